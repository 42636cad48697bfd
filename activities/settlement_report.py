"""The processor simulator's settlement report: what it paid out in a window, as CSV.

A real processor sends its merchants a settlement report; the simulator writes the
same, in the processor's CSV format (the contract in recon/formats):

    date,reference,amount,currency,type
    2026-11-24,pay-3f2a9c01b7d4,125.00,EUR,capture

one `capture` line per capture the processor settled in `[start, end)`, dated by the
day it settled (the capture's own date, unless it settled late), the payment id as
reference, and the amount in major units with exactly the currency's exponent digits,
rendered from the integer minor units with `decimal`.

**Injected discrepancies.** On request the report lies, in ways a reconciliation must
catch, each a count of lines: `missing` (a capture left out), `extra` (a line for a
payment that does not exist), `wrong_amount`, `wrong_currency`, `duplicate` (a line
repeated) and `late` (a capture moved out of this window: the processor settles it at
`end` instead, so it appears in the next window's report, dated later). The choice of
lines is a function of the seed, the window and the captures in it; a `late`
settlement is recorded in the simulator (`processor_captures.settles_at`), so every
later report agrees with it, and a repeat of the same request changes nothing. The
returned `SettlementReport` names every payment an injection touched, so a test can
check that reconciliation finds each one.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.money import currency_exponent

HEADER = ("date", "reference", "amount", "currency", "type")
INJECTION_KINDS = ("missing", "extra", "wrong_amount", "wrong_currency", "duplicate", "late")
# Limits: lines injected per kind, captures in one report, and the window's length.
INJECTED_LINES_MAX = 10_000
REPORT_CAPTURES_MAX = 2_000_000
WINDOW_MAX = timedelta(days=366)
# A wrong amount is off by 1 to this many minor units, always still positive.
WRONG_AMOUNT_DELTA_MAX_MINOR = 99
EXTRA_AMOUNT_MINOR_RANGE = (100, 100_000)
# Wrong currencies are taken among these, with the true one's exponent where possible,
# so that only the currency is wrong, not also the number of digits.
WRONG_CURRENCIES = ("EUR", "USD", "GBP", "CHF", "SEK", "JPY", "KRW", "KWD", "BHD")


@dataclass(frozen=True)
class ReportLine:
    """One line of the report, as written."""

    value_date: date
    reference: str
    amount_minor: int
    currency: str
    kind: str = "capture"


@dataclass(frozen=True)
class Injected:
    """One injected discrepancy: the payment it touched, where, and how."""

    kind: str
    payment_id: str
    # The line's 1-based position among the data rows (the header not counted), or
    # None when the capture is left out of this report (`missing`, `late`). For a
    # `duplicate`, the repeated copy.
    row: int | None
    detail: str


@dataclass(frozen=True)
class SettlementReport:
    """A settlement report and its manifest."""

    start: datetime
    end: datetime
    seed: int
    content: bytes
    lines: tuple[ReportLine, ...]
    # What the processor really settled in the window: every capture whose settlement
    # falls in it, whether or not an injection then misreports it.
    settled: tuple[str, ...]
    # Captures of an earlier window that settled late, into this one.
    late_arrivals: tuple[str, ...]
    injected: tuple[Injected, ...] = field(default=())

    def touched(self, kind: str) -> list[str]:
        """The payment ids an injection of this kind touched, in report order."""
        return [i.payment_id for i in self.injected if i.kind == kind]

    def manifest(self) -> dict[str, Any]:
        """The report's manifest, for JSON: window, counts, and every injection."""
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "seed": self.seed,
            "lines": len(self.lines),
            "settled": len(self.settled),
            "late_arrivals": list(self.late_arrivals),
            "injected": [
                {"kind": i.kind, "payment_id": i.payment_id, "row": i.row, "detail": i.detail}
                for i in self.injected
            ],
        }


def parse_injections(spec: str) -> dict[str, int]:
    """`"missing=1,extra=2"` → `{"missing": 1, "extra": 2}`; ValueError names what is wrong."""
    counts: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        kind, equals, count = part.partition("=")
        if not equals:
            raise ValueError(f"{part!r}: expected KIND=COUNT, e.g. missing=1")
        kind = kind.strip()
        try:
            counts[kind] = int(count.strip())
        except ValueError:
            raise ValueError(f"{part!r}: {count.strip()!r} is not a whole number") from None
    _check_injections(counts)
    return counts


def amount_text(amount_minor: int, currency: str) -> str:
    """Major units with exactly the currency's exponent digits: 1234 EUR → "12.34"."""
    exponent = currency_exponent(currency)
    return f"{Decimal(amount_minor).scaleb(-exponent):.{exponent}f}"


