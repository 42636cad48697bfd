"""What every read model is: a name, its tables, and a set-based way to apply a range.

A projection applies the events of one range of the log, `after < global_seq <= upto`,
to its tables in a few set-based statements inside the caller's transaction (the same
one that moves its checkpoint). It never reads past `upto`, which the projector keeps at
or below the safe horizon, and it reads the events table directly, so a batch costs a
handful of round trips whatever its size.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

# A projection's apply step: (connection, schema, after, upto).
Apply = Callable[[psycopg.AsyncConnection[Any], str, int, int], Awaitable[None]]
# A bulk build's apply step for one part of the accounts: (connection, schema, after,
# upto, part, parts); the parts are disjoint and together make all the accounts.
PartApply = Callable[[psycopg.AsyncConnection[Any], str, int, int, int, int], Awaitable[None]]
# A step on a projection's tables in one schema: (connection, schema).
Step = Callable[[psycopg.AsyncConnection[Any], str], Awaitable[None]]

# The one place a read model's schema is named.
LIVE_SCHEMA = "projection"
SHADOW_SCHEMA = "projection_shadow"


@dataclass(frozen=True)
class Bulk:
    """A faster way for a replay to build a model from event 1 into new tables.

    The replay makes the tables without their indexes, calls `begin`, applies every
    batch with `apply` (with the checkpoint, as `Projection.apply`), then, in one
    transaction, builds the indexes as the live tables have them and calls `finish`.
    While `marker` (a table of the model's schema) exists, the build is in bulk: an
    interrupted one resumes in bulk.

    `apply` takes one part of the accounts: the replay runs the parts side by side, on
    connections of their own, each with its own checkpoint (see ledger/replay.py)."""

    marker: str
    begin: Step
    apply: PartApply
    finish: Step


@dataclass(frozen=True)
class Projection:
    name: str
    # Its tables, in the schema it lives in (checkpoints are shared, not listed).
    tables: tuple[str, ...]
    apply: Apply
    # What it is, for `paysaga replay --help` and the docs.
    summary: str
    bulk: Bulk | None = None


def statement(text: str, schema: str) -> sql.Composed:
    """One SQL statement with `{s}` standing for the (quoted) schema of the tables."""
    return sql.SQL(text).format(s=sql.Identifier(schema))


def range_params(after: int, upto: int) -> dict[str, Any]:
    return {"after": after, "upto": upto}
