"""Reconciliation's store and matching, against real settled payments in a real PostgreSQL.

Statements are built from payments settled through the ledger (`tests/harness/ledger.py`),
as parsed files (`recon.formats.base`), and ingested and matched as the application role.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest

from ledger.settlements import settlement_horizon, sync_settlement_items
from ledger.store import EventStore
from recon.formats import parse_statement
from recon.formats.base import ParsedFile, ParsedStatement, StatementError, StatementLine
from recon.formats.build import (
    bank_line,
    build_camt053,
    build_processor_csv,
    processor_line,
)
from recon.formats.build import statement as bank_statement
from recon.matching import RuleCount, RunResult, reconcile
from recon.rules import MatchRules
from recon.store import StatementConflict, ingest
from tests.harness.ledger import Payment, open_account
from tests.harness.postgres import IsolatedDatabase
from tests.harness.read_side import connect_app, connect_owner

RULES = MatchRules(amount_tolerance_minor=0, date_window_days=3, settlement_window_s=2 * 86_400)
# Past the settlement window: every unmatched settlement counts as missing.
LATER = timedelta(days=3)


# --- building blocks -----------------------------------------------------------------------
@dataclass
class Settled:
    payment_id: str
    amount_minor: int
    currency: str
    settled_at: datetime

    @property
    def value_date(self) -> date:
        return self.settled_at.astimezone(UTC).date()


class Books:
    """Accounts in EUR and USD, funded from external accounts by payments of known ids."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.settled: list[Settled] = []

    async def open(self) -> None:
        for currency in ("EUR", "USD"):
            world = f"world-{currency.lower()}"
            await open_account(
                self.store, world, currency=currency, kind="external", overdraft_limit_minor=None
            )
            await open_account(self.store, f"payer-{currency.lower()}", currency=currency)
            await open_account(
                self.store, f"shop-{currency.lower()}", currency=currency, kind="merchant"
            )
            await self.pay(world, f"payer-{currency.lower()}", 1_000_000, currency)

    async def pay(self, payer: str, payee: str, amount_minor: int, currency: str) -> Settled:
        payment = Payment(self.store, payer, payee, amount_minor, currency)
        results = await payment.settle_fully()
        settled = Settled(payment.payment_id, amount_minor, currency, results[-1].event.recorded_at)
        self.settled.append(settled)
        return settled

    async def sale(self, amount_minor: int, currency: str = "EUR") -> Settled:
        c = currency.lower()
        return await self.pay(f"payer-{c}", f"shop-{c}", amount_minor, currency)

    def fundings(self) -> list[Settled]:
        return [s for s in self.settled if s.amount_minor == 1_000_000]


def line(
    no: int,
    reference: str | None,
    amount_minor: int,
    currency: str = "EUR",
    value_date: date | None = None,
    kind: str = "capture",
) -> StatementLine:
    return StatementLine(
        line_no=no,
        amount_minor=amount_minor,
        currency=currency,
        value_date=value_date or datetime.now(UTC).date(),
        booking_date=None,
        reference=reference,
        end_to_end_id=reference,
        bank_reference=None,
        kind=kind,
        description=None,
    )


def lines_for(settled: list[Settled], start: int = 1) -> list[StatementLine]:
    """One exact line per settlement."""
    return [
        line(start + n, s.payment_id, s.amount_minor, s.currency, s.value_date)
        for n, s in enumerate(settled)
    ]


def statement(statement_id: str, lines: list[StatementLine]) -> ParsedStatement:
    return ParsedStatement(
        statement_id=statement_id, account="processor", currency=None, lines=tuple(lines)
    )


def parsed(*statements: ParsedStatement) -> ParsedFile:
    """A file whose hash stands for its content (the statements as parsed)."""
    digest = hashlib.sha256(repr(statements).encode()).hexdigest()
    return ParsedFile(format="processor-csv", sha256=digest, statements=statements)


def renumbered(lines: list[StatementLine]) -> list[StatementLine]:
    return [replace(x, line_no=n) for n, x in enumerate(lines, 1)]


@pytest.fixture
async def books(store: EventStore) -> Books:
    books = Books(store)
    await books.open()
    return books


@pytest.fixture
async def conn(database: IsolatedDatabase) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """The application role's connection, as a service holds it (autocommit)."""
    conn = await connect_app(database)
    yield conn
    await conn.close()


