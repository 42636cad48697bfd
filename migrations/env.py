"""Alembic environment: migrations run synchronously, as the schema owner.

It imports nothing from the product. `paysaga.migrate` passes the owner's URL and the
application role in the config's attributes. Alembic's own CLI (`alembic upgrade head`
from the repository root) takes them from `DATABASE_URL` and `PAYSAGA_DB_APP_ROLE`
(default `paysaga_app`), or from `-x url=... -x app_role=...`.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, make_url, pool

config = context.config
DEFAULT_APP_ROLE = "paysaga_app"


def _owner_url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    url = url or os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("no database URL: set DATABASE_URL or pass -x url=postgresql://...")
    return str(url)


def _app_role() -> str:
    role = config.attributes.get("app_role")
    role = role or context.get_x_argument(as_dictionary=True).get("app_role")
    return str(role or os.environ.get("PAYSAGA_DB_APP_ROLE") or DEFAULT_APP_ROLE)


def run_migrations_online() -> None:
    config.attributes["app_role"] = _app_role()
    url = make_url(_owner_url()).set(drivername="postgresql+psycopg")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("paysaga migrations run online only; use `paysaga db upgrade`")
run_migrations_online()
