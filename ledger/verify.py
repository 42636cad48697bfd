"""`ledger verify` and `ledger check`: prove the ledger against itself.

- **verify** walks every event in global order and recomputes its hash in Python,
  independently of the database function that wrote it (ledger/hashing.py): a changed
  payload, a removed or reordered event breaks a stream's chain at a named
  `global_seq`. It checks that each stream head points at its stream's last event.
  Then the seal: every block's hash is recomputed from its own list and from the
  events that are in its range now, so a sealed event that was deleted, inserted or
  rewritten, or a whole stream that was removed, is named. Given a digest kept
  outside the database (`ledger digest`), it proves the log still extends it.
- **check** parses every event against the catalog, folds it into positions
  (ledger/fold.py), replays every stream through the state machine, then compares
  with the stored positions and stream heads, and checks the zero-sum rule per
  currency.

Both read in batches, so memory grows with the number of streams and accounts (and
one block), not events, and both report the first bad `global_seq`. Neither crashes
on malformed data: a row they cannot read is a violation, named like any other. Each
runs in one REPEATABLE READ transaction, so a ledger that keeps taking payments
meanwhile is judged on one consistent snapshot.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.errors import LedgerError
from ledger.events import parse_event
from ledger.fold import LedgerFold, zero_sum_violations
from ledger.hashing import GENESIS_HASH, chain_hash, content_digest
from ledger.projections.check import ReadModelCheck
from ledger.state_machine import REPEATABLE_EVENT_TYPES

BATCH_SIZE = 5000
BLOCK_BATCH_SIZE = 20
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Violation:
    rule: str
    message: str
    global_seq: int | None = None
    stream_id: str | None = None


@dataclass(frozen=True)
class SealPoint:
    """A sealed block verified once, from which a later verification may start."""

    block_no: int
    last_seq: int
    hash: bytes


@dataclass(frozen=True)
class Digest:
    """The latest block's end and hash: a root to keep outside the database."""

    last_seq: int
    hash: bytes

    def __str__(self) -> str:
        return f"{self.last_seq}:{self.hash.hex()}"

    @classmethod
    def parse(cls, raw: str) -> Digest:
        """`<global_seq>:<64 hex digits>`, as `ledger digest` prints it."""
        seq, _, digest = raw.strip().partition(":")
        try:
            last_seq, value = int(seq), bytes.fromhex(digest)
        except ValueError:
            raise ValueError(f"a digest reads <global_seq>:<sha-256 in hex>, not {raw!r}") from None
        if last_seq < 1 or len(value) != 32:
            raise ValueError(f"a digest reads <global_seq>:<sha-256 in hex>, not {raw!r}")
        return cls(last_seq, value)


@dataclass
class Report:
    name: str
    events: int = 0
    streams: int = 0
    accounts: int = 0
    blocks: int = 0
    unsealed: int = 0
    read_models: int = 0
    violations: list[Violation] = field(default_factory=list)
    # The newest block walked, where a later `verify_seal_since` may start.
    seal_point: SealPoint | None = None

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def first_bad_seq(self) -> int | None:
        seqs = [v.global_seq for v in self.violations if v.global_seq is not None]
        return min(seqs) if seqs else None

    def add(
        self, rule: str, message: str, *, seq: int | None = None, stream: str | None = None
    ) -> None:
        self.violations.append(Violation(rule, message, seq, stream))

    def lines(self, *, violations_shown_max: int = 20) -> list[str]:
        scope = f"{self.events} events in {self.streams} streams"
        if self.accounts:
            scope += f", {self.accounts} accounts"
        if self.read_models:
            scope += f", {self.read_models} read models"
        if self.name == "verify":
            scope += f", {self.blocks} sealed blocks, {self.unsealed} events not sealed yet"
        if self.ok:
            return [f"ledger {self.name}: OK ({scope})"]
        lines = [f"ledger {self.name}: FAILED, {len(self.violations)} violation(s) ({scope})"]
        if self.first_bad_seq is not None:
            lines.append(f"first bad global_seq: {self.first_bad_seq}")
        ordered = sorted(self.violations, key=lambda v: (v.global_seq is None, v.global_seq or 0))
        for v in ordered[:violations_shown_max]:
            where = f"global_seq {v.global_seq}" if v.global_seq is not None else "-"
            lines.append(f"  [{v.rule}] {where}: {v.message}")
        if len(ordered) > violations_shown_max:
            lines.append(f"  ... and {len(ordered) - violations_shown_max} more")
        return lines


