"""The read side in tests: run the projector's passes for real, against the test's DB."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from ledger.db import to_libpq_url
from ledger.projections import READ_MODELS, Projection
from ledger.projector import Projector
from ledger.store import EventStore
from tests.harness.postgres import IsolatedDatabase


async def connect_app(database: IsolatedDatabase) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        to_libpq_url(database.urls.app_url), autocommit=True
    )


async def connect_owner(database: IsolatedDatabase) -> psycopg.AsyncConnection[Any]:
    """As `paysaga replay` connects: the schema owner, in autocommit mode."""
    return await psycopg.AsyncConnection.connect(
        to_libpq_url(database.urls.owner_url), autocommit=True
    )


def projector(
    store: EventStore,
    database: IsolatedDatabase,
    projections: Sequence[Projection] | None = None,
    **options: Any,
) -> Projector:
    return Projector(
        store,
        to_libpq_url(database.urls.app_url),
        list(READ_MODELS.values()) if projections is None else projections,
        **options,
    )


async def project(
    store: EventStore, database: IsolatedDatabase, projections: Sequence[Projection] | None = None
) -> int:
    """Bring the read models up to every event appended so far; the events applied."""
    runner = projector(store, database, projections)
    conn = await connect_app(database)
    try:
        return await runner.run_once(conn)
    finally:
        await conn.close()
