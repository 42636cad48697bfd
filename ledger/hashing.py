"""The hash chain: how an event's hash is computed, in one place for writer and verifier.

    hash = SHA-256(prev_hash ‖ content ‖ int64be(global_seq)
                   ‖ int64be(stream_version) ‖ int64be(recorded_at in µs since epoch))

`content` is a digest of the event's envelope (stream_id, event_id, event_type,
schema_version, payload, actor, correlation_id, causation_id, attempt). Two schemes
exist, recorded per event in `hash_scheme`; stored events are never rewritten, so both
stay verifiable:

1. (revision 0002) SHA-256 of the envelope as canonical JSON (sorted keys, no
   whitespace), computed by the writer in Python and handed to the database. The
   database could not check it, so a caller could store a hash its event did not earn.
2. (revision 0005) computed by the database function itself from the values it
   stores: SHA-256 of the envelope's fields in a fixed order, each text prefixed by
   its length in bytes (-1 for NULL), the event id as its 16 bytes, integers as
   4-byte big-endian, and the payload as PostgreSQL prints it as jsonb. The verifier
   reproduces that text here (`jsonb_text`), independently of the database.

The chain is **per stream**: `prev_hash` is the hash of the previous event in the same
stream (32 zero bytes for the first). Why per stream and not global: a global chain
would make every append in the system wait on one lock, held until commit, so total
throughput would be one commit at a time; per stream, appends serialise only where
they must anyway (the stream's own lock). What it protects: any change to a stored
event breaks that event's hash, and any removal or reordering inside a stream breaks
its successor's `prev_hash`. What a per-stream chain cannot show, the removal of a
whole stream or of a stream's last events, the seal shows: blocks that chain every
event in global order (`ledger_blocks`, `ledger verify`).
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
    scheme: int,
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
    """The envelope's digest under hash scheme 1 or 2 (see the module docstring)."""
    envelope = {
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
    if scheme == 1:
        return hashlib.sha256(canonical_json(envelope)).digest()
    if scheme == 2:
        digest = hashlib.sha256()
        digest.update(_field(stream_id))
        digest.update(event_id.bytes)
        digest.update(_field(event_type))
        digest.update(schema_version.to_bytes(4, "big", signed=True))
        digest.update(_field(jsonb_text(payload)))
        digest.update(_field(actor))
        digest.update(_field(correlation_id))
        digest.update(_field(causation_id))
        digest.update((-1 if attempt is None else attempt).to_bytes(4, "big", signed=True))
        return digest.digest()
    raise ValueError(f"unknown hash scheme {scheme}")


def _field(text: str | None) -> bytes:
    """A text, prefixed by its length in bytes; NULL as the length -1."""
    if text is None:
        return (-1).to_bytes(4, "big", signed=True)
    encoded = text.encode()
    return len(encoded).to_bytes(4, "big", signed=True) + encoded


def jsonb_text(value: Any) -> str:
    """The text PostgreSQL prints for `value` as jsonb (`value::jsonb::text`).

    Object keys are ordered by their length in bytes, then bytewise; separators are
    ", " and ": "; strings are escaped as JSON with non-ASCII characters kept, as
    Python's json module does. Only JSON's integers are numbers here: the ledger
    refuses fractions, so their printing never has to match numeric's.
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        return "{" + ", ".join(f"{jsonb_text(k)}: {jsonb_text(value[k])}" for k in keys) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(jsonb_text(item) for item in value) + "]"
    raise ValueError(f"no jsonb text for {type(value).__name__} {value!r}")


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
