"""Ingesting parsed statements into schema `recon`, whole or not at all.

`ingest` is idempotent twice over:

- by content: a file whose SHA-256 is known adds nothing (`duplicate=True`);
- by statement id: a statement already ingested from another file is skipped, when it
  arrives with the same content (account, currency, and every line as normalised).
  Under a known id with *other* content it is refused, with the whole file
  (`StatementConflict`): a bank does not re-issue a statement with different lines, so
  either the file or the earlier one is wrong, and an operator must say which.

Everything a file adds (its row, its statements, its lines) is written in one
transaction, and every line is checked on its way in: a file refused halfway leaves
nothing behind. Lines are loaded with COPY.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

import psycopg

from ledger.money import AMOUNT_MINOR_MAX, currency_exponent
from recon.formats.base import ParsedFile, ParsedStatement, StatementError, StatementLine

SOURCES = frozenset({"upload", "inbox", "simulator"})
LINE_KINDS = frozenset({"capture", "refund", "fee", "credit", "debit"})
# Bounds of what one file may hold, and of each field (the table's CHECKs say the same).
STATEMENTS_PER_FILE_MAX = 10_000
LINES_PER_FILE_MAX = 5_000_000
FORMAT_CHARS_MAX = 40
FILENAME_CHARS_MAX = 255
ID_CHARS_MAX = 200  # statement ids, accounts, references
DESCRIPTION_CHARS_MAX = 1_000
# COPY is fed in chunks of this many lines.
COPY_CHUNK_LINES = 10_000

# Ingests take this lock shared, a reconciliation run exclusively while it reads how far
# lines go: every line id at or below what a run saw belongs to a committed ingest.
LINES_LOCK = "paysaga/recon/lines"

# NULL in the COPY data: the empty string (COPY ... (NULL '')), so that a backslash in a
# block can only be a value's, and a block with none needs no escaping. An empty text
# value is stored as NULL, as it means nothing else.
_NULL = ""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
# COPY's text format: a backslash, tab, newline or carriage return in a value is escaped.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_LINE_COLUMNS = (
    "statement_id, line_no, amount_minor, currency, value_date, booking_date, reference, "
    "end_to_end_id, bank_reference, kind, description"
)

_LOCK_LINES_SHARED = "SELECT pg_advisory_xact_lock_shared(hashtextextended(%(key)s, 0))"
_INSERT_FILE = """
INSERT INTO recon.statement_files (file_sha256, format, filename, source, statements, lines,
                                   statements_new, lines_new)
VALUES (%(sha)s, %(format)s, %(filename)s, %(source)s, %(statements)s, %(lines)s, 0, 0)
ON CONFLICT (file_sha256) DO NOTHING
RETURNING file_sha256
"""
_INSERT_STATEMENTS = """
INSERT INTO recon.statements (statement_id, file_sha256, account, currency, lines)
SELECT s.statement_id, %(sha)s, s.account, s.currency, s.lines
  FROM unnest(%(ids)s::text[], %(accounts)s::text[], %(currencies)s::text[], %(lines)s::int[])
       AS s(statement_id, account, currency, lines)
ON CONFLICT (statement_id) DO NOTHING
RETURNING statement_id
"""
_FILE_COUNTS = """
UPDATE recon.statement_files SET statements_new = %(statements)s, lines_new = %(lines)s
 WHERE file_sha256 = %(sha)s
"""
_KNOWN_STATEMENT = """
SELECT file_sha256, account, currency, lines FROM recon.statements WHERE statement_id = %(id)s
"""
_INCOMING = """
CREATE TEMP TABLE recon_incoming_lines (
    statement_id text, line_no integer, amount_minor bigint, currency text, value_date date,
    booking_date date, reference text, end_to_end_id text, bank_reference text, kind text,
    description text
) ON COMMIT DROP
"""
_COPY_INCOMING = f"COPY recon_incoming_lines ({_LINE_COLUMNS}) FROM STDIN (NULL '')"
_COPY_LINES = f"COPY recon.statement_lines ({_LINE_COLUMNS}) FROM STDIN (NULL '')"
_DIFFERING_LINES = f"""
SELECT count(*) FROM (
    (SELECT {_LINE_COLUMNS} FROM recon.statement_lines WHERE statement_id = %(id)s
     EXCEPT ALL SELECT {_LINE_COLUMNS} FROM recon_incoming_lines)
    UNION ALL
    (SELECT {_LINE_COLUMNS} FROM recon_incoming_lines
     EXCEPT ALL SELECT {_LINE_COLUMNS} FROM recon.statement_lines WHERE statement_id = %(id)s)
) AS differing
"""


class StatementConflict(StatementError):
    """A statement id already ingested, arriving with other content: the file is refused."""


@dataclass(frozen=True)
class IngestResult:
    file_sha256: str
    statements_new: int
    statements_known: int
    lines_new: int
    duplicate: bool  # the same bytes were ingested before: nothing was added


def _text(value: str | None, what: str, chars_max: int, where: str) -> str:
    """A text value in COPY's text format; None (and an empty string) is NULL."""
    if value is None or value == "":
        return _NULL
    if not isinstance(value, str) or len(value) > chars_max:
        raise StatementError(f"{where}: {what} must be text of at most {chars_max} characters")
    if "\x00" in value:
        raise StatementError(f"{where}: {what} holds a NUL character")
    return value.translate(_COPY_ESCAPES)


