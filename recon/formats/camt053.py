"""ISO 20022 camt.053 (BankToCustomerStatement), versions 001.02 to 001.08, read with lxml.

Why plain lxml and explicit element paths, not a camt library:

- `pycamt` (1.1.1) detects only 001.02, .03, .04, .08 and .12 (a 001.05 to .07 file comes
  back as "unknown"), finds fields with descendant searches (`.//Amt`, `.//CdtDbtInd`)
  that can pick a nested transaction's element instead of the entry's, turns balances
  into floats, returns strings with no element path when something is missing, and its
  repository is GPL-3.0 while its wheel says MIT.
- `pyiso20022` (1.6.2) is maintained and has Decimal amounts, but it is a generator of
  xsdata dataclasses (2.4 MB, one module per message version), needs `xsdata` at run time
  without declaring it, and reports a bad file as an xsdata binding error, with no path.
- The fields reconciliation needs sit at the same paths in every version from 001.02 to
  001.08 (`Ntry/Amt`, `CdtDbtInd`, `BookgDt`, `ValDt`, `AcctSvcrRef`,
  `NtryDtls/TxDtls/Refs/EndToEndId`, `Stmt/Id`, `Acct/Id/IBAN|Othr/Id`); only the entry
  status changed shape (a code up to .06, `Sts/Cd` from .07). Reading them directly is a
  page of code, keeps amounts as exact decimals, and lets every error name its element,
  e.g. `/Document/BkToCstmrStmt/Stmt[2]/Ntry[3]/Amt: amount '12.345' has more decimals
  than EUR allows (2)`.

lxml is used safely: no DTD is loaded, no entity is resolved, nothing is fetched from the
network, a DOCTYPE is refused outright, huge text nodes are refused (`huge_tree=False`),
and the file size is bounded by `FILE_BYTES_MAX` before parsing. The official XSDs are
not shipped, so the file is not schema-validated: every field read is checked instead.

Choices, each faithful to the file:

- An entry whose status is not `BOOK` (pending `PDNG`, information `INFO`) moved no money
  and yields no line.
- An entry is one line, with the entry's amount. A batch (several `TxDtls`, or a `Btch`
  with `NbOfTxs` > 1) stays one line: the bank booked one amount, which is what the
  matcher's many-to-one rule pairs with many settlements. Its end-to-end id is None and
  its reference the batch's `PmtInfId` when there is one. Splitting it into per-TxDtls
  lines would invent bookings the account never had (and a 001.02 `TxDtls` has no `Amt`).
- `EndToEndId` `NOTPROVIDED` (the SEPA placeholder) is no id.
- The sign comes from `CdtDbtInd` alone: with `RvslInd` the indicator already gives the
  reversal entry's own direction.
"""

from __future__ import annotations

import io
from datetime import date

from lxml import etree

from recon.formats.base import (
    ParsedFile,
    ParsedStatement,
    StatementError,
    StatementLine,
    check_statement_lines,
    clip,
    direction_kind,
    exponent_of,
    iso_date,
    minor_units,
)

NAMESPACE_PREFIX = "urn:iso:std:iso:20022:tech:xsd:camt.053.001."
VERSIONS = ("02", "03", "04", "05", "06", "07", "08")
NOT_PROVIDED = "NOTPROVIDED"
# Elements that repeat: their path always carries an index (Stmt[1]), so a message
# names the same element whether the file holds one statement or many.
_REPEATED = frozenset({"Stmt", "Ntry", "NtryDtls", "TxDtls", "Bal", "Ustrd"})


