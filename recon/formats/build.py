"""Render statements in each format from normalised lines: the inverse of the parsers,
for tests and for the simulator's exports, so real settled payments can be turned into a
file in any format.

What each format carries, so that `parse_statement(build_x(s))` gives `s` back for it:

- camt.053: everything but the kind, which follows the sign (`credit`/`debit`). The
  end-to-end id is `TxDtls/Refs/EndToEndId`, another reference goes in `NtryRef`, the bank
  reference in `AcctSvcrRef`, the description in `AddtlNtryInf`.
- MT940: amount, currency (one per statement), dates (two-digit years), the end-to-end
  id (`/EREF/` in `:86:`), a reference of up to 16 characters when there is no end-to-end
  id (`:61:` customer reference), the bank reference (up to 16, after `//`). The
  description is written into `:86:` but comes back as the whole `:86:` text. The
  statement id comes back as `<:20:>/<:28C:>/<account>/<closing date>`.
- BAI2: amount, currency (one per account), the value date (funds type `V` when it
  differs from the group's as-of date), the booking date (the as-of date; one per
  statement), the reference (customer reference), the bank reference and the
  description (text). No end-to-end id. The statement id is derived from the file header.
- processor CSV: value date, reference, amount, currency and kind (capture, refund, fee).

Output is deterministic (no clock is read unless a time is passed), so a file built twice
from the same lines has the same sha256.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, time

from lxml import etree

from ledger.money import currency_exponent
from recon.formats.base import ParsedStatement, StatementLine, direction_kind
from recon.formats.camt053 import NAMESPACE_PREFIX, VERSIONS

__all__ = [
    "CAMT_VERSIONS",
    "bank_line",
    "build_bai2",
    "build_camt053",
    "build_mt940",
    "build_processor_csv",
    "decimal_text",
    "processor_line",
    "statement",
]

CAMT_VERSIONS = tuple(f"001.{version}" for version in VERSIONS)
_IBAN = re.compile(r"^[A-Z]{2}[0-9]{2}[A-Za-z0-9]{1,30}$")
# Two-digit years: MT940 reads YY as 20YY, BAI2 (strptime's %y) as 1969-2068.
MT940_YEARS = range(2000, 2100)
BAI2_YEARS = range(1969, 2069)
MT940_REFERENCE_CHARS_MAX = 16
MT940_DETAILS_LINE_CHARS_MAX = 65
BAI2_CREDIT_CODE = "195"  # Incoming Money Transfer
BAI2_DEBIT_CODE = "495"  # Outgoing Money Transfer


# --- making lines --------------------------------------------------------------------------
def bank_line(
    amount_minor: int,
    currency: str,
    value_date: date,
    *,
    end_to_end_id: str | None = None,
    reference: str | None = None,
    bank_reference: str | None = None,
    booking_date: date | None = None,
    description: str | None = None,
) -> StatementLine:
    """A bank statement line as a parser returns it: the reference defaults to the
    end-to-end id, then the bank reference; the kind follows the sign."""
    return StatementLine(
        line_no=0,
        amount_minor=amount_minor,
        currency=currency,
        value_date=value_date,
        booking_date=booking_date,
        reference=reference or end_to_end_id or bank_reference,
        end_to_end_id=end_to_end_id,
        bank_reference=bank_reference,
        kind=direction_kind(amount_minor > 0),
        description=description,
    )


def processor_line(
    kind: str, reference: str, amount_minor: int, currency: str, value_date: date
) -> StatementLine:
    """A line of the processor's report; `amount_minor` is the positive amount, signed
    here by kind (a capture is money in, a refund or fee money out)."""
    if kind not in ("capture", "refund", "fee") or amount_minor <= 0:
        raise ValueError("a processor line is a capture, refund or fee of a positive amount")
    signed = amount_minor if kind == "capture" else -amount_minor
    return StatementLine(
        line_no=0,
        amount_minor=signed,
        currency=currency,
        value_date=value_date,
        booking_date=None,
        reference=reference,
        end_to_end_id=None,
        bank_reference=None,
        kind=kind,
        description=None,
    )


def statement(
    statement_id: str, account: str, lines: Iterable[StatementLine], currency: str | None = None
) -> ParsedStatement:
    """A statement of `lines`, numbered from 1 in order; its currency defaults to the
    lines' one currency."""
    numbered = tuple(replace(line, line_no=position) for position, line in enumerate(lines, 1))
    currencies = {line.currency for line in numbered}
    if currency is None and len(currencies) == 1:
        currency = next(iter(currencies))
    return ParsedStatement(
        statement_id=statement_id, account=account, currency=currency, lines=numbered
    )


