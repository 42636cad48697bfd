"""The sealer: chains the log into blocks, up to the safe horizon, every few seconds.

Each step is one call of `ledger_seal` (migrations/sql/0005_ledger_seal.sql), which
proves the horizon itself and trusts its caller for nothing but a block size. Several
sealers may run at once: they queue on the blocks table's lock and never seal an event
twice. An event is sealed within two intervals of its commit, plus however long a
transaction open elsewhere in the database holds the horizon back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ledger.store import Block, EventStore

log = logging.getLogger("paysaga.sealer")

SEAL_INTERVAL_S_DEFAULT = 2.0
BACKOFF_S_MAX = 30.0


async def seal_all(store: EventStore, *, events_max: int = 10_000) -> list[Block]:
    """Seal everything the horizon allows now, in as many blocks as it takes."""
    blocks = []
    while (block := await store.seal(events_max=events_max)) is not None:
        blocks.append(block)
    return blocks


async def run_sealer(
    store: EventStore, stop: asyncio.Event, *, interval_s: float = SEAL_INTERVAL_S_DEFAULT
) -> None:
    """Seal until `stop` is set. A failing database is retried with a doubling backoff."""
    backoff_s = interval_s
    while not stop.is_set():
        try:
            for block in await seal_all(store):
                log.info(
                    "sealed block",
                    extra={
                        "block_no": block.block_no,
                        "last_seq": block.last_seq,
                        "events": block.event_count,
                    },
                )
            backoff_s = interval_s
        except Exception as error:  # the database may be restarting: keep trying
            log.warning("sealing failed; retrying", extra={"error": str(error)})
            backoff_s = min(backoff_s * 2, BACKOFF_S_MAX)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff_s)