async def count_events(engine: AsyncEngine) -> int:
    """For the progress bar's total (an estimate if appends continue meanwhile)."""
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM events"))).scalar_one())


async def latest_digest(engine: AsyncEngine) -> Digest | None:
    """The newest block's digest, or None if nothing is sealed yet."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT last_seq, hash FROM ledger_blocks ORDER BY block_no DESC LIMIT 1")
            )
        ).one_or_none()
    return None if row is None else Digest(row.last_seq, bytes(row.hash))


@asynccontextmanager
async def _snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            yield conn


_EVENT_COLUMNS = (
    "e.global_seq, e.stream_id, e.stream_version, e.event_id, e.event_type, "
    "e.schema_version, e.payload, e.actor, e.correlation_id, e.causation_id, e.attempt, "
    "e.recorded_at, e.prev_hash, e.hash, e.hash_scheme"
)
# Each event with its stream predecessor's version and hash (one unique-index seek), for
# a walk that starts in the middle of the log.
_EVENTS_LINKED = text(
    f"SELECT {_EVENT_COLUMNS}, p.stream_version AS link_version, p.hash AS link_hash "
    "FROM events e LEFT JOIN events p "
    "ON p.stream_id = e.stream_id AND p.stream_version = e.stream_version - 1 "
    "WHERE e.global_seq > :after AND e.global_seq <= :upto ORDER BY e.global_seq LIMIT :limit"
)


async def _events(
    conn: AsyncConnection, after: int = 0, upto: int | None = None
) -> AsyncIterator[Any]:
    query = (
        text(
            f"SELECT {_EVENT_COLUMNS} FROM events e "
            "WHERE e.global_seq > :after ORDER BY e.global_seq LIMIT :limit"
        )
        if upto is None
        else _EVENTS_LINKED
    )
    while True:
        rows = (
            await conn.execute(query, {"after": after, "upto": upto, "limit": BATCH_SIZE})
        ).all()
        if not rows:
            return
        for row in rows:
            yield row
        after = rows[-1].global_seq


async def _blocks(conn: AsyncConnection, after: int = 0) -> AsyncIterator[Any]:
    while True:
        rows = (
            await conn.execute(
                text(
                    "SELECT block_no, first_seq, last_seq, seqs, stream_ids, event_hashes, "
                    "prev_hash, hash FROM ledger_blocks WHERE block_no > :after "
                    "ORDER BY block_no LIMIT :limit"
                ),
                {"after": after, "limit": BLOCK_BATCH_SIZE},
            )
        ).all()
        if not rows:
            return
        for row in rows:
            yield row
        after = rows[-1].block_no


async def _stream_heads(conn: AsyncConnection) -> dict[str, Any]:
    rows = await conn.execute(text("SELECT stream_id, version, state, last_hash FROM streams"))
    return {row.stream_id: row for row in rows}


def block_hash(
    prev_hash: bytes, first_seq: int, last_seq: int, events: list[tuple[int, bytes]]
) -> bytes:
    """A block's hash, as ledger_seal computes it (migrations/sql/0005_ledger_seal.sql)."""
    digest = hashlib.sha256(prev_hash)
    digest.update(first_seq.to_bytes(8, "big", signed=True))
    digest.update(last_seq.to_bytes(8, "big", signed=True))
    for seq, event_hash in sorted(events):
        digest.update(seq.to_bytes(8, "big", signed=True))
        digest.update(event_hash)
    return digest.digest()


def _event_hash(row: Any) -> bytes:
    """The hash an event earns from its stored fields, under its hash scheme."""
    content = content_digest(
        scheme=row.hash_scheme,
        stream_id=row.stream_id,
        event_id=row.event_id,
        event_type=row.event_type,
        schema_version=row.schema_version,
        payload=row.payload,
        actor=row.actor,
        correlation_id=row.correlation_id,
        causation_id=row.causation_id,
        attempt=row.attempt,
    )
    return chain_hash(
        bytes(row.prev_hash),
        content,
        global_seq=row.global_seq,
        stream_version=row.stream_version,
        recorded_at=row.recorded_at,
    )


