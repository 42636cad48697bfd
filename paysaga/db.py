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

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ledger.db import create_reader_engine, to_sqlalchemy_url
from ledger.store import EventStore
from paysaga.settings import Settings


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
    """An async engine that acts as the application role (see `ledger.db`)."""
    return create_reader_engine(
        urls.app_login_url,
        connect_args=urls.app_connect_args(),
        pool_size=pool_size,
        pool_overflow_max=pool_overflow_max,
    )


def create_owner_engine(urls: DatabaseUrls) -> AsyncEngine:
    """An async engine that acts as the schema owner (administrative commands, tests)."""
    return create_async_engine(to_sqlalchemy_url(urls.owner_url), pool_size=2, max_overflow=2)


async def open_store(
    urls: DatabaseUrls, *, pool_size: int = 10, engine: AsyncEngine | None = None
) -> EventStore:
    """The event store, acting as the application role. Close it when done."""
    return await EventStore.open(
        urls.app_login_url,
        connect_args=urls.app_connect_args(),
        pool_size=pool_size,
        engine=engine,
    )
