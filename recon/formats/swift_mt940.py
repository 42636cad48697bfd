"""SWIFT MT940 customer statements, read with the `mt-940` package (`mt940`).

The file is split into statements at each `:20:` (as `mt940.parse_statements` does), and
each statement is handed to `mt940` whole. This module adds what reconciliation needs
around it:

- line numbers: `mt940` reports neither lines nor tags, so on a failure the statement's
  tags are read again one at a time to find the first that does not parse, and the
  error names its line (`line 7: :61: ...`);
- completeness: a statement must carry `:25:`, `:28C:`, an opening (`:60F:`/`:60M:`) and
  a closing balance (`:62F:`/`:62M:`); a file cut short loses its closing balance, and is
  refused with the line where it ends;
- exact amounts in minor units (`mt940` gives Decimals), with the statement's currency
  checked against ISO 4217.

Options switched on (all are fixes `mt940` keeps opt-in for compatibility): a reversal of
a credit (`RC`) is a debit, lower-case marks count, a structured `:86:` without `KREF`
keeps the `:61:` customer reference, and long `:86:` details are not cut.

Normalised fields: the end-to-end id is `EREF+` of a German structured `:86:` (parsed by
`mt940`) or `/EREF/` of the SWIFT/Dutch structured `:86:`; `NOTPROVIDED` is none. The
reference is the end-to-end id, else the `:61:` customer reference (`NONREF` is none),
else the bank reference (`//` in `:61:`). The booking date is the `:61:` entry date.

A statement's id is `<:20:>/<:28C:>/<:25:>/<closing balance date>`: `:20:` alone is not
unique in practice (German banks send `STARTUMSE` every day) and `:28C:` restarts each
year, so the account and the day make the id safe to deduplicate on.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from datetime import date
from decimal import Decimal
from typing import Any

import mt940
import mt940.models
import mt940.tags

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
    minor_units,
)

OPTIONS = mt940.Options(
    reversal_sign=True,
    case_insensitive_marks=True,
    merge_keeps_values=True,
    unbounded_details=True,
    non_swift_free_text=True,
    strip_bom=True,
)
NO_REFERENCE = "NONREF"
NOT_PROVIDED = "NOTPROVIDED"

_TAG_LINE = re.compile(r"^:(?P<tag>(?P<base>\d{2}|NS)[A-Z]?):")
# `/EREF/<id>` ends at the next `/CODE/` field, at `//`, or at the end of the details.
_SLASH_EREF = re.compile(r"/EREF/(?P<id>.+?)(?=/[A-Z]{2,4}/|//|/?$)")
_REQUIRED = (
    (("25",), ":25: (account)"),
    (("28C", "28"), ":28C: (statement number)"),
    (("60F", "60M", "60"), ":60F:/:60M: (opening balance)"),
)
_CLOSING = ("62F", "62M", "62")


def is_mt940(text: str) -> bool:
    """Whether the text has an MT940 statement's first tags (a cheap sniff)."""
    head = text[:65536]
    return bool(re.search(r"(?m)^:20:", head) and re.search(r"(?m)^:(25|28C?|60[FM]?):", head))