class _Seal:
    """Walks the blocks alongside the events, one block in memory at a time."""

    def __init__(
        self,
        report: Report,
        blocks: AsyncIterator[Any],
        digest: Digest | None,
        since: SealPoint | None = None,
    ) -> None:
        self.report = report
        self.blocks = blocks
        self.digest = digest
        self.digest_seen = False
        self.block: Any = None
        self.present: dict[int, tuple[str, bytes]] = {}
        self.stored_prev = GENESIS_HASH if since is None else since.hash
        self.actual_prev = self.stored_prev
        self.last_seq = 0 if since is None else since.last_seq
        report.blocks = 0 if since is None else since.block_no
        self.missing: dict[str, list[int]] = defaultdict(list)

    async def _next_block(self) -> None:
        self.block = await anext(self.blocks, None)
        self.present = {}

    async def start(self) -> None:
        await self._next_block()

    async def see(self, seq: int, stream_id: str, event_hash: bytes) -> None:
        while self.block is not None and seq > self.block.last_seq:
            self._close_block()
            await self._next_block()
        if self.block is not None and seq >= self.block.first_seq:
            self.present[seq] = (stream_id, event_hash)
        else:
            # After the last block, or in a range no block covers (which the
            # block-link check reports).
            self.report.unsealed += 1

    async def finish(self, streams_left: set[str]) -> None:
        while self.block is not None:
            self._close_block()
            await self._next_block()
        for stream_id, seqs in self.missing.items():
            if stream_id not in streams_left:
                self.report.add(
                    "removed-stream",
                    f"{stream_id} was removed: all {len(seqs)} of its sealed events are gone "
                    f"(global_seq {', '.join(map(str, seqs[:10]))})",
                    seq=seqs[0],
                    stream=stream_id,
                )
        if self.digest is not None and not self.digest_seen:
            self.report.add(
                "digest",
                f"no block ends at global_seq {self.digest.last_seq}: the log does not extend "
                f"the digest {self.digest} (its blocks were removed or rewritten)",
                seq=self.digest.last_seq,
            )

    def _close_block(self) -> None:
        block, report = self.block, self.report
        report.blocks += 1
        number = block.block_no
        if number != report.blocks:
            report.add("block-order", f"block {number} found where block {report.blocks} belongs")
        if block.first_seq != self.last_seq + 1 or bytes(block.prev_hash) != self.stored_prev:
            report.add(
                "block-link",
                f"block {number} does not follow block {number - 1}: a block was removed, "
                "inserted or changed",
                seq=block.first_seq,
            )
        sealed = {
            int(seq): (str(stream), bytes(event_hash))
            for seq, stream, event_hash in zip(
                block.seqs, block.stream_ids, block.event_hashes, strict=False
            )
        }
        listed = [(seq, event_hash) for seq, (_, event_hash) in sealed.items()]
        if block_hash(self.stored_prev, block.first_seq, block.last_seq, listed) != bytes(
            block.hash
        ):
            report.add(
                "block-hash",
                f"block {number} does not hash to its stored hash: the block was changed",
                seq=block.first_seq,
            )
        for seq, (stream_id, _) in sorted(sealed.items()):
            if seq not in self.present:
                self.missing[stream_id].append(seq)
                report.add(
                    "deleted-event",
                    f"the event at global_seq {seq} in {stream_id}, sealed in block {number}, "
                    "is missing: it was deleted",
                    seq=seq,
                    stream=stream_id,
                )
        for seq, (stream_id, event_hash) in sorted(self.present.items()):
            if seq not in sealed:
                report.add(
                    "inserted-event",
                    f"the event at global_seq {seq} in {stream_id} lies in sealed block "
                    f"{number}'s range but was not sealed in it: it was inserted afterwards",
                    seq=seq,
                    stream=stream_id,
                )
            elif sealed[seq][1] != event_hash:
                report.add(
                    "rewritten-event",
                    f"the event at global_seq {seq} in {stream_id} does not carry the hash "
                    f"sealed in block {number}: it was rewritten",
                    seq=seq,
                    stream=stream_id,
                )
        actual = [(seq, event_hash) for seq, (_, event_hash) in self.present.items()]
        self.actual_prev = block_hash(self.actual_prev, block.first_seq, block.last_seq, actual)
        if self.digest is not None and block.last_seq == self.digest.last_seq:
            self.digest_seen = True
            if self.actual_prev != self.digest.hash:
                report.add(
                    "digest",
                    f"the log up to global_seq {self.digest.last_seq} no longer hashes to the "
                    f"digest {self.digest}: sealed history was changed since it was taken",
                    seq=self.digest.last_seq,
                )
        self.stored_prev = bytes(block.hash)
        self.last_seq = block.last_seq
        report.seal_point = SealPoint(int(number), int(block.last_seq), bytes(block.hash))


