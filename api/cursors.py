"""Opaque page cursors: one codec for every list, and one answer for a forged cursor.

A cursor stands for a global_seq, tagged with the list that gave it out, so a cursor of
one list is refused by another. Anything this API did not give out is a 400
`invalid_cursor` problem.
"""

from __future__ import annotations

import base64
import binascii

from api.problems import ProblemError

SEQ_MAX = 2**63 - 1


def encode_cursor(global_seq: int, tag: str = "") -> str:
    return base64.urlsafe_b64encode(f"{tag}{global_seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str, tag: str = "") -> int:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        raw = base64.urlsafe_b64decode(padded.encode()).decode()
        seq = int(raw.removeprefix(tag)) if raw.startswith(tag) and raw[len(tag) :].isdigit() else 0
    except (ValueError, binascii.Error, UnicodeDecodeError):
        seq = 0
    if not 1 <= seq <= SEQ_MAX:
        raise ProblemError(400, "invalid_cursor", "the cursor is not one this API gave out")
    return seq
