"""Ledger append latency as the events table grows: 10,000 to 10,000,000 events.

The log is grown in stages (`--sizes`, by default 10,000, 100,000, 1,000,000 and
10,000,000 events in the table). Each stage's history is generated inside PostgreSQL
(`INSERT ... SELECT` over `generate_series`, as the schema owner, in parallel parts:
`--generate-workers`), with the stream heads it leaves, then vacuumed and analysed as
autovacuum would have by then. At each size it measures, side by side:

* **append**: full payment lifecycles (PaymentInitiated, PaymentAuthorized,
  FundsReserved, PaymentSettled) through the ledger's own path, `EventStore.append`
  as the application role: `ledger_append` with its checks, the stream's lock, the
  positions and the hash chain, each append its own transaction;
* **the floor**: a plain one-row INSERT of the same payload into a table with a
  bigint key and nothing else, as the same role, its own transaction too; one insert
  after each append, so that the machine's noise falls on both alike.

It prints p50/p99/max of each, their ratio at each size, and how the append's p99 at
the largest size compares with the smallest (it should stay flat), and writes
bench/results/ledger_growth-<time>.json.

    .venv/bin/python bench/ledger_growth.py                          # up to 10M events
    .venv/bin/python bench/ledger_growth.py --sizes 10000,100000     # quicker
    .venv/bin/python bench/ledger_growth.py --generate-budget-s 240  # stop growing then
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python bench/ledger_growth.py

The generated history belongs to a scratch database. Its payment ids are spread over
the same hexadecimal key space as the measured ones (uuid4), and so are its event ids,
so that the measured appends land all over the indexes, as in a live ledger. Its hashes
are one placeholder (scheme 2), and the positions do not follow it: `paysaga ledger
verify` would reject this log. A stage that would not fit the generation budget or the
free disk is skipped and named in the output, never silently dropped.

Compare ratios within one run: this machine is shared, and absolute figures drift.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ledger import bench_postgres, lifecycle_events, percentile  # noqa: E402
from ledger.db import to_libpq_url  # noqa: E402
from ledger.events import AccountOpened, event_id_for, payment_stream  # noqa: E402
from ledger.store import EventStore, NewEvent  # noqa: E402
from paysaga.db import DatabaseUrls, open_store  # noqa: E402

APP_ROLE = "paysaga_app"
console = Console(stderr=True)

SIZES_DEFAULT = (10_000, 100_000, 1_000_000, 10_000_000)
SIZES_MAX = 100_000_000
LIFECYCLES_DEFAULT = 250  # measured at each size: 1,000 appends and 1,000 inserts
PAYERS = 50
# Generated lifecycles per INSERT statement (four events each): a transaction of its own.
GENERATE_CHUNK_LIFECYCLES = 250_000
GENERATE_WORKERS_DEFAULT = 2
# What one generated event takes on disk, with its share of the indexes and the stream
# heads (measured: 1.2 GB for 2M events), and the WAL on top; a stage needs this much
# free space, twice over, or it is skipped.
EVENT_BYTES_ON_DISK = 600
DISK_HEADROOM = 2.0
# One generated event every 10 us, the history ending an hour before the run.
EVENT_SPACING_US = 10
PLACEHOLDER_HASH = b"\xab" * 32
PAYMENT_MINOR = 100
FUNDING_MINOR = 10**12

# One chunk of lifecycles [first, last], their events numbered from base + 1, in the
# order of their stream ids. A lifecycle's payment id starts with a multiplicative hash
# of its number (spread over 32 bits, like a random id) and ends with the number
# (unique); its event ids start with the same hash, so that the rows of a chunk arrive
# in the order of every index they enter, and each index is swept once per chunk
# instead of being written at random.
_GENERATE = """
WITH l AS (
    SELECT n, row_number() OVER (ORDER BY h.h8, n) AS rank,
           h.h8 || lpad(to_hex(n), 10, '0') AS pid
      FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS n
     CROSS JOIN LATERAL (
         SELECT lpad(to_hex((n * 2654435761) %% 4294967296), 8, '0') AS h8) AS h
), e AS (
    SELECT l.n, l.pid, step, %(base)s::bigint + 4 * (l.rank - 1) + step AS seq,
           'payer-' || (l.n %% %(payers)s) AS payer, 100 + l.n %% 1000 AS amount
      FROM l CROSS JOIN generate_series(1, 4) AS step
), heads AS (
    INSERT INTO streams (stream_id, version, state, last_hash, last_seq)
    SELECT 'payment-' || pid, 4, 'settled', %(hash)s, %(base)s::bigint + 4 * rank
      FROM l ORDER BY rank
)
INSERT INTO events (global_seq, stream_id, stream_version, event_id, event_type,
                    schema_version, payload, actor, correlation_id, recorded_at,
                    prev_hash, hash, hash_scheme)