async def verify_chain(
    engine: AsyncEngine, progress: Progress | None = None, *, digest: Digest | None = None
) -> Report:
    """Recompute every hash, every link of every stream's chain, and every sealed block."""
    async with _snapshot(engine) as conn:
        return await _verify_chain(conn, progress, digest)


async def _verify_chain(
    conn: AsyncConnection, progress: Progress | None, digest: Digest | None
) -> Report:
    report = Report("verify")
    last: dict[str, tuple[int, bytes, int]] = {}  # stream -> (version, hash, global_seq)
    seal = _Seal(report, _blocks(conn), digest)
    await seal.start()
    async for row in _events(conn):
        report.events += 1
        await seal.see(row.global_seq, row.stream_id, bytes(row.hash))
        _verify_event(report, row, last)
        last[row.stream_id] = (row.stream_version, bytes(row.hash), row.global_seq)
        if progress is not None:
            progress(1)
    report.streams = len(last)
    await seal.finish(set(last))
    heads = await _stream_heads(conn)
    for stream_id, head in heads.items():
        tail = last.get(stream_id)
        if tail is None:
            if head.version > 0:
                report.add(
                    "missing-stream",
                    f"{stream_id} is at v{head.version} but none of its events remain",
                    stream=stream_id,
                )
            continue
        version, last_hash, seq = tail
        if head.version != version or bytes(head.last_hash) != last_hash:
            report.add(
                "head-mismatch",
                f"{stream_id}: head at v{head.version}, last event is v{version}: "
                "events after it were removed, or the head was changed",
                seq=seq,
                stream=stream_id,
            )
    for stream_id, (_, _, seq) in last.items():
        if stream_id not in heads:
            report.add(
                "missing-head", f"{stream_id} has events but no head", seq=seq, stream=stream_id
            )
    return report


async def verify_seal_since(
    engine: AsyncEngine, since: SealPoint | None
) -> tuple[Report, SealPoint | None]:
    """Verify the blocks sealed after `since` (all of them if None): each block's hash and
    link, and each event in their ranges, its hash and its link to its stream's previous
    event, which may lie before `since`. Returns the report and the newest block reached
    (`since` again when there is no new block), for the next call to start from; a
    full `verify_chain` report carries its own in `seal_point`.

    It trusts `since`, which an earlier verification established: a scheduled check costs
    what was sealed since the last one, not the whole log. `verify_chain` is the full walk."""
    async with _snapshot(engine) as conn:
        report = Report("seal")
        after = 0 if since is None else since.block_no
        newest = (
            await conn.execute(
                text(
                    "SELECT block_no, last_seq, hash FROM ledger_blocks "
                    "ORDER BY block_no DESC LIMIT 1"
                )
            )
        ).one_or_none()
        if since is not None:
            kept = (
                await conn.execute(
                    text("SELECT hash FROM ledger_blocks WHERE block_no = :n"),
                    {"n": since.block_no},
                )
            ).one_or_none()
            if kept is None:
                report.add("block-link", f"block {since.block_no}, verified before, is gone")
            elif bytes(kept.hash) != since.hash:
                report.add(
                    "block-hash",
                    f"block {since.block_no} no longer carries the hash it was verified with",
                )
        if newest is None or newest.block_no <= after:
            return report, since
        seal = _Seal(report, _blocks(conn, after), None, since)
        await seal.start()
        last: dict[str, tuple[int, bytes, int]] = {}
        start_seq = 0 if since is None else since.last_seq
        async for row in _events(conn, start_seq, newest.last_seq):
            report.events += 1
            await seal.see(row.global_seq, row.stream_id, bytes(row.hash))
            if row.stream_id not in last and row.link_hash is not None:
                last[row.stream_id] = (row.link_version, bytes(row.link_hash), 0)
            _verify_event(report, row, last)
            last[row.stream_id] = (row.stream_version, bytes(row.hash), row.global_seq)
        report.streams = len(last)
        await seal.finish(set(last))
        return report, report.seal_point or since


