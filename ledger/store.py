"""The event store: append events, read them back, read accounts and positions.

Writes go through one database function, `ledger_append`
(`migrations/sql/0005_ledger_append.sql`), in autocommit mode: one round trip per
event, and locks are held only for the span of that function and its commit. That is
what lets a hot account take many appends per second.

Appends use psycopg's own connection pool; reads use SQLAlchemy Core. The split is
measured, not taste: per append, the client spent about 430 µs of CPU through
SQLAlchemy's async layer, 260 µs through SQLAlchemy's pool with the raw driver
connection, and 180 µs through psycopg_pool (8 writers, bench-style lifecycles), and on
a 2-core machine shared with PostgreSQL that client CPU is throughput.

The store's side of the contract is small, since the database function trusts no
caller (it checks the transition, the payload, the postings and computes the hash
itself):

- it builds the payload from the catalog's model, so its own events are well formed;
- it translates every refusal into a domain error, never a raw database error;
- it retries transient failures (serialisation failures, deadlocks, lost
  connections) a bounded number of times. Retrying is safe: an append whose first
  attempt committed is recognised by its event id and appends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import bindparam, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import errors
from ledger.db import create_reader_engine, to_libpq_url
from ledger.events import AccountOpened, DomainEvent, account_stream, parse_event
from ledger.hashing import canonical_json
from ledger.state_machine import TERMINAL_STATES

log = logging.getLogger("paysaga.ledger")

APPEND_ATTEMPTS_MAX = 5
APPEND_BACKOFF_S_MAX = 0.5
READ_LIMIT_MAX = 10_000
ACCOUNTS_PAGE_MAX = 500
SEQ_MAX = 2**63 - 1
SEAL_EVENTS_MAX = 10_000
# How long a reader waits for the safe horizon to cover what it could already see.
HORIZON_CATCH_UP_S_MAX = 1.0
HORIZON_RETRY_S_MIN = 0.002
HORIZON_RETRY_S_MAX = 0.05
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
# Projectors LISTEN here (ledger/projector.py).
NOTIFY_CHANNEL = "paysaga_events"
# At most one NOTIFY in flight per store, and at most one per this interval.
NOTIFY_INTERVAL_S_MIN = 0.005

_EVENT_COLUMNS = (
    "global_seq, stream_id, stream_version, event_id, event_type, schema_version, payload, "
    "actor, correlation_id, causation_id, attempt, recorded_at, prev_hash, hash"
)

# Its own transaction, never the append's: a NOTIFY takes a database-wide lock at commit
# and holds it through the commit's WAL flush, so a NOTIFY inside ledger_append's
# transaction made concurrent appends commit one at a time (bench/replay.py measured
# 1,664 against 2,282 events/s at saturation). This one has nothing to make durable.
_NOTIFY = f"SELECT set_config('synchronous_commit', 'off', true), pg_notify('{NOTIFY_CHANNEL}', '')"

_APPEND = """
    SELECT * FROM ledger_append(
        %(event_id)s::uuid, %(stream_id)s::text, %(event_type)s::text,
        %(schema_version)s::integer, %(payload)s::jsonb, %(actor)s::text,
        %(correlation_id)s::text, %(causation_id)s::text, %(attempt)s::integer,
        %(expected_version)s::integer)
