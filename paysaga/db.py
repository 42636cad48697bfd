"""Database connections: which URL each role uses, and the engines built from them.

Two roles touch the database:

- the **owner** runs migrations and the administrative CLI (`DATABASE_URL`);
- the **application role** is what the worker, the API and the projector act as.
  It holds only INSERT and SELECT on the ledger, so a bug in a service cannot
  rewrite history even if it tried.

When `DATABASE_APP_URL` is unset, services log in with `DATABASE_URL` and take on the
application role at session start (libpq `options=-c role=...`). That keeps a single
URL working against any server whose login can act as the application role, such as
a superuser on a development machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from paysaga.settings import Settings

SQLALCHEMY_DRIVER = "postgresql+psycopg"


def to_sqlalchemy_url(url: str | URL) -> URL:
    """The same database, addressed through SQLAlchemy's psycopg 3 dialect."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"paysaga needs PostgreSQL, not {parsed.get_backend_name()!r}")
    return parsed.set(drivername=SQLALCHEMY_DRIVER)


def to_libpq_url(url: str | URL) -> str:
    """The same database as a plain libpq URL, for psycopg and the PostgreSQL tools."""
    parsed = make_url(url) if isinstance(url, str) else url
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def with_database(url: str | URL, database: str) -> URL:
    """The same server and credentials, pointed at another database."""
    parsed = make_url(url) if isinstance(url, str) else url
    return parsed.set(database=database)


@dataclass(frozen=True)
class DatabaseUrls:
    """Where the owner and the application role connect."""

    owner_url: str
    app_url: str | None
    app_role: str

    def app_connect_args(self) -> dict[str, Any]:
        """Extra libpq arguments for application connections."""
        if self.app_url is not None:
            return {}
        # Without a login of its own, the service acts as the application role for the
        # whole session. `role` set at startup survives ROLLBACK and RESET ROLE.
        return {"options": f"-c role={self.app_role}"}

    @property
    def app_login_url(self) -> str:
        return self.app_url or self.owner_url


def database_urls(settings: Settings) -> DatabaseUrls:
    """The URLs for the configured server: external if `DATABASE_URL` is set, else embedded."""
    if settings.database_url is not None:
        return DatabaseUrls(
            owner_url=settings.database_url,
            app_url=settings.database_app_url,
            app_role=settings.db_app_role,
        )
    # Imported here so that services pointed at an external server never load it.
    from paysaga.embedded_pg import EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.data_path / "pg", app_role=settings.db_app_role)
    return DatabaseUrls(
        owner_url=embedded.owner_url(),
        app_url=embedded.app_url(),
        app_role=settings.db_app_role,
    )


def create_app_engine(
    urls: DatabaseUrls, *, pool_size: int = 10, pool_overflow_max: int = 10
) -> AsyncEngine:
    """An async engine that acts as the application role.

    In autocommit mode: everything the services run through it is a single statement,
    and an implicit BEGIN ... ROLLBACK around each would triple its round trips. Work
    that needs a transaction (the ledger walks) asks for one explicitly. No pre-ping
    either (another round trip per checkout): a connection lost to a database restart
    fails one statement, the pool is then invalidated, and the API answers that
    request with a 503 to retry.
    """
    return create_async_engine(
        to_sqlalchemy_url(urls.app_login_url),
        pool_size=pool_size,
        max_overflow=pool_overflow_max,
        isolation_level="AUTOCOMMIT",
        connect_args=urls.app_connect_args(),
    )


def create_owner_engine(urls: DatabaseUrls) -> AsyncEngine:
    """An async engine that acts as the schema owner (administrative commands, tests)."""
    return create_async_engine(to_sqlalchemy_url(urls.owner_url), pool_size=2, max_overflow=2)
