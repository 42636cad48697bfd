"""The processor's settlement report: CSV, UTF-8, comma separated, with a header row
`date,reference,amount,currency,type`.

`date` is the settlement (value) date `YYYY-MM-DD`, `reference` the payment id, `amount`
a positive decimal in major units (`12.34` EUR, `1200` JPY; digits past the currency's
exponent must be zeros), `currency` ISO 4217, and `type` one of `capture` (money in, so
amount_minor > 0), `refund` or `fee` (money out, < 0).

The file is one statement, of account `processor`, with the id
`processor-<first date>-<last date>-<sha256[:12]>`. A report with no rows yields no
statement. The csv writer ends every row with a line end, so a file whose last row has
none was cut short, and is refused.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from recon.formats.base import (
    ParsedFile,
    ParsedStatement,
    StatementError,
    StatementLine,
    check_line_count,
    check_statement_lines,
    iso_date,
    minor_units,
)

HEADER = ("date", "reference", "amount", "currency", "type")
ACCOUNT = "processor"
SIGNS = {"capture": 1, "refund": -1, "fee": -1}
REFERENCE_CHARS_MAX = 200


def is_processor_csv(text: str) -> bool:
    """Whether the first line is the report's header (a cheap sniff)."""
    first = text.lstrip("\ufeff").split("\n", 1)[0].strip()
    return tuple(field.strip() for field in first.split(",")) == HEADER


def parse_processor_csv(content: bytes, sha256: str) -> ParsedFile:
    """Parse the processor's report; any problem is a StatementError naming the line."""
    try:
        text = content.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        bad_line = content[: error.start].count(b"\n") + 1
        raise StatementError(f"line {bad_line}: not UTF-8 text") from None
    check_line_count(text)
    if text and not text.endswith("\n"):
        last_line = text.count("\n") + 1
        raise StatementError(
            f"line {last_line}: the last row has no line end; the file is truncated"
        )
    lines: list[StatementLine] = []
    for line_no, row in _rows(text):
        if line_no == 1:
            if tuple(field.strip() for field in row) != HEADER:
                raise StatementError(f"line 1: the header must be {','.join(HEADER)}")
            continue
        if not row or row == [""]:
            raise StatementError(f"line {line_no}: an empty row")
        lines.append(_line(line_no, row, len(lines) + 1))
        check_statement_lines(len(lines), f"line {line_no}")
    if not lines:
        return ParsedFile(format="processor-csv", sha256=sha256, statements=())
    first = min(line.value_date for line in lines)
    last = max(line.value_date for line in lines)
    statement = ParsedStatement(
        statement_id=f"processor-{first.isoformat()}-{last.isoformat()}-{sha256[:12]}",
        account=ACCOUNT,
        currency=None if len({line.currency for line in lines}) > 1 else lines[0].currency,
        lines=tuple(lines),
    )
    return ParsedFile(format="processor-csv", sha256=sha256, statements=(statement,))


def _rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """Rows with the line each starts on (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        for row in reader:
            yield start, row
            start = reader.line_num + 1
    except csv.Error as error:
        raise StatementError(f"line {start}: {error}") from None


def _line(line_no: int, row: list[str], position: int) -> StatementLine:
    where = f"line {line_no}"
    if len(row) != len(HEADER):
        raise StatementError(f"{where}: {len(row)} fields, expected {len(HEADER)}")
    day, reference, amount, currency, kind = (field.strip() for field in row)
    value_date = iso_date(day, f"{where}: date")
    if not reference:
        raise StatementError(f"{where}: the reference is empty")
    if len(reference) > REFERENCE_CHARS_MAX:
        raise StatementError(f"{where}: the reference is over {REFERENCE_CHARS_MAX} characters")
    if kind not in SIGNS:
        raise StatementError(f"{where}: type {kind!r} is not one of {', '.join(SIGNS)}")
    magnitude = minor_units(amount, currency, where)
    if magnitude == 0:
        raise StatementError(f"{where}: amount {amount!r} must be positive")
    return StatementLine(
        line_no=position,
        amount_minor=SIGNS[kind] * magnitude,
        currency=currency,
        value_date=value_date,
        booking_date=None,
        reference=reference,
        end_to_end_id=None,
        bank_reference=None,
        kind=kind,
        description=None,
    )
