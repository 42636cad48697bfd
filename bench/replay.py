"""Replay and the read side at a million events: rebuild speed, projector lag, as_of.

Generates a payment history straight into the events table with COPY, as the schema
owner, in three stages (1/100, 1/10 and all of --lifecycles: by default 10,000, 100,000
and 1,000,000 payment events over --accounts accounts). After each stage it projects
the live read models and times the query behind `balance?as_of=` on random accounts and
on the two accounts with the longest histories. At full size it then:

* times as_of at the three sizes again, side by side: the statement materialised as it
  was at the smaller stages (`ledger.replay.materialise`) and the live one, queried in
  turn, so that the machine's drift between stages does not enter their ratio (a query
  with no table behind it, measured alike, shows that drift);
* rebuilds the balances and the statement (`ledger/replay.py`), each alone, and times
  one SQL aggregate that computes the same balances straight from the events table
  (and checks that they agree);
* runs the real projector (`ledger/projector.py`) in its own process while writers
  append through the ledger's own path (`EventStore.append`, as the application role)
  at a paced 1,000 events/s, and measures how long each event takes to reach the read
  models.

It prints every figure next to its target and writes bench/results/replay-<time>.json.

    .venv/bin/python bench/replay.py                   # embedded PostgreSQL 18, durable
    .venv/bin/python bench/replay.py --lifecycles 20000 --accounts 2000 --lag-s 10
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/replay.py

The generated history belongs to a scratch database. Each lifecycle is
PaymentInitiated, PaymentAuthorized, FundsReserved, PaymentSettled, with payloads as
the catalog writes them (a 1.5% fee to the fees account when a merchant is paid), and
the accounts, positions and stream heads agree with the events, so the ledger's own
appends can follow them. The hashes do not: every generated event carries the same
placeholder 32-byte hash (scheme 2), since no projection reads a hash, and
`paysaga ledger verify` would reject this log. Customers may overdraw up to a large
limit, so no payment needs funding first.

Compare ratios within one run: this machine is shared, and absolute figures drift.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import json
import os
import platform
import random
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import psutil
import psycopg
from rich.console import Console
from rich.table import Table

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import percentile  # noqa: E402
from bench.ledger import bench_postgres, server_cpu_s  # noqa: E402
from ledger.db import to_libpq_url  # noqa: E402
from ledger.events import (  # noqa: E402
    FundsReserved,
    PaymentAuthorized,
    PaymentInitiated,
    PaymentSettled,
    Posting,
    event_id_for,
    payment_stream,
)
from ledger.projections import READ_MODELS, Projection  # noqa: E402
from ledger.projections.balances import BALANCES  # noqa: E402
from ledger.projections.base import LIVE_SCHEMA, statement  # noqa: E402
from ledger.projections.statement import STATEMENT  # noqa: E402
from ledger.projector import Projector, catch_up  # noqa: E402
from ledger.read_models import BALANCE_AS_OF_SQL, STATEMENT_CHECKPOINT  # noqa: E402
from ledger.replay import (  # noqa: E402
    REPLAY_BATCH_EVENTS_MAX,
    REPLAY_BULK_BATCH_EVENTS_MAX,
    materialise,
    plan_materialise,
    rebuild,
    safe_seq,
)
from ledger.store import EventStore, NewEvent  # noqa: E402
from paysaga.db import DatabaseUrls  # noqa: E402

APP_ROLE = "paysaga_app"
console = Console(stderr=True)

# --- the generated history ---------------------------------------------------------------
CURRENCY = "EUR"
ACTOR = "bench"
LIFECYCLES_DEFAULT = 250_000
ACCOUNTS_DEFAULT = 10_000
# The log is measured at 1/100, 1/10 and all of the lifecycles.
STAGE_DIVISORS = (100, 10, 1)
# Lifecycles generated together, their events interleaved as payments in flight are.
BLOCK_LIFECYCLES = 50
# One generated event every 10 ms: a million events span about three hours, ending a
# minute before the run starts.
EVENT_SPACING_US = 10_000
MERCHANT_EVERY = 10  # one account in ten is a merchant
HOT_PAYEE_PERCENT = 20  # of payments pay the hot merchant
CUSTOMER_PAYEE_PERCENT = 30  # pay another customer; the rest pay a random merchant
FEE_BPS = 150  # merchants pay a fee, to the fees account
AMOUNT_MINOR_MIN = 100
AMOUNT_MINOR_MAX = 100_000
# Customers' credit line: no generated or paced payment can run out of it.
OVERDRAFT_LIMIT_MINOR = 10**12
# The credit stripes ledger_apply_money gives merchant, settlement and fees accounts.
STRIPED_KINDS_STRIPES = 8
COPY_CHUNK_ROWS = 20_000
HOT_MERCHANT = "merch-hot"
FEES_ACCOUNT = "fees"
EVENT_ID_PREFIX = "b0000000-0000-4000-8000-"
# In COPY's text format a backslash is doubled; bytea then reads \x<hex>.
PLACEHOLDER_HASH_COPY = "\\\\x" + "ab" * 32
HOLD_EXPIRY = timedelta(hours=1)

_COPY_EVENTS = (
    "COPY events (global_seq, stream_id, stream_version, event_id, event_type, "
    "schema_version, payload, actor, correlation_id, causation_id, attempt, recorded_at, "
    "prev_hash, hash, hash_scheme) FROM STDIN"
)
_COPY_STREAMS = "COPY streams (stream_id, version, state, last_hash, last_seq) FROM STDIN"
_COPY_ACCOUNTS = (
    "COPY accounts (account_id, currency, kind, overdraft_limit_minor, metadata, "
    "credit_stripes, opened_seq) FROM STDIN"
)
_COPY_POSITIONS = (
    "COPY positions (account_id, stripe, currency, overdraft_limit_minor, credit_stripes, "
    "debits_pending, debits_posted, credits_pending, credits_posted, last_seq) FROM STDIN"
)


# --- as_of ---------------------------------------------------------------------------------
def _as_of_sql() -> str:
    """The API's `balance?as_of=` statement (`ledger.read_models`), with psycopg's
    placeholders and `{s}` for the schema of the read model, so that a materialised
    copy can be asked the same."""
    named = re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", BALANCE_AS_OF_SQL.text)
    return named.replace("projection.", "{s}.")


# One backward seek in (account_id, recorded_at, global_seq) of the statement, with the
# checkpoint and the account's terms.
AS_OF_SQL = _as_of_sql()
# The same position as the sum of the account's movements up to the instant: what the
# warm-up checks each as_of answer against.
_AS_OF_SUMMED = """
SELECT coalesce(sum(debits_pending_delta), 0), coalesce(sum(debits_posted_delta), 0),
       coalesce(sum(credits_pending_delta), 0), coalesce(sum(credits_posted_delta), 0)
  FROM {s}.entries WHERE account_id = %(account)s AND recorded_at <= %(as_of)s
