"""What every statement format parses into: normalised lines, in integer minor units.

A line's amount is signed from the account holder's side: a credit (money in) is
positive, a debit (money out) negative.

The limits every parser applies live here, named once, with the helpers the parsers
share: amounts to minor units (exact integer arithmetic, never a float) and ISO dates.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from decimal import Context, Decimal

from ledger.money import AMOUNT_MINOR_MAX, currency_exponent

# A statement file larger than this is refused before it is read: a day's statement for
# one account is kilobytes to a few megabytes; 64 MiB leaves room for a processor's
# report of a busy day (about a million CSV rows) and bounds the parser's memory.
FILE_BYTES_MAX = 64 * 1024 * 1024
# Physical lines of a text format (MT940, BAI2, CSV), and normalised lines of any file.
TEXT_LINES_MAX = 4_000_000
STATEMENT_LINES_MAX = 1_000_000
# Free text carried along for people (descriptions); longer text is cut, never refused.
DESCRIPTION_CHARS_MAX = 500
# An amount's digits: camt allows 18, MT940 15, BAI2 amounts fit in int64 (19). Anything
# longer is refused before it reaches Decimal.
AMOUNT_DIGITS_MAX = 30

# Distinct currency codes whose exponent is remembered between lines.
CURRENCIES_CACHED_MAX = 256

KINDS = ("capture", "refund", "fee", "credit", "debit")


class StatementError(ValueError):
    """A file that cannot be read as a statement. The message names the line number (text
    formats) or the element path (XML) where reading failed; nothing from the file is used."""


@dataclass(frozen=True, slots=True)
class StatementLine:
    line_no: int  # 1-based, the line's position in its statement
    amount_minor: int  # signed: credit > 0, debit < 0
    currency: str  # ISO 4217
    value_date: date
    booking_date: date | None
    reference: str | None  # what to match on: the end-to-end id, else the best reference
    end_to_end_id: str | None
    bank_reference: str | None
    kind: str  # "capture" | "refund" | "fee" | "credit" | "debit"
    description: str | None


@dataclass(frozen=True, slots=True)
class ParsedStatement:
    statement_id: str
    account: str
    currency: str | None
    lines: tuple[StatementLine, ...]


@dataclass(frozen=True, slots=True)
class ParsedFile:
    format: str  # "camt.053.001.02" .. "camt.053.001.08", "mt940", "bai2", "processor-csv"
    sha256: str  # hex digest of the file's bytes
    statements: tuple[ParsedStatement, ...]

    def lines(self) -> Iterator[tuple[ParsedStatement, StatementLine]]:
        """Every line of every statement, in file order, with its statement."""
        for statement in self.statements:
            for line in statement.lines:
                yield statement, line

    def as_json(self) -> dict[str, object]:
        """`{"format", "statements", "lines"}`, dates as `YYYY-MM-DD`: what
        `paysaga statement show --json` prints."""
        return {
            "format": self.format,
            "statements": [
                {
                    "statement_id": statement.statement_id,
                    "account": statement.account,
                    "currency": statement.currency,
                    "line_count": len(statement.lines),
                }
                for statement in self.statements
            ],
            "lines": [
                {
                    "amount_minor": line.amount_minor,
                    "currency": line.currency,
                    "value_date": line.value_date.isoformat(),
                    "booking_date": line.booking_date.isoformat() if line.booking_date else None,
                    "reference": line.reference,
                    "end_to_end_id": line.end_to_end_id,
                    "bank_reference": line.bank_reference,
                    "kind": line.kind,
                    "statement_id": statement.statement_id,
                    "account": statement.account,
                    "line_no": line.line_no,
                }
                for statement, line in self.lines()
            ],
        }


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def check_size(content: bytes) -> None:
    """Refuse a file over FILE_BYTES_MAX before anything reads it."""
    if len(content) > FILE_BYTES_MAX:
        raise StatementError(
            f"the file is {len(content)} bytes; statements are limited to {FILE_BYTES_MAX} bytes"
        )


def check_line_count(text: str) -> None:
    """Refuse a text file with more than TEXT_LINES_MAX lines."""
    count = text.count("\n") + 1
    if count > TEXT_LINES_MAX:
        raise StatementError(
            f"the file has {count} lines; text statements are limited to {TEXT_LINES_MAX}"
        )


def check_statement_lines(count: int, where: str) -> None:
    if count > STATEMENT_LINES_MAX:
        raise StatementError(
            f"{where}: more than {STATEMENT_LINES_MAX} statement lines in one file"
        )


@functools.lru_cache(maxsize=CURRENCIES_CACHED_MAX)
def _exponent(currency: str) -> int:
    # Cached: a file repeats a handful of currencies a million times. An unknown code
    # raises, and exceptions are never cached.
    return currency_exponent(currency)


def exponent_of(currency: str, where: str) -> int:
    """The currency's ISO 4217 exponent; an unknown code is a StatementError at `where`."""
    try:
        return _exponent(currency)
    except ValueError as error:
        raise StatementError(f"{where}: currency {currency!r}: {error}") from None