def decimal_text(magnitude_minor: int, currency: str, extra_zero_decimals: int = 0) -> str:
    """`1234, "EUR"` → `"12.34"`; `1200, "JPY"` → `"1200"`; with `extra_zero_decimals=2`,
    `"12.3400"`."""
    if magnitude_minor < 0:
        raise ValueError("a magnitude is not negative")
    exponent = currency_exponent(currency)
    digits = str(magnitude_minor).rjust(exponent + 1, "0")
    whole, fraction = (digits[:-exponent], digits[-exponent:]) if exponent else (digits, "")
    fraction += "0" * extra_zero_decimals
    return f"{whole}.{fraction}" if fraction else whole


def _check_years(statement_: ParsedStatement, years: range, name: str) -> None:
    for line in statement_.lines:
        for day in (line.value_date, line.booking_date):
            if day is not None and day.year not in years:
                raise ValueError(
                    f"{name} writes two-digit years ({years.start}-{years.stop - 1}): {day}"
                )


def _currency_of(statement_: ParsedStatement) -> str:
    if statement_.currency is not None:
        return statement_.currency
    currencies = {line.currency for line in statement_.lines}
    if len(currencies) != 1:
        raise ValueError(f"statement {statement_.statement_id!r} needs one currency")
    return currencies.pop()


# --- camt.053 ------------------------------------------------------------------------------
def build_camt053(
    statements: Sequence[ParsedStatement],
    version: str = "001.08",
    *,
    message_id: str | None = None,
    created_at: datetime | None = None,
    opening_balance_minor: int = 0,
    extra_zero_decimals: int = 0,
) -> bytes:
    """A camt.053 document (001.02 to 001.08) holding `statements`, one `Ntry` per line.

    `extra_zero_decimals` pads every amount with zeros past the currency's exponent, as
    some banks write them (`12.3400`).
    """
    if version not in CAMT_VERSIONS:
        raise ValueError(f"camt.053 version {version!r} is not one of {', '.join(CAMT_VERSIONS)}")
    if not statements:
        raise ValueError("a camt.053 document holds at least one statement")
    namespace = f"{NAMESPACE_PREFIX}{version.removeprefix('001.')}"
    status_as_choice = version >= "001.07"
    transaction_amounts = version >= "001.03"

    def sub(
        parent: etree._Element, name: str, text: str | None = None, **attrs: str
    ) -> etree._Element:
        element = etree.SubElement(parent, f"{{{namespace}}}{name}", attrs)
        if text is not None:
            element.text = text
        return element

    def amount(parent: etree._Element, magnitude: int, currency: str) -> None:
        sub(parent, "Amt", decimal_text(magnitude, currency, extra_zero_decimals), Ccy=currency)

    def day(parent: etree._Element, name: str, value: date) -> None:
        sub(sub(parent, name), "Dt", value.isoformat())

    all_dates = [line.value_date for s in statements for line in s.lines] or [date(2000, 1, 1)]
    created = created_at or datetime.combine(max(all_dates), time(23, 59, 59), UTC)
    root = etree.Element(f"{{{namespace}}}Document", nsmap={None: namespace})
    message = sub(root, "BkToCstmrStmt")
    header = sub(message, "GrpHdr")
    sub(header, "MsgId", (message_id or f"PAYSAGA-{statements[0].statement_id}")[:35])
    sub(header, "CreDtTm", created.isoformat(timespec="seconds"))
    for statement_ in statements:
        currency = _currency_of(statement_)
        dates = [line.value_date for line in statement_.lines] or [created.date()]
        node = sub(message, "Stmt")
        sub(node, "Id", statement_.statement_id)
        sub(node, "CreDtTm", created.isoformat(timespec="seconds"))
        period = sub(node, "FrToDt")
        sub(period, "FrDtTm", datetime.combine(min(dates), time(0, 0, 0), UTC).isoformat())
        sub(period, "ToDtTm", datetime.combine(max(dates), time(23, 59, 59), UTC).isoformat())
        account = sub(node, "Acct")
        identification = sub(account, "Id")
        if _IBAN.match(statement_.account):
            sub(identification, "IBAN", statement_.account)
        else:
            sub(sub(identification, "Othr"), "Id", statement_.account)
        if statement_.currency is not None:
            sub(account, "Ccy", statement_.currency)
        closing = opening_balance_minor + sum(
            line.amount_minor for line in statement_.lines if line.currency == currency
        )
        for code, balance, when in (
            ("OPBD", opening_balance_minor, min(dates)),
            ("CLBD", closing, max(dates)),
        ):
            node_balance = sub(node, "Bal")
            sub(sub(sub(node_balance, "Tp"), "CdOrPrtry"), "Cd", code)
            amount(node_balance, abs(balance), currency)
            sub(node_balance, "CdtDbtInd", "CRDT" if balance >= 0 else "DBIT")
            day(node_balance, "Dt", when)
        for line in statement_.lines:
            entry = sub(node, "Ntry")
            if line.reference not in (None, line.end_to_end_id, line.bank_reference):
                sub(entry, "NtryRef", line.reference)
            amount(entry, abs(line.amount_minor), line.currency)
            indicator = "CRDT" if line.amount_minor > 0 else "DBIT"
            sub(entry, "CdtDbtInd", indicator)
            if status_as_choice:
                sub(sub(entry, "Sts"), "Cd", "BOOK")
            else:
                sub(entry, "Sts", "BOOK")
            if line.booking_date is not None:
                day(entry, "BookgDt", line.booking_date)
            day(entry, "ValDt", line.value_date)
            if line.bank_reference is not None:
                sub(entry, "AcctSvcrRef", line.bank_reference)
            domain = sub(sub(entry, "BkTxCd"), "Domn")
            sub(domain, "Cd", "PMNT")
            family = sub(domain, "Fmly")
            sub(family, "Cd", "RCDT" if indicator == "CRDT" else "ICDT")
            sub(family, "SubFmlyCd", "ESCT")
            if line.end_to_end_id is not None:
                details = sub(sub(entry, "NtryDtls"), "TxDtls")
                sub(sub(details, "Refs"), "EndToEndId", line.end_to_end_id)
                if transaction_amounts:
                    amount(details, abs(line.amount_minor), line.currency)
                    sub(details, "CdtDbtInd", indicator)
            if line.description is not None:
                sub(entry, "AddtlNtryInf", line.description)
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))


