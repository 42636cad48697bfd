"""The projector: keeps the read models current, below the safe horizon, in batches.

For each read model, one batch is one transaction that locks the model's checkpoint
row, applies the events after it up to a bound (set-based SQL, `ledger/projections/`),
and moves the checkpoint: a crash anywhere in a batch rolls all of it back, so no event
is lost or applied twice. A batch never reads past the safe horizon, so an event that
commits late, below events already visible, is still applied, in order.

Several projectors may run at once: a batch takes its checkpoint's row lock with SKIP
LOCKED, so a second projector skips a read model the first is applying and never
applies the same events. `paysaga replay` swaps a rebuilt model in under the same lock.

The projector wakes on `LISTEN paysaga_events`: the event store notifies after its
appends, outside their transactions (ledger/store.py says why). It polls every `poll_s`
anyway, for appends made some other way and notifications lost with a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from ledger.projections.base import LIVE_SCHEMA, Apply, Projection, statement
from ledger.store import NOTIFY_CHANNEL, EventStore

log = logging.getLogger("paysaga.projector")

BATCH_EVENTS_MAX = 5_000
POLL_S_DEFAULT = 1.0
BACKOFF_S_MAX = 30.0

_BATCH_END = """
SELECT count(*) AS n, max(global_seq) AS last_seq FROM (
    SELECT global_seq FROM events
     WHERE global_seq > %(after)s AND global_seq <= %(until)s
     ORDER BY global_seq LIMIT %(limit)s) AS batch
"""
_LOCK_CHECKPOINT = "SELECT last_seq FROM {s}.checkpoints WHERE projection = %(name)s FOR UPDATE"
_MOVE_CHECKPOINT = """
UPDATE {s}.checkpoints
   SET last_seq = %(upto)s, events_applied = events_applied + %(n)s,
       updated_at = clock_timestamp()
 WHERE projection = %(name)s
"""


@dataclass(frozen=True)
class Batch:
    after: int
    upto: int
    events: int


@dataclass(frozen=True)
class Lag:
    """How far a read model trails the log: in events (sequence numbers) and seconds."""

    projection: str
    last_seq: int
    events: int
    seconds: float
    updated_at: datetime


async def apply_batch(
    conn: psycopg.AsyncConnection[Any],
    projection: Projection,
    *,
    until: int,
    events_max: int = BATCH_EVENTS_MAX,
    schema: str = LIVE_SCHEMA,
    wait: bool = False,
    apply: Apply | None = None,
) -> Batch | None:
    """Apply the next batch (at most `events_max` events, none past `until`) in one
    transaction with the checkpoint, through `apply` (by default the projection's own).
    None: another projector holds this model now (`wait=False`), or the model has no
    checkpoint in `schema`."""
    lock = _LOCK_CHECKPOINT + ("" if wait else " SKIP LOCKED")
    async with conn.transaction():
        cursor = await conn.execute(statement(lock, schema), {"name": projection.name})
        row = await cursor.fetchone()
        if row is None:
            return None
        after = int(row[0])
        if after >= until:
            return Batch(after, after, 0)
        cursor = await conn.execute(
            _BATCH_END, {"after": after, "until": until, "limit": events_max}
        )
        n, last_seq = await cursor.fetchone() or (0, None)
        upto = until if n < events_max or last_seq is None else int(last_seq)
        await (apply or projection.apply)(conn, schema, after, upto)
        await conn.execute(
            statement(_MOVE_CHECKPOINT, schema), {"upto": upto, "n": n, "name": projection.name}
        )
    return Batch(after, upto, int(n))


async def catch_up(
    conn: psycopg.AsyncConnection[Any],
    projection: Projection,
    *,
    until: int,
    events_max: int = BATCH_EVENTS_MAX,
    schema: str = LIVE_SCHEMA,
    on_batch: Callable[[Batch], None] | None = None,
    apply: Apply | None = None,
) -> int:
    """Apply batches until the model reaches `until`; the events applied. Stops early,
    without waiting, when another projector holds the model."""
    applied = 0
    while True:
        batch = await apply_batch(
            conn, projection, until=until, events_max=events_max, schema=schema, apply=apply
        )
        if batch is None:
            return applied
        applied += batch.events
        if on_batch is not None and batch.upto > batch.after:
            on_batch(batch)
        if batch.upto >= until:
            return applied


class Projector:
    """Runs a set of projections against the live read models until stopped."""

    def __init__(
        self,
        store: EventStore,
        conninfo: str,
        projections: Sequence[Projection],
        *,
        connect_kwargs: dict[str, Any] | None = None,
        events_max: int = BATCH_EVENTS_MAX,
        poll_s: float = POLL_S_DEFAULT,
    ) -> None:
        self.store = store
        self.conninfo = conninfo
        self.projections = list(projections)
        self.connect_kwargs = dict(connect_kwargs or {})
        self.events_max = events_max
        self.poll_s = poll_s

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        # Autocommit: every batch is an explicit transaction, and nothing else may hold
        # one open (it would hold the safe horizon back for every reader).
        return await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, **self.connect_kwargs
        )

    async def run_once(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Bring every projection up to the safe horizon as it is now; events applied."""
        horizon = await self.store.safe_horizon()
        applied = 0
        for projection in self.projections:
            applied += await catch_up(
                conn, projection, until=horizon.safe_seq, events_max=self.events_max
            )
        return applied

    async def run(
        self, stop: asyncio.Event, *, on_pass: Callable[[int], Awaitable[None]] | None = None
    ) -> None:
        """Project until `stop` is set. A failing database is retried with a backoff."""
        backoff_s = self.poll_s
        while not stop.is_set():
            try:
                await self._run_connected(stop, on_pass)
            except (psycopg.OperationalError, OSError) as error:
                log.warning("projector lost the database; retrying", extra={"error": str(error)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_S_MAX)

    async def _run_connected(
        self, stop: asyncio.Event, on_pass: Callable[[int], Awaitable[None]] | None
    ) -> None:
        conn = await self._connect()
        listener = await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, **self.connect_kwargs
        )
        try:
            await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
            log.info("projector running", extra={"projections": [p.name for p in self.projections]})
            while not stop.is_set():
                applied = await self.run_once(conn)
                if on_pass is not None:
                    await on_pass(applied)
                if applied:
                    continue  # more may have arrived while this pass ran
                await self._wait(listener, stop)
        finally:
            await listener.close()
            await conn.close()

    async def _wait(self, listener: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        """Until a notification, `stop`, or `poll_s` has passed."""

        async def notified() -> None:
            async for _ in listener.notifies(timeout=self.poll_s, stop_after=1):
                return

        waiters = [asyncio.ensure_future(notified()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError, psycopg.Error):
                await asyncio.gather(*waiters, return_exceptions=True)