def _check_file(parsed: ParsedFile, source: str, filename: str | None) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {sorted(SOURCES)}, not {source!r}")
    if not isinstance(parsed.sha256, str) or not _SHA256.match(parsed.sha256):
        raise StatementError("the file's sha256 must be 64 lowercase hex digits")
    if not isinstance(parsed.format, str) or not 1 <= len(parsed.format) <= FORMAT_CHARS_MAX:
        raise StatementError(f"the file's format must be 1 to {FORMAT_CHARS_MAX} characters")
    if filename is not None:
        _text(filename, "the file name", FILENAME_CHARS_MAX, "file")
    if len(parsed.statements) > STATEMENTS_PER_FILE_MAX:
        raise StatementError(
            f"the file holds {len(parsed.statements)} statements; at most "
            f"{STATEMENTS_PER_FILE_MAX} are accepted"
        )
    lines = sum(len(s.lines) for s in parsed.statements)
    if lines > LINES_PER_FILE_MAX:
        raise StatementError(
            f"the file holds {lines} lines; at most {LINES_PER_FILE_MAX} are accepted"
        )


def _check_currency(code: object, where: str, known: set[str]) -> str:
    if isinstance(code, str) and code in known:
        return code
    if not isinstance(code, str) or not _CURRENCY.match(code):
        raise StatementError(f"{where}: currency {code!r} is not a 3-letter ISO 4217 code")
    try:
        currency_exponent(code)
    except ValueError as error:
        raise StatementError(f"{where}: {error}") from None
    known.add(code)
    return code


def _checked_row(
    statement: ParsedStatement, sid: str, line: StatementLine, seen: set[int], known: set[str]
) -> str:
    """One line in COPY's text format, every field checked and escaped; raises
    StatementError naming the statement and the line at the first bad field."""
    no = line.line_no
    where = f"statement {statement.statement_id!r}, line {no}"
    if type(no) is not int or no < 1 or no in seen:
        raise StatementError(f"{where}: line numbers must be distinct integers from 1")
    amount = line.amount_minor
    if type(amount) is not int or not -AMOUNT_MINOR_MAX <= amount <= AMOUNT_MINOR_MAX:
        raise StatementError(f"{where}: the amount must be an integer in minor units")
    currency = _check_currency(line.currency, where, known)
    if type(line.value_date) is not date:
        raise StatementError(f"{where}: the value date must be a date")
    booking = line.booking_date
    if booking is not None and type(booking) is not date:
        raise StatementError(f"{where}: the booking date must be a date or none")
    if line.kind not in LINE_KINDS:
        raise StatementError(f"{where}: kind {line.kind!r} is not one of {sorted(LINE_KINDS)}")
    return (
        f"{sid}\t{no}\t{amount}\t{currency}\t{line.value_date}\t"
        f"{_NULL if booking is None else booking}\t"
        f"{_text(line.reference, 'the reference', ID_CHARS_MAX, where)}\t"
        f"{_text(line.end_to_end_id, 'the end-to-end id', ID_CHARS_MAX, where)}\t"
        f"{_text(line.bank_reference, 'the bank reference', ID_CHARS_MAX, where)}\t"
        f"{line.kind}\t"
        f"{_text(line.description, 'the description', DESCRIPTION_CHARS_MAX, where)}\n"
    )