# --- MT940 ---------------------------------------------------------------------------------
_MT940_ID = re.compile(r"^(?P<reference>[^/]{1,16})/(?P<number>\d{1,5}(?:/\d{1,5})?)(?:/|$)")


def _mt940_amount(magnitude: int, currency: str) -> str:
    """MT940 writes a decimal comma, always: `12,34`, `1200,`."""
    text = decimal_text(magnitude, currency)
    return text.replace(".", ",") if "." in text else f"{text},"


def build_mt940(statements: Sequence[ParsedStatement]) -> bytes:
    """An MT940 file with one statement per entry of `statements`.

    The `:20:` and `:28C:` come from a statement id written `<ref>/<number>[/...]` (as
    the parser returns it), else the id itself (up to 16 characters) is the `:20:` and
    its position in the file the `:28C:`.
    """
    out: list[str] = []
    for position, statement_ in enumerate(statements, 1):
        currency = _currency_of(statement_)
        match = _MT940_ID.match(statement_.statement_id)
        if match:
            reference, number = match.group("reference"), match.group("number")
        elif len(statement_.statement_id) <= MT940_REFERENCE_CHARS_MAX:
            reference, number = statement_.statement_id, str(position)
        else:
            raise ValueError(f"MT940 :20: holds 16 characters: {statement_.statement_id!r}")
        dates = [line.value_date for line in statement_.lines] or [date(2000, 1, 1)]
        _check_years(statement_, MT940_YEARS, "MT940")
        closing = sum(line.amount_minor for line in statement_.lines)
        out += [
            f":20:{reference}",
            f":25:{statement_.account}",
            f":28C:{number}",
            f":60F:C{min(dates):%y%m%d}{currency}{_mt940_amount(0, currency)}",
        ]
        for line in statement_.lines:
            if line.currency != currency:
                raise ValueError(f"MT940 statements hold one currency ({currency}): {line}")
            out += _mt940_entry(line, currency)
        mark = "C" if closing >= 0 else "D"
        out.append(
            f":62F:{mark}{max(dates):%y%m%d}{currency}{_mt940_amount(abs(closing), currency)}"
        )
        out.append("-")
    return ("\r\n".join(out) + "\r\n").encode("utf-8")


