"""`ledger verify` and `ledger check`: prove the ledger against itself.

- **verify** walks every event in global order and recomputes its hash in Python,
  independently of the database function that wrote it: a changed payload, a
  removed or reordered event breaks the chain at a named `global_seq`. It also
  checks that each stream head points at its stream's last event.
- **check** folds every event into positions (ledger/fold.py) and replays every
  stream through the state machine, then compares with the stored positions and
  stream heads, and checks the zero-sum rule per currency.

Both read in batches, so memory grows with the number of streams and accounts, not
events, and both report the first bad `global_seq`. Each runs in one REPEATABLE READ
transaction, so a ledger that keeps taking payments meanwhile is judged on one
consistent snapshot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.errors import LedgerError
from ledger.fold import LedgerFold, zero_sum_violations
from ledger.hashing import GENESIS_HASH, chain_hash, content_digest

BATCH_SIZE = 5000
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Violation:
    rule: str
    message: str
    global_seq: int | None = None
    stream_id: str | None = None


@dataclass
class Report:
    name: str
    events: int = 0
    streams: int = 0
    accounts: int = 0
    violations: list[Violation] = field(default_factory=list)

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


@asynccontextmanager
async def _snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            yield conn


async def _events(conn: AsyncConnection) -> AsyncIterator[Any]:
    after = 0
    while True:
        rows = (
            await conn.execute(
                text(
                    "SELECT global_seq, stream_id, stream_version, event_id, event_type, "
                    "schema_version, payload, actor, correlation_id, causation_id, attempt, "
                    "recorded_at, prev_hash, hash FROM events WHERE global_seq > :after "
                    "ORDER BY global_seq LIMIT :limit"
                ),
                {"after": after, "limit": BATCH_SIZE},
            )
        ).all()
        if not rows:
            return
        for row in rows:
            yield row
        after = rows[-1].global_seq


async def _stream_heads(conn: AsyncConnection) -> dict[str, Any]:
    rows = await conn.execute(text("SELECT stream_id, version, state, last_hash FROM streams"))
    return {row.stream_id: row for row in rows}


async def verify_chain(engine: AsyncEngine, progress: Progress | None = None) -> Report:
    """Recompute every hash and every link of every stream's chain."""
    async with _snapshot(engine) as conn:
        return await _verify_chain(conn, progress)


async def _verify_chain(conn: AsyncConnection, progress: Progress | None) -> Report:
    report = Report("verify")
    last: dict[str, tuple[int, bytes, int]] = {}  # stream -> (version, hash, global_seq)
    async for row in _events(conn):
        report.events += 1
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
        content = content_digest(
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
        expected = chain_hash(
            bytes(row.prev_hash),
            content,
            global_seq=row.global_seq,
            stream_version=row.stream_version,
            recorded_at=row.recorded_at,
        )
        if expected != bytes(row.hash):
            report.add(
                "hash-mismatch",
                f"{where}: stored hash {bytes(row.hash).hex()[:16]}… but its content hashes to "
                f"{expected.hex()[:16]}…: the event was changed after it was written",
                seq=row.global_seq,
                stream=row.stream_id,
            )
        last[row.stream_id] = (row.stream_version, bytes(row.hash), row.global_seq)
        if progress is not None:
            progress(1)
    report.streams = len(last)
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
    async for row in _events(conn):
        report.events += 1
        last_seq[row.stream_id] = row.global_seq
        types = seen_types.setdefault(row.stream_id, set())
        if row.event_type in types:
            report.add(
                "repeated-event-type",
                f"{row.stream_id}: {row.event_type} appears twice",
                seq=row.global_seq,
                stream=row.stream_id,
            )
        types.add(row.event_type)
        if row.stream_id in broken:
            continue  # one violation per stream: later events would only repeat it
        try:
            fold.apply(row.stream_id, row.event_type, row.payload)
        except LedgerError as error:
            broken.add(row.stream_id)
            report.add(
                "state-machine"
                if error.code in ("invalid_transition", "stream_closed")
                else "fold",
                f"{row.stream_id} v{row.stream_version} {row.event_type}: {error}",
                seq=row.global_seq,
                stream=row.stream_id,
            )
        if progress is not None:
            progress(1)
    report.streams = len(seen_types)

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