async def rows(conn: psycopg.AsyncConnection[Any], query: str, params: Any = None) -> list[Any]:
    cursor = await conn.execute(query, params)
    return list(await cursor.fetchall())


async def count(conn: psycopg.AsyncConnection[Any], table: str) -> int:
    return int((await rows(conn, f"SELECT count(*) FROM recon.{table}"))[0][0])


async def run(
    conn: psycopg.AsyncConnection[Any],
    *,
    at: datetime | None = None,
    rules: MatchRules = RULES,
    full: bool = False,
) -> RunResult:
    return await reconcile(
        conn,
        f"run-{uuid.uuid4().hex[:12]}",
        rules=rules,
        full=full,
        now=at or datetime.now(UTC) + LATER,
    )


def found(result: RunResult) -> set[tuple[str, str | None]]:
    """(type, reference) of each discrepancy a run found."""
    return {(d.type, d.reference) for d in result.discrepancies}


# --- ingestion -----------------------------------------------------------------------------
async def test_ingest_is_idempotent_by_content_and_by_statement_id(conn, books: Books) -> None:
    sales = [await books.sale(1_000 + n) for n in range(3)]
    first = statement("stmt-1", lines_for(sales[:2]))
    second = statement("stmt-2", lines_for(sales[2:]))
    file_a = parsed(first, second)

    result = await ingest(conn, file_a, source="upload", filename="a.csv")
    assert (result.statements_new, result.statements_known, result.lines_new) == (2, 0, 3)
    assert not result.duplicate

    again = await ingest(conn, file_a, source="inbox", filename="a-again.csv")
    assert again.duplicate
    assert (again.statements_new, again.lines_new) == (0, 0)

    third = statement("stmt-3", [line(1, "other-ref", 500)])
    file_b = parsed(second, third)  # another file repeating stmt-2 as it was
    overlap = await ingest(conn, file_b, source="simulator", filename=None)
    assert not overlap.duplicate
    assert (overlap.statements_new, overlap.statements_known, overlap.lines_new) == (1, 1, 1)

    assert await count(conn, "statement_files") == 2
    assert await count(conn, "statements") == 3
    assert await count(conn, "statement_lines") == 4
    stored = await rows(
        conn,
        "SELECT statement_id, line_no, amount_minor, currency, reference, kind "
        "FROM recon.statement_lines ORDER BY line_id",
    )
    assert stored[0] == ("stmt-1", 1, 1_000, "EUR", sales[0].payment_id, "capture")


async def test_a_known_statement_id_with_other_content_refuses_the_whole_file(
    conn, books: Books
) -> None:
    sale = await books.sale(2_000)
    await ingest(
        conn, parsed(statement("stmt-1", lines_for([sale]))), source="upload", filename=None
    )

    altered = statement("stmt-1", [line(1, sale.payment_id, 2_001)])
    fresh = statement("stmt-9", [line(1, "fresh", 100)])
    with pytest.raises(StatementConflict, match="stmt-1"):
        await ingest(conn, parsed(fresh, altered), source="upload", filename="b.csv")
    extra_line = statement("stmt-1", [*lines_for([sale]), line(2, "more", 5)])
    with pytest.raises(StatementConflict, match="stmt-1"):
        await ingest(conn, parsed(fresh, extra_line), source="upload", filename="c.csv")

    assert await count(conn, "statement_files") == 1
    assert [r[0] for r in await rows(conn, "SELECT statement_id FROM recon.statements")] == [
        "stmt-1"
    ]
    assert await count(conn, "statement_lines") == 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (replace(line(3, "r3", 100), currency="EURO"), "line 3: currency 'EURO'"),
        (replace(line(3, "r3", 100), currency="XAU"), "line 3: XAU has no minor unit"),
        (replace(line(3, "r3", 100), amount_minor=2**63), "line 3: the amount"),
        (replace(line(3, "r3", 100), reference="a\x00b"), "line 3: the reference holds a NUL"),
        (replace(line(3, "r3", 100), reference="x" * 201), "line 3: the reference must be"),
        (replace(line(3, "r3", 100), kind="payout"), "line 3: kind 'payout'"),
        (replace(line(3, "r3", 100), line_no=2), "line 2: line numbers must be distinct"),
    ],
)
async def test_a_bad_line_refuses_the_whole_file_and_names_it(
    conn, database: IsolatedDatabase, bad: StatementLine, message: str
) -> None:
    good = statement("stmt-good", [line(1, "g1", 100), line(2, "g2", 200)])
    spoilt = statement("stmt-bad", [line(1, "r1", 100), line(2, "r2", 200), bad])
    with pytest.raises(StatementError, match=message):
        await ingest(conn, parsed(good, spoilt), source="upload", filename="bad.csv")
    for table in ("statement_files", "statements", "statement_lines"):
        assert await count(conn, table) == 0, table
    # The file as it should have been goes in whole afterwards.
    fixed = statement("stmt-bad", [line(1, "r1", 100), line(2, "r2", 200), line(3, "r3", 1)])
    result = await ingest(conn, parsed(good, fixed), source="upload", filename="bad.csv")
    assert result.lines_new == 5


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (ParsedStatement("", "processor", None, ()), "its id must not be empty"),
        (ParsedStatement("s", "", None, ()), "its account must not be empty"),
        (ParsedStatement("s", "a\x00", None, ()), "its account holds a NUL"),
        (ParsedStatement("s", "processor", "EURO", ()), "currency 'EURO'"),
    ],
)
async def test_a_bad_statement_refuses_the_whole_file(
    conn, bad: ParsedStatement, message: str
) -> None:
    with pytest.raises(StatementError, match=message):
        await ingest(conn, parsed(bad), source="upload", filename=None)
    assert await count(conn, "statement_files") == 0