async def export_settlement_report(
    engine: AsyncEngine,
    start: datetime,
    end: datetime,
    *,
    inject: Mapping[str, int] | None = None,
    seed: int = 0,
) -> bytes:
    """The report's CSV bytes (see `build_settlement_report` for its manifest)."""
    report = await build_settlement_report(engine, start, end, inject=inject, seed=seed)
    return report.content


async def build_settlement_report(
    engine: AsyncEngine,
    start: datetime,
    end: datetime,
    *,
    inject: Mapping[str, int] | None = None,
    seed: int = 0,
) -> SettlementReport:
    """The simulator's settlement report for `[start, end)`, with the injections asked for.

    Deterministic for a given seed, window and set of captures. Bad input (a naive or
    empty window, an unknown kind, more injections than the window has captures)
    raises ValueError and changes nothing.
    """
    _check_window(start, end)
    counts = dict(inject or {})
    _check_injections(counts)
    rng = random.Random(f"{seed}:{start.isoformat()}:{end.isoformat()}")
    async with engine.begin() as conn:
        # Sorted here, not by the database's collation, so any server draws the same.
        captured = sorted(
            str(row.payment_id)
            for row in await conn.execute(_CAPTURED_IN_WINDOW, {"start": start, "end": end})
        )
        if len(captured) > REPORT_CAPTURES_MAX:
            raise ValueError(
                f"{len(captured)} captures in the window, more than {REPORT_CAPTURES_MAX}: "
                "ask for a shorter window"
            )
        # One order for every choice: the captures by payment id, shuffled by the seed.
        rng.shuffle(captured)
        late = captured[: counts.get("late", 0)]
        if len(late) < counts.get("late", 0):
            raise _too_few("late", counts["late"], len(captured))
        rows = sorted(
            await conn.execute(_SETTLED_IN_WINDOW, {"start": start, "end": end}),
            key=lambda row: (row.settles_at, str(row.payment_id)),
        )
        late_set = set(late)
        in_window = {row.payment_id for row in rows} - late_set
        pool = [p for p in captured[len(late) :] if p in in_window]
        victims: dict[str, list[str]] = {}
        for kind in ("missing", "wrong_amount", "wrong_currency", "duplicate"):
            wanted = counts.get(kind, 0)
            if wanted > len(pool):
                raise _too_few(kind, wanted, len(pool))
            victims[kind], pool = pool[:wanted], pool[wanted:]
        extras = await _extra_references(conn, rng, counts.get("extra", 0))
        if late:
            # The processor pays these out when the window closes: the next report's.
            await conn.execute(_SETTLE_LATE, {"ids": late, "end": end})

    settled = tuple(row.payment_id for row in rows if row.payment_id not in late_set)
    late_arrivals = tuple(
        row.payment_id for row in rows if row.payment_id not in late_set and row.captured_at < start
    )
    lines, injected = _lines(rows, late_set, victims, extras, rng, start)
    for payment_id in late:
        injected.append(
            Injected(
                "late",
                payment_id,
                None,
                f"settled at {end.isoformat()} instead: it is in the next window's report",
            )
        )
    return SettlementReport(
        start=start,
        end=end,
        seed=seed,
        content=_csv(lines),
        lines=tuple(lines),
        settled=settled,
        late_arrivals=late_arrivals,
        injected=tuple(injected),
    )


def _lines(
    rows: Sequence[Any],
    late: set[str],
    victims: dict[str, list[str]],
    extras: list[str],
    rng: random.Random,
    start: datetime,
) -> tuple[list[ReportLine], list[Injected]]:
    """The report's lines in order (date, then reference), and where each lie went."""
    missing = set(victims["missing"])
    wrong_amount = set(victims["wrong_amount"])
    wrong_currency = set(victims["wrong_currency"])
    duplicate = set(victims["duplicate"])
    # (line, kind of injection or None, what it says)
    drafted: list[tuple[ReportLine, str | None, str]] = []
    for row in rows:
        payment_id = row.payment_id
        if payment_id in late or payment_id in missing:
            continue
        line = ReportLine(
            value_date=row.settles_at.astimezone(UTC).date(),
            reference=payment_id,
            amount_minor=int(row.amount_minor),
            currency=str(row.currency),
        )
        true_amount = f"{amount_text(line.amount_minor, line.currency)} {line.currency}"
        if payment_id in wrong_amount:
            reported = line.amount_minor + rng.randint(1, WRONG_AMOUNT_DELTA_MAX_MINOR)
            line = ReportLine(line.value_date, payment_id, reported, line.currency)
            drafted.append(
                (
                    line,
                    "wrong_amount",
                    f"reports {amount_text(reported, line.currency)} {line.currency} "
                    f"for a capture of {true_amount}",
                )
            )
            continue
        if payment_id in wrong_currency:
            other = _other_currency(line.currency, rng)
            line = ReportLine(line.value_date, payment_id, line.amount_minor, other)
            drafted.append(
                (
                    line,
                    "wrong_currency",
                    f"reports {amount_text(line.amount_minor, other)} {other} "
                    f"for a capture of {true_amount}",
                )
            )
            continue
        drafted.append((line, None, ""))
        if payment_id in duplicate:
            drafted.append((line, "duplicate", f"the line of {true_amount} appears twice"))
    extra_date = start.astimezone(UTC).date()
    currency = _most_common_currency(rows)
    for reference in extras:
        amount_minor = rng.randint(*EXTRA_AMOUNT_MINOR_RANGE)
        line = ReportLine(extra_date, reference, amount_minor, currency)
        drafted.append(
            (
                line,
                "extra",
                f"a capture of {amount_text(amount_minor, currency)} {currency} for a "
                "payment that does not exist",
            )
        )
    # Stable: a duplicate stays right after its original.
    drafted.sort(key=lambda d: (d[0].value_date, d[0].reference))
    lines = [line for line, _, _ in drafted]
    injected = [
        Injected(kind, line.reference, row_no, detail)
        for row_no, (line, kind, detail) in enumerate(drafted, start=1)
        if kind is not None
    ]
    injected.extend(
        Injected("missing", p, None, "left out of the report") for p in victims["missing"]
    )
    return lines, injected


