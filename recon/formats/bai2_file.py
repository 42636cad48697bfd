"""BAI2 cash management files, read with the `bai2` package.

`bai2` checks the structure (file, group, account, trailers) and the integrity (record
counts, control totals), which is what makes a truncated or tampered file fail. It
reports neither line numbers nor where a record came from, so this module feeds it the
file's records through an iterator that remembers which record it is on, and names that
record's line in every error. It also guards `bai2` against a file cut short: a file must
end with its `99` trailer (without it `bai2` would loop forever on the last record).

Each account (`03`) of each group (`02`) is one statement. Amounts are integers in the
currency's minor unit, as BAI2 writes them (implied decimals). Type codes give the sign:
a credit code (100-399) is money in, a debit code (400-699) money out; a non-monetary
code (890) with no amount yields no line, and one with an amount is refused. The value
date is the funds-type `V` date when given, else the group's as-of date, which is also
the booking date. The reference is the customer reference, else the bank reference;
BAI2 carries no end-to-end id.

A statement's id is `<sender>/<creation date>/<file id>/<account>/<as-of date>`: the
BAI2 file id is unique per sender and creation date, and one file may report an account
for several days.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from bai2 import constants, exceptions, helpers, models, parsers

from ledger.money import AMOUNT_MINOR_MAX
from recon.formats.base import (
    ParsedFile,
    ParsedStatement,
    StatementError,
    StatementLine,
    check_line_count,
    check_statement_lines,
    clip,
    direction_kind,
    exponent_of,
)

RECORD_CODES = frozenset(code.value for code in constants.RecordCode)
_NAMES = {
    "01": "file header (01)",
    "02": "group header (02)",
    "03": "account identifier (03)",
    "16": "transaction detail (16)",
    "49": "account trailer (49)",
    "88": "continuation (88)",
    "98": "group trailer (98)",
    "99": "file trailer (99)",
}


def is_bai2(text: str) -> bool:
    """Whether the first record is a BAI2 file header (a cheap sniff)."""
    return text.lstrip("\ufeff \t\r\n").startswith("01,")


class _Records(helpers.IteratorHelper):  # type: ignore[misc]
    """The records of the file, remembering the index of the current one."""

    def __init__(self, lines: list[str]) -> None:
        self.index = -1
        self.exhausted = False
        super().__init__(lines)

    def advance(self) -> None:
        try:
            super().advance()
        except StopIteration:
            # Past the last record nothing matches any parser, so no loop re-reads it.
            self.exhausted = True
            self.current_record = models.Record(code=None, fields=[])
            raise
        self.index += 1


def parse_bai2(content: bytes, sha256: str) -> ParsedFile:
    """Parse a BAI2 file; any problem is a StatementError naming the line."""
    try:
        text = content.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        bad_line = content[: error.start].count(b"\n") + 1
        raise StatementError(f"line {bad_line}: not UTF-8/ASCII text") from None
    check_line_count(text)
    records: list[tuple[int, str]] = [
        (number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()
    ]
    if not records:
        raise StatementError("line 1: the file is empty")
    for number, line in records:
        if line[:2] not in RECORD_CODES or line[2:3] != ",":
            raise StatementError(
                f"line {number}: {line[:20]!r} is not a BAI2 record "
                f"({', '.join(sorted(RECORD_CODES))})"
            )
    heads = [(number, line) for number, line in records if not line.startswith("88,")]
    if heads[0][1][:2] != "01":
        raise StatementError(f"line {heads[0][0]}: a BAI2 file starts with its header (01)")
    if heads[-1][1][:2] != "99":
        raise StatementError(
            f"line {records[-1][0]}: the file ends without its trailer (99); it is truncated"
        )
    starts = [number for number, _ in heads]
    iterator = _Records([line for _, line in records])
    try:
        parsed = parsers.Bai2FileParser(iterator, check_integrity=True).parse()
    except (
        exceptions.ParsingException,
        exceptions.IntegrityException,
        exceptions.NotSupportedYetException,
        ValueError,
        IndexError,
        KeyError,
        TypeError,
    ) as error:
        raise _located(error, iterator, starts, heads) from None
    if not iterator.exhausted:
        raise StatementError(f"line {starts[iterator.index]}: a record after the file trailer (99)")
    return _normalise(
        parsed,
        sha256,
        detail_lines=[number for number, line in heads if line[:2] == "16"],
        account_lines=[number for number, line in heads if line[:2] == "03"],
        group_lines=[number for number, line in heads if line[:2] == "02"],
    )


def _located(
    error: Exception, iterator: _Records, starts: list[int], heads: list[tuple[int, str]]
) -> StatementError:
    index = iterator.index
    # An integrity check runs once the trailer is read and the iterator has moved on.
    if isinstance(error, exceptions.IntegrityException) and not iterator.exhausted:
        index -= 1
    index = min(max(index, 0), len(starts) - 1)
    code = heads[index][1][:2]
    reason = str(error) or type(error).__name__
    if isinstance(error, exceptions.ParsingException) and iterator.exhausted:
        return StatementError(f"line {starts[-1]}: the file ends too early ({reason})")
    return StatementError(f"line {starts[index]}: {_NAMES.get(code, code)}: {reason}")


def _normalise(
    parsed: Any,
    sha256: str,
    *,
    detail_lines: list[int],
    account_lines: list[int],
    group_lines: list[int],
) -> ParsedFile:
    header = parsed.header
    created: date | None = header.creation_date
    statements: list[ParsedStatement] = []
    seen: set[str] = set()
    details = iter(detail_lines)
    accounts = iter(account_lines)
    total = 0
    for group, group_line in zip(parsed.children, group_lines, strict=True):
        as_of: date | None = group.header.as_of_date
        if as_of is None:
            raise StatementError(f"line {group_line}: group header (02): no as-of date")
        for account in group.children:
            account_line = next(accounts)
            number = str(account.header.customer_account_number or "").strip()
            if not number:
                raise StatementError(f"line {account_line}: the account number is empty")
            currency = str(account.header.currency or group.header.currency or "USD").strip()
            exponent_of(currency, f"line {account_line}")
            lines: list[StatementLine] = []
            for detail in account.children:
                line = _line(detail, currency, as_of, next(details), len(lines) + 1)
                if line is not None:
                    lines.append(line)
            statement_id = (
                f"{header.sender_id}/{created:%Y%m%d}/{header.file_id}/{number}/{as_of:%Y%m%d}"
                if created is not None
                else f"{header.sender_id}/-/{header.file_id}/{number}/{as_of:%Y%m%d}"
            )
            if statement_id in seen:
                raise StatementError(
                    f"line {account_line}: statement {statement_id!r} appears twice"
                )
            seen.add(statement_id)
            total += len(lines)
            check_statement_lines(total, f"line {account_line}")
            statements.append(
                ParsedStatement(
                    statement_id=statement_id, account=number, currency=currency, lines=tuple(lines)
                )
            )
    return ParsedFile(format="bai2", sha256=sha256, statements=tuple(statements))


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _line(
    detail: Any, currency: str, as_of: date, source_line: int, line_no: int
) -> StatementLine | None:
    where = f"line {source_line}"
    direction = detail.type_code.transaction
    amount = detail.amount
    if direction not in (constants.TypeCodeTransaction.credit, constants.TypeCodeTransaction.debit):
        if not amount:
            return None
        raise StatementError(
            f"{where}: type code {detail.type_code.code} ({detail.type_code.description}) "
            "carries an amount but no credit or debit direction"
        )
    if amount is None:
        raise StatementError(f"{where}: the amount is missing")
    if amount < 0:
        raise StatementError(f"{where}: amount {amount} is negative")
    if amount > AMOUNT_MINOR_MAX:
        raise StatementError(f"{where}: amount {amount} is beyond the largest amount held")
    credit = direction == constants.TypeCodeTransaction.credit
    value_date = as_of
    availability = detail.availability
    if detail.funds_type == constants.FundsType.value_dated and availability:
        value_date = availability.get("date") or as_of
    customer_reference = _text(detail.customer_reference)
    bank_reference = _text(detail.bank_reference)
    return StatementLine(
        line_no=line_no,
        amount_minor=amount if credit else -amount,
        currency=currency,
        value_date=value_date,
        booking_date=as_of,
        reference=customer_reference or bank_reference,
        end_to_end_id=None,
        bank_reference=bank_reference,
        kind=direction_kind(credit),
        description=clip(_text(detail.text)),
    )