_PLAIN_DECIMAL = re.compile(r"^[0-9]+(?:\.[0-9]+)?$")
# Enough digits for any amount the pattern lets through, so nothing is ever rounded.
_EXACT = Context(prec=AMOUNT_DIGITS_MAX + 8)


def minor_units(text: str, currency: str, where: str, shown: str | None = None) -> int:
    """A non-negative decimal written `123` or `123.45` (major units) as an integer of the
    currency's minor unit, computed with `decimal`, never a float.

    Digits beyond the currency's exponent are accepted only when they are zeros
    (`12.3400` EUR is 1234); `12.345` EUR is a StatementError, as is an unknown currency
    or anything that is not such a number. `shown` is how the amount was written, for
    the message.
    """
    shown = text if shown is None else shown
    match = _PLAIN_DECIMAL.match(text)
    if match is None or len(text) > AMOUNT_DIGITS_MAX + 1:
        raise StatementError(f"{where}: amount {shown!r} is not a number")
    exponent = exponent_of(currency, where)
    # Exact: the pattern bounds the digits well inside the context's precision.
    scaled = Decimal(text).scaleb(exponent, _EXACT)
    if scaled != scaled.to_integral_value(context=_EXACT):
        raise StatementError(
            f"{where}: amount {shown!r} has more decimals than {currency} allows ({exponent})"
        )
    value = int(scaled)
    if value > AMOUNT_MINOR_MAX:
        raise StatementError(f"{where}: amount {shown!r} is beyond the largest amount held")
    return value


_ISO_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:Z|[+-]\d{2}:\d{2})?$")
_ISO_DATE_TIME = re.compile(
    r"^(\d{4}-\d{2}-\d{2})T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})?$"
)


def iso_date(text: str, where: str, *, with_time: bool = False) -> date:
    """An ISO 8601 date (`2024-03-07`, optionally with a zone, as xs:date allows), or with
    `with_time` a date-time, of which the date as written is kept (the statement's own
    calendar day, not converted to UTC)."""
    match = (_ISO_DATE_TIME if with_time else _ISO_DATE).match(text)
    if match is None:
        kind = "date-time" if with_time else "date"
        raise StatementError(f"{where}: {text!r} is not an ISO {kind}")
    try:
        return date.fromisoformat(match.group(1))
    except ValueError as error:
        raise StatementError(f"{where}: {text!r} is not a valid date ({error})") from None


def clip(text: str | None) -> str | None:
    """Free text, whitespace collapsed and cut to DESCRIPTION_CHARS_MAX; None if empty."""
    if text is None:
        return None
    collapsed = " ".join(text.split())
    return collapsed[:DESCRIPTION_CHARS_MAX] or None


def direction_kind(credit: bool) -> str:
    """A bank line's kind: money in is a credit, money out a debit."""
    return "credit" if credit else "debit"