"""
_READ_STREAM = text(
    f"SELECT {_EVENT_COLUMNS} FROM events WHERE stream_id = :stream_id ORDER BY stream_version"
)
_STREAM_OPENINGS = text(
    f"SELECT {_EVENT_COLUMNS} FROM events WHERE stream_id = ANY(:ids) AND stream_version = 1"
)
_READ_RANGE = text(
    f"SELECT {_EVENT_COLUMNS} FROM events WHERE global_seq > :after_seq "
    "AND global_seq <= :up_to ORDER BY global_seq LIMIT :limit"
)
_POSITION_COLUMNS = (
    "p.account_id, p.currency, p.overdraft_limit_minor, p.debits_pending, p.debits_posted, "
    "p.credits_pending, p.credits_posted, p.last_seq"
)


@dataclass(frozen=True)
class NewEvent:
    """An event to append, with who caused it and why."""

    stream_id: str
    event: DomainEvent
    event_id: uuid.UUID
    actor: str
    correlation_id: str | None = None
    causation_id: str | None = None
    attempt: int | None = None


@dataclass(frozen=True)
class RecordedEvent:
    """An event as stored: immutable, ordered, hashed."""

    global_seq: int
    stream_id: str
    stream_version: int
    event_id: uuid.UUID
    event_type: str
    schema_version: int
    payload: dict[str, Any]
    actor: str
    correlation_id: str | None
    causation_id: str | None
    attempt: int | None
    recorded_at: datetime
    prev_hash: bytes
    hash: bytes

    def to_event(self) -> DomainEvent:
        return parse_event(self.event_type, self.schema_version, self.payload)


@dataclass(frozen=True)
class AppendResult:
    event: RecordedEvent
    appended: bool  # False: the event was already there (an idempotent retry)
    state: str  # the stream's state now: after this event, or wherever a retry found it
    checked_at: datetime  # the ledger's clock when it answered


class PositionFigures:
    """What a position's four counters add up to (a mixin of the dataclasses that hold
    them: Position here, the read models' Balance)."""

    overdraft_limit_minor: int | None
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int

    @property
    def posted_minor(self) -> int:
        return self.credits_posted - self.debits_posted

    @property
    def pending_minor(self) -> int:
        return self.credits_pending - self.debits_pending

    @property
    def available_minor(self) -> int | None:
        """What may still be reserved; None for an unlimited (external) account."""
        if self.overdraft_limit_minor is None:
            return None
        return (
            self.credits_posted
            - self.debits_posted
            - self.debits_pending
            + self.overdraft_limit_minor
        )


@dataclass(frozen=True)
class Position(PositionFigures):
    """An account's position, as in TigerBeetle, read straight from the ledger."""

    account_id: str
    currency: str
    overdraft_limit_minor: int | None
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int
    last_seq: int


@dataclass(frozen=True)
class Account:
    account_id: str
    currency: str
    kind: str
    overdraft_limit_minor: int | None
    metadata: dict[str, Any]
    opened_seq: int
    opened_at: datetime
    position: Position


