"""Connections to the ledger's database: URL forms, and the engine services read through.

The ledger knows nothing of the product's settings: callers hand it a URL (and, at
most, extra libpq arguments). Which URL a service uses is the product's business
(`paysaga/db.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

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


def create_reader_engine(
    url: str,
    *,
    connect_args: Mapping[str, Any] | None = None,
    pool_size: int = 10,
    pool_overflow_max: int = 10,
) -> AsyncEngine:
    """An async engine for the services' reads.

    In autocommit mode: everything the services run through it is a single statement,
    and an implicit BEGIN ... ROLLBACK around each would triple its round trips. Work
    that needs a transaction (the ledger walks) asks for one explicitly. No pre-ping
    either (another round trip per checkout): a connection lost to a database restart
    fails one statement, the pool is then invalidated, and the caller retries.
    """
    return create_async_engine(
        to_sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_overflow_max,
        isolation_level="AUTOCOMMIT",
        connect_args=dict(connect_args or {}),
    )