def _verify_event(report: Report, row: Any, last: dict[str, tuple[int, bytes, int]]) -> None:
    version, prev, _ = last.get(row.stream_id, (0, GENESIS_HASH, 0))
    where = f"{row.stream_id} v{row.stream_version} (event {row.event_id})"
    if row.stream_version != version + 1:
        report.add(
            "version-gap",
            f"{where} follows v{version}: an event is missing or out of order",
            seq=row.global_seq,
            stream=row.stream_id,
        )
    if bytes(row.prev_hash) != prev:
        report.add(
            "broken-link",
            f"{where} does not chain to its predecessor's hash",
            seq=row.global_seq,
            stream=row.stream_id,
        )
    try:
        expected = _event_hash(row)
    except (ValueError, TypeError, OverflowError) as error:
        report.add(
            "unreadable",
            f"{where}: its fields cannot be hashed ({error})",
            seq=row.global_seq,
            stream=row.stream_id,
        )
        return
    if expected != bytes(row.hash):
        report.add(
            "hash-mismatch",
            f"{where}: stored hash {bytes(row.hash).hex()[:16]}… but its content hashes to "
            f"{expected.hex()[:16]}…: the event was changed after it was written",
            seq=row.global_seq,
            stream=row.stream_id,
        )


async def check_ledger(engine: AsyncEngine, progress: Progress | None = None) -> Report:
    """Fold every event; compare with stored positions and heads; check the zero-sum rule."""
    async with _snapshot(engine) as conn:
        return await _check_ledger(conn, progress)


async def _check_ledger(conn: AsyncConnection, progress: Progress | None) -> Report:
    report = Report("check")
    fold = LedgerFold()
    broken: set[str] = set()
    seen_types: dict[str, set[str]] = {}
    last_seq: dict[str, int] = {}
    read_models = await ReadModelCheck.start(conn, report)
    async for row in _events(conn):
        await read_models.before(row.global_seq)
        read_models.apply(row)
        report.events += 1
        last_seq[row.stream_id] = row.global_seq
        types = seen_types.setdefault(row.stream_id, set())
        if row.event_type in types and row.event_type not in REPEATABLE_EVENT_TYPES:
            report.add(
                "repeated-event-type",
                f"{row.stream_id}: {row.event_type} appears twice",
                seq=row.global_seq,
                stream=row.stream_id,
            )
        types.add(row.event_type)
        if progress is not None:
            progress(1)
        if row.stream_id in broken:
            continue  # one violation per stream: later events would only repeat it
        where = f"{row.stream_id} v{row.stream_version} {row.event_type}"
        try:
            parse_event(row.event_type, row.schema_version, row.payload)
        except (ValueError, ValidationError) as error:
            broken.add(row.stream_id)
            report.add(
                "malformed",
                f"{where}: the payload does not fit the catalog: {_first_line(error)}",
                seq=row.global_seq,
                stream=row.stream_id,
            )
            continue
        try:
            fold.apply(row.stream_id, row.event_type, row.payload)
        except LedgerError as error:
            broken.add(row.stream_id)
            report.add(
                "state-machine"
                if error.code in ("invalid_transition", "stream_closed")
                else "fold",
                f"{where}: {error}",
                seq=row.global_seq,
                stream=row.stream_id,
            )
    report.streams = len(seen_types)
    await read_models.finish()
    report.read_models = len(read_models.checked)

    heads = await _stream_heads(conn)
    for stream_id, state in fold.states.items():
        head = heads.get(stream_id)
        if stream_id not in broken and (head is None or head.state != state):
            report.add(
                "head-state",
                f"{stream_id}: the events lead to {state!r}, its head says "
                f"{head.state if head else 'nothing'!r}",
                seq=last_seq.get(stream_id),
                stream=stream_id,
            )

    stored = {
        row.account_id: row
        for row in await conn.execute(
            text(
                "SELECT account_id, currency, debits_pending, debits_posted, "
                "credits_pending, credits_posted, last_seq FROM account_positions"
            )
        )
    }
    report.accounts = len(stored)
    for account_id, row in stored.items():
        folded = fold.positions.get(account_id)
        actual = (row.debits_pending, row.debits_posted, row.credits_pending, row.credits_posted)
        if folded is None:
            report.add(
                "position-without-events",
                f"{account_id} has a position but no AccountOpened event",
                seq=row.last_seq,
            )
        elif folded.as_tuple() != actual:
            report.add(
                "position-mismatch",
                f"{account_id}: stored (dp, dP, cp, cP) = {actual}, "
                f"the events give {folded.as_tuple()}",
                seq=row.last_seq,
            )
    for account_id in fold.positions.keys() - stored.keys():
        report.add("missing-position", f"{account_id} was opened but has no position")
    for problem in zero_sum_violations(stored.values()):
        report.add("zero-sum", f"stored positions: {problem}")
    for problem in fold.zero_sum_violations():
        report.add("zero-sum", f"folded events: {problem}")
    return report


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return " ".join(lines[:3]) if lines else type(error).__name__