def decode(content: bytes) -> str:
    """SWIFT text is ASCII; banks send UTF-8 or Latin-1 around it."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        text = content.decode("latin-1")
    return text.removeprefix("\ufeff")


class _Tag:
    """One tag as written: its line, name, and value (its text up to the next tag)."""

    def __init__(self, line_no: int, name: str, base: str, value: str) -> None:
        self.line_no = line_no
        self.name = name
        self.base = base
        self.value = value


def _known(base: str) -> bool:
    key: int | str = int(base) if base.isdigit() else base
    return key in mt940.tags.TAG_BY_ID


def _tags(lines: list[str]) -> list[_Tag]:
    """The file's tags, with the line each starts on. Lines outside any tag (SWIFT block
    headers, bank banners) are ignored, as `mt940` ignores them."""
    tags: list[_Tag] = []
    starts = [
        (index, match)
        for index, line in enumerate(lines)
        if (match := _TAG_LINE.match(line)) and _known(match.group("base"))
    ]
    for position, (index, match) in enumerate(starts):
        end = starts[position + 1][0] if position + 1 < len(starts) else len(lines)
        body = [lines[index][match.end() :], *lines[index + 1 : end]]
        kept = [line.rstrip() for line in body if line.strip() and line.strip() != "-"]
        tags.append(_Tag(index + 1, match.group("tag"), match.group("base"), "\n".join(kept)))
    return tags


def _statements(tags: list[_Tag]) -> list[list[_Tag]]:
    blocks: list[list[_Tag]] = []
    for tag in tags:
        if tag.name == "20":
            blocks.append([tag])
        elif blocks:
            blocks[-1].append(tag)
    return blocks


def parse_mt940(content: bytes, sha256: str) -> ParsedFile:
    """Parse an MT940 file (one or more statements); any problem is a StatementError
    naming the line."""
    text = decode(content)
    check_line_count(text)
    lines = text.splitlines()
    blocks = _statements(_tags(lines))
    if not blocks:
        raise StatementError("line 1: no :20: tag, so no MT940 statement")
    statements: list[ParsedStatement] = []
    seen: set[str] = set()
    total = 0
    for position, block in enumerate(blocks):
        last_line = (
            blocks[position + 1][0].line_no - 1 if position + 1 < len(blocks) else len(lines)
        )
        statement = _statement(block, lines, last_line)
        if statement.statement_id in seen:
            raise StatementError(
                f"line {block[0].line_no}: statement {statement.statement_id!r} appears twice"
            )
        seen.add(statement.statement_id)
        total += len(statement.lines)
        check_statement_lines(total, f"line {block[0].line_no}")
        statements.append(statement)
    return ParsedFile(format="mt940", sha256=sha256, statements=tuple(statements))


def _statement(block: list[_Tag], lines: list[str], last_line: int) -> ParsedStatement:
    first = block[0].line_no
    names = {tag.name for tag in block}
    for accepted, label in _REQUIRED:
        if not names.intersection(accepted):
            raise StatementError(f"line {first}: the statement that starts here has no {label}")
    if not names.intersection(_CLOSING):
        raise StatementError(
            f"line {last_line}: the statement that starts at line {first} ends without a "
            "closing balance (:62F:/:62M:); the file is truncated or malformed"
        )
    transactions = mt940.models.Transactions(options=OPTIONS)
    try:
        with _quiet():
            transactions.parse("\n".join(lines[first - 1 : last_line]))
    except Exception as error:
        with _quiet():
            located = _locate(block, error)
        raise located from None
    entries = [tag for tag in block if tag.name == "61"]
    if len(transactions) != len(entries):
        raise StatementError(
            f"line {first}: read {len(transactions)} transactions for {len(entries)} :61: tags"
        )
    data = transactions.data
    currency = transactions.currency
    if currency is None:
        raise StatementError(f"line {first}: the statement has no currency in its balances")
    opening = next(tag for tag in block if tag.name in ("60F", "60M", "60"))
    exponent_of(currency, f"line {opening.line_no} (:{opening.name}:)")
    statement_lines = [
        _line(position, transaction.data, currency, tag.line_no)
        for position, (transaction, tag) in enumerate(zip(transactions, entries, strict=True), 1)
    ]
    reference = str(data.get("transaction_reference") or "").strip()
    number = str(data.get("statement_number") or "").strip()
    if data.get("sequence_number"):
        number += f"/{data['sequence_number']}"
    account = str(data.get("account_identification") or "").strip()
    if not account:
        raise StatementError(f"line {first}: the statement's :25: account is empty")
    closing = next(
        (
            data[key]
            for key in ("final_closing_balance", "intermediate_closing_balance", "closing_balance")
            if key in data
        ),
        None,
    )
    closing_date = getattr(closing, "date", None)
    day = closing_date.isoformat() if isinstance(closing_date, date) else "-"
    return ParsedStatement(
        statement_id=f"{reference}/{number}/{account}/{day}",
        account=account,
        currency=currency,
        lines=tuple(statement_lines),
    )


def _plain(value: object) -> date | None:
    """mt940's Date subclass, as a plain date (equal, hashable and serialisable alike)."""
    if isinstance(value, date):
        return date(value.year, value.month, value.day)
    return None


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _line(line_no: int, data: dict[str, Any], currency: str, source_line: int) -> StatementLine:
    where = f"line {source_line}"
    status = str(data.get("status") or "").upper()
    if status not in ("C", "D", "RC", "RD"):
        raise StatementError(f"{where}: :61: debit/credit mark {status!r} is not C, D, RC or RD")
    credit = status in ("C", "RD")
    amount = data["amount"].amount
    assert isinstance(amount, Decimal)
    written = format(abs(amount), "f")
    magnitude = minor_units(written, currency, where, written.replace(".", ","))
    value_date = _plain(data.get("date"))
    if value_date is None:
        raise StatementError(f"{where}: :61: has no value date")

    details = _text(data.get("transaction_details"))
    end_to_end_id = _text(data.get("end_to_end_reference"))
    if end_to_end_id is None and details is not None:
        match = _SLASH_EREF.search("".join(details.splitlines()))
        end_to_end_id = _text(match.group("id")) if match else None
    if end_to_end_id == NOT_PROVIDED:
        end_to_end_id = None
    customer_reference = _text(data.get("customer_reference"))
    if customer_reference == NO_REFERENCE:
        customer_reference = None
    bank_reference = _text(data.get("bank_reference"))
    if bank_reference == NO_REFERENCE:
        bank_reference = None
    reference = end_to_end_id or customer_reference or bank_reference
    description = _text(data.get("purpose")) or details
    return StatementLine(
        line_no=line_no,
        amount_minor=magnitude if credit else -magnitude,
        currency=currency,
        value_date=value_date,
        booking_date=_plain(data.get("entry_date")),
        reference=reference,
        end_to_end_id=end_to_end_id,
        bank_reference=bank_reference,
        kind=direction_kind(credit),
        description=clip(description),
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """`mt940` logs every tag it cannot match at ERROR; the StatementError says it once."""
    logger = logging.getLogger("mt940")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _locate(block: list[_Tag], error: Exception) -> StatementError:
    """Find the first tag of the statement that `mt940` cannot read, by reading the tags
    again one at a time, and name its line."""
    transactions = mt940.models.Transactions(options=OPTIONS)
    for tag_written in block:
        tag = (
            transactions.tags.get(tag_written.name)
            or transactions.tags[
                int(tag_written.base) if tag_written.base.isdigit() else tag_written.base
            ]
        )
        try:
            tag_dict = tag.parse(transactions, tag_written.value)
            steps: list[Callable[..., Any]] = transactions.processors.get(f"pre_{tag.slug}", [])
            for processor in steps:
                tag_dict = processor(transactions, tag, tag_dict)
            result = tag(transactions, tag_dict)
            for processor in transactions.processors.get(f"post_{tag.slug}", []):
                result = processor(transactions, tag, tag_dict, result)
        except Exception as failure:
            shown = (
                tag_written.value
                if len(tag_written.value) <= 80
                else tag_written.value[:77] + "..."
            )
            return StatementError(
                f"line {tag_written.line_no}: :{tag_written.name}: {shown!r} cannot be read "
                f"({_reason(failure)})"
            )
        if tag.scope is mt940.models.Transactions:
            transactions.data.update(result)
    first = block[0].line_no
    return StatementError(f"line {first}: the statement cannot be read ({_reason(error)})")


def _reason(error: Exception) -> str:
    if isinstance(error, RuntimeError) and error.args:
        return "it does not match the tag's format"
    return f"{type(error).__name__}: {error}"