SELECT e.seq, 'payment-' || e.pid, e.step,
       (substr(e.pid, 1, 8) || '-0000-4000-800' || e.step || '-'
        || lpad(to_hex(e.n), 12, '0'))::uuid,
       (ARRAY['PaymentInitiated', 'PaymentAuthorized', 'FundsReserved',
              'PaymentSettled'])[e.step],
       1,
       CASE e.step
         WHEN 1 THEN jsonb_build_object(
             'payment_id', e.pid, 'payer_account_id', e.payer, 'payee_account_id', 'shop',
             'amount_minor', e.amount, 'currency', 'EUR', 'reference', null,
             'metadata', '{}'::jsonb)
         WHEN 2 THEN jsonb_build_object(
             'payment_id', e.pid, 'authorization_id', 'auth-' || e.pid, 'processor', 'bench')
         WHEN 3 THEN jsonb_build_object(
             'payment_id', e.pid, 'payer_account_id', e.payer, 'payee_account_id', 'shop',
             'amount_minor', e.amount, 'currency', 'EUR',
             'expires_at', to_char(
                 %(start)s::timestamptz + e.seq * %(spacing_us)s * interval '1 microsecond'
                 + interval '1 hour', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'))
         ELSE jsonb_build_object(
             'payment_id', e.pid, 'currency', 'EUR', 'fee_minor', 0,
             'postings', jsonb_build_array(
                 jsonb_build_object('account_id', e.payer, 'side', 'debit',
                                    'amount_minor', e.amount),
                 jsonb_build_object('account_id', 'shop', 'side', 'credit',
                                    'amount_minor', e.amount)))
       END,
       'bench', 'payment-' || e.pid,
       %(start)s::timestamptz + e.seq * %(spacing_us)s * interval '1 microsecond',
       %(hash)s, %(hash)s, 2
  FROM e ORDER BY e.seq
"""
# The floor: what one durable INSERT of one row costs, with no ledger behind it.
_FLOOR_TABLE = "bench_insert_floor"
_CREATE_FLOOR = f"""
CREATE TABLE {_FLOOR_TABLE} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload jsonb NOT NULL
)
"""
_INSERT_FLOOR = f"INSERT INTO {_FLOOR_TABLE} (payload) VALUES (%s)"


@dataclass
class Latency:
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float


def latency(values_ms: list[float]) -> Latency:
    ordered = sorted(values_ms)
    return Latency(
        samples=len(ordered),
        p50_ms=round(percentile(ordered, 0.50), 3),
        p99_ms=round(percentile(ordered, 0.99), 3),
        max_ms=round(ordered[-1], 3),
        mean_ms=round(sum(ordered) / len(ordered), 3),
    )


@dataclass
class Stage:
    events: int  # in the table when measured
    generated_events: int
    generate_s: float
    generate_events_per_s: float
    vacuum_analyze_s: float
    checkpoint_s: float | None
    events_table_bytes: int
    append: Latency
    insert_floor: Latency
    append_over_insert_p50: float
    append_over_insert_p99: float


@dataclass
class Skipped:
    events: int
    reason: str


@dataclass
class Growth:
    stages: list[Stage] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


async def connect(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(to_libpq_url(url), autocommit=True)


async def one_value(conn: psycopg.AsyncConnection[Any], query: str) -> Any:
    row = await (await conn.execute(query)).fetchone()
    assert row is not None
    return row[0]


async def generate(
    owner_url: str, first: int, lifecycles: int, base_seq: int, start: datetime, workers: int
) -> None:
    """Lifecycles first .. first+lifecycles-1, their events numbered from base_seq + 1, in
    chunks shared out over `workers` connections."""
    chunks = []
    for chunk_first in range(first, first + lifecycles, GENERATE_CHUNK_LIFECYCLES):
        chunk_last = min(chunk_first + GENERATE_CHUNK_LIFECYCLES, first + lifecycles) - 1
        chunks.append((chunk_first, chunk_last, base_seq + 4 * (chunk_first - first)))

    async def part(mine: list[tuple[int, int, int]]) -> None:
        conn = await connect(owner_url)
        try:
            for chunk_first, chunk_last, chunk_base in mine:
                await conn.execute(
                    _GENERATE,
                    {
                        "first": chunk_first,
                        "last": chunk_last,
                        "base": chunk_base,
                        "payers": PAYERS,
                        "hash": PLACEHOLDER_HASH,
                        "start": start,
                        "spacing_us": EVENT_SPACING_US,
                    },
                )
        finally:
            await conn.close()

    await asyncio.gather(*(part(chunks[i::workers]) for i in range(workers)))


async def open_accounts(store: EventStore) -> None:
    """`world` (external), `shop` (merchant) and the payers, funded from `world`."""
    await store.open_account(
        AccountOpened(
            account_id="world", currency="EUR", kind="external", overdraft_limit_minor=None
        ),
        actor="bench",
    )
    await store.open_account(
        AccountOpened(account_id="shop", currency="EUR", kind="merchant"), actor="bench"
    )
    expires_at = datetime.now(UTC) + timedelta(hours=1)
    for i in range(PAYERS):
        payer = f"payer-{i}"
        await store.open_account(
            AccountOpened(account_id=payer, currency="EUR", kind="customer"), actor="bench"
        )
        await append_lifecycle(store, "world", payer, FUNDING_MINOR, expires_at, None)


async def append_lifecycle(
    store: EventStore,
    payer: str,
    payee: str,
    amount_minor: int,
    expires_at: datetime,
    floor: tuple[psycopg.AsyncConnection[Any], list[float], list[float]] | None,
) -> None:
    """One lifecycle through the store; with a floor, one plain insert after each append,
    each timed into its list."""
    payment_id = uuid.uuid4().hex
    stream, correlation = payment_stream(payment_id), f"payment-{payment_id}"
    for step, event in enumerate(
        lifecycle_events(payment_id, payer, payee, amount_minor, expires_at)
    ):
        new = NewEvent(stream, event, event_id_for(correlation, str(step)), "bench", correlation)
        started = time.perf_counter()
        await store.append(new)
        appended_ms = (time.perf_counter() - started) * 1000
        if floor is None:
            continue
        conn, appends_ms, inserts_ms = floor
        payload = json.dumps(event.payload(), default=str)
        started = time.perf_counter()
        await conn.execute(_INSERT_FLOOR, (payload,), prepare=True)
        inserts_ms.append((time.perf_counter() - started) * 1000)
        appends_ms.append(appended_ms)


async def measure(
    store: EventStore, app_url: str, lifecycles: int
) -> tuple[list[float], list[float]]:
    """`lifecycles` lifecycles, one writer, each append followed by one plain insert."""
    conn = await connect(app_url)
    appends_ms: list[float] = []
    inserts_ms: list[float] = []
    expires_at = datetime.now(UTC) + timedelta(hours=1)
    try:
        for index in range(lifecycles):
            await append_lifecycle(
                store,
                f"payer-{index % PAYERS}",
                "shop",
                PAYMENT_MINOR,
                expires_at,
                (conn, appends_ms, inserts_ms),
            )
    finally:
        await conn.close()
    return appends_ms, inserts_ms


async def vacuum_analyze(conn: psycopg.AsyncConnection[Any]) -> float:
    """What autovacuum would have done by now on a live system, done at once."""
    started = time.perf_counter()
    for table in ("events", "streams"):
        await conn.execute(f"VACUUM (ANALYZE) {table}")
    return time.perf_counter() - started


async def checkpoint(admin_url: str) -> float | None:
    """Write the generated pages out before measuring, so that the checkpointer does
    not flush gigabytes in the middle of it; seconds, or None when the login may not
    (it needs a superuser or pg_checkpoint)."""
    conn = await connect(admin_url)
    try:
        started = time.perf_counter()
        await conn.execute("CHECKPOINT")
        return time.perf_counter() - started
    except psycopg.errors.InsufficientPrivilege:
        console.print("[yellow]no CHECKPOINT before measuring: the login may not[/yellow]")
        return None
    finally:
        await conn.close()


async def grow_and_measure(
    urls: DatabaseUrls,
    admin_url: str,
    data_dir: Path,
    sizes: list[int],
    lifecycles: int,
    workers: int,
    generate_budget_s: float | None,
) -> Growth:
    """Grow the log to each size in turn and measure there; skip, with the reason, a size
    the generation budget or the free disk cannot hold."""
    growth = Growth()
    owner = await connect(urls.owner_url)
    store = await open_store(urls, pool_size=2)
    try:
        await owner.execute(_CREATE_FLOOR)
        await owner.execute(f"GRANT INSERT ON {_FLOOR_TABLE} TO {urls.app_role}")
        await open_accounts(store)
        # The generated history ends an hour before now, whatever its size.
        start = datetime.now(UTC) - timedelta(microseconds=EVENT_SPACING_US * max(sizes), hours=1)
        generated_lifecycles = 0
        generate_spent_s = 0.0
        rate_events_per_s: float | None = None
        for size in sizes:
            events_now = int(await one_value(owner, "SELECT count(*) FROM events"))
            to_add = max(0, size - events_now) // 4
            needed_bytes = DISK_HEADROOM * EVENT_BYTES_ON_DISK * 4 * to_add
            free_bytes = shutil.disk_usage(data_dir).free
            if needed_bytes > free_bytes:
                reason = (
                    f"needs about {needed_bytes / 1e9:.1f} GB free, {free_bytes / 1e9:.1f} GB are"
                )
                growth.skipped.append(Skipped(size, reason))
                console.print(f"[yellow]{size:,} events skipped: {reason}[/yellow]")
                break
            if generate_budget_s is not None and to_add and rate_events_per_s is not None:
                expected_s = 4 * to_add / rate_events_per_s
                if generate_spent_s + expected_s > generate_budget_s:
                    reason = (
                        f"generating {4 * to_add:,} more events would take about "
                        f"{expected_s:.0f} s at {rate_events_per_s:,.0f} events/s; "
                        f"{generate_budget_s - generate_spent_s:.0f} s of the "
                        f"{generate_budget_s:.0f} s budget were left (--generate-budget-s)"
                    )
                    growth.skipped.append(Skipped(size, reason))
                    console.print(f"[yellow]{size:,} events skipped: {reason}[/yellow]")
                    break
            console.print(f"growing to {size:,} events: {4 * to_add:,} to generate ...")
            started = time.perf_counter()
            if to_add:
                base_seq = int(await one_value(owner, "SELECT max(global_seq) FROM events"))
                await generate(
                    urls.owner_url, generated_lifecycles + 1, to_add, base_seq, start, workers
                )
                await owner.execute(
                    "SELECT setval('events_global_seq', %s)", (base_seq + 4 * to_add,)
                )
                generated_lifecycles += to_add
            generate_s = time.perf_counter() - started
            generate_spent_s += generate_s
            if to_add:
                rate_events_per_s = 4 * to_add / generate_s
            vacuum_s = await vacuum_analyze(owner)
            checkpoint_s = await checkpoint(admin_url)
            events_at = int(await one_value(owner, "SELECT count(*) FROM events"))
            table_bytes = int(await one_value(owner, "SELECT pg_total_relation_size('events')"))
            appends_ms, inserts_ms = await measure(store, urls.app_url, lifecycles)
            append, insert = latency(appends_ms), latency(inserts_ms)
            stage = Stage(
                events=events_at,
                generated_events=4 * to_add,
                generate_s=round(generate_s, 2),
                generate_events_per_s=round(4 * to_add / generate_s) if to_add else 0,
                vacuum_analyze_s=round(vacuum_s, 2),
                checkpoint_s=None if checkpoint_s is None else round(checkpoint_s, 2),
                events_table_bytes=table_bytes,
                append=append,
                insert_floor=insert,
                append_over_insert_p50=round(append.p50_ms / insert.p50_ms, 2),
                append_over_insert_p99=round(append.p99_ms / insert.p99_ms, 2),
            )
            growth.stages.append(stage)
            console.print(
                f"{events_at:>11,} events ({table_bytes / 1e6:,.0f} MB): generated in "
                f"{generate_s:.1f} s, vacuum+analyze {vacuum_s:.1f} s; append p50 "
                f"{append.p50_ms:.2f} ms p99 {append.p99_ms:.2f} ms; insert p50 "
                f"{insert.p50_ms:.2f} ms p99 {insert.p99_ms:.2f} ms"
            )
    finally:
        await store.close()
        await owner.close()
    return growth


def print_report(growth: Growth, version: str) -> dict[str, float | None]:
    """The table, and the figures that sum it up: the append's p50 and p99 at the
    largest size reached over the smallest."""
    table = Table(
        title=f"ledger append vs one plain INSERT as the events table grows (PostgreSQL {version})"
    )
    for column in (
        "events",
        "table MB",
        "generate s",
        "append p50 ms",
        "append p99 ms",
        "insert p50 ms",
        "insert p99 ms",
        "append/insert p50",
        "append/insert p99",
    ):
        table.add_column(column, justify="right")
    for s in growth.stages:
        table.add_row(
            f"{s.events:,}",
            f"{s.events_table_bytes / 1e6:,.0f}",
            f"{s.generate_s:.1f}",
            f"{s.append.p50_ms:.2f}",
            f"{s.append.p99_ms:.2f}",
            f"{s.insert_floor.p50_ms:.2f}",
            f"{s.insert_floor.p99_ms:.2f}",
            f"{s.append_over_insert_p50:.2f}",
            f"{s.append_over_insert_p99:.2f}",
        )
    Console(width=160).print(table)
    for skipped in growth.skipped:
        print(f"not reached: {skipped.events:,} events ({skipped.reason})")
    first, last = growth.stages[0], growth.stages[-1]
    summary: dict[str, float | None] = {
        "append_p50_largest_over_smallest": round(last.append.p50_ms / first.append.p50_ms, 2),
        "append_p99_largest_over_smallest": round(last.append.p99_ms / first.append.p99_ms, 2),
        "ratio_p50_largest_over_smallest": round(
            last.append_over_insert_p50 / first.append_over_insert_p50, 2
        ),
    }
    for name, value in summary.items():
        print(f"{name}: {value}")
    return summary


async def run(args: argparse.Namespace, sizes: list[int]) -> None:
    with bench_postgres("bench-growth-", "bench_growth", data_root=args.data_root) as db:
        with psycopg.connect(to_libpq_url(db.urls.owner_url)) as conn:
            version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        console.print(f"PostgreSQL {version}, {db.server}; sizes {sizes}")
        growth = await grow_and_measure(
            db.urls,
            db.admin_url,
            db.workdir,
            sizes,
            args.lifecycles,
            args.generate_workers,
            args.generate_budget_s,
        )
    server = db.server

    if not growth.stages:
        raise SystemExit("no size could be measured")
    summary = print_report(growth, version)
    out = args.out or ROOT / "bench" / "results" / (
        f"ledger_growth-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "ledger_growth",
                "postgres_version": version,
                "postgres": server,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "config": {
                    "sizes": sizes,
                    "lifecycles_per_size": args.lifecycles,
                    "writers": 1,
                    "generate_workers": args.generate_workers,
                    "generate_budget_s": args.generate_budget_s,
                },
                "stages": [asdict(s) for s in growth.stages],
                "skipped": [asdict(s) for s in growth.skipped],
                "reached_events": growth.stages[-1].events,
                **summary,
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default=",".join(str(s) for s in SIZES_DEFAULT),
        help="events in the table at each measurement, ascending",
    )
    parser.add_argument("--lifecycles", type=int, default=LIFECYCLES_DEFAULT, help="per size")
    parser.add_argument("--generate-workers", type=int, default=GENERATE_WORKERS_DEFAULT)
    parser.add_argument(
        "--generate-budget-s",
        type=float,
        default=None,
        help="skip the sizes whose generation would take the total past this",
    )
    parser.add_argument("--data-root", type=Path, default=None, help="where the cluster lives")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if sizes != sorted(sizes) or sizes[0] < 1 or sizes[-1] > SIZES_MAX:
        parser.error(f"--sizes must ascend, from 1 to at most {SIZES_MAX:,}")
    if args.lifecycles < 1 or args.generate_workers < 1:
        parser.error("--lifecycles and --generate-workers must be positive")
    try:
        import uvloop

        uvloop.run(run(args, sizes))
    except ImportError:
        asyncio.run(run(args, sizes))


if __name__ == "__main__":
    main()