def _copy_rows(statement: ParsedStatement, known: set[str]) -> Iterator[str]:
    """The statement's lines in COPY's text format, in chunks of `COPY_CHUNK_LINES`;
    checks every field, and raises StatementError naming the statement and the line at
    the first bad one.

    Most lines are plain: every field of the expected type and length, and no character
    that COPY escapes. Those are formatted in one go (a million lines in about 2 s rather
    than 5); any chunk that is not plain is formatted again line by line, with every
    check and escape (`_checked_row`)."""
    sid = statement.statement_id.translate(_COPY_ESCAPES)
    seen: set[int] = set()
    rows: list[str] = []
    lines: list[StatementLine] = []
    checked: set[int] = set()  # rows of the chunk already formatted by `_checked_row`
    for line in statement.lines:
        no, amount, currency = line.line_no, line.amount_minor, line.currency
        value_date, booking = line.value_date, line.booking_date
        reference, e2e, bank_ref = line.reference, line.end_to_end_id, line.bank_reference
        description = line.description
        if (
            type(no) is int
            and no > 0
            and no not in seen
            and type(amount) is int
            and -AMOUNT_MINOR_MAX <= amount <= AMOUNT_MINOR_MAX
            and currency in known
            and type(value_date) is date
            and (booking is None or type(booking) is date)
            and line.kind in LINE_KINDS
            and (
                reference is None or (type(reference) is str and 0 < len(reference) <= ID_CHARS_MAX)
            )
            and (e2e is None or (type(e2e) is str and 0 < len(e2e) <= ID_CHARS_MAX))
            and (bank_ref is None or (type(bank_ref) is str and 0 < len(bank_ref) <= ID_CHARS_MAX))
            and (
                description is None
                or (type(description) is str and 0 < len(description) <= DESCRIPTION_CHARS_MAX)
            )
        ):
            rows.append(
                f"{sid}\t{no}\t{amount}\t{currency}\t{value_date}\t"
                f"{_NULL if booking is None else booking}\t"
                f"{_NULL if reference is None else reference}\t{_NULL if e2e is None else e2e}\t"
                f"{_NULL if bank_ref is None else bank_ref}\t{line.kind}\t"
                f"{_NULL if description is None else description}\n"
            )
        else:
            checked.add(len(rows))
            rows.append(_checked_row(statement, sid, line, seen, known))
        seen.add(no)
        lines.append(line)
        if len(rows) == COPY_CHUNK_LINES:
            yield _chunk(statement, sid, rows, lines, known, checked)
            rows, lines, checked = [], [], set()
    if rows:
        yield _chunk(statement, sid, rows, lines, known, checked)


def _chunk(
    statement: ParsedStatement,
    sid: str,
    rows: list[str],
    lines: list[StatementLine],
    known: set[str],
    checked: set[int],
) -> str:
    """The rows as one block of COPY data: as formatted when no quickly formatted row
    held a character COPY escapes (every row then has exactly its ten tabs and one
    newline), else every line again with its fields checked and escaped."""
    text = "".join(rows)
    quick = "".join(r for n, r in enumerate(rows) if n not in checked) if checked else text
    if (
        text.count("\t") == 10 * len(rows)
        and text.count("\n") == len(rows)
        and "\\" not in quick
        and "\r" not in quick
        and "\x00" not in quick
    ):
        return text
    seen: set[int] = set()
    escaped = []
    for line in lines:
        escaped.append(_checked_row(statement, sid, line, seen, known))
        seen.add(line.line_no)
    return "".join(escaped)


def _check_statement(statement: ParsedStatement, known_currencies: set[str]) -> None:
    where = f"statement {statement.statement_id!r}"
    for value, what in ((statement.statement_id, "its id"), (statement.account, "its account")):
        if not isinstance(value, str) or not value:
            raise StatementError(f"{where}: {what} must not be empty")
        _text(value, what, ID_CHARS_MAX, where)
    if statement.currency is not None:
        _check_currency(statement.currency, where, known_currencies)


def _distinct_statements(parsed: ParsedFile) -> list[ParsedStatement]:
    """The file's statements, each id once: a statement repeated whole within a file is
    the same statement; one id with two contents is refused."""
    by_id: dict[str, ParsedStatement] = {}
    for statement in parsed.statements:
        earlier = by_id.get(statement.statement_id)
        if earlier is None:
            by_id[statement.statement_id] = statement
        elif earlier != statement:
            raise StatementConflict(
                f"statement {statement.statement_id!r} appears twice in the file with "
                "different content"
            )
    return list(by_id.values())


