"""Invariant 7: each read model equals a fresh fold of the log up to its checkpoint.

`ledger check` folds the log once, in one snapshot; as the fold passes each read
model's checkpoint, that model's table is read and compared row by row.
"""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.projections.base import LIVE_SCHEMA
from ledger.projections.fold import KEY_COLUMNS, ROW_COLUMNS, TABLE_OF, ReadModelFold, Rows

DIFFERENCES_SHOWN_MAX = 5


class Reporter(Protocol):
    def add(
        self, rule: str, message: str, *, seq: int | None = None, stream: str | None = None
    ) -> None: ...


async def read_table(conn: AsyncConnection, name: str, schema: str = LIVE_SCHEMA) -> Rows:
    """A read model's rows, keyed as the fold keys them."""
    keys, columns = KEY_COLUMNS[name], ROW_COLUMNS[name]
    result = await conn.execute(
        text(f'SELECT {", ".join(keys + columns)} FROM "{schema}".{TABLE_OF[name]}')
    )
    return {tuple(row[: len(keys)]): tuple(row[len(keys) :]) for row in result}


def differences(name: str, expected: Rows, actual: Rows) -> list[str]:
    """What differs between a table and its fold, in words (at most a few examples)."""
    problems = []
    columns = ROW_COLUMNS[name]
    for key in sorted(expected.keys() - actual.keys()):
        problems.append(f"{name}: row {key} is missing")
    for key in sorted(actual.keys() - expected.keys()):
        problems.append(f"{name}: row {key} should not exist")
    for key in sorted(expected.keys() & actual.keys()):
        if expected[key] != actual[key]:
            changed = [
                f"{c}={a!r} (the events give {e!r})"
                for c, e, a in zip(columns, expected[key], actual[key], strict=True)
                if e != a
            ]
            problems.append(f"{name}: row {key}: {', '.join(changed)}")
    return problems


class ReadModelCheck:
    """Compares each read model with the fold as the fold passes its checkpoint."""

    def __init__(self, conn: AsyncConnection, report: Reporter, checkpoints: dict[str, int]):
        self.conn = conn
        self.report = report
        self.pending = dict(sorted(checkpoints.items(), key=lambda kv: kv[1]))
        self.fold = ReadModelFold()
        self.broken = False
        self.checked: list[str] = []

    @classmethod
    async def start(cls, conn: AsyncConnection, report: Reporter) -> ReadModelCheck:
        exists = (
            await conn.execute(text("SELECT to_regclass('projection.checkpoints') IS NOT NULL"))
        ).scalar_one()
        checkpoints: dict[str, int] = {}
        if exists:
            rows = await conn.execute(
                text("SELECT projection, last_seq FROM projection.checkpoints")
            )
            checkpoints = {r.projection: int(r.last_seq) for r in rows if r.projection in TABLE_OF}
        return cls(conn, report, checkpoints)

    async def before(self, seq: int) -> None:
        """Compare every model whose checkpoint is below `seq`, the next event's."""
        while self.pending and next(iter(self.pending.values())) < seq:
            name, last_seq = _pop_first(self.pending)
            await self._compare(name, last_seq)

    def apply(self, event: Any) -> None:
        if self.broken:
            return
        try:
            self.fold.apply(event)
        except (KeyError, TypeError, ValueError) as error:
            self.broken = True
            self.report.add(
                "read-model-fold",
                f"the read models cannot be folded past this event: {error!r}",
                seq=event.global_seq,
                stream=event.stream_id,
            )

    async def finish(self) -> None:
        for name, last_seq in list(self.pending.items()):
            await self._compare(name, last_seq)
        self.pending.clear()

    async def _compare(self, name: str, last_seq: int) -> None:
        if self.broken:
            return
        problems = differences(name, self.fold.rows(name), await read_table(self.conn, name))
        self.checked.append(name)
        for problem in problems[:DIFFERENCES_SHOWN_MAX]:
            self.report.add("read-model", f"{problem} (checkpoint {last_seq})", seq=last_seq)
        if len(problems) > DIFFERENCES_SHOWN_MAX:
            self.report.add(
                "read-model",
                f"{name}: {len(problems) - DIFFERENCES_SHOWN_MAX} more difference(s)",
                seq=last_seq,
            )


def _pop_first(pending: dict[str, int]) -> tuple[str, int]:
    name = next(iter(pending))
    return name, pending.pop(name)
