"""The event feed for downstream consumers: every ledger event, in global order.

Sequence numbers are taken inside the appending transaction, so a transaction that
took a lower number can commit after one that took a higher number. A consumer that
jumped past the gap would never see the late event. The feed therefore hands out only
a gap-free run of numbers; a gap is awaited until `GAP_GRACE_S` after the event that
follows it was recorded (an append commits within milliseconds of taking its
number), after which the number is taken to belong to an append that rolled back.
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
GAP_GRACE_S = 2.0


@router.get("", response_model=EventFeed)
async def event_feed(
    store: StoreDep,
    key: FeedKey,
    after_seq: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=FEED_LIMIT_MAX)] = FEED_LIMIT_DEFAULT,
) -> EventFeed:
    """Events after `after_seq`, oldest first; pass `next_after_seq` back to continue."""
    events = await store.read_range(after_seq=after_seq, limit=limit)
    if not events:
        return EventFeed(events=[], next_after_seq=after_seq)
    horizon = await store.clock_minus(GAP_GRACE_S)
    handed_out = []
    expected = after_seq + 1
    for event in events:
        # A gap before this event may still fill, unless it is older than the grace.
        if event.global_seq != expected and event.recorded_at > horizon:
            break
        handed_out.append(event)
        expected = event.global_seq + 1
    next_after = handed_out[-1].global_seq if handed_out else after_seq
    return EventFeed(events=[event_out(e) for e in handed_out], next_after_seq=next_after)