def is_xml(content: bytes) -> bool:
    """Whether the file is XML (its namespace is checked when it is parsed)."""
    return content[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def _local(element: etree._Element) -> str:
    return str(etree.QName(element).localname)


def _path(element: etree._Element, child: str | None = None) -> str:
    """`/Document/BkToCstmrStmt/Stmt[2]/Ntry[3]` (then `/child` if given)."""
    parts: list[str] = []
    node: etree._Element | None = element
    while node is not None:
        name = _local(node)
        index = 1 + sum(
            1 for sibling in node.itersiblings(preceding=True) if sibling.tag == node.tag
        )
        parts.append(f"{name}[{index}]" if name in _REPEATED or index > 1 else name)
        node = node.getparent()
    path = "/" + "/".join(reversed(parts))
    return f"{path}/{child}" if child else path


def _syntax_error(content: bytes, error: etree.XMLSyntaxError) -> StatementError:
    """Name the element that was open where the XML broke (a truncated file ends inside
    one), by reading again up to the break."""
    stack: list[tuple[str, dict[str, int]]] = [("", {})]
    line, column = error.position if error.position else (error.lineno, 0)
    try:
        events = etree.iterparse(
            io.BytesIO(content),
            events=("start", "end"),
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            huge_tree=False,
        )
        for event, element in events:
            if event == "start":
                name = _local(element)
                counts = stack[-1][1]
                counts[name] = counts.get(name, 0) + 1
                index = counts[name]
                shown = f"{name}[{index}]" if name in _REPEATED or index > 1 else name
                stack.append((shown, {}))
            else:
                stack.pop()
                element.clear()
    except etree.XMLSyntaxError as again:
        line, column = again.position if again.position else (again.lineno, 0)
    path = "/" + "/".join(name for name, _ in stack[1:])
    return StatementError(
        f"{path}: the XML is malformed or truncated (line {line}, column {column}): {error.msg}"
    )


class _Reader:
    """Reads one camt.053 document in namespace `ns`."""

    def __init__(self, ns: str) -> None:
        self.ns = {"c": ns}

    def child(self, element: etree._Element, path: str) -> etree._Element | None:
        found = element.find("/".join(f"c:{step}" for step in path.split("/")), self.ns)
        return found

    def children(self, element: etree._Element, path: str) -> list[etree._Element]:
        return list(element.findall("/".join(f"c:{step}" for step in path.split("/")), self.ns))

    def text(self, element: etree._Element, path: str) -> str | None:
        found = self.child(element, path)
        if found is None or found.text is None:
            return None
        return found.text.strip() or None

    def required_text(self, element: etree._Element, path: str) -> str:
        value = self.text(element, path)
        if value is None:
            raise StatementError(f"{_path(element, path)}: missing or empty")
        return value

    def date_choice(self, element: etree._Element, name: str, where: str) -> date | None:
        """`BookgDt`/`ValDt`: a `Dt` or a `DtTm` (whose calendar day is kept); `where` is
        the element's path."""
        holder = self.child(element, name)
        if holder is None:
            return None
        day = self.text(holder, "Dt")
        if day is not None:
            return iso_date(day, f"{where}/{name}/Dt")
        moment = self.text(holder, "DtTm")
        if moment is not None:
            return iso_date(moment, f"{where}/{name}/DtTm", with_time=True)
        raise StatementError(f"{where}/{name}: has neither Dt nor DtTm")


def parse_camt053(content: bytes, sha256: str) -> ParsedFile:
    """Parse a camt.053.001.02-.08 document; any problem is a StatementError naming the
    element path."""
    try:
        root = etree.fromstring(content, parser=_parser())
    except etree.XMLSyntaxError as error:
        raise _syntax_error(content, error) from None
    if root.getroottree().docinfo.doctype:
        raise StatementError("/: a DOCTYPE is not allowed in a statement")
    qname = etree.QName(root)
    namespace = qname.namespace or ""
    if qname.localname != "Document" or not namespace.startswith(NAMESPACE_PREFIX):
        raise StatementError(
            f"/{qname.localname}: not a camt.053 Document (namespace {namespace or 'none'!r})"
        )
    version = namespace.removeprefix(NAMESPACE_PREFIX)
    if version not in VERSIONS:
        raise StatementError(
            f"/Document: camt.053.001.{version} is not supported "
            f"(001.{VERSIONS[0]} to 001.{VERSIONS[-1]} are)"
        )
    reader = _Reader(namespace)
    message = reader.child(root, "BkToCstmrStmt")
    if message is None:
        raise StatementError("/Document/BkToCstmrStmt: missing")
    statements_xml = reader.children(message, "Stmt")
    if not statements_xml:
        raise StatementError("/Document/BkToCstmrStmt/Stmt: the file holds no statement")
    statements: list[ParsedStatement] = []
    seen: set[str] = set()
    total = 0
    for position, statement_xml in enumerate(statements_xml, 1):
        statement = _statement(reader, statement_xml, f"/Document/BkToCstmrStmt/Stmt[{position}]")
        if statement.statement_id in seen:
            raise StatementError(
                f"{_path(statement_xml, 'Id')}: statement id {statement.statement_id!r} "
                "appears twice in the file"
            )
        seen.add(statement.statement_id)
        total += len(statement.lines)
        check_statement_lines(total, f"/Document/BkToCstmrStmt/Stmt[{position}]")
        statements.append(statement)
    return ParsedFile(format=f"camt.053.001.{version}", sha256=sha256, statements=tuple(statements))


def _statement(reader: _Reader, statement_xml: etree._Element, where: str) -> ParsedStatement:
    # Paths are built from positions as the elements are walked: computing one from the
    # tree looks at every preceding sibling, which over all entries would be quadratic.
    statement_id = reader.required_text(statement_xml, "Id")
    account_xml = reader.child(statement_xml, "Acct")
    if account_xml is None:
        raise StatementError(f"{where}/Acct: missing")
    account = reader.text(account_xml, "Id/IBAN") or reader.text(account_xml, "Id/Othr/Id")
    if account is None:
        raise StatementError(f"{where}/Acct/Id: neither IBAN nor Othr/Id")
    account_currency = reader.text(account_xml, "Ccy")
    if account_currency is not None:
        exponent_of(account_currency, f"{where}/Acct/Ccy")
    lines: list[StatementLine] = []
    for position, entry_xml in enumerate(reader.children(statement_xml, "Ntry"), 1):
        line = _entry(reader, entry_xml, f"{where}/Ntry[{position}]", len(lines) + 1)
        if line is not None:
            lines.append(line)
    currencies = {line.currency for line in lines}
    currency = account_currency or (currencies.pop() if len(currencies) == 1 else None)
    return ParsedStatement(
        statement_id=statement_id, account=account, currency=currency, lines=tuple(lines)
    )


def _entry(
    reader: _Reader, entry: etree._Element, entry_path: str, line_no: int
) -> StatementLine | None:
    status = reader.text(entry, "Sts/Cd") or reader.text(entry, "Sts/Prtry")
    status = status or reader.text(entry, "Sts")
    if status is not None and status != "BOOK":
        return None

    amount_xml = reader.child(entry, "Amt")
    if amount_xml is None or amount_xml.text is None:
        raise StatementError(f"{entry_path}/Amt: missing or empty")
    where = f"{entry_path}/Amt"
    currency = amount_xml.get("Ccy")
    if not currency:
        raise StatementError(f"{where}: no Ccy attribute")
    amount_text = amount_xml.text.strip()
    magnitude = minor_units(amount_text, currency, where)

    indicator = reader.text(entry, "CdtDbtInd")
    if indicator not in ("CRDT", "DBIT"):
        raise StatementError(f"{entry_path}/CdtDbtInd: {indicator!r} is neither CRDT nor DBIT")
    credit = indicator == "CRDT"

    booking_date = reader.date_choice(entry, "BookgDt", entry_path)
    value_date = reader.date_choice(entry, "ValDt", entry_path) or booking_date
    if value_date is None:
        raise StatementError(f"{entry_path}: has neither ValDt nor BookgDt")

    transactions = reader.children(entry, "NtryDtls/TxDtls")
    batch_sizes = [
        reader.text(details, "Btch/NbOfTxs") for details in reader.children(entry, "NtryDtls")
    ]
    batch = len(transactions) > 1 or any(size not in (None, "0", "1") for size in batch_sizes)
    single = transactions[0] if len(transactions) == 1 and not batch else None

    end_to_end_id = None
    if single is not None:
        end_to_end_id = reader.text(single, "Refs/EndToEndId")
        if end_to_end_id == NOT_PROVIDED:
            end_to_end_id = None
    bank_reference = reader.text(entry, "AcctSvcrRef")
    if bank_reference is None and single is not None:
        bank_reference = reader.text(single, "Refs/AcctSvcrRef")
    batch_payment_id = next(
        (
            value
            for details in reader.children(entry, "NtryDtls")
            if (value := reader.text(details, "Btch/PmtInfId")) is not None
        ),
        None,
    )
    candidates = [end_to_end_id, batch_payment_id]
    if single is not None:
        candidates += [reader.text(single, "Refs/PmtInfId"), reader.text(single, "Refs/InstrId")]
    candidates += [reader.text(entry, "NtryRef"), bank_reference]
    reference = next((value for value in candidates if value is not None), None)

    description = reader.text(entry, "AddtlNtryInf")
    if description is None and single is not None:
        unstructured = [
            element.text.strip()
            for element in reader.children(single, "RmtInf/Ustrd")
            if element.text and element.text.strip()
        ]
        description = " ".join(unstructured) or reader.text(single, "AddtlTxInf")
    if description is None and batch:
        count = max(
            [len(transactions)] + [int(size) for size in batch_sizes if size and size.isdigit()]
        )
        description = f"batch of {count} transactions"

    return StatementLine(
        line_no=line_no,
        amount_minor=magnitude if credit else -magnitude,
        currency=currency,
        value_date=value_date,
        booking_date=booking_date,
        reference=reference,
        end_to_end_id=end_to_end_id,
        bank_reference=bank_reference,
        kind=direction_kind(credit),
        description=clip(description),
    )