async def test_text_with_tabs_newlines_and_backslashes_is_stored_as_given(conn) -> None:
    tricky = replace(line(1, "ref\\with\ttab", 100), description="two\nlines\r\\N and \\")
    await ingest(conn, parsed(statement("stmt-t", [tricky])), source="upload", filename=None)
    stored = await rows(conn, "SELECT reference, description FROM recon.statement_lines")
    assert stored == [("ref\\with\ttab", "two\nlines\r\\N and \\")]


# --- settlement items ----------------------------------------------------------------------
async def test_every_settlement_becomes_one_item_once(conn, books: Books) -> None:
    sale = await books.sale(4_321, "USD")
    horizon = await settlement_horizon(conn)
    first = await sync_settlement_items(conn, after=0, upto=horizon)
    again = await sync_settlement_items(conn, after=0, upto=horizon)
    assert first.upto == again.upto == horizon
    assert (first.items_new, again.items_new) == (len(books.settled), 0)
    item = await rows(
        conn,
        "SELECT kind, payment_id, reference, amount_minor, currency, value_date, settled_at "
        "FROM recon.items WHERE payment_id = %s",
        (sale.payment_id,),
    )
    assert item == [
        (
            "capture",
            sale.payment_id,
            sale.payment_id,
            4_321,
            "USD",
            sale.value_date,
            sale.settled_at,
        )
    ]


# --- matching ------------------------------------------------------------------------------
async def test_each_discrepancy_type_is_found_once_and_not_again(conn, books: Books) -> None:
    exact, wrong_amount, wrong_currency, repeated, unreported, late = [
        await books.sale(1_000 * n) for n in range(1, 7)
    ]
    tomorrow = late.value_date + timedelta(days=1)
    lines = [
        *lines_for([*books.fundings(), exact, repeated]),
        line(0, wrong_amount.payment_id, wrong_amount.amount_minor + 100),
        line(0, wrong_currency.payment_id, wrong_currency.amount_minor, "USD"),
        line(0, repeated.payment_id, repeated.amount_minor),
        line(0, "p-nobody-knows", 777),
        line(0, late.payment_id, late.amount_minor, value_date=tomorrow),
        # The ledger has no refunds and the processor charges no fees: money out for a
        # settled payment names no settlement, and is for an operator to look at.
        line(0, exact.payment_id, -200, kind="refund"),
        line(0, exact.payment_id, -35, kind="fee"),
    ]
    await ingest(
        conn, parsed(statement("stmt-1", renumbered(lines))), source="upload", filename=None
    )

    first = await run(conn)
    assert found(first) == {
        ("amount_mismatch", wrong_amount.payment_id),
        ("currency_mismatch", wrong_currency.payment_id),
        ("duplicate_in_statement", repeated.payment_id),
        ("missing_in_ledger", "p-nobody-knows"),
        ("missing_in_statement", unreported.payment_id),
        ("missing_in_ledger", exact.payment_id),
    }
    money_out = [d for d in first.discrepancies if d.reference == exact.payment_id]
    assert sorted((d.details["kind"], d.amount_minor, d.item_id) for d in money_out) == [
        ("fee", -35, None),
        ("refund", -200, None),
    ]
    assert len(first.discrepancies) == 7
    assert first.discrepancy_counts["internal_drift"] == 0
    assert first.matched["exact"].lines == len(books.fundings()) + 3  # exact, repeated, late
    by_type = {d.type: d for d in first.discrepancies}
    mismatch = by_type["amount_mismatch"]
    assert (mismatch.amount_minor, mismatch.expected_amount_minor) == (2_100, 2_000)
    assert mismatch.payment_id == wrong_amount.payment_id
    assert mismatch.line_id is not None and mismatch.item_id is not None
    currency = by_type["currency_mismatch"]
    assert (currency.currency, currency.expected_currency) == ("USD", "EUR")
    missing = by_type["missing_in_statement"]
    assert (missing.line_id, missing.expected_amount_minor) == (None, 5_000)
    assert by_type["missing_in_ledger"].item_id is None
    assert by_type["duplicate_in_statement"].item_id is not None

    # The next runs, incremental and full, find the same problems and record none again.
    second = await run(conn)
    assert second.discrepancies == ()
    assert second.lines_considered == 6  # only the unmatched lines, each with its discrepancy
    full = await run(conn, full=True)
    assert full.discrepancies == ()
    assert await count(conn, "discrepancies") == 7
    assert await count(conn, "matched_lines") == first.lines_matched