async def _copy(cursor: psycopg.AsyncCursor[Any], command: str, chunks: Iterator[str]) -> None:
    """COPY the chunks, formatting the next one in a thread while this one is sent, so
    that checking and formatting lines (about 2.5 s of CPU a million) overlaps with the
    server loading them rather than waiting for it."""
    async with cursor.copy(command) as copy:
        upcoming = asyncio.ensure_future(asyncio.to_thread(next, chunks, None))
        try:
            while (chunk := await upcoming) is not None:
                upcoming = asyncio.ensure_future(asyncio.to_thread(next, chunks, None))
                await copy.write(chunk)
        finally:
            # The generator may be running in its thread: let it finish before the
            # COPY (and perhaps the transaction) ends, whatever it raises.
            if not upcoming.done():
                await asyncio.wait([upcoming])
            if not upcoming.cancelled():
                upcoming.exception()


async def _refuse_if_different(
    conn: psycopg.AsyncConnection[Any], statement: ParsedStatement, known_currencies: set[str]
) -> None:
    """Raise StatementConflict unless the statement already stored under this id has
    exactly this content."""
    cursor = await conn.execute(_KNOWN_STATEMENT, {"id": statement.statement_id})
    row = await cursor.fetchone()
    assert row is not None, "a statement id that conflicted must be stored"
    file_sha256, account, currency, lines = row
    stored = (account, currency, lines)
    differs = stored != (statement.account, statement.currency, len(statement.lines))
    if not differs:
        async with conn.cursor() as cur:
            await cur.execute("DROP TABLE IF EXISTS recon_incoming_lines")
            await cur.execute(_INCOMING)
            await _copy(cur, _COPY_INCOMING, _copy_rows(statement, known_currencies))
            await cur.execute(_DIFFERING_LINES, {"id": statement.statement_id})
            counted = await cur.fetchone()
            differs = counted is None or int(counted[0]) > 0
    if differs:
        raise StatementConflict(
            f"statement {statement.statement_id!r} was already ingested (from file "
            f"{file_sha256[:12]}...) with other content; nothing from this file was ingested"
        )


async def ingest(
    conn: psycopg.AsyncConnection[Any],
    parsed: ParsedFile,
    *,
    source: str,
    filename: str | None,
) -> IngestResult:
    """Ingest a parsed file, whole or not at all (one transaction, nested in the caller's
    if it has one). Raises StatementError (StatementConflict for a known statement id
    with other content) and adds nothing when any part of the file is bad.

    Lines are checked as they are copied: a bad one aborts the COPY, and the transaction
    takes everything else of the file back with it."""
    _check_file(parsed, source, filename)
    statements = _distinct_statements(parsed)
    known_currencies: set[str] = set()
    for statement in statements:
        _check_statement(statement, known_currencies)
    line_count = sum(len(s.lines) for s in parsed.statements)

    async with conn.transaction():
        await conn.execute(_LOCK_LINES_SHARED, {"key": LINES_LOCK})
        cursor = await conn.execute(
            _INSERT_FILE,
            {
                "sha": parsed.sha256,
                "format": parsed.format,
                "filename": filename,
                "source": source,
                "statements": len(parsed.statements),
                "lines": line_count,
            },
        )
        if await cursor.fetchone() is None:
            return IngestResult(parsed.sha256, 0, len(statements), 0, duplicate=True)
        cursor = await conn.execute(
            _INSERT_STATEMENTS,
            {
                "sha": parsed.sha256,
                "ids": [s.statement_id for s in statements],
                "accounts": [s.account for s in statements],
                "currencies": [s.currency for s in statements],
                "lines": [len(s.lines) for s in statements],
            },
        )
        new_ids = {str(row[0]) for row in await cursor.fetchall()}
        for statement in statements:
            if statement.statement_id not in new_ids:
                await _refuse_if_different(conn, statement, known_currencies)
        new = [s for s in statements if s.statement_id in new_ids]
        lines_new = sum(len(s.lines) for s in new)
        if lines_new:
            async with conn.cursor() as cur:
                chunks = (chunk for s in new for chunk in _copy_rows(s, known_currencies))
                await _copy(cur, _COPY_LINES, chunks)
        await conn.execute(
            _FILE_COUNTS, {"sha": parsed.sha256, "statements": len(new), "lines": lines_new}
        )
    return IngestResult(
        parsed.sha256,
        statements_new=len(new),
        statements_known=len(statements) - len(new),
        lines_new=lines_new,
        duplicate=False,
    )