def _mt940_entry(line: StatementLine, currency: str) -> list[str]:
    mark = "C" if line.amount_minor > 0 else "D"
    entry = f"{line.booking_date:%m%d}" if line.booking_date is not None else ""
    own = line.reference if line.end_to_end_id is None else None
    if own is not None and own == line.bank_reference:
        own = None
    if own is not None and (len(own) > MT940_REFERENCE_CHARS_MAX or "//" in own):
        raise ValueError(f"an MT940 customer reference holds 16 characters: {own!r}")
    amount = _mt940_amount(abs(line.amount_minor), currency)
    text = f":61:{line.value_date:%y%m%d}{entry}{mark}{amount}NTRF{own or 'NONREF'}"
    if line.bank_reference is not None:
        if len(line.bank_reference) > MT940_REFERENCE_CHARS_MAX:
            raise ValueError(
                f"an MT940 bank reference holds 16 characters: {line.bank_reference!r}"
            )
        text += f"//{line.bank_reference}"
    details = ""
    if line.end_to_end_id is not None:
        details = f"/EREF/{line.end_to_end_id}"
    if line.description is not None:
        details += f"/REMI/{line.description}" if details else line.description
    lines = [text]
    if details:
        chunks = [
            details[start : start + MT940_DETAILS_LINE_CHARS_MAX]
            for start in range(0, len(details), MT940_DETAILS_LINE_CHARS_MAX)
        ]
        lines += [f":86:{chunks[0]}", *chunks[1:]]
    return lines


# --- BAI2 ----------------------------------------------------------------------------------
def build_bai2(
    statements: Sequence[ParsedStatement],
    *,
    sender: str = "PAYSAGABANK",
    receiver: str = "PAYSAGA",
    file_id: str = "1",
    created_at: datetime | None = None,
) -> bytes:
    """A BAI2 file with one group (02) and account (03) per statement; trailers carry
    the record counts and control totals `bai2` checks."""
    all_dates = [line.value_date for s in statements for line in s.lines] or [date(2000, 1, 1)]
    created = created_at or datetime.combine(max(all_dates), time(23, 59), UTC)
    records = [f"01,{sender},{receiver},{created:%y%m%d},{created:%H%M},{file_id},,,2/"]
    file_total = 0
    for statement_ in statements:
        currency = _currency_of(statement_)
        _check_years(statement_, BAI2_YEARS, "BAI2")
        booked = {line.booking_date for line in statement_.lines if line.booking_date is not None}
        if len(booked) > 1:
            raise ValueError(
                f"a BAI2 account section has one as-of date; {statement_.statement_id!r} has "
                f"{len(booked)} booking dates"
            )
        as_of = (
            booked.pop()
            if booked
            else max((line.value_date for line in statement_.lines), default=created.date())
        )
        group = [f"02,{receiver},{sender},1,{as_of:%y%m%d},,{currency},2/"]
        account = [f"03,{statement_.account},{currency},/"]
        total = 0
        for line in statement_.lines:
            if line.currency != currency:
                raise ValueError(f"BAI2 accounts hold one currency ({currency}): {line}")
            code = BAI2_CREDIT_CODE if line.amount_minor > 0 else BAI2_DEBIT_CODE
            funds = "Z" if line.value_date == as_of else f"V,{line.value_date:%y%m%d},"
            customer = line.reference if line.reference != line.bank_reference else None
            fields = [
                code,
                str(abs(line.amount_minor)),
                funds,
                line.bank_reference or "",
                customer or "",
            ]
            record = "16," + ",".join(fields)
            if line.description:
                record += f",{line.description.rstrip('/')}"
            account.append(record + "/")
            total += abs(line.amount_minor)
        account.append(f"49,{total},{len(account) + 1}/")
        group += account
        group.append(f"98,{total},1,{len(group) + 1}/")
        records += group
        file_total += total
    records.append(f"99,{file_total},{len(statements)},{len(records) + 1}/")
    return ("\n".join(records) + "\n").encode("ascii", errors="replace")


# --- the processor's CSV -------------------------------------------------------------------
def build_processor_csv(lines: Iterable[StatementLine]) -> bytes:
    """The processor's settlement report: `date,reference,amount,currency,type`, amounts
    positive in major units with exactly the currency's exponent digits."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("date", "reference", "amount", "currency", "type"))
    for line in lines:
        expected_sign = 1 if line.kind == "capture" else -1
        if line.kind not in ("capture", "refund", "fee") or line.reference is None:
            raise ValueError(
                f"a processor line is a capture, refund or fee with a reference: {line}"
            )
        if line.amount_minor * expected_sign <= 0:
            raise ValueError(f"a {line.kind}'s amount has the wrong sign: {line}")
        writer.writerow(
            (
                line.value_date.isoformat(),
                line.reference,
                decimal_text(abs(line.amount_minor), line.currency),
                line.currency,
                line.kind,
            )
        )
    return buffer.getvalue().encode("utf-8")