async def test_a_settlement_is_missing_only_past_the_settlement_window(conn, books: Books) -> None:
    reported = lines_for(books.fundings())
    await ingest(conn, parsed(statement("stmt-1", reported)), source="upload", filename=None)
    sale = await books.sale(1_234)

    within = await run(conn, at=datetime.now(UTC))
    assert within.discrepancies == ()
    # Its line arrives late but within the window: it matches, and nothing is raised.
    await ingest(
        conn, parsed(statement("stmt-2", lines_for([sale]))), source="upload", filename=None
    )
    later = await run(conn)
    assert later.discrepancies == ()
    assert later.matched["exact"].items == 1

    unreported = await books.sale(4_321)
    young = await run(conn, at=datetime.now(UTC))
    assert young.discrepancies == ()
    old = await run(conn)
    assert found(old) == {("missing_in_statement", unreported.payment_id)}
    assert (await run(conn)).discrepancies == ()


async def test_a_line_missing_in_the_ledger_matches_once_the_settlement_is_posted(
    conn, books: Books
) -> None:
    payment = Payment(books.store, "payer-eur", "shop-eur", 3_000, "EUR")
    early = line(1, payment.payment_id, 3_000)
    await ingest(conn, parsed(statement("stmt-1", [early])), source="upload", filename=None)
    first = await run(conn, at=datetime.now(UTC))
    assert found(first) == {("missing_in_ledger", payment.payment_id)}

    await payment.settle_fully()
    second = await run(conn, at=datetime.now(UTC))
    assert second.discrepancies == ()
    assert second.matched["exact"].lines == 1
    assert second.now_matched == (first.discrepancies[0].discrepancy_id,)


async def test_duplicates_on_both_sides_are_paired_never_matched_twice(
    conn, database: IsolatedDatabase, books: Books
) -> None:
    # The ledger settles a payment once; a second item of one reference is written here,
    # as the owner, to see the item side of the pairing.
    owner = await connect_owner(database)
    try:
        await owner.execute(
            "INSERT INTO recon.items (global_seq, kind, payment_id, reference, amount_minor, "
            "currency, value_date, settled_at) "
            "SELECT g, 'capture', r, r, a, 'EUR', now()::date, now() - interval '5 days' "
            "FROM (VALUES (900001, 'two-items', 700), (900002, 'two-items', 700), "
            "(900003, 'three-items', 900), (900004, 'three-items', 900), "
            "(900005, 'three-items', 900)) AS v(g, r, a)"
        )
    finally:
        await owner.close()
    lines = [
        *lines_for(books.fundings()),
        *[line(0, "two-items", 700) for _ in range(3)],
        *[line(0, "three-items", 900) for _ in range(2)],
    ]
    await ingest(conn, parsed(statement("s", renumbered(lines))), source="upload", filename=None)

    result = await run(conn)
    assert result.matched["exact"].lines == len(books.fundings()) + 4
    assert sorted((d.type, d.reference) for d in result.discrepancies) == [
        ("duplicate_in_statement", "two-items"),
        ("missing_in_statement", "three-items"),
    ]
    pairs = await rows(
        conn,
        "SELECT l.reference, count(DISTINCT ml.line_id), count(DISTINCT mi.item_id) "
        "FROM recon.matched_lines ml JOIN recon.statement_lines l USING (line_id) "
        "JOIN recon.matched_items mi USING (match_id) GROUP BY l.reference "
        "HAVING l.reference IN ('two-items', 'three-items') ORDER BY 1",
    )
    assert pairs == [("three-items", 2, 2), ("two-items", 2, 2)]


