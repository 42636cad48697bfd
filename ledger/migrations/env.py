"""Alembic environment: migrations run synchronously, as the schema owner.

The URL comes from the caller (`paysaga.migrate`, which passes it in the config's
attributes) or, when Alembic's own CLI runs this, from the settings.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from paysaga.db import database_urls, to_sqlalchemy_url
from paysaga.settings import get_settings

config = context.config


def _owner_url() -> str:
    url = config.attributes.get("url")
    if url is None:
        url = database_urls(get_settings()).owner_url
    return str(url)


def run_migrations_online() -> None:
    engine = create_engine(to_sqlalchemy_url(_owner_url()), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("paysaga migrations run online only; use `paysaga db upgrade`")
run_migrations_online()
