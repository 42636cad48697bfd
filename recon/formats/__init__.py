"""Statement formats: camt.053 (001.02-.08), SWIFT MT940, BAI2 and the processor's CSV
report, each parsed into the same normalised lines (`ParsedFile`), behind
`parse_statement`.

The format is recognised from the content, never from the file name alone: XML in a
camt.053 namespace, a BAI2 file header (`01,`), MT940 tags (`:20:` then `:25:`...), or
the report's CSV header. A file that is none of these, too large, malformed or truncated
is refused whole with a `StatementError` that names the line or the element.

`recon.formats.build` does the reverse: it renders normalised lines in any of the formats.
"""

from __future__ import annotations

from recon.formats.bai2_file import is_bai2, parse_bai2
from recon.formats.base import (
    FILE_BYTES_MAX,
    STATEMENT_LINES_MAX,
    TEXT_LINES_MAX,
    ParsedFile,
    ParsedStatement,
    StatementError,
    StatementLine,
    check_size,
    sha256_hex,
)
from recon.formats.camt053 import is_xml, parse_camt053
from recon.formats.processor_csv import is_processor_csv, parse_processor_csv
from recon.formats.swift_mt940 import decode, is_mt940, parse_mt940

__all__ = [
    "FILE_BYTES_MAX",
    "FORMATS",
    "STATEMENT_LINES_MAX",
    "TEXT_LINES_MAX",
    "ParsedFile",
    "ParsedStatement",
    "StatementError",
    "StatementLine",
    "detect_format",
    "parse_statement",
]

FORMATS = (
    *(f"camt.053.001.{version}" for version in ("02", "03", "04", "05", "06", "07", "08")),
    "mt940",
    "bai2",
    "processor-csv",
)


def detect_format(content: bytes) -> str | None:
    """ "camt.053" (any XML: its namespace is checked by the parser), "mt940", "bai2" or
    "processor-csv" from the content, or None."""
    if is_xml(content):
        return "camt.053"
    head = decode(content[:65536])
    if is_bai2(head):
        return "bai2"
    if is_processor_csv(head):
        return "processor-csv"
    if is_mt940(head):
        return "mt940"
    return None


def parse_statement(content: bytes, filename: str | None = None) -> ParsedFile:
    """Parse a statement file of any supported format into normalised lines.

    Raises StatementError, naming the line (text formats) or the element path (XML),
    for a file that is unrecognised, over the size limits, malformed or truncated, or
    that holds an unknown currency or an amount finer than its currency's minor unit.
    """
    check_size(content)
    sha256 = sha256_hex(content)
    kind = detect_format(content)
    if kind == "camt.053":
        return parse_camt053(content, sha256)
    if kind == "bai2":
        return parse_bai2(content, sha256)
    if kind == "processor-csv":
        return parse_processor_csv(content, sha256)
    if kind == "mt940":
        return parse_mt940(content, sha256)
    name = f"{filename}: " if filename else ""
    raise StatementError(
        f"{name}line 1: not a statement this reads (camt.053, MT940, BAI2 or the "
        "processor's CSV report)"
    )