"""
# The same round trip with no table behind it: what the client, the socket and the
# scheduler cost, measured with the as_of queries, to tell their noise from the query's.
FLOOR = "floor: no table"
FLOOR_SQL = "SELECT %(account)s::text, %(as_of)s::timestamptz, %(checkpoint)s::text"
AS_OF_EXPLAIN = "EXPLAIN (ANALYZE, TIMING OFF, SUMMARY ON, FORMAT JSON) "
AS_OF_SAMPLES_DEFAULT = 3_000
AS_OF_WARMUP_SAMPLES = 300
AS_OF_EXPLAIN_SAMPLES = 300

# --- projector lag -------------------------------------------------------------------------
LAG_EVENTS_PER_S_DEFAULT = 1_000
LAG_S_DEFAULT = 30.0
LAG_WARMUP_S = 2.0  # appended, not counted: the projector's first passes settle
LAG_WRITERS_DEFAULT = 8
# How often the bench reads the checkpoints: a lag is overstated by at most this.
LAG_POLL_S = 0.02
LAG_DRAIN_S_MAX = 60.0
# Below this share of the paced rate, the writers could not sustain the load.
LAG_RATE_SUSTAINED_MIN = 0.98
PROJECTOR_START_S_MAX = 60.0
PROJECTOR_STOP_S_MAX = 15.0

# --- targets (issue 9) ---------------------------------------------------------------------
REPLAY_EVENTS_PER_S_MIN = 100_000
REPLAY_OVER_AGGREGATE_MAX = 3.0
LAG_P99_MS_MAX = 1_000.0
AS_OF_P99_GROWTH_MAX = 1.2

# The aggregate counts its fastest run (the first may read the events from disk): the
# stricter bar for the replays.
AGGREGATE_RUNS = 2

# The balances of every account, in one pass over the events: holds from each money
# event's PaymentInitiated (stream version 1), postings from each settlement.
AGGREGATE_SQL = """
WITH money AS (
    SELECT e.global_seq, e.stream_id, e.event_type, e.payload
      FROM events e
     WHERE e.event_type IN ('FundsReserved', 'FundsReleased', 'PaymentSettled')
),
moves AS (
    SELECT x.account_id, m.global_seq, x.dp, 0::bigint AS dpo, x.cp, 0::bigint AS cpo
      FROM money m
      JOIN events i ON i.stream_id = m.stream_id AND i.stream_version = 1
      CROSS JOIN LATERAL (
          SELECT CASE WHEN m.event_type = 'FundsReserved' THEN 1 ELSE -1 END
                 * (i.payload->>'amount_minor')::bigint AS amount) AS h
      CROSS JOIN LATERAL (VALUES
          (i.payload->>'payer_account_id', h.amount, 0::bigint),
          (i.payload->>'payee_account_id', 0::bigint, h.amount)) AS x(account_id, dp, cp)
    UNION ALL
    SELECT p.account_id, m.global_seq, 0::bigint,
           CASE WHEN p.side = 'debit' THEN p.amount_minor ELSE 0 END, 0::bigint,
           CASE WHEN p.side = 'credit' THEN p.amount_minor ELSE 0 END
      FROM money m
      CROSS JOIN LATERAL jsonb_to_recordset(m.payload->'postings')
           AS p(account_id text, side text, amount_minor bigint)
     WHERE m.event_type = 'PaymentSettled'
),
per_account AS (
    SELECT account_id, sum(dp)::bigint AS dp, sum(dpo)::bigint AS dpo, sum(cp)::bigint AS cp,
           sum(cpo)::bigint AS cpo, max(global_seq) AS last_seq
      FROM moves GROUP BY account_id
)
SELECT o.payload->>'account_id', o.payload->>'currency', o.payload->>'kind',
       (o.payload->>'overdraft_limit_minor')::bigint,
       coalesce(a.dp, 0), coalesce(a.dpo, 0), coalesce(a.cp, 0), coalesce(a.cpo, 0),
       o.global_seq, coalesce(a.last_seq, o.global_seq)
  FROM events o
  LEFT JOIN per_account a ON a.account_id = o.payload->>'account_id'
 WHERE o.event_type = 'AccountOpened'
 ORDER BY 1
"""
_BALANCES_ROWS = """
SELECT account_id, currency, kind, overdraft_limit_minor, debits_pending, debits_posted,
       credits_pending, credits_posted, opened_seq, last_seq
  FROM projection.balances ORDER BY account_id
"""
# Accounts whose statement's last row (in either order) disagrees with their balances.
_STATEMENT_DISAGREES = """
SELECT count(*) FROM projection.balances b
  LEFT JOIN LATERAL (
      SELECT x.debits_pending, x.debits_posted, x.credits_pending, x.credits_posted
        FROM projection.entries x WHERE x.account_id = b.account_id
       ORDER BY x.global_seq DESC LIMIT 1) AS s ON true
  LEFT JOIN LATERAL (
      SELECT x.at_debits_pending, x.at_debits_posted, x.at_credits_pending,
             x.at_credits_posted
        FROM projection.entries x WHERE x.account_id = b.account_id
       ORDER BY x.recorded_at DESC, x.global_seq DESC LIMIT 1) AS t ON true
 WHERE (coalesce(s.debits_pending, 0), coalesce(s.debits_posted, 0),
        coalesce(s.credits_pending, 0), coalesce(s.credits_posted, 0))
       IS DISTINCT FROM (b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted)
    OR (coalesce(t.at_debits_pending, 0), coalesce(t.at_debits_posted, 0),
        coalesce(t.at_credits_pending, 0), coalesce(t.at_credits_posted, 0))
       IS DISTINCT FROM (b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted)
"""


@dataclass
class Account:
    account_id: str
    kind: str
    overdraft_limit_minor: int
    stripes: int
    opened_seq: int = 0
    # Per stripe, as the positions hold it once every generated hold has settled.
    debits_posted: list[int] = field(default_factory=list)
    credits_posted: list[int] = field(default_factory=list)
    last_seq: list[int] = field(default_factory=list)


def credit_stripe(stream_id: str, stripes: int) -> int:
    """ledger_credit_stripe: which stripe of an account a payment's credits land on."""
    if stripes == 1:
        return 0
    return hashlib.sha256(stream_id.encode()).digest()[0] % stripes


Side = Literal["debit", "credit"]


def settlement_postings(
    payer: str, payee: Account, amount_minor: int
) -> tuple[list[tuple[str, Side, int]], int]:
    """The postings and fee of a settlement, as the saga makes them."""
    fee_minor = amount_minor * FEE_BPS // 10_000 if payee.kind == "merchant" else 0
    postings: list[tuple[str, Side, int]] = [
        (payer, "debit", amount_minor),
        (payee.account_id, "credit", amount_minor - fee_minor),
    ]
    if fee_minor > 0:
        postings.append((FEES_ACCOUNT, "credit", fee_minor))
    return postings, fee_minor


