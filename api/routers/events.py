"""The event feed for downstream consumers: every ledger event, in global order.

Sequence numbers are taken inside the appending transaction, so a transaction that
took a lower number can commit after one that took a higher number. A consumer that
jumped past the gap would never see the late event. The feed therefore hands out
events only up to the ledger's safe horizon (`EventStore.safe_horizon`): no event at
or below it can still appear, so `next_after_seq` never skips one. A transaction
left open anywhere in the database holds the horizon back until it ends.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import FeedKey, StoreDep
from api.models import EventFeed
from api.problems import COMMON_RESPONSES
from api.routers.payments import event_out

router = APIRouter(prefix="/v1/events", tags=["events"], responses=COMMON_RESPONSES)

FEED_LIMIT_MAX = 1000
FEED_LIMIT_DEFAULT = 100


@router.get("", response_model=EventFeed)
async def event_feed(
    store: StoreDep,
    key: FeedKey,
    after_seq: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=FEED_LIMIT_MAX)] = FEED_LIMIT_DEFAULT,
) -> EventFeed:
    """Events after `after_seq`, oldest first; pass `next_after_seq` back to continue.

    `safe_seq` is the horizon the page was read under: every event at or below it has
    been handed out by now, to whoever asked.
    """
    horizon = await store.safe_horizon()
    events = await store.read_range(after_seq=after_seq, limit=limit, up_to=horizon.safe_seq)
    next_after = events[-1].global_seq if events else max(after_seq, 0)
    if len(events) < limit and horizon.safe_seq > next_after:
        # Nothing more exists up to the horizon (the numbers between rolled back).
        next_after = horizon.safe_seq
    return EventFeed(
        events=[event_out(e) for e in events],
        next_after_seq=next_after,
        safe_seq=horizon.safe_seq,
    )