async def test_the_rule_pass_matches_within_tolerance_split_lines_and_a_batched_payout(
    conn, books: Books
) -> None:
    close = await books.sale(10_000)
    close_but_late = await books.sale(20_000)
    split = await books.sale(30_000)
    usd = [await books.sale(amount, "USD") for amount in (1_100, 2_200, 3_300)]
    day = usd[0].value_date
    lines = [
        *lines_for(books.fundings()),
        line(0, close.payment_id, 9_997),
        line(0, close_but_late.payment_id, 19_998, value_date=day + timedelta(days=10)),
        line(0, split.payment_id, 12_000),
        line(0, split.payment_id, 18_000),
        line(0, "PAYOUT-USD-1", 6_600, "USD", day + timedelta(days=1), "credit"),
    ]
    await ingest(conn, parsed(statement("s", renumbered(lines))), source="upload", filename=None)

    rules = replace(RULES, amount_tolerance_minor=5)
    result = await run(conn, rules=rules)
    assert result.matched["tolerance"].lines == 1
    assert result.matched["split"] == RuleCount(matches=1, lines=2, items=1)
    assert result.matched["batch"].items == 3 and result.matched["batch"].lines == 1
    # Outside the date window, a close amount is a mismatch, not a match.
    assert found(result) == {("amount_mismatch", close_but_late.payment_id)}
    rules_of = dict(
        await rows(
            conn,
            "SELECT i.payment_id, m.rule FROM recon.matched_items mi "
            "JOIN recon.items i USING (item_id) "
            "JOIN recon.matched_lines m ON m.line_id = mi.match_id",
        )
    )
    assert rules_of[close.payment_id] == "tolerance"
    assert rules_of[split.payment_id] == "split"
    assert {rules_of[s.payment_id] for s in usd} == {"batch"}

    # With batching off, a payout is a line the ledger does not know; once batching is
    # on, the next run matches it after all, and says so.
    more = [await books.sale(amount, "USD") for amount in (500, 700)]
    payout = line(1, "PAYOUT-USD-2", 1_200, "USD", more[0].value_date, "credit")
    await ingest(conn, parsed(statement("s2", [payout])), source="upload", filename=None)
    unbatched = await run(conn, at=datetime.now(UTC), rules=replace(rules, batch_payouts=False))
    assert found(unbatched) == {("missing_in_ledger", "PAYOUT-USD-2")}
    batched = await run(conn, at=datetime.now(UTC), rules=rules)
    assert batched.matched["batch"] == RuleCount(matches=1, lines=1, items=2)
    assert batched.now_matched == (unbatched.discrepancies[0].discrepancy_id,)


async def test_files_in_real_formats_match_the_settlements_they_report(conn, books: Books) -> None:
    """The processor's CSV names each capture; the bank's camt.053 pays the day's USD
    captures out in one credit."""
    eur = [await books.sale(amount) for amount in (1_250, 990, 30_000)]
    usd = [await books.sale(amount, "USD") for amount in (1_100, 2_200)]
    report = build_processor_csv(
        processor_line("capture", s.payment_id, s.amount_minor, s.currency, s.value_date)
        for s in [*books.fundings(), *eur]
    )
    payout = bank_line(
        3_300, "USD", usd[0].value_date + timedelta(days=1), bank_reference="PAYOUT-USD"
    )
    camt = build_camt053([bank_statement("camt-stmt-1", "DE89370400440532013000", [payout])])

    for content, name in ((report, "report.csv"), (camt, "statement.xml")):
        result = await ingest(conn, parse_statement(content, name), source="upload", filename=name)
        assert not result.duplicate and result.lines_new >= 1

    outcome = await run(conn)
    assert outcome.discrepancies == ()
    assert outcome.matched["exact"].items == len(books.fundings()) + len(eur)
    assert outcome.matched["batch"] == RuleCount(matches=1, lines=1, items=2)