def _csv(lines: Sequence[ReportLine]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    for line in lines:
        writer.writerow(
            (
                line.value_date.isoformat(),
                line.reference,
                amount_text(line.amount_minor, line.currency),
                line.currency,
                line.kind,
            )
        )
    return out.getvalue().encode("utf-8")


async def _extra_references(conn: Any, rng: random.Random, count: int) -> list[str]:
    """References of payments that do not exist (none the processor has ever seen)."""
    if count == 0:
        return []
    references = sorted({f"pay-extra-{rng.getrandbits(64):016x}" for _ in range(count)})
    known = {row.payment_id for row in await conn.execute(_KNOWN_PAYMENTS, {"ids": references})}
    if known or len(references) < count:
        # 64 random bits each: a clash is a bug in the seed's use, not bad luck.
        raise RuntimeError(f"extra references clash with real payments: {sorted(known)}")
    return references


def _other_currency(currency: str, rng: random.Random) -> str:
    exponent = currency_exponent(currency)
    same = [c for c in WRONG_CURRENCIES if c != currency and currency_exponent(c) == exponent]
    return rng.choice(same or [c for c in WRONG_CURRENCIES if c != currency])


def _most_common_currency(rows: Sequence[Any]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row.currency)] = counts.get(str(row.currency), 0) + 1
    return max(sorted(counts), key=lambda c: counts[c]) if counts else "EUR"


def _check_window(start: datetime, end: datetime) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("the window needs time zones (an RFC 3339 time, or a date as UTC)")
    if not start < end:
        raise ValueError(
            f"the window is empty: {start.isoformat()} is not before {end.isoformat()}"
        )
    if end - start > WINDOW_MAX:
        raise ValueError(f"the window is longer than {WINDOW_MAX.days} days")


def _check_injections(counts: Mapping[str, int]) -> None:
    unknown = sorted(set(counts) - set(INJECTION_KINDS))
    if unknown:
        raise ValueError(
            f"unknown injection {', '.join(unknown)}: choose among {', '.join(INJECTION_KINDS)}"
        )
    for kind, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int):
            raise ValueError(f"{kind}: the count must be a whole number, not {count!r}")
        if not 0 <= count <= INJECTED_LINES_MAX:
            raise ValueError(f"{kind}={count}: a count is between 0 and {INJECTED_LINES_MAX}")


def _too_few(kind: str, wanted: int, available: int) -> ValueError:
    return ValueError(
        f"{kind}={wanted}: the window has only {available} capture(s) left to misreport"
    )


# Captured in the window: the lines an injection may pick (a late one included).
_CAPTURED_IN_WINDOW = text(
    "SELECT payment_id FROM processor_captures WHERE captured_at >= :start AND captured_at < :end"
)
# Settled in the window: the report's lines (a capture settled late from an earlier
# window included, one moved late out of this window excluded).
_SETTLED_IN_WINDOW = text(
    "SELECT payment_id, amount_minor, currency, captured_at, settles_at "
    "FROM processor_captures WHERE settles_at >= :start AND settles_at < :end"
)
_SETTLE_LATE = text(
    "UPDATE processor_captures SET settles_at = greatest(settles_at, :end) WHERE payment_id IN :ids"
).bindparams(bindparam("ids", expanding=True))
_KNOWN_PAYMENTS = text(
    "SELECT payment_id FROM processor_authorizations WHERE payment_id IN :ids"
).bindparams(bindparam("ids", expanding=True))
