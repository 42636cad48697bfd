"""Reconciliation at a million: statement lines against ledger settlement items, end to end.

Setup (not part of the figure): --items settlement items (1,000,000 by default) are
generated straight into `recon.items` with COPY, as the schema owner. In production
items come from `PaymentSettled` events through `ledger/settlements.py`, one set-based
INSERT ... SELECT per run over the events since the last one; generating a million
settled payments through the ledger would measure the ledger, not reconciliation. A
processor statement of exactly as many lines is built from them as a parsed file
(`recon.formats.base.ParsedFile`, one statement per value date), with 1% of the items
given a discrepancy, spread evenly over every type matching finds:

* `missing_in_statement`: an item with no line;
* `missing_in_ledger`: a line with a reference the ledger does not know;
* `amount_mismatch`: a line whose amount is off by more than the tolerance;
* `currency_mismatch`: a line in another currency;
* `duplicate_in_statement`: a line repeated;

and work for the rule pass: 0.1% of the lines off by less than the tolerance, 0.1% of
the items paid in two lines (split), and one currency (CHF) paid out as one line per
day (batched payouts), plus 0.1% of the lines a day late (which must match and raise
nothing).

Setup ends with VACUUM ANALYZE of the items (what autovacuum would have done) and a
CHECKPOINT (so that none starts in the middle of the measurement). Measured, as the
application role, as the services run it:

1. ingest: `recon.store.ingest` (checks every line, COPY into `recon.statement_lines`);
2. reconcile: `recon.matching.reconcile`, each of its phases (`recon.matching.PHASES`):
   the exact pass with its candidates, recording its matches, the rule pass,
   classification, and recording the discrepancies and the run (with the commit);
3. then the next run, incremental: 1,000 new settlements and their lines, ingested and
   matched over the million already matched and the discrepancies still open.

It prints each phase, throughput, and whether every injected discrepancy was found
exactly once (and the incremental run found nothing new), and writes
bench/results/recon-<time>.json. It asserts no timing.

    .venv/bin/python bench/recon.py                      # embedded PostgreSQL 18, durable
    .venv/bin/python bench/recon.py --lines 100000
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/recon.py
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
sys.path.insert(0, str(ROOT))

from bench.ledger import bench_postgres, server_cpu_s  # noqa: E402
from ledger.db import to_libpq_url  # noqa: E402
from paysaga.db import DatabaseUrls  # noqa: E402
from recon.formats.base import ParsedFile, ParsedStatement, StatementLine  # noqa: E402
from recon.matching import PHASES, RunResult, reconcile  # noqa: E402
from recon.rules import MatchRules  # noqa: E402
from recon.store import ingest  # noqa: E402

APP_ROLE = "paysaga_app"
console = Console(stderr=True)

LINES_DEFAULT = 1_000_000
LINES_MIN = 10_000
DAYS = 10  # the items' value dates, ending before the settlement window
DISCREPANCY_SHARE = 0.01  # of the items, spread evenly over the five types
RULE_SHARE = 0.001  # of the items: within tolerance; split in two lines; a day late
TOLERANCE_MINOR = 5
CURRENCIES = (("EUR", 90), ("USD", 7), ("GBP", 3))  # per-payment currencies, weights
BATCHED_CURRENCY = "CHF"  # paid out as one line a day
AMOUNT_MINOR_MIN = 100
AMOUNT_MINOR_MAX = 100_000
COPY_CHUNK_ROWS = 50_000
TARGET_S = 20.0
# New settlements and lines of the incremental run that follows the big one.
INCREMENTAL_LINES = 1_000
TYPES = (
    "missing_in_statement",
    "missing_in_ledger",
    "amount_mismatch",
    "currency_mismatch",
    "duplicate_in_statement",
)

_COPY_ITEMS = (
    "COPY recon.items (global_seq, kind, payment_id, reference, amount_minor, currency, "
    "value_date, settled_at) FROM STDIN"
)


@dataclass
class Item:
    reference: str
    amount_minor: int
    currency: str
    value_date: date
    settled_at: datetime


@dataclass
class Plan:
    """What was generated, and what a correct run must find."""

    items: list[Item]
    file: ParsedFile
    lines: int
    expected: dict[str, int] = field(default_factory=dict)  # per discrepancy type
    expected_matches: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def generate(lines_n: int, seed: int, now: datetime) -> Plan:
    """Items and a statement of exactly `lines_n` lines each (see the module docstring)."""
    rng = random.Random(seed)
    per_type = max(1, round(lines_n * DISCREPANCY_SHARE / len(TYPES)))
    rule_n = max(1, round(lines_n * RULE_SHARE))
    # Lines = items - missing + extra + duplicates + split - batched + payouts: the
    # batched items make up the difference, so that lines = items.
    batched_n = per_type + rule_n + DAYS
    first_day = (now - timedelta(days=DAYS + 3)).date()
    codes = [c for c, _ in CURRENCIES]
    weights = [w for _, w in CURRENCIES]

    items: list[Item] = []
    for n in range(lines_n):
        batched = n < batched_n
        day = first_day + timedelta(days=n % DAYS)
        settled_at = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(
            seconds=rng.randrange(86_400)
        )
        items.append(
            Item(
                reference=f"p-{n:012x}",
                amount_minor=rng.randint(AMOUNT_MINOR_MIN, AMOUNT_MINOR_MAX),
                currency=BATCHED_CURRENCY if batched else rng.choices(codes, weights)[0],
                value_date=day,
                settled_at=settled_at,
            )
        )
    # Distinct per-payment items for each injection; batched items are left alone.
    chosen = rng.sample(range(batched_n, lines_n), len(TYPES) * per_type + 3 * rule_n)
    groups: dict[str, list[int]] = {}
    cursor = 0
    for name, size in (
        *((t, per_type) for t in TYPES if t != "missing_in_ledger"),
        ("extra", per_type),  # which items the extra lines are placed next to
        ("tolerance", rule_n),
        ("split", rule_n),
        ("late", rule_n),
    ):
        groups[name] = chosen[cursor : cursor + size]
        cursor += size
    role = {index: name for name, indexes in groups.items() for index in indexes}

    by_day: dict[date, list[StatementLine]] = {}

    def add(value_date: date, **fields: Any) -> None:
        lines = by_day.setdefault(value_date, [])
        lines.append(
            StatementLine(
                line_no=len(lines) + 1,
                value_date=value_date,
                booking_date=value_date,
                end_to_end_id=fields.get("reference"),
                bank_reference=None,
                kind=fields.pop("kind", "capture"),
                description=None,
                **fields,
            )
        )

    for n, item in enumerate(items):
        injected = role.get(n)
        if n < batched_n or injected == "missing_in_statement":
            continue
        ref, amount, currency, day = (
            item.reference,
            item.amount_minor,
            item.currency,
            item.value_date,
        )
        if injected == "amount_mismatch":
            amount += TOLERANCE_MINOR + 1 + rng.randrange(1_000)
        elif injected == "currency_mismatch":
            currency = "JPY" if currency != "JPY" else "EUR"
        elif injected == "tolerance":
            amount -= rng.randint(1, TOLERANCE_MINOR)
        elif injected == "late":
            day += timedelta(days=1)
        if injected == "split":
            part = amount // 3
            add(day, reference=ref, amount_minor=part, currency=currency)
            add(day, reference=ref, amount_minor=amount - part, currency=currency)
            continue
        add(day, reference=ref, amount_minor=amount, currency=currency)
        if injected == "duplicate_in_statement":
            add(day, reference=ref, amount_minor=amount, currency=currency)
        elif injected == "extra":
            add(
                day,
                reference=f"x-{n:012x}",
                amount_minor=rng.randint(AMOUNT_MINOR_MIN, AMOUNT_MINOR_MAX),
                currency=currency,
            )
    payouts: Counter[date] = Counter()
    for item in items[:batched_n]:
        payouts[item.value_date] += item.amount_minor
    for day, total in sorted(payouts.items()):
        add(
            day + timedelta(days=1),
            reference=f"PAYOUT-{BATCHED_CURRENCY}-{day.isoformat()}",
            amount_minor=total,
            currency=BATCHED_CURRENCY,
            kind="credit",
        )

    statements = tuple(
        ParsedStatement(
            statement_id=f"bench-{day.isoformat()}",
            account="processor",
            currency=None,
            lines=tuple(lines),
        )
        for day, lines in sorted(by_day.items())
    )
    lines_total = sum(len(s.lines) for s in statements)
    digest = hashlib.sha256(f"bench-recon-{seed}-{lines_n}".encode()).hexdigest()
    plan = Plan(
        items=items,
        file=ParsedFile(format="processor-csv", sha256=digest, statements=statements),
        lines=lines_total,
    )
    plan.expected = {t: per_type for t in TYPES}
    # Every per-payment item but the missing, the mismatched, and the rule pass's.
    exact_n = lines_n - batched_n - 3 * per_type - 2 * rule_n
    plan.expected_matches = {
        # (matches, lines, items)
        "exact": (exact_n, exact_n, exact_n),
        "tolerance": (rule_n, rule_n, rule_n),
        "split": (rule_n, 2 * rule_n, rule_n),
        "batch": (len(payouts), len(payouts), batched_n),
    }
    return plan


def item_rows(items: list[Item], first_seq: int) -> Any:
    """The items in COPY's text format, in chunks; global_seq stands in for the event."""
    chunk: list[str] = []
    for seq, item in enumerate(items, first_seq):
        chunk.append(
            f"{seq}\tcapture\t{item.reference}\t{item.reference}\t{item.amount_minor}\t"
            f"{item.currency}\t{item.value_date.isoformat()}\t{item.settled_at.isoformat()}\n"
        )
        if len(chunk) >= COPY_CHUNK_ROWS:
            yield "".join(chunk)
            chunk = []
    if chunk:
        yield "".join(chunk)