# --- one stream's audit trail, for people (the operations console) ------------------------
STREAM_AUDIT_EVENTS_MAX = 1_000


@dataclass(frozen=True)
class EventAudit:
    """One event of a stream as stored, and what verifying it found."""

    global_seq: int
    stream_version: int
    event_id: str
    event_type: str
    payload: dict[str, Any]
    actor: str
    correlation_id: str | None
    causation_id: str | None
    recorded_at: datetime
    prev_hash: bytes
    hash: bytes
    hash_ok: bool  # its stored hash is the one its content earns
    link_ok: bool  # it follows its predecessor in the stream (version and prev_hash)
    block_no: int | None  # the sealed block that lists it; None: not sealed yet
    seal_ok: bool | None  # None: not sealed yet; else the block lists it with its hash
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.hash_ok and self.link_ok and self.seal_ok is not False


@dataclass(frozen=True)
class BlockAudit:
    block_no: int
    first_seq: int
    last_seq: int
    sealed_at: datetime
    hash: bytes
    hash_ok: bool  # it hashes to its stored hash from its own list
    link_ok: bool  # its prev_hash is the previous block's hash (genesis for block 1)


@dataclass(frozen=True)
class StreamAudit:
    """A stream's events with each hash, link and seal checked, and the blocks that seal
    them. Read in one snapshot."""

    stream_id: str
    events: list[EventAudit]
    blocks: list[BlockAudit]
    head_ok: bool  # the stream's head points at its last event
    truncated: bool  # the stream has more than STREAM_AUDIT_EVENTS_MAX events

    @property
    def ok(self) -> bool:
        return (
            self.head_ok
            and all(e.ok for e in self.events)
            and all(b.hash_ok and b.link_ok for b in self.blocks)
        )

    @property
    def sealed(self) -> bool:
        return bool(self.events) and all(e.block_no is not None for e in self.events)


_STREAM_EVENTS = text(
    f"SELECT {_EVENT_COLUMNS} FROM events e WHERE e.stream_id = :stream "
    "ORDER BY e.stream_version LIMIT :limit"
)
_BLOCK_HOLDING = text(
    "SELECT block_no, first_seq, last_seq, seqs, stream_ids, event_hashes, prev_hash, hash, "
    "sealed_at FROM ledger_blocks WHERE last_seq >= :seq ORDER BY last_seq LIMIT 1"
)
_BLOCK_HASH = text("SELECT hash FROM ledger_blocks WHERE block_no = :n")
_STREAM_HEAD = text("SELECT version, last_hash FROM streams WHERE stream_id = :stream")