class History:
    """The generated log: accounts, then payment lifecycles, with the positions they leave."""

    def __init__(self, accounts: int, seed: int, start: datetime) -> None:
        self.rng = random.Random(seed)
        self.start = start
        self.next_seq = 1
        merchants = max(1, accounts // MERCHANT_EVERY)
        customers = max(2, accounts - merchants - 2)
        self.accounts: dict[str, Account] = {}
        self._add(FEES_ACCOUNT, "fees", 0)
        self._add(HOT_MERCHANT, "merchant", 0)
        self.merchants = [f"merch-{i:05d}" for i in range(merchants - 1)] or [HOT_MERCHANT]
        self.customers = [f"cust-{i:06d}" for i in range(customers)]
        for account_id in self.merchants:
            self._add(account_id, "merchant", 0)
        for account_id in self.customers:
            self._add(account_id, "customer", OVERDRAFT_LIMIT_MINOR)
        self.stream_lines: list[str] = []

    def _add(self, account_id: str, kind: str, overdraft_limit_minor: int) -> None:
        if account_id in self.accounts:
            return
        stripes = STRIPED_KINDS_STRIPES if kind in ("merchant", "settlement", "fees") else 1
        self.accounts[account_id] = Account(
            account_id,
            kind,
            overdraft_limit_minor,
            stripes,
            debits_posted=[0] * stripes,
            credits_posted=[0] * stripes,
            last_seq=[0] * stripes,
        )

    def recorded_at(self, seq: int) -> datetime:
        return self.start + timedelta(microseconds=seq * EVENT_SPACING_US)

    def _event(
        self, stream_id: str, version: int, event_type: str, payload: str, correlation: str
    ) -> tuple[int, str]:
        seq = self.next_seq
        self.next_seq += 1
        line = (
            f"{seq}\t{stream_id}\t{version}\t{EVENT_ID_PREFIX}{seq:012x}\t{event_type}\t1\t"
            f"{payload}\t{ACTOR}\t{correlation}\t\\N\t\\N\t{self.recorded_at(seq).isoformat()}\t"
            f"{PLACEHOLDER_HASH_COPY}\t{PLACEHOLDER_HASH_COPY}\t2\n"
        )
        return seq, line

    def open_accounts(self) -> tuple[list[str], list[str]]:
        """AccountOpened for every account (events), and their accounts rows."""
        events: list[str] = []
        rows: list[str] = []
        for account in self.accounts.values():
            overdraft = "null" if account.kind == "external" else str(account.overdraft_limit_minor)
            payload = (
                f'{{"account_id": "{account.account_id}", "currency": "{CURRENCY}", '
                f'"kind": "{account.kind}", "overdraft_limit_minor": {overdraft}, '
                '"metadata": {}}'
            )
            stream_id = f"account-{account.account_id}"
            seq, line = self._event(stream_id, 1, "AccountOpened", payload, "\\N")
            events.append(line)
            account.opened_seq = seq
            account.last_seq = [seq] * account.stripes
            rows.append(
                f"{account.account_id}\t{CURRENCY}\t{account.kind}\t"
                f"{account.overdraft_limit_minor}\t{{}}\t{account.stripes}\t{seq}\n"
            )
            self.stream_lines.append(f"{stream_id}\t1\topen\t{PLACEHOLDER_HASH_COPY}\t{seq}\n")
        return events, rows

    def pick_payment(self) -> tuple[str, Account, int]:
        """A payer (a customer), a payee and an amount."""
        payer = self.rng.choice(self.customers)
        roll = self.rng.randrange(100)
        if roll < HOT_PAYEE_PERCENT:
            payee = HOT_MERCHANT
        elif roll < HOT_PAYEE_PERCENT + CUSTOMER_PAYEE_PERCENT:
            payee = self.rng.choice(self.customers)
            while payee == payer:
                payee = self.rng.choice(self.customers)
        else:
            payee = self.rng.choice(self.merchants)
        return payer, self.accounts[payee], self.rng.randint(AMOUNT_MINOR_MIN, AMOUNT_MINOR_MAX)

    def payments(self, first: int, count: int) -> Iterator[str]:
        """The events of lifecycles first .. first+count-1, as COPY text in chunks."""
        lines: list[str] = []
        for block_start in range(first, first + count, BLOCK_LIFECYCLES):
            block = range(block_start, min(block_start + BLOCK_LIFECYCLES, first + count))
            chosen = {n: self.pick_payment() for n in block}
            for step, event_type in enumerate(
                ("PaymentInitiated", "PaymentAuthorized", "FundsReserved", "PaymentSettled"),
                start=1,
            ):
                for n in block:
                    lines.append(self._payment_event(n, step, event_type, *chosen[n]))
            if len(lines) >= COPY_CHUNK_ROWS:
                yield "".join(lines)
                lines.clear()
        if lines:
            yield "".join(lines)

    def _payment_event(
        self, n: int, step: int, event_type: str, payer: str, payee: Account, amount: int
    ) -> str:
        payment_id = f"p{n:08d}"
        stream_id = payment_stream(payment_id)
        terms = (
            f'"payer_account_id": "{payer}", "payee_account_id": "{payee.account_id}", '
            f'"amount_minor": {amount}, "currency": "{CURRENCY}"'
        )
        if event_type == "PaymentSettled":
            postings, fee_minor = settlement_postings(payer, payee, amount)
            rendered = ", ".join(
                f'{{"account_id": "{a}", "side": "{side}", "amount_minor": {minor}}}'
                for a, side, minor in postings
            )
            payload = (
                f'{{"payment_id": "{payment_id}", "currency": "{CURRENCY}", '
                f'"postings": [{rendered}], "fee_minor": {fee_minor}}}'
            )
            seq, line = self._event(stream_id, step, event_type, payload, stream_id)
            self._settled(stream_id, seq, postings)
            self.stream_lines.append(f"{stream_id}\t4\tsettled\t{PLACEHOLDER_HASH_COPY}\t{seq}\n")
            return line
        if event_type == "PaymentInitiated":
            payload = (
                f'{{"payment_id": "{payment_id}", {terms}, "reference": null, "metadata": {{}}}}'
            )
        elif event_type == "PaymentAuthorized":
            payload = (
                f'{{"payment_id": "{payment_id}", "authorization_id": "auth-{payment_id}", '
                f'"processor": "{ACTOR}"}}'
            )
        else:
            expires_at = (self.recorded_at(self.next_seq) + HOLD_EXPIRY).isoformat()
            payload = f'{{"payment_id": "{payment_id}", {terms}, "expires_at": "{expires_at}"}}'
        return self._event(stream_id, step, event_type, payload, stream_id)[1]

    def _settled(self, stream_id: str, seq: int, postings: list[tuple[str, Side, int]]) -> None:
        # The hold (FundsReserved) came and went on the same rows: only postings remain,
        # and every row the payment touched was last moved by its settlement.
        for account_id, side, minor in postings:
            account = self.accounts[account_id]
            if side == "debit":
                account.debits_posted[0] += minor
                account.last_seq[0] = seq
            else:
                stripe = credit_stripe(stream_id, account.stripes)
                account.credits_posted[stripe] += minor
                account.last_seq[stripe] = seq

    def take_stream_lines(self) -> str:
        text = "".join(self.stream_lines)
        self.stream_lines.clear()
        return text

    def position_lines(self) -> str:
        lines = []
        for a in self.accounts.values():
            for stripe in range(a.stripes):
                lines.append(
                    f"{a.account_id}\t{stripe}\t{CURRENCY}\t{a.overdraft_limit_minor}\t"
                    f"{a.stripes}\t0\t{a.debits_posted[stripe]}\t0\t{a.credits_posted[stripe]}\t"
                    f"{a.last_seq[stripe]}\n"
                )
        return "".join(lines)

    def expected_balances(self) -> dict[str, tuple[int, int, int, int]]:
        """(debits_pending, debits_posted, credits_pending, credits_posted) per account."""
        return {
            a.account_id: (0, sum(a.debits_posted), 0, sum(a.credits_posted))
            for a in self.accounts.values()
        }


# --- results -------------------------------------------------------------------------------
@dataclass
class Latency:
    samples: int
    p50_us: float
    p99_us: float
    max_us: float


def latency(values_us: list[float]) -> Latency:
    return Latency(
        samples=len(values_us),
        p50_us=round(percentile(values_us, 0.50), 1),
        p99_us=round(percentile(values_us, 0.99), 1),
        max_us=round(max(values_us), 1),
    )


@dataclass
class AsOf:
    payment_events: int  # the size of the log, in payment events
    cohort: str
    # Rows of the cohort's account(s) in the statement: the hot accounts' history length.
    history_rows: int
    round_trip: Latency  # the query as a client sees it (prepared, unix socket)
    server: Latency  # the executor's own time (EXPLAIN ANALYZE), on fewer samples


@dataclass
class Stage:
    payment_events: int
    log_events: int
    generate_s: float
    generate_events_per_s: float
    vacuum_analyze_s: float
    project_s: float
    project_events_per_s: float
    as_of: list[AsOf]


@dataclass
class Replay:
    projection: str
    events: int
    batches: int
    seconds: float
    events_per_s: float
    over_aggregate: float
    server_cpu_s: float | None


@dataclass
class Aggregate:
    accounts: int
    seconds: float
    runs_s: list[float]
    equals_balances: bool
    equals_generated_positions: bool
    statement_accounts_disagreeing: int


@dataclass
class ModelLag:
    projection: str
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class Lag:
    target_events_per_s: int
    writers: int
    seconds: float
    events: int
    achieved_events_per_s: float
    append_p50_ms: float
    append_p99_ms: float
    schedule_slip_p99_ms: float
    schedule_slip_max_ms: float
    # Every read model holds the event: the latest of the models' times.
    all_models: ModelLag
    per_model: list[ModelLag]
    projector_cpu_s_per_s: float
    server_cpu_s_per_s: float | None
    poll_ms: float


# --- database ------------------------------------------------------------------------------
async def connect(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(to_libpq_url(url), autocommit=True)


async def copy_text(conn: psycopg.AsyncConnection[Any], statement: str, chunks: Any) -> None:
    async with conn.cursor() as cursor, cursor.copy(statement) as copy:
        for chunk in chunks:
            await copy.write(chunk)


async def generate_stage(
    conn: psycopg.AsyncConnection[Any], history: History, first: int, count: int
) -> tuple[float, int]:
    """Append lifecycles first .. first+count-1 with COPY, in one transaction with their
    stream heads; (seconds, events)."""
    seq_before = history.next_seq
    started = time.perf_counter()
    async with conn.transaction():
        await copy_text(conn, _COPY_EVENTS, history.payments(first, count))
        await copy_text(conn, _COPY_STREAMS, [history.take_stream_lines()])
        await conn.execute("SELECT setval('events_global_seq', %s)", (history.next_seq - 1,))
    return time.perf_counter() - started, history.next_seq - seq_before


async def open_accounts(conn: psycopg.AsyncConnection[Any], history: History) -> None:
    events, rows = history.open_accounts()
    async with conn.transaction():
        await copy_text(conn, _COPY_EVENTS, ["".join(events)])
        await copy_text(conn, _COPY_ACCOUNTS, ["".join(rows)])
        await copy_text(conn, _COPY_STREAMS, [history.take_stream_lines()])
        await conn.execute("SELECT setval('events_global_seq', %s)", (history.next_seq - 1,))


async def vacuum_analyze(conn: psycopg.AsyncConnection[Any], tables: list[str]) -> float:
    """What autovacuum would have done by now on a live system, done at once."""
    started = time.perf_counter()
    for table in tables:
        await conn.execute(f"VACUUM (ANALYZE) {table}")
    return time.perf_counter() - started


async def project_live(conn: psycopg.AsyncConnection[Any]) -> float:
    """Bring every live read model up to the safe horizon; seconds."""
    started = time.perf_counter()
    until = await safe_seq(conn)
    for projection in READ_MODELS.values():
        await catch_up(conn, projection, until=until, events_max=REPLAY_BATCH_EVENTS_MAX)
    return time.perf_counter() - started


# --- as_of ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatementAt:
    """A statement table to query: the live one, or one materialised at a point."""

    payment_events: int
    schema: str
    span: tuple[datetime, datetime]  # the payment history it holds


def as_of_params(account_id: str, instant: datetime) -> dict[str, Any]:
    return {"account": account_id, "as_of": instant, "checkpoint": STATEMENT_CHECKPOINT}


def history_rows(conn: psycopg.Connection[Any], cohort: str, schema: str) -> int:
    """A cohort's rows in the statement: per account on average for random accounts."""
    if cohort == FLOOR:
        return 0
    if cohort == "random account":
        query = "SELECT count(*) / greatest(1, count(DISTINCT account_id)) FROM {s}.entries"
        row = conn.execute(statement(query, schema)).fetchone()
    else:
        query = "SELECT count(*) FROM {s}.entries WHERE account_id = %s"
        row = conn.execute(statement(query, schema), (cohort,)).fetchone()
    assert row is not None
    return int(row[0])


def measure_as_of(
    owner_url: str, history: History, seed: int, samples: int, tables: list[StatementAt]
) -> list[AsOf]:
    """as_of's query on random accounts, on the hot merchant and on the fees account, at
    random instants of each table's payment history. With several tables, every round
    queries each of them in turn, so that noise from the rest of the machine falls on
    all of them alike."""
    rng = random.Random(seed)
    ordinary = [*history.customers, *history.merchants]
    cohorts: dict[str, Callable[[], str]] = {
        "random account": lambda: rng.choice(ordinary),
        HOT_MERCHANT: lambda: HOT_MERCHANT,
        FEES_ACCOUNT: lambda: FEES_ACCOUNT,
        FLOOR: lambda: rng.choice(ordinary),
    }
    queries = {t.schema: statement(AS_OF_SQL, t.schema) for t in tables}
    explains = {t.schema: statement(AS_OF_EXPLAIN + AS_OF_SQL, t.schema) for t in tables}

    def instant(table: StatementAt) -> datetime:
        first, last = table.span
        span_us = int((last - first) / timedelta(microseconds=1))
        return first + timedelta(microseconds=rng.randrange(span_us + 1))

    round_trip_us: dict[tuple[str, str], list[float]] = {}
    server_us: dict[tuple[str, str], list[float]] = {}
    with psycopg.connect(to_libpq_url(owner_url), autocommit=True) as conn:
        for index in range(AS_OF_WARMUP_SAMPLES):
            for t in tables:
                account_id = HOT_MERCHANT if index % 2 else rng.choice(ordinary)
                params = as_of_params(account_id, instant(t))
                answer = conn.execute(queries[t.schema], params, prepare=True).fetchall()
                summed = conn.execute(statement(_AS_OF_SUMMED, t.schema), params).fetchone()
                assert len(answer) == 1 and summed is not None
                position = tuple(0 if v is None else v for v in answer[0][5:9])
                assert position == tuple(summed), (t.schema, params, position, summed)
        for name, pick in cohorts.items():
            for index in range(samples):
                rotated = tables[index % len(tables) :] + tables[: index % len(tables)]
                for t in rotated:
                    query = FLOOR_SQL if name == FLOOR else queries[t.schema]
                    params = as_of_params(pick(), instant(t))
                    started = time.perf_counter()
                    conn.execute(query, params, prepare=True).fetchall()
                    elapsed_us = (time.perf_counter() - started) * 1e6
                    round_trip_us.setdefault((name, t.schema), []).append(elapsed_us)
            for _ in range(min(samples, AS_OF_EXPLAIN_SAMPLES)):
                for t in tables:
                    explain = AS_OF_EXPLAIN + FLOOR_SQL if name == FLOOR else explains[t.schema]
                    row = conn.execute(explain, as_of_params(pick(), instant(t))).fetchone()
                    assert row is not None
                    executed_us = float(row[0][0]["Execution Time"]) * 1000
                    server_us.setdefault((name, t.schema), []).append(executed_us)
        results = []
        for t in tables:
            for name in cohorts:
                results.append(
                    AsOf(
                        payment_events=t.payment_events,
                        cohort=name,
                        history_rows=history_rows(conn, name, t.schema),
                        round_trip=latency(round_trip_us[(name, t.schema)]),
                        server=latency(server_us[(name, t.schema)]),
                    )
                )
    return results


async def materialise_statements(
    owner_url: str, stages: list[tuple[int, int, tuple[datetime, datetime]]]
) -> list[StatementAt]:
    """The statement as it was at each earlier stage, each in a schema of its own
    (`ledger.replay.materialise`); stages are (payment events, last global_seq, span)."""
    conn = await connect(owner_url)
    tables = []
    try:
        for payment_events, until, span in stages:
            schema = f"bench_statement_{payment_events}"
            await plan_materialise(conn, STATEMENT, schema, until, restart=True)
            await materialise(conn, STATEMENT, schema, until)
            await conn.execute(statement("VACUUM (ANALYZE) {s}.entries", schema))
            tables.append(StatementAt(payment_events, schema, span))
    finally:
        await conn.close()
    return tables


# --- replay and the aggregate --------------------------------------------------------------
async def replay(owner_url: str, projection: Projection, server_pid: int | None) -> Replay:
    """Rebuild one read model from event 1 (`ledger.replay.rebuild`), alone."""
    events = batches = 0

    def on_batch(batch: Any) -> None:
        nonlocal events, batches
        events += batch.events
        batches += 1

    conn = await connect(owner_url)
    try:
        cpu_before = server_cpu_s(server_pid)
        started = time.perf_counter()
        await rebuild(conn, projection, restart=True, on_batch=on_batch)
        seconds = time.perf_counter() - started
        cpu_after = server_cpu_s(server_pid)
    finally:
        await conn.close()
    cpu = None if cpu_before is None or cpu_after is None else round(cpu_after - cpu_before, 2)
    return Replay(
        projection=projection.name,
        events=events,
        batches=batches,
        seconds=round(seconds, 3),
        events_per_s=round(events / seconds),
        over_aggregate=0.0,
        server_cpu_s=cpu,
    )


async def aggregate(owner_url: str, history: History) -> Aggregate:
    """The balances as one SQL aggregate over the events, timed, checked against the
    balances read model and against the positions the generator computed."""
    conn = await connect(owner_url)
    try:
        runs_s = []
        rows: list[Any] = []
        for _ in range(AGGREGATE_RUNS):
            started = time.perf_counter()
            rows = await (await conn.execute(AGGREGATE_SQL)).fetchall()
            runs_s.append(round(time.perf_counter() - started, 3))
        balances = await (await conn.execute(_BALANCES_ROWS)).fetchall()
        disagreeing = await (await conn.execute(_STATEMENT_DISAGREES)).fetchone()
    finally:
        await conn.close()
    expected = history.expected_balances()
    generated = {row[0]: tuple(row[4:8]) for row in rows}
    return Aggregate(
        accounts=len(rows),
        seconds=min(runs_s),
        runs_s=runs_s,
        equals_balances=[tuple(r) for r in rows] == [tuple(r) for r in balances],
        equals_generated_positions=generated == expected,
        statement_accounts_disagreeing=int(disagreeing[0]) if disagreeing else -1,
    )


# --- projector lag -------------------------------------------------------------------------
async def run_projector_child(app_url: str) -> None:
    """`--run-projector`: the real projector over every read model, until SIGTERM.
    Says `ready` on stdout after its first pass."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    store = await EventStore.open(app_url, pool_size=2)
    said_ready = False

    async def on_pass(applied: int) -> None:
        nonlocal said_ready
        if not said_ready:
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            said_ready = True

    try:
        await Projector(store, to_libpq_url(app_url), list(READ_MODELS.values())).run(
            stop, on_pass=on_pass
        )
    finally:
        await store.close()


def process_cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def poll_checkpoints(
    conn: psycopg.AsyncConnection[Any],
    covers: dict[str, list[tuple[int, datetime]]],
    stop: asyncio.Event,
) -> None:
    """Record, every LAG_POLL_S, when each checkpoint was first seen past each point."""
    loop = asyncio.get_running_loop()
    due = loop.time()
    while not stop.is_set():
        cursor = await conn.execute(
            "SELECT projection, last_seq, clock_timestamp() FROM projection.checkpoints "
            "WHERE projection = ANY(%s)",
            (list(covers),),
        )
        for name, last_seq, now in await cursor.fetchall():
            seen = covers[name]
            if not seen or last_seq > seen[-1][0]:
                seen.append((int(last_seq), now))
        due += LAG_POLL_S
        await asyncio.sleep(max(0.0, due - loop.time()))


def covered_at(seen: list[tuple[int, datetime]], seq: int) -> datetime | None:
    index = bisect.bisect_left(seen, seq, key=lambda cover: cover[0])
    return seen[index][1] if index < len(seen) else None


async def measure_lag(
    urls: DatabaseUrls,
    history: History,
    *,
    events_per_s: int,
    seconds: float,
    writers: int,
    seed: int,
    server_pid: int | None,
) -> Lag:
    rng = random.Random(seed)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--run-projector",
        urls.app_url,
        stdout=asyncio.subprocess.PIPE,
    )
    poll_conn = await connect(urls.owner_url)
    store = await EventStore.open(urls.app_url, pool_size=writers)
    covers: dict[str, list[tuple[int, datetime]]] = {name: [] for name in READ_MODELS}
    stop_polling = asyncio.Event()
    poller: asyncio.Task[None] | None = None
    try:
        assert child.stdout is not None
        ready = await asyncio.wait_for(child.stdout.readline(), PROJECTOR_START_S_MAX)
        if ready.strip() != b"ready":
            raise RuntimeError(f"the projector did not start (it said {ready!r})")
        poller = asyncio.create_task(poll_checkpoints(poll_conn, covers, stop_polling))

        lifecycle_s = 4 / events_per_s
        warmup = round(LAG_WARMUP_S / lifecycle_s)
        total = warmup + round(seconds / lifecycle_s)
        loop = asyncio.get_running_loop()
        expires_at = datetime.now(UTC) + timedelta(hours=1)
        appended: list[tuple[int, datetime]] = []  # measured events: (global_seq, recorded_at)
        append_ms: list[float] = []
        slip_ms: list[float] = []
        start = finished_at = 0.0  # set once the writers are warm
        next_index = 0

        async def lifecycle(index: int) -> None:
            payer, payee, amount = history.pick_payment()
            payment_id = uuid.UUID(int=rng.getrandbits(128)).hex
            stream = payment_stream(payment_id)
            postings, fee_minor = settlement_postings(payer, payee, amount)
            events = [
                PaymentInitiated(
                    payment_id=payment_id,
                    payer_account_id=payer,
                    payee_account_id=payee.account_id,
                    amount_minor=amount,
                    currency=CURRENCY,
                ),
                PaymentAuthorized(
                    payment_id=payment_id, authorization_id=payment_id, processor=ACTOR
                ),
                FundsReserved(
                    payment_id=payment_id,
                    payer_account_id=payer,
                    payee_account_id=payee.account_id,
                    amount_minor=amount,
                    currency=CURRENCY,
                    expires_at=expires_at,
                ),
                PaymentSettled(
                    payment_id=payment_id,
                    currency=CURRENCY,
                    postings=[
                        Posting(account_id=account_id, side=side, amount_minor=minor)
                        for account_id, side, minor in postings
                    ],
                    fee_minor=fee_minor,
                ),
            ]
            for step, event in enumerate(events):
                began = time.perf_counter()
                result = await store.append(
                    NewEvent(stream, event, event_id_for(stream, str(step)), ACTOR, stream)
                )
                if index >= warmup:
                    append_ms.append((time.perf_counter() - began) * 1000)
                    appended.append((result.event.global_seq, result.event.recorded_at))

        async def writer() -> None:
            nonlocal next_index, finished_at
            while next_index < total:
                index = next_index
                next_index += 1
                due = start + index * lifecycle_s
                await asyncio.sleep(max(0.0, due - loop.time()))
                if index >= warmup:
                    slip_ms.append((loop.time() - due) * 1000)
                await lifecycle(index)
                finished_at = max(finished_at, loop.time())

        # Each pooled connection appends before the clock starts: the first call of
        # ledger_append on a connection compiles it and plans its statements.
        await store.appends.wait(PROJECTOR_START_S_MAX)
        await asyncio.gather(*(lifecycle(-1) for _ in range(writers)))
        start = finished_at = loop.time() + 0.1
        cpu_from = loop.time()
        projector_cpu_before = process_cpu_s(child.pid)
        server_cpu_before = server_cpu_s(server_pid)
        await asyncio.gather(*(writer() for _ in range(writers)))
        measured_from = start + warmup * lifecycle_s
        write_s = finished_at - measured_from
        last_seq = max(seq for seq, _ in appended)
        drain_deadline = loop.time() + LAG_DRAIN_S_MAX
        while min((seen[-1][0] if seen else 0) for seen in covers.values()) < last_seq:
            if loop.time() > drain_deadline:
                raise RuntimeError("the projector did not catch up within the drain limit")
            await asyncio.sleep(LAG_POLL_S)
        cpu_window_s = loop.time() - cpu_from
        projector_cpu = process_cpu_s(child.pid) - projector_cpu_before
        server_cpu_after = server_cpu_s(server_pid)
    finally:
        stop_polling.set()
        if poller is not None:
            await poller
        await store.close()
        await poll_conn.close()
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.wait(), PROJECTOR_STOP_S_MAX)
            except TimeoutError:
                child.kill()
                await child.wait()

    per_event: dict[str, list[float]] = {name: [] for name in covers}
    all_models: list[float] = []
    for seq, recorded_at in appended:
        latest = 0.0
        for name, seen in covers.items():
            at = covered_at(seen, seq)
            assert at is not None, "drained: every checkpoint covers every measured event"
            lag_ms = (at - recorded_at) / timedelta(milliseconds=1)
            per_event[name].append(lag_ms)
            latest = max(latest, lag_ms)
        all_models.append(latest)

    def model_lag(name: str, values: list[float]) -> ModelLag:
        return ModelLag(
            projection=name,
            p50_ms=round(percentile(values, 0.50), 1),
            p99_ms=round(percentile(values, 0.99), 1),
            max_ms=round(max(values), 1),
        )

    server_cpu = None
    if server_cpu_before is not None and server_cpu_after is not None:
        server_cpu = round((server_cpu_after - server_cpu_before) / cpu_window_s, 3)
    return Lag(
        target_events_per_s=events_per_s,
        writers=writers,
        seconds=round(write_s, 2),
        events=len(appended),
        achieved_events_per_s=round(len(appended) / write_s, 1),
        append_p50_ms=round(percentile(append_ms, 0.50), 2),
        append_p99_ms=round(percentile(append_ms, 0.99), 2),
        schedule_slip_p99_ms=round(percentile(slip_ms, 0.99), 1),
        schedule_slip_max_ms=round(max(slip_ms), 1),
        all_models=model_lag("all read models", all_models),
        per_model=[model_lag(name, values) for name, values in per_event.items()],
        projector_cpu_s_per_s=round(projector_cpu / cpu_window_s, 3),
        server_cpu_s_per_s=server_cpu,
        poll_ms=LAG_POLL_S * 1000,
    )


# --- the run -------------------------------------------------------------------------------
@dataclass
class Target:
    figure: str
    value: float
    target: str
    met: bool


def as_of_growth(
    small: list[AsOf], large: list[AsOf], label: str, size_small: int, size_large: int
) -> list[Target]:
    found = []
    for before, after in zip(small, large, strict=True):
        if after.cohort == FLOOR:
            continue
        growth = after.round_trip.p99_us / before.round_trip.p99_us
        found.append(
            Target(
                f"as_of p99 {after.cohort}, {size_large:,} / {size_small:,} events ({label})",
                round(growth, 3),
                f"<= {AS_OF_P99_GROWTH_MAX}",
                growth <= AS_OF_P99_GROWTH_MAX,
            )
        )
    return found


def targets(
    stages: list[Stage], side_by_side: list[AsOf], replays: list[Replay], lag: Lag | None
) -> list[Target]:
    found = []
    for r in replays:
        found.append(
            Target(
                f"replay {r.projection}, events/s",
                r.events_per_s,
                f">= {REPLAY_EVENTS_PER_S_MIN:,}",
                r.events_per_s >= REPLAY_EVENTS_PER_S_MIN,
            )
        )
        found.append(
            Target(
                f"replay {r.projection} / SQL aggregate, time",
                r.over_aggregate,
                f"<= {REPLAY_OVER_AGGREGATE_MAX}",
                r.over_aggregate <= REPLAY_OVER_AGGREGATE_MAX,
            )
        )
    if lag is not None:
        # The lag target assumes the write load was sustained.
        rate_min = LAG_RATE_SUSTAINED_MIN * lag.target_events_per_s
        found.append(
            Target(
                "lag phase: achieved write rate, events/s",
                lag.achieved_events_per_s,
                f">= {rate_min:.0f}",
                lag.achieved_events_per_s >= rate_min,
            )
        )
        found.append(
            Target(
                f"projector lag p99 at {lag.achieved_events_per_s:.0f} events/s, ms",
                lag.all_models.p99_ms,
                f"< {LAG_P99_MS_MAX:.0f}",
                lag.all_models.p99_ms < LAG_P99_MS_MAX,
            )
        )
    smallest, largest = stages[0].payment_events, stages[-1].payment_events
    found += as_of_growth(
        [a for a in side_by_side if a.payment_events == smallest],
        [a for a in side_by_side if a.payment_events == largest],
        "side by side",
        smallest,
        largest,
    )
    found += as_of_growth(stages[0].as_of, stages[-1].as_of, "during growth", smallest, largest)
    return found


def print_report(
    version: str,
    stages: list[Stage],
    side_by_side: list[AsOf],
    replays: list[Replay],
    agg: Aggregate,
    lag: Lag | None,
    found: list[Target],
) -> None:
    out = Console(width=170)
    table = Table(title=f"log stages: generated with COPY, then projected (PostgreSQL {version})")
    for column in (
        "payment events",
        "log events",
        "generate s",
        "generate events/s",
        "vacuum+analyze s",
        "project s",
        "project events/s",
    ):
        table.add_column(column, justify="right")
    for s in stages:
        table.add_row(
            f"{s.payment_events:,}",
            f"{s.log_events:,}",
            f"{s.generate_s:.1f}",
            f"{s.generate_events_per_s:,}",
            f"{s.vacuum_analyze_s:.1f}",
            f"{s.project_s:.1f}",
            f"{s.project_events_per_s:,}",
        )
    out.print(table)

    table = Table(
        title="as_of: round trip (prepared, unix socket) during growth and side by side; "
        "server = EXPLAIN ANALYZE execution, side by side"
    )
    for column in (
        "payment events",
        "cohort",
        "history rows",
        "growth p50 us",
        "growth p99 us",
        "side p50 us",
        "side p99 us",
        "server p50 us",
        "server p99 us",
    ):
        table.add_column(column, justify="right")
    for s in stages:
        for grown in s.as_of:
            side = next(
                a
                for a in side_by_side
                if a.payment_events == s.payment_events and a.cohort == grown.cohort
            )
            table.add_row(
                f"{s.payment_events:,}",
                grown.cohort,
                f"{grown.history_rows:,}",
                f"{grown.round_trip.p50_us:.0f}",
                f"{grown.round_trip.p99_us:.0f}",
                f"{side.round_trip.p50_us:.0f}",
                f"{side.round_trip.p99_us:.0f}",
                f"{side.server.p50_us:.0f}",
                f"{side.server.p99_us:.0f}",
            )
    out.print(table)

    table = Table(title="replay (rebuild into projection_shadow, swap) vs one SQL aggregate")
    for column in (
        "what",
        "events",
        "batches",
        "seconds",
        "events/s",
        "/ aggregate",
        "server CPU s",
    ):
        table.add_column(column, justify="right")
    for r in replays:
        table.add_row(
            f"rebuild {r.projection}",
            f"{r.events:,}",
            str(r.batches),
            f"{r.seconds:.2f}",
            f"{r.events_per_s:,}",
            f"{r.over_aggregate:.2f}",
            "-" if r.server_cpu_s is None else f"{r.server_cpu_s:.1f}",
        )
    table.add_row(
        f"SQL aggregate ({agg.accounts:,} accounts)",
        "",
        "",
        f"{agg.seconds:.2f}",
        "",
        "1.00",
        "",
    )
    out.print(table)
    out.print(
        f"aggregate = balances read model: {agg.equals_balances}; = generated positions: "
        f"{agg.equals_generated_positions}; accounts whose statement disagrees with their "
        f"balance: {agg.statement_accounts_disagreeing}; aggregate runs (s): {agg.runs_s}"
    )

    if lag is not None:
        table = Table(
            title=(
                f"projector lag: {lag.events:,} events appended at {lag.achieved_events_per_s:.0f}"
                f"/s (target {lag.target_events_per_s}) by {lag.writers} writers over "
                f"{lag.seconds:.0f} s; lag = checkpoint seen past the event (polled every "
                f"{lag.poll_ms:.0f} ms) - recorded_at"
            )
        )
        for column in ("read model", "p50 ms", "p99 ms", "max ms"):
            table.add_column(column, justify="right")
        for m in [*lag.per_model, lag.all_models]:
            table.add_row(m.projection, f"{m.p50_ms:.1f}", f"{m.p99_ms:.1f}", f"{m.max_ms:.1f}")
        out.print(table)
        out.print(
            f"append p50 {lag.append_p50_ms} ms, p99 {lag.append_p99_ms} ms; lifecycle start "
            f"behind schedule p99 {lag.schedule_slip_p99_ms} ms, max {lag.schedule_slip_max_ms}"
            f" ms; projector process CPU {lag.projector_cpu_s_per_s:.2f} s/s; PostgreSQL CPU "
            f"{lag.server_cpu_s_per_s if lag.server_cpu_s_per_s is not None else '-'} s/s"
        )

    table = Table(title="targets (issue 9)")
    for column in ("figure", "value", "target", "met"):
        table.add_column(column, justify="right")
    for t in found:
        table.add_row(t.figure, f"{t.value:,}", t.target, "yes" if t.met else "NO")
    out.print(table)


async def run(args: argparse.Namespace) -> None:
    with bench_postgres("bench-replay-", "bench_replay", keep_data=args.keep_data) as db:
        await bench(args, db.urls, db.server, db.pid)


async def bench(
    args: argparse.Namespace, urls: DatabaseUrls, server: str, server_pid: int | None
) -> None:
    conn = await connect(urls.owner_url)
    try:
        version = str((await (await conn.execute("SHOW server_version")).fetchone() or ["?"])[0])
        accounts_n = args.accounts
        planned_events = accounts_n + 4 * args.lifecycles
        start = datetime.now(UTC) - timedelta(
            microseconds=(planned_events + 1) * EVENT_SPACING_US, minutes=1
        )
        history = History(accounts_n, args.seed, start)
        console.print(
            f"PostgreSQL {version}, {server}; {args.lifecycles:,} lifecycles over "
            f"{len(history.accounts):,} accounts"
        )
        await open_accounts(conn, history)
        first_payment_seq = history.next_seq

        stages: list[Stage] = []
        points: list[tuple[int, int, tuple[datetime, datetime]]] = []
        done = 0
        for divisor in STAGE_DIVISORS:
            upto = args.lifecycles // divisor
            generate_s, events = await generate_stage(conn, history, done, upto - done)
            done = upto
            vacuum_s = await vacuum_analyze(conn, ["events", "streams"])
            project_s = await project_live(conn)
            vacuum_s += await vacuum_analyze(
                conn, ["projection.entries", "projection.balances", "projection.payments"]
            )
            log_events = history.next_seq - 1
            span = (history.recorded_at(first_payment_seq), history.recorded_at(log_events))
            points.append((4 * upto, log_events, span))
            as_of = await asyncio.to_thread(
                measure_as_of,
                urls.owner_url,
                history,
                args.seed + divisor,
                args.as_of_samples,
                [StatementAt(4 * upto, LIVE_SCHEMA, span)],
            )
            stage = Stage(
                payment_events=4 * upto,
                log_events=log_events,
                generate_s=round(generate_s, 2),
                generate_events_per_s=round(events / generate_s),
                vacuum_analyze_s=round(vacuum_s, 2),
                project_s=round(project_s, 2),
                project_events_per_s=round(events / project_s),
                as_of=as_of,
            )
            stages.append(stage)
            console.print(
                f"{stage.payment_events:>10,} payment events: generated in {generate_s:.1f} s, "
                f"projected in {project_s:.1f} s; as_of p99 "
                + ", ".join(f"{c.cohort} {c.round_trip.p99_us:.0f} us" for c in as_of)
            )

        # The same sizes again, side by side: the statement materialised as it was at the
        # smaller stages, and the live one.
        tables = await materialise_statements(urls.owner_url, points[:-1])
        full_events, _, full_span = points[-1]
        tables.append(StatementAt(full_events, LIVE_SCHEMA, full_span))
        side_by_side = await asyncio.to_thread(
            measure_as_of, urls.owner_url, history, args.seed, args.as_of_samples, tables
        )
        console.print(
            "as_of p99, side by side: "
            + ", ".join(
                f"{a.cohort} at {a.payment_events:,} {a.round_trip.p99_us:.0f} us"
                for a in side_by_side
            )
        )

        async with conn.transaction():
            await copy_text(conn, _COPY_POSITIONS, [history.position_lines()])
        await vacuum_analyze(conn, ["accounts", "positions"])

        replays = []
        for projection in (BALANCES, STATEMENT):
            result = await replay(urls.owner_url, projection, server_pid)
            console.print(
                f"rebuilt {projection.name}: {result.events:,} events in {result.seconds:.1f} s"
            )
            replays.append(result)
        agg = await aggregate(urls.owner_url, history)
        for r in replays:
            r.over_aggregate = round(r.seconds / agg.seconds, 2)
        console.print(f"SQL aggregate: {agg.seconds:.2f} s (runs {agg.runs_s})")
        if not (agg.equals_balances and agg.equals_generated_positions):
            console.print("[red]the aggregate disagrees with the balances or the generator[/red]")

        lag = None
        if args.lag_s > 0:
            console.print(
                f"projector lag: {args.lag_events_per_s} events/s for {args.lag_s:.0f} s ..."
            )
            lag = await measure_lag(
                urls,
                history,
                events_per_s=args.lag_events_per_s,
                seconds=args.lag_s,
                writers=args.lag_writers,
                seed=args.seed,
                server_pid=server_pid,
            )
    finally:
        await conn.close()

    found = targets(stages, side_by_side, replays, lag)
    print_report(version, stages, side_by_side, replays, agg, lag, found)
    out = args.out or ROOT / "bench" / "results" / f"replay-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "replay",
                "postgres_version": version,
                "postgres": server,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "config": {
                    "lifecycles": args.lifecycles,
                    "accounts": len(history.accounts),
                    "hot_payee_percent": HOT_PAYEE_PERCENT,
                    "fee_bps": FEE_BPS,
                    "as_of_samples": args.as_of_samples,
                    "replay_batch_events_max": REPLAY_BATCH_EVENTS_MAX,
                    "replay_bulk_batch_events_max": REPLAY_BULK_BATCH_EVENTS_MAX,
                    "seed": args.seed,
                },
                "stages": [asdict(s) for s in stages],
                "as_of_side_by_side": [asdict(a) for a in side_by_side],
                "replay": [asdict(r) for r in replays],
                "aggregate": asdict(agg),
                "lag": asdict(lag) if lag is not None else None,
                "targets": [asdict(t) for t in found],
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--lifecycles", type=int, default=LIFECYCLES_DEFAULT)
    parser.add_argument("--accounts", type=int, default=ACCOUNTS_DEFAULT)
    parser.add_argument("--as-of-samples", type=int, default=AS_OF_SAMPLES_DEFAULT)
    parser.add_argument("--lag-s", type=float, default=LAG_S_DEFAULT, help="0: skip")
    parser.add_argument("--lag-events-per-s", type=int, default=LAG_EVENTS_PER_S_DEFAULT)
    parser.add_argument("--lag-writers", type=int, default=LAG_WRITERS_DEFAULT)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--keep-data", action="store_true", help="keep the data directory (server stopped)"
    )
    parser.add_argument("--run-projector", metavar="APP_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lifecycles < BLOCK_LIFECYCLES * STAGE_DIVISORS[0]:
        parser.error(f"--lifecycles must be at least {BLOCK_LIFECYCLES * STAGE_DIVISORS[0]}")
    main_coroutine = run_projector_child(args.run_projector) if args.run_projector else run(args)
    # uvloop (installed with uvicorn[standard]) is what the services run on too.
    try:
        import uvloop

        uvloop.run(main_coroutine)
    except ImportError:
        asyncio.run(main_coroutine)


if __name__ == "__main__":
    main()