async def connect(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(to_libpq_url(url), autocommit=True)


@dataclass
class Figures:
    items: int
    lines: int
    generate_s: float
    load_items_s: float
    ingest_s: float
    reconcile_s: float
    end_to_end_s: float
    lines_per_s: float
    phase_s: dict[str, float]
    server_cpu_s: float | None
    matched: dict[str, dict[str, int]]
    discrepancies: dict[str, int]
    expected_discrepancies: dict[str, int]
    expected_matches: dict[str, list[int]]
    incremental_lines: int
    incremental_s: float
    incremental_considered: list[int]  # lines, items
    incremental_phase_s: dict[str, float]
    correct: bool


async def checkpoint(admin_url: str) -> None:
    """Start the timed part from a clean slate: a checkpoint taken now is not taken in
    the middle of it (its full-page writes would double the WAL of the pages it first
    touches). Needs a superuser (or pg_checkpoint); skipped, and said, without."""
    conn = await connect(admin_url)
    try:
        await conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        console.print("[yellow]no CHECKPOINT before the run: the login may not[/yellow]")
    finally:
        await conn.close()


async def load_items(owner_url: str, items: list[Item], first_seq: int) -> float:
    """COPY items in as the owner, then VACUUM ANALYZE, as autovacuum would have; seconds."""
    owner = await connect(owner_url)
    try:
        started = time.perf_counter()
        async with (
            owner.transaction(),
            owner.cursor() as cursor,
            cursor.copy(_COPY_ITEMS) as copy,
        ):
            for chunk in item_rows(items, first_seq):
                await copy.write(chunk)
        await owner.execute("VACUUM (ANALYZE) recon.items")
        return time.perf_counter() - started
    finally:
        await owner.close()


def delta(plan: Plan, count: int, now: datetime) -> tuple[list[Item], ParsedFile]:
    """`count` settlements of the last hour and a statement with their lines: what an
    incremental run finds new after the big one."""
    start = len(plan.items)
    items = [
        Item(
            reference=f"p-{start + n:012x}",
            amount_minor=AMOUNT_MINOR_MIN + n,
            currency="EUR",
            value_date=(now - timedelta(hours=1)).date(),
            settled_at=now - timedelta(hours=1),
        )
        for n in range(count)
    ]
    lines = tuple(
        StatementLine(
            line_no=n + 1,
            amount_minor=item.amount_minor,
            currency=item.currency,
            value_date=item.value_date,
            booking_date=None,
            reference=item.reference,
            end_to_end_id=item.reference,
            bank_reference=None,
            kind="capture",
            description=None,
        )
        for n, item in enumerate(items)
    )
    statement = ParsedStatement(
        statement_id="bench-incremental", account="processor", currency=None, lines=lines
    )
    digest = hashlib.sha256(f"bench-recon-incremental-{count}".encode()).hexdigest()
    return items, ParsedFile(format="processor-csv", sha256=digest, statements=(statement,))


async def bench(
    args: argparse.Namespace, urls: DatabaseUrls, admin_url: str, server_pid: int | None
) -> Figures:
    now = datetime.now(UTC)
    started = time.perf_counter()
    plan = generate(args.lines, args.seed, now)
    generate_s = time.perf_counter() - started
    console.print(
        f"generated {len(plan.items):,} items and {plan.lines:,} lines in {generate_s:.1f} s"
    )
    load_items_s = await load_items(urls.owner_url, plan.items, 1)
    console.print(f"loaded the items in {load_items_s:.1f} s")
    await checkpoint(admin_url)

    rules = MatchRules(amount_tolerance_minor=TOLERANCE_MINOR, date_window_days=3)
    conn = await connect(urls.app_url)
    try:
        cpu_before = server_cpu_s(server_pid)
        started = time.perf_counter()
        result = await ingest(conn, plan.file, source="upload", filename="bench.csv")
        ingest_s = time.perf_counter() - started
        console.print(f"ingested {result.lines_new:,} lines in {ingest_s:.1f} s")
        started = time.perf_counter()
        run: RunResult = await reconcile(
            conn, "bench-run-1", rules=rules, now=now, progress=lambda p: console.print(f"  {p}")
        )
        reconcile_s = time.perf_counter() - started
        cpu_after = server_cpu_s(server_pid)

        # The next run, incremental: a few new settlements and their lines, over the
        # million matched and the discrepancies still open.
        new_items, new_file = delta(plan, INCREMENTAL_LINES, now)
        await load_items(urls.owner_url, new_items, len(plan.items) + 1)
        started = time.perf_counter()
        await ingest(conn, new_file, source="upload", filename="bench-incremental.csv")
        following: RunResult = await reconcile(conn, "bench-run-2", rules=rules, now=now)
        incremental_s = time.perf_counter() - started
    finally:
        await conn.close()

    matched = {rule: asdict(count) for rule, count in run.matched.items()}
    found = {t: run.discrepancy_counts.get(t, 0) for t in TYPES}
    expected_matches = {rule: list(v) for rule, v in plan.expected_matches.items()}
    correct = (
        found == plan.expected
        and all(
            [matched[r]["matches"], matched[r]["lines"], matched[r]["items"]] == v
            for r, v in expected_matches.items()
        )
        and following.lines_matched == INCREMENTAL_LINES
        and not following.discrepancies
    )
    end_to_end_s = ingest_s + reconcile_s
    return Figures(
        items=len(plan.items),
        lines=plan.lines,
        generate_s=round(generate_s, 2),
        load_items_s=round(load_items_s, 2),
        ingest_s=round(ingest_s, 2),
        reconcile_s=round(reconcile_s, 2),
        end_to_end_s=round(end_to_end_s, 2),
        lines_per_s=round(plan.lines / end_to_end_s),
        phase_s=run.phase_s,
        server_cpu_s=(
            None if cpu_before is None or cpu_after is None else round(cpu_after - cpu_before, 2)
        ),
        matched=matched,
        discrepancies=found,
        expected_discrepancies=plan.expected,
        expected_matches=expected_matches,
        incremental_lines=INCREMENTAL_LINES,
        incremental_s=round(incremental_s, 3),
        incremental_considered=[following.lines_considered, following.items_considered],
        incremental_phase_s=following.phase_s,
        correct=correct,
    )


def report(figures: Figures, version: str) -> None:
    out = Console()
    table = Table(title=f"reconciliation: {figures.lines:,} lines x {figures.items:,} items")
    for column in ("phase", "seconds", "share"):
        table.add_column(column, justify="right")
    table.add_row("ingest (checks, COPY)", f"{figures.ingest_s:.2f}", "")
    for phase in PHASES:
        seconds = figures.phase_s.get(phase, 0.0)
        table.add_row(f"  reconcile: {phase}", f"{seconds:.2f}", "")
    table.add_row("reconcile", f"{figures.reconcile_s:.2f}", "")
    table.add_row(
        "end to end",
        f"{figures.end_to_end_s:.2f}",
        f"target < {TARGET_S:.0f} s: {'met' if figures.end_to_end_s < TARGET_S else 'NOT met'}",
    )
    table.add_row("throughput", f"{figures.lines_per_s:,} lines/s", "")
    if figures.server_cpu_s is not None:
        table.add_row("PostgreSQL CPU", f"{figures.server_cpu_s:.2f}", "")
    lines_seen, items_seen = figures.incremental_considered
    table.add_row(
        f"next run, incremental: {figures.incremental_lines:,} new lines",
        f"{figures.incremental_s:.2f}",
        f"looked at {lines_seen:,} lines, {items_seen:,} items",
    )
    out.print(table)
    checks = Table(title="found against injected")
    for column in ("what", "found", "expected"):
        checks.add_column(column, justify="right")
    for t in TYPES:
        checks.add_row(t, f"{figures.discrepancies[t]:,}", f"{figures.expected_discrepancies[t]:,}")
    for rule, (matches, lines, items) in figures.expected_matches.items():
        got = figures.matched[rule]
        checks.add_row(
            f"{rule} matches / lines / items",
            f"{got['matches']:,} / {got['lines']:,} / {got['items']:,}",
            f"{matches:,} / {lines:,} / {items:,}",
        )
    out.print(checks)
    out.print(
        f"PostgreSQL {version}; setup: generate {figures.generate_s:.1f} s, "
        f"items COPY {figures.load_items_s:.1f} s; "
        + ("every injected discrepancy found once" if figures.correct else "[red]MISMATCH[/red]")
    )


async def run(args: argparse.Namespace) -> None:
    with bench_postgres("bench-recon-", "bench_recon") as db:
        conn = await connect(db.urls.owner_url)
        try:
            cursor = await conn.execute("SHOW server_version")
            version = str((await cursor.fetchone() or ["?"])[0])
        finally:
            await conn.close()
        console.print(f"PostgreSQL {version}, {db.server}; {args.lines:,} lines")
        figures = await bench(args, db.urls, db.admin_url, db.pid)

    report(figures, version)
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    out = args.out or ROOT / "bench" / "results" / f"recon-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "recon",
                "postgres_version": version,
                "postgres": db.server,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "config": {
                    "lines": args.lines,
                    "seed": args.seed,
                    "days": DAYS,
                    "discrepancy_share": DISCREPANCY_SHARE,
                    "rule_share": RULE_SHARE,
                    "tolerance_minor": TOLERANCE_MINOR,
                },
                "target_s": TARGET_S,
                "figures": asdict(figures),
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=LINES_DEFAULT, help="lines, and as many items")
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.lines < LINES_MIN:
        parser.error(f"--lines must be at least {LINES_MIN}")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