@dataclass(frozen=True)
class StreamHead:
    stream_id: str
    version: int
    state: str
    last_hash: bytes
    last_seq: int | None

    @property
    def closed(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class Horizon:
    """`safe_seq`: no event at or below it can still appear. `head_seq`: the highest
    global_seq visible when it was read."""

    safe_seq: int
    head_seq: int


@dataclass(frozen=True)
class Block:
    """A sealed block of the log (see `ledger_blocks`)."""

    block_no: int
    first_seq: int
    last_seq: int
    event_count: int
    hash: bytes


@dataclass(frozen=True)
class Lags:
    horizon_events: int
    horizon_s: float
    unsealed_events: int
    unsealed_s: float


@dataclass(frozen=True)
class OpenPayment:
    """A payment whose stream has no terminal event yet."""

    payment_id: str
    state: str
    last_event_at: datetime
    hold_expires_at: datetime | None


@dataclass(frozen=True)
class PayerActivity:
    kind: str | None  # None: no such account
    recent_payments: int


class _Waker:
    """Wakes the projectors after appends: coalesces any number of pokes into at most one
    NOTIFY in flight, at most one per NOTIFY_INTERVAL_S_MIN, and always one after the
    last poke. Best effort: a projector also polls."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool
        self._pending = False
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        self._pending = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        while self._pending:
            self._pending = False
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(_NOTIFY)
            except (psycopg.Error, PoolTimeout) as error:
                log.debug("could not notify the projectors", extra={"error": str(error)})
                return
            await asyncio.sleep(NOTIFY_INTERVAL_S_MIN)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class EventStore:
    """The ledger's store: appends through psycopg's pool, reads through SQLAlchemy."""

    def __init__(
        self,
        engine: AsyncEngine,
        appends: AsyncConnectionPool,
        *,
        append_attempts_max: int = APPEND_ATTEMPTS_MAX,
        owns_engine: bool = False,
    ) -> None:
        self.engine = engine
        self.appends = appends
        self.append_attempts_max = append_attempts_max
        self._owns_engine = owns_engine
        self._waker = _Waker(appends)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        connect_args: Mapping[str, Any] | None = None,
        pool_size: int = 10,
        engine: AsyncEngine | None = None,
    ) -> EventStore:
        """A store on this URL (the application role's login). Close it when done.

        Pass `engine` to share an existing engine for reads; otherwise the store makes
        (and later disposes of) its own.
        """
        extra = dict(connect_args or {})
        appends: AsyncConnectionPool = AsyncConnectionPool(
            to_libpq_url(url),
            kwargs={"autocommit": True, "row_factory": namedtuple_row, **extra},
            min_size=pool_size,
            max_size=pool_size,
            open=False,
            name="ledger-appends",
        )
        await appends.open()
        owns_engine = engine is None
        if engine is None:
            engine = create_reader_engine(
                url, connect_args=extra, pool_size=pool_size, pool_overflow_max=pool_size
            )
        return cls(engine, appends, owns_engine=owns_engine)

    async def close(self) -> None:
        await self._waker.close()
        await self.appends.close()
        if self._owns_engine:
            await self.engine.dispose()

    # --- writing --------------------------------------------------------------------------
    async def append(self, new: NewEvent, *, expected_version: int | None = None) -> AppendResult:
        """Append one event. Idempotent by event id; refusals are domain errors."""
        payload = new.event.payload()
        payload_json = canonical_json(payload).decode()
        if "\\u0000" in payload_json:
            raise errors.InvalidEvent("text in an event may not contain NUL characters")
        params = {
            "event_id": new.event_id,
            "stream_id": new.stream_id,
            "event_type": new.event.event_type,
            "schema_version": new.event.schema_version,
            "payload": payload_json,
            "actor": new.actor,
            "correlation_id": new.correlation_id,
            "causation_id": new.causation_id,
            "attempt": new.attempt,
            "expected_version": expected_version,
        }
        row = await self._append_with_retries(new, params)
        if row.appended:
            self._waker.poke()
        return AppendResult(
            event=RecordedEvent(
                global_seq=row.global_seq,
                stream_id=new.stream_id,
                stream_version=row.stream_version,
                event_id=new.event_id,
                event_type=new.event.event_type,
                schema_version=new.event.schema_version,
                payload=payload,
                actor=row.actor,
                correlation_id=row.correlation_id,
                causation_id=row.causation_id,
                attempt=row.attempt,
                recorded_at=row.recorded_at,
                prev_hash=bytes(row.prev_hash),
                hash=bytes(row.hash),
            ),
            appended=row.appended,
            state=row.state,
            checked_at=row.checked_at,
        )

    async def _append_with_retries(self, new: NewEvent, params: dict[str, Any]) -> Any:
        for attempt in range(1, self.append_attempts_max + 1):
            try:
                async with self.appends.connection() as conn:
                    cursor = await conn.execute(_APPEND, params)
                    return await cursor.fetchone()
            except (psycopg.Error, PoolTimeout) as error:
                if isinstance(error, psycopg.Error):
                    domain = _domain_error(error, new)
                    if domain is not None:
                        raise domain from None
                transient = isinstance(error, psycopg.OperationalError | PoolTimeout) or (
                    getattr(error, "sqlstate", None) in _RETRYABLE_SQLSTATES
                )
                if not transient:
                    raise
                if attempt == self.append_attempts_max:
                    raise errors.StoreUnavailable(
                        f"append of {new.event.event_type} to {new.stream_id} failed "
                        f"{attempt} times: {error}",
                    ) from error
                delay_s = min(APPEND_BACKOFF_S_MAX, 0.01 * 2**attempt) * random.uniform(0.5, 1)
                log.warning(
                    "transient append failure, retrying",
                    extra={"stream_id": new.stream_id, "attempt": attempt, "error": str(error)},
                )
                await asyncio.sleep(delay_s)
        raise AssertionError("unreachable: the loop returns or raises")

    async def open_account(
        self,
        opened: AccountOpened,
        *,
        actor: str,
        event_id: uuid.UUID | None = None,
        correlation_id: str | None = None,
    ) -> AppendResult:
        """Open an account: an `AccountOpened` event in the account's own stream."""
        return await self.append(
            NewEvent(
                stream_id=account_stream(opened.account_id),
                event=opened,
                event_id=event_id or uuid.uuid4(),
                actor=actor,
                correlation_id=correlation_id,
            )
        )

    # --- reading --------------------------------------------------------------------------
    async def _fetch(self, statement: Any, params: dict[str, Any]) -> list[Any]:
        return await fetch_all(self.engine, statement, params)

    async def read_stream(self, stream_id: str) -> list[RecordedEvent]:
        """A stream's events in order."""
        return [_recorded(row) for row in await self._fetch(_READ_STREAM, {"stream_id": stream_id})]

    async def stream_openings(self, stream_ids: Sequence[str]) -> dict[str, RecordedEvent]:
        """The first event of each of `stream_ids` that has one: one seek per stream."""
        if not stream_ids:
            return {}
        if len(stream_ids) > READ_LIMIT_MAX:
            raise ValueError(f"at most {READ_LIMIT_MAX} streams at once")
        rows = await self._fetch(_STREAM_OPENINGS, {"ids": list(stream_ids)})
        return {row.stream_id: _recorded(row) for row in rows}

    async def read_range(
        self, *, after_seq: int = 0, limit: int = 1000, up_to: int = SEQ_MAX
    ) -> list[RecordedEvent]:
        """Events with after_seq < global_seq <= up_to, in global order, at most `limit`.

        A reader that must never skip an event that commits late passes the safe
        horizon as `up_to` (see `safe_horizon`).
        """
        if not 1 <= limit <= READ_LIMIT_MAX:
            raise ValueError(f"limit must be between 1 and {READ_LIMIT_MAX}")
        rows = await self._fetch(
            _READ_RANGE, {"after_seq": after_seq, "limit": limit, "up_to": up_to}
        )
        return [_recorded(row) for row in rows]

    async def safe_horizon(self, *, catch_up_s_max: float = HORIZON_CATCH_UP_S_MAX) -> Horizon:
        """The safe horizon: no event at or below `safe_seq` can still appear.

        One call of `ledger_safe_horizon()` proves what earlier calls saw (see
        `migrations/sql/0005_ledger_safe_horizon.sql`); this calls it again, briefly,
        until the horizon covers every event that was visible at the first call, or
        `catch_up_s_max` has passed (a long transaction somewhere holds it back).
        """
        first = await self._horizon()
        horizon = first
        deadline = time.monotonic() + catch_up_s_max
        delay_s = HORIZON_RETRY_S_MIN
        while horizon.safe_seq < first.head_seq and time.monotonic() < deadline:
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, HORIZON_RETRY_S_MAX)
            horizon = await self._horizon()
        return horizon

    async def _horizon(self) -> Horizon:
        row = (await self._fetch(_SAFE_HORIZON, {}))[0]
        return Horizon(safe_seq=row.safe_seq, head_seq=row.head_seq)

    async def seal(self, *, events_max: int = SEAL_EVENTS_MAX) -> Block | None:
        """Seal the events after the last block, up to the safe horizon, into one block."""
        rows = await self._fetch(_SEAL, {"events_max": events_max})
        if not rows:
            return None
        row = rows[0]
        return Block(
            block_no=row.block_no,
            first_seq=row.first_seq,
            last_seq=row.last_seq,
            event_count=row.event_count,
            hash=bytes(row.hash),
        )

    async def lags(self) -> Lags:
        """How far the safe horizon and the seal trail the log, in events and seconds."""
        horizon = await self._horizon()
        row = (await self._fetch(_LAGS, {"safe_seq": horizon.safe_seq}))[0]
        return Lags(
            horizon_events=max(0, horizon.head_seq - horizon.safe_seq),
            horizon_s=float(row.horizon_s or 0.0),
            unsealed_events=max(0, horizon.head_seq - int(row.sealed_seq)),
            unsealed_s=float(row.unsealed_s or 0.0),
        )

    async def stream_head(self, stream_id: str) -> StreamHead | None:
        rows = await self._fetch(_STREAM_HEAD, {"stream_id": stream_id})
        if not rows:
            return None
        row = rows[0]
        return StreamHead(row.stream_id, row.version, row.state, bytes(row.last_hash), row.last_seq)

    async def get_position(self, account_id: str) -> Position:
        """The position as of every committed append: a strongly consistent read."""
        rows = await self._fetch(_POSITION, {"id": account_id})
        if not rows:
            raise errors.UnknownAccount(f"no account {account_id!r}", account_id=account_id)
        return _position(rows[0])

    async def account_terms(self, account_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """{account id: (currency, kind)} for those of `account_ids` that exist: one query."""
        rows = await self._fetch(_ACCOUNT_TERMS, {"ids": list(account_ids)})
        return {row.account_id: (row.currency, row.kind) for row in rows}

    async def get_account(self, account_id: str) -> Account | None:
        rows = await self._fetch(_ACCOUNT, {"id": account_id})
        return _account(rows[0]) if rows else None

    async def list_accounts(self, *, after_id: str | None, limit: int) -> list[Account]:
        """Accounts in id order after `after_id`, at most `limit`, each with its position
        as of every committed append (strongly consistent, like `get_account`)."""
        if not 1 <= limit <= ACCOUNTS_PAGE_MAX:
            raise ValueError(f"limit must be 1 to {ACCOUNTS_PAGE_MAX}, not {limit}")
        rows = await self._fetch(_ACCOUNTS_PAGE, {"after": after_id or "", "limit": limit})
        return [_account(row) for row in rows]

    async def open_payments(self, *, idle_s: float, limit: int) -> list[OpenPayment]:
        """Payment streams with no terminal event, idle for `idle_s` or more, oldest first."""
        rows = await self._fetch(_OPEN_PAYMENTS, {"idle_s": idle_s, "limit": limit})
        return [
            OpenPayment(
                payment_id=row.stream_id.removeprefix("payment-"),
                state=row.state,
                last_event_at=row.last_event_at,
                hold_expires_at=row.hold_expires_at,
            )
            for row in rows
        ]

    async def count_streams_by_state(self, kind: str, states: Sequence[str]) -> dict[str, int]:
        """How many streams of one kind (`payment`, `account`) are in each of `states`."""
        rows = await self._fetch(_COUNT_BY_STATE, {"prefix": f"{kind}-%", "states": sorted(states)})
        return {row.state: int(row.n) for row in rows}

    async def payer_activity(
        self, payer_account_id: str, *, window_s: int, before_seq: int, until: datetime
    ) -> PayerActivity:
        """The payer's account kind, and how many payments it started in the `window_s`
        up to `until`, recorded before `before_seq`."""
        rows = await self._fetch(
            _PAYER_ACTIVITY,
            {
                "payer": payer_account_id,
                "window_s": window_s,
                "before_seq": before_seq,
                "until": until,
            },
        )
        return PayerActivity(kind=rows[0].kind, recent_payments=int(rows[0].recent))

    async def clock(self) -> datetime:
        """The ledger's clock: the time recorded events are stamped with."""
        rows = await self._fetch(_CLOCK, {})
        now: datetime = rows[0].now
        return now

    async def ping(self) -> None:
        """One round trip to the database."""
        await self._fetch(_PING, {})


_STREAM_HEAD = text(
    "SELECT stream_id, version, state, last_hash, last_seq FROM streams "
    "WHERE stream_id = :stream_id"
)
_POSITION = text(f"SELECT {_POSITION_COLUMNS} FROM account_positions p WHERE p.account_id = :id")
_ACCOUNT_TERMS = text(
    "SELECT account_id, currency, kind FROM accounts WHERE account_id IN :ids"
).bindparams(bindparam("ids", expanding=True))
_ACCOUNT = text(
    "SELECT a.kind, a.metadata, a.opened_seq, e.recorded_at AS opened_at, "
    f"{_POSITION_COLUMNS} FROM accounts a "
    "JOIN account_positions p USING (account_id) "
    "JOIN events e ON e.global_seq = a.opened_seq "
    "WHERE a.account_id = :id"
)

# One page of accounts by primary key. The positions are summed over their stripes for
# that page alone: the `= ANY` condition on the view's grouping key is pushed into it as an
# index scan of `positions` (a plain join would aggregate every account's rows first).
_ACCOUNTS_PAGE = text(
    """
    WITH page AS MATERIALIZED (
        SELECT account_id, kind, metadata, opened_seq FROM accounts
         WHERE account_id > :after ORDER BY account_id LIMIT :limit)
    SELECT a.kind, a.metadata, a.opened_seq, e.recorded_at AS opened_at, """
    + _POSITION_COLUMNS
    + """
      FROM page a
      JOIN account_positions p ON p.account_id = a.account_id
      JOIN events e ON e.global_seq = a.opened_seq
     WHERE p.account_id = ANY (ARRAY(SELECT account_id FROM page))
     ORDER BY a.account_id
    """
)


_OPEN_PAYMENTS = text(
    """
    SELECT s.stream_id, s.state, last.recorded_at AS last_event_at,
           CAST(hold.payload->>'expires_at' AS timestamptz) AS hold_expires_at
      FROM streams s
      JOIN events last ON last.global_seq = s.last_seq
      LEFT JOIN events hold ON hold.stream_id = s.stream_id AND hold.event_type = 'FundsReserved'
     WHERE s.stream_id LIKE 'payment-%'
       AND s.state NOT IN ('settled', 'declined', 'rejected', 'failed', 'cancelled')
       AND last.recorded_at < clock_timestamp() - make_interval(secs => :idle_s)
     ORDER BY last.recorded_at
     LIMIT :limit
    """
)
_COUNT_BY_STATE = text(
    "SELECT state, count(*) AS n FROM streams "
    "WHERE stream_id LIKE :prefix AND state = ANY (:states) GROUP BY state"
)
# The payer's kind and its recent payments, in one round trip.
_PAYER_ACTIVITY = text(
    """
    SELECT a.kind,
           (SELECT count(*) FROM events e
             WHERE e.event_type = 'PaymentInitiated'
               AND e.payload->>'payer_account_id' = :payer
               AND e.recorded_at > CAST(:until AS timestamptz) - make_interval(secs => :window_s)
               AND e.global_seq < :before_seq) AS recent
      FROM (SELECT :payer AS account_id) AS p
      LEFT JOIN accounts a ON a.account_id = p.account_id
    """
)
_SAFE_HORIZON = text("SELECT safe_seq, head_seq FROM ledger_safe_horizon()")
_SEAL = text(
    "SELECT block_no, first_seq, last_seq, event_count, hash FROM ledger_seal(:events_max)"
)
# Seconds since the oldest event above the horizon, and above the last block, was
# recorded: how stale a reader or the seal is.
_LAGS = text(
    """
    SELECT coalesce((SELECT max(b.last_seq) FROM ledger_blocks b), 0) AS sealed_seq,
           extract(epoch FROM clock_timestamp() - (
               SELECT e.recorded_at FROM events e WHERE e.global_seq > :safe_seq
                ORDER BY e.global_seq LIMIT 1)) AS horizon_s,
           extract(epoch FROM clock_timestamp() - (
               SELECT e.recorded_at FROM events e
                WHERE e.global_seq > coalesce((SELECT max(b.last_seq) FROM ledger_blocks b), 0)
                ORDER BY e.global_seq LIMIT 1)) AS unsealed_s
    """
)
_PING = text("SELECT 1")
_CLOCK = text("SELECT clock_timestamp() AS now")


async def fetch_all(engine: AsyncEngine, statement: Any, params: dict[str, Any]) -> list[Any]:
    """Run one read. A connection lost to a database restart is retried once: reads are
    safe to repeat, and the pool drops the dead connections on the first error."""
    for attempt in (1, 2):
        try:
            async with engine.connect() as conn:
                return list((await conn.execute(statement, params)).all())
        except DBAPIError as error:
            if attempt == 2 or not error.connection_invalidated:
                raise
    raise AssertionError("unreachable: the loop returns or raises")


def _recorded(row: Any) -> RecordedEvent:
    return RecordedEvent(
        global_seq=row.global_seq,
        stream_id=row.stream_id,
        stream_version=row.stream_version,
        event_id=row.event_id,
        event_type=row.event_type,
        schema_version=row.schema_version,
        payload=row.payload,
        actor=row.actor,
        correlation_id=row.correlation_id,
        causation_id=row.causation_id,
        attempt=row.attempt,
        recorded_at=row.recorded_at,
        prev_hash=bytes(row.prev_hash),
        hash=bytes(row.hash),
    )


def _account(row: Any) -> Account:
    return Account(
        account_id=row.account_id,
        currency=row.currency,
        kind=row.kind,
        overdraft_limit_minor=row.overdraft_limit_minor,
        metadata=row.metadata,
        opened_seq=row.opened_seq,
        opened_at=row.opened_at,
        position=_position(row),
    )


def _position(row: Any) -> Position:
    return Position(
        account_id=row.account_id,
        currency=row.currency,
        overdraft_limit_minor=row.overdraft_limit_minor,
        debits_pending=row.debits_pending,
        debits_posted=row.debits_posted,
        credits_pending=row.credits_pending,
        credits_posted=row.credits_posted,
        last_seq=row.last_seq,
    )


def _diag(error: psycopg.Error) -> tuple[str, dict[str, Any]]:
    diag = error.diag
    message = str(diag.message_primary or error)
    detail_text = diag.message_detail
    details: dict[str, Any] = {}
    if detail_text:
        try:
            parsed = json.loads(detail_text)
            details = parsed if isinstance(parsed, dict) else {"detail": parsed}
        except ValueError:
            details = {"detail": detail_text}
    return message, details


def _domain_error(error: psycopg.Error, new: NewEvent) -> errors.LedgerError | None:
    """The domain error a database refusal stands for, or None if it is not one."""
    state = error.sqlstate
    if state is None:
        return None
    message, details = _diag(error)
    details.update(stream_id=new.stream_id, event_type=new.event.event_type)
    constraint = error.diag.constraint_name
    if state == "PS001":
        if new.event.event_type == "AccountOpened" and details.get("state") == "open":
            return errors.AccountExists(f"account {new.stream_id} already exists", **details)
        if details.get("state") in TERMINAL_STATES:
            return errors.StreamClosed(
                f"{new.stream_id} is closed ({details['state']}); "
                f"{new.event.event_type} may not follow",
                **details,
            )
        return errors.InvalidTransition(message, **details)
    simple: dict[str, type[errors.LedgerError]] = {
        "PS002": errors.IdempotencyConflict,
        "PS003": errors.InsufficientFunds,
        "PS004": errors.UnknownAccount,
        "PS005": errors.CurrencyMismatch,
        "PS006": errors.WrongExpectedVersion,
        "PS007": errors.InvalidPostings,
        "PS009": errors.InvalidEvent,
        "22003": errors.AmountOutOfRange,
    }
    if state in simple:
        return simple[state](message, **details)
    if state == "23505" and constraint == "events_event_id_key":
        return errors.IdempotencyConflict(
            f"event id {new.event_id} is already used by another stream", **details
        )
    if state == "23514" and constraint == "positions_within_overdraft":
        return errors.InsufficientFunds(message, **details)
    if state == "23514":
        return errors.InvalidPostings(message, constraint=constraint, **details)
    return None