async def test_no_line_or_item_can_be_matched_twice_even_by_the_application_role(
    conn, books: Books
) -> None:
    sale = await books.sale(5_000)
    await ingest(
        conn,
        parsed(statement("s", lines_for([*books.fundings(), sale]))),
        source="upload",
        filename=None,
    )
    await run(conn)
    line_id, item_id = (
        await rows(
            conn,
            "SELECT ml.line_id, mi.item_id FROM recon.matched_lines ml "
            "JOIN recon.matched_items mi USING (match_id) LIMIT 1",
        )
    )[0]
    with pytest.raises(psycopg.errors.UniqueViolation):
        await conn.execute(
            "INSERT INTO recon.matched_lines (line_id, match_id, run_id, rule) "
            "VALUES (%s, -1, 'run-again', 'exact')",
            (line_id,),
        )
    with pytest.raises(psycopg.errors.UniqueViolation):
        await conn.execute(
            "INSERT INTO recon.matched_items (item_id, match_id) VALUES (%s, -1)", (item_id,)
        )
    for statement_sql in (
        "DELETE FROM recon.matched_lines",
        "DELETE FROM recon.statement_lines",
        "TRUNCATE recon.matched_items",
        "UPDATE recon.items SET amount_minor = 1",
        "UPDATE recon.discrepancies SET type = 'internal_drift'",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute(statement_sql)


async def test_concurrent_ingests_and_runs_add_each_thing_once(
    conn, database: IsolatedDatabase, books: Books
) -> None:
    sales = [await books.sale(100 + n) for n in range(20)]
    file = parsed(statement("s", lines_for([*books.fundings(), *sales])))
    other = await connect_app(database)
    try:
        ingested = await asyncio.gather(
            ingest(conn, file, source="upload", filename=None),
            ingest(other, file, source="inbox", filename=None),
        )
        assert sorted(r.duplicate for r in ingested) == [False, True]
        runs = await asyncio.gather(run(conn), run(other))
    finally:
        await other.close()
    assert sorted(r.lines_matched for r in runs) == [0, 22]
    assert await count(conn, "matched_lines") == await count(conn, "matched_items") == 22
    assert await count(conn, "discrepancies") == 0


async def test_a_run_retried_under_its_id_returns_what_it_recorded(conn, books: Books) -> None:
    await ingest(
        conn, parsed(statement("s", [line(1, "p-unknown", 99)])), source="upload", filename=None
    )
    at = datetime.now(UTC) + LATER
    first = await reconcile(conn, "run-retried", rules=RULES, now=at)
    again = await reconcile(conn, "run-retried", rules=RULES, now=at + timedelta(hours=1))
    assert again.replayed and not first.replayed
    assert again.discrepancies == first.discrepancies
    assert (again.matched, again.discrepancy_counts) == (first.matched, first.discrepancy_counts)
    assert await count(conn, "runs") == 1


async def test_a_discrepancys_id_is_its_ledgers_and_the_app_role_cannot_change_that(
    conn, books: Books, database: IsolatedDatabase
) -> None:
    """Line and item ids restart in every database: derived from the problem alone, two
    ledgers on one Temporal named different problems alike, and the second's case
    joined the first's workflow (migration 0016)."""
    payment = Payment(books.store, "payer-eur", "shop-eur", 3_000, "EUR")
    await ingest(
        conn,
        parsed(statement("stmt-1", [line(1, payment.payment_id, 3_000)])),
        source="upload",
        filename=None,
    )
    found_now = (await run(conn, at=datetime.now(UTC))).discrepancies
    assert len(found_now) == 1
    ledger_id, problem_key = await (
        await conn.execute(
            "SELECT i.ledger_id::text, d.problem_key FROM recon.installation i, "
            "recon.discrepancies d"
        )
    ).fetchone()
    derived = uuid.UUID(hashlib.md5(f"{ledger_id}:{problem_key}".encode()).hexdigest())
    assert str(found_now[0].discrepancy_id) == str(derived)
    for statement_sql in (
        "UPDATE recon.installation SET ledger_id = gen_random_uuid()",
        "UPDATE recon.discrepancies SET discrepancy_id = md5(problem_key)::uuid",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute(statement_sql)
    # Not even the owner can give a discrepancy an id its ledger would not derive.
    owner = await connect_owner(database)
    try:
        with pytest.raises(psycopg.errors.CheckViolation):
            await owner.execute(
                "UPDATE recon.discrepancies SET discrepancy_id = md5(problem_key)::uuid"
            )
    finally:
        await owner.close()
