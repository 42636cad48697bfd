"""The hash chain: how an event's hash is computed, in one place for writer and verifier.

    content = SHA-256(canonical JSON of stream_id, event_id, event_type, schema_version,
                      payload, actor, correlation_id, causation_id, attempt)
    hash    = SHA-256(prev_hash ‖ content ‖ int64be(global_seq)
                      ‖ int64be(stream_version) ‖ int64be(recorded_at in µs since epoch))

The chain is **per stream**: `prev_hash` is the hash of the previous event in the same
stream (32 zero bytes for the first). Why per stream and not global: a global chain
would make every append in the system wait on one lock, held until commit, so total
throughput would be one commit at a time; per stream, appends serialise only where
they must anyway (the stream's own lock), and the chain stays correct under any
number of concurrent transactions, because each stream's appends are already
serialised by that lock. What it protects: any change to a stored event breaks that
event's hash, and any removal or reordering inside a stream breaks its successor's
`prev_hash`. What a per-stream chain cannot show by itself, the removal of a whole
stream, `ledger check` catches as positions and stream heads that no longer match the
events.

The writer computes `content` in Python (canonical JSON is Python's to define) and the
database function adds the fields it assigns (sequence, version, time) under the lock.
The verifier recomputes both halves in Python, independently of the database function.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

GENESIS_HASH = bytes(32)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8. Stable across a round trip through JSONB."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_digest(
    *,
    stream_id: str,
    event_id: uuid.UUID,
    event_type: str,
    schema_version: int,
    payload: dict[str, Any],
    actor: str,
    correlation_id: str | None,
    causation_id: str | None,
    attempt: int | None,
) -> bytes:
    return hashlib.sha256(
        canonical_json(
            {
                "stream_id": stream_id,
                "event_id": str(event_id),
                "event_type": event_type,
                "schema_version": schema_version,
                "payload": payload,
                "actor": actor,
                "correlation_id": correlation_id,
                "causation_id": causation_id,
                "attempt": attempt,
            }
        )
    ).digest()


def epoch_us(moment: datetime) -> int:
    """Microseconds since the Unix epoch, exactly (integer arithmetic, no floats)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def chain_hash(
    prev_hash: bytes, content: bytes, *, global_seq: int, stream_version: int, recorded_at: datetime
) -> bytes:
    return hashlib.sha256(
        prev_hash
        + content
        + global_seq.to_bytes(8, "big", signed=True)
        + stream_version.to_bytes(8, "big", signed=True)
        + epoch_us(recorded_at).to_bytes(8, "big", signed=True)
    ).digest()