async def audit_stream(engine: AsyncEngine, stream_id: str) -> StreamAudit:
    """Verify one stream the way `verify_chain` verifies the log, event by event: each
    hash recomputed from the stored fields, each link to the stream's previous event,
    and the sealed block that lists it (the block's own hash and its link to the block
    before). Costs one seek per event and per block, never a walk of the log."""
    async with _snapshot(engine) as conn:
        rows = (
            await conn.execute(
                _STREAM_EVENTS, {"stream": stream_id, "limit": STREAM_AUDIT_EVENTS_MAX + 1}
            )
        ).all()
        truncated = len(rows) > STREAM_AUDIT_EVENTS_MAX
        rows = rows[:STREAM_AUDIT_EVENTS_MAX]
        blocks: dict[int, Any] = {}
        events: list[EventAudit] = []
        version, prev = 0, GENESIS_HASH
        for row in rows:
            block = next(
                (b for b in blocks.values() if b.first_seq <= row.global_seq <= b.last_seq), None
            )
            if block is None:
                found = (await conn.execute(_BLOCK_HOLDING, {"seq": row.global_seq})).one_or_none()
                if found is not None and found.first_seq <= row.global_seq:
                    blocks[int(found.block_no)] = block = found
            events.append(_audit_event(row, version, prev, block))
            version, prev = row.stream_version, bytes(row.hash)
        head = (await conn.execute(_STREAM_HEAD, {"stream": stream_id})).one_or_none()
        head_ok = (head is None and not rows) or (
            head is not None
            and (truncated or (head.version == version and bytes(head.last_hash) == prev))
        )
        audited = [await _audit_block(conn, block) for _, block in sorted(blocks.items())]
    return StreamAudit(stream_id, events, audited, head_ok, truncated)


def _audit_event(row: Any, version: int, prev: bytes, block: Any) -> EventAudit:
    problems: list[str] = []
    try:
        hash_ok = _event_hash(row) == bytes(row.hash)
    except (ValueError, TypeError, OverflowError) as error:
        hash_ok = False
        problems.append(f"its fields cannot be hashed ({error})")
    if not hash_ok and not problems:
        problems.append("its content does not hash to its stored hash: it was changed")
    link_ok = row.stream_version == version + 1 and bytes(row.prev_hash) == prev
    if not link_ok:
        problems.append(f"it does not follow v{version} of its stream (version or prev_hash)")
    block_no: int | None = None
    seal_ok: bool | None = None
    if block is not None:
        block_no = int(block.block_no)
        listed = dict(zip(block.seqs, block.event_hashes, strict=False))
        sealed_hash = listed.get(row.global_seq)
        seal_ok = sealed_hash is not None and bytes(sealed_hash) == bytes(row.hash)
        if sealed_hash is None:
            problems.append(f"it lies in block {block_no}'s range but the block does not list it")
        elif not seal_ok:
            problems.append(f"block {block_no} sealed another hash for it: it was rewritten")
    return EventAudit(
        global_seq=row.global_seq,
        stream_version=row.stream_version,
        event_id=str(row.event_id),
        event_type=row.event_type,
        payload=row.payload,
        actor=row.actor,
        correlation_id=row.correlation_id,
        causation_id=row.causation_id,
        recorded_at=row.recorded_at,
        prev_hash=bytes(row.prev_hash),
        hash=bytes(row.hash),
        hash_ok=hash_ok,
        link_ok=link_ok,
        block_no=block_no,
        seal_ok=seal_ok,
        problems=tuple(problems),
    )


async def _audit_block(conn: AsyncConnection, block: Any) -> BlockAudit:
    listed = list(zip(block.seqs, block.event_hashes, strict=False))
    events = [(int(seq), bytes(event_hash)) for seq, event_hash in listed]
    hash_ok = block_hash(bytes(block.prev_hash), block.first_seq, block.last_seq, events) == bytes(
        block.hash
    )
    if block.block_no == 1:
        link_ok = bytes(block.prev_hash) == GENESIS_HASH
    else:
        before = (await conn.execute(_BLOCK_HASH, {"n": block.block_no - 1})).one_or_none()
        link_ok = before is not None and bytes(before.hash) == bytes(block.prev_hash)
    return BlockAudit(
        block_no=int(block.block_no),
        first_seq=int(block.first_seq),
        last_seq=int(block.last_seq),
        sealed_at=block.sealed_at,
        hash=bytes(block.hash),
        hash_ok=hash_ok,
        link_ok=link_ok,
    )
