"""Replay: rebuild a read model from event 1 without taking the live one down.

`rebuild` builds the model into `projection_shadow` (tables made LIKE the live ones)
while the live model keeps serving and the projector keeps moving it. Every batch
commits with the shadow's own checkpoint, so an interrupted rebuild resumes where it
stopped. Once the shadow has caught up, one transaction takes the live checkpoint's
lock (the projector's batch on that model waits or skips), applies the last events so
the shadow is at least as far as the live model, and moves the shadow's tables into
`projection` in place of the live ones: a reader sees the old tables or the new, never
a half-built one, and a model's `as_of_seq` never moves back.

`materialise` builds the models as they were at one point of the log into a schema of
its own, for an investigation; it resumes the same way. An instant stands for the
point `seq_at` gives: every event before the first one recorded after the instant.

Both need DDL, so they run as the schema owner, on a connection in autocommit mode (each
batch is its own transaction).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from ledger.projections.base import LIVE_SCHEMA, SHADOW_SCHEMA, Apply, Bulk, Projection
from ledger.projector import Batch, apply_batch, catch_up

REPLAY_BATCH_EVENTS_MAX = 50_000
# A build in bulk (`Bulk`) commits fewer, larger batches: each batch's per-account work
# (totals kept aside) is paid once per batch, not per event (measured on the statement,
# PostgreSQL 15, a million events: 11.0 s and 11.5 s against 12.1 s twice at 50,000).
REPLAY_BULK_BATCH_EVENTS_MAX = 200_000
# A build in bulk runs this many parts of the accounts side by side, each on a connection
# (a server process) of its own: one per core, up to four. Each part reads every event of
# a batch and keeps its own accounts' rows, so the reading is paid once per part and the
# rest is shared out (PostgreSQL 15, 2 cores, a million events, the statement's batches
# alone: 6.9 s in two parts against 10.0 s in one, on an otherwise idle machine).
REPLAY_BULK_PARTS = max(1, min(os.cpu_count() or 1, 4))
HORIZON_CALLS_MAX = 40
REPLAY_SETTINGS = {
    # A replay's batches sort and hash tens of thousands of rows: in memory, not on
    # disk (measured on the statement: 10.5 s against 11.0 s for a million events).
    "work_mem": "64MB",
    # Each batch is one large statement planned afresh: where the server has JIT, it
    # compiled each for about 57 ms of a 1 s batch (PostgreSQL 15, EXPLAIN ANALYZE).
    "jit": "off",
}
SWAP_LOCK_TIMEOUT_MS = 10_000
# Once the shadow is this close to its target, the swap's transaction applies the rest.
SWAP_GAP_EVENTS_MAX = REPLAY_BATCH_EVENTS_MAX
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
RESERVED_SCHEMAS = frozenset(
    {LIVE_SCHEMA, SHADOW_SCHEMA, "public", "information_schema", "pg_catalog", "pg_toast"}
)

OnBatch = Callable[[Batch], None]


class ReplayError(Exception):
    """A replay the caller asked for that cannot be done (bad schema, point passed, ...)."""


@dataclass(frozen=True)
class Plan:
    """Where a build starts and where it is headed, in events, for a progress bar."""

    projection: str
    start_seq: int
    target_seq: int
    events: int


async def _one(conn: psycopg.AsyncConnection[Any], query: Any, params: Any = None) -> Any:
    cursor = await conn.execute(query, params)
    row = await cursor.fetchone()
    return None if row is None else row[0]


async def safe_seq(conn: psycopg.AsyncConnection[Any]) -> int:
    """The safe horizon, as the store proves it: called again, briefly, until it covers
    what the first call could see. `conn` must be in autocommit mode."""
    safe = head = 0
    for attempt in range(HORIZON_CALLS_MAX):
        cursor = await conn.execute("SELECT safe_seq, head_seq FROM ledger_safe_horizon()")
        row = await cursor.fetchone()
        assert row is not None
        safe = int(row[0])
        head = int(row[1]) if attempt == 0 else head
        if safe >= head:
            break
        await asyncio.sleep(0.005 * (attempt + 1))
    return safe


async def exclusive(
    conn: psycopg.AsyncConnection[Any], projection: Projection, schema: str
) -> None:
    """One replay at a time per read model and schema: a session lock, released when the
    replay's connection closes."""
    taken = await _one(
        conn,
        "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
        (f"paysaga-replay/{schema}/{projection.name}",),
    )
    if not taken:
        raise ReplayError(f"another replay of {projection.name} into {schema} is running")


# The point of the log an instant stands for: the longest prefix none of whose events was
# recorded after it. recorded_at follows global_seq only per account and stream: two
# appends on different accounts can take their numbers in one order and their times in
# the other, so "the last event recorded at or before the instant" could sit above one
# recorded after it. Looked for at or below a safe horizon read first: every event up to
# it has committed, so none can still appear below the answer. A forward walk of the
# primary key from event 1 that stops at the first event recorded after the instant: it
# reads the prefix the materialisation then folds anyway. (An index on recorded_at would
# cost every append and still not make it a seek: the lowest global_seq recorded after
# an instant is a minimum over all of them.)
_FIRST_RECORDED_AFTER = """
SELECT global_seq FROM events
 WHERE recorded_at > %(instant)s AND global_seq <= %(horizon)s
 ORDER BY global_seq LIMIT 1
"""


async def seq_at(conn: psycopg.AsyncConnection[Any], instant: datetime) -> int:
    """The log as it stood at `instant`: the longest global_seq prefix none of whose events
    was recorded after it, i.e. the first global_seq recorded after `instant`, minus one.
    Bounded by the safe horizon: when every event up to it was recorded at or before
    `instant`, the horizon (events above it may still commit). `conn` must be in
    autocommit mode."""
    horizon = await safe_seq(conn)
    first_after = await _one(conn, _FIRST_RECORDED_AFTER, {"instant": instant, "horizon": horizon})
    return horizon if first_after is None else int(first_after) - 1


async def count_events(conn: psycopg.AsyncConnection[Any], after: int, upto: int) -> int:
    value = await _one(
        conn,
        "SELECT count(*) FROM events WHERE global_seq > %s AND global_seq <= %s",
        (after, upto),
    )
    return int(value)


def check_schema_name(schema: str) -> str:
    if not _SCHEMA_NAME.match(schema) or schema in RESERVED_SCHEMAS or schema.startswith("pg_"):
        raise ReplayError(
            f"{schema!r} cannot hold a replay: use a new lower-case name (letters, digits, _), "
            f"not one of {', '.join(sorted(RESERVED_SCHEMAS))} or pg_*"
        )
    return schema


async def _prepare(
    conn: psycopg.AsyncConnection[Any], projection: Projection, schema: str, *, restart: bool
) -> int:
    """The tables and checkpoint of `projection` in `schema`, made LIKE the live ones;
    the checkpoint to resume from (0 for a fresh build). A fresh build of a model that
    builds in bulk gets its tables without indexes (`Bulk`)."""
    await _replay_settings(conn)
    async with conn.transaction():
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        await conn.execute(_like_live(schema, "checkpoints", indexes=True, if_not_exists=True))
        checkpoint = await _one(
            conn,
            sql.SQL("SELECT last_seq FROM {}.checkpoints WHERE projection = %s").format(
                sql.Identifier(schema)
            ),
            (projection.name,),
        )
        tables_present = all(
            [await _table_exists(conn, schema, table) for table in projection.tables]
        )
        if checkpoint is not None and tables_present and not restart:
            return int(checkpoint)
        for table in projection.tables:
            await conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(table)
                )
            )
            await conn.execute(_like_live(schema, table, indexes=projection.bulk is None))
        if projection.bulk is not None:
            await projection.bulk.begin(conn, schema)
        await conn.execute(
            sql.SQL(
                "INSERT INTO {}.checkpoints (projection) VALUES (%s) ON CONFLICT (projection) "
                "DO UPDATE SET last_seq = 0, events_applied = 0, updated_at = clock_timestamp()"
            ).format(sql.Identifier(schema)),
            (projection.name,),
        )
        return 0


async def _replay_settings(conn: psycopg.AsyncConnection[Any]) -> None:
    for name, value in REPLAY_SETTINGS.items():
        await conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))


def _like_live(
    schema: str, table: str, *, indexes: bool, if_not_exists: bool = False
) -> sql.Composed:
    return sql.SQL("CREATE TABLE {}{}.{} (LIKE {}.{} INCLUDING ALL{})").format(
        sql.SQL("IF NOT EXISTS " if if_not_exists else ""),
        sql.Identifier(schema),
        sql.Identifier(table),
        sql.Identifier(LIVE_SCHEMA),
        sql.Identifier(table),
        sql.SQL("" if indexes else " EXCLUDING INDEXES"),
    )


async def _table_exists(conn: psycopg.AsyncConnection[Any], schema: str, table: str) -> bool:
    return bool(
        await _one(
            conn,
            "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
            (schema, table),
        )
    )


async def _build(
    conn: psycopg.AsyncConnection[Any],
    projection: Projection,
    schema: str,
    until: int,
    events_max: int | None,
    on_batch: OnBatch | None,
) -> int:
    """Bring `projection` in `schema` to `until`; its checkpoint there. A build in bulk
    finishes on the way (its indexes built, its fix-ups applied); its batches hold
    `events_max` events, or REPLAY_BULK_BATCH_EVENTS_MAX if none is given."""
    bulk = projection.bulk
    if bulk is None or not await _table_exists(conn, schema, bulk.marker):
        await catch_up(
            conn,
            projection,
            until=until,
            events_max=events_max or REPLAY_BATCH_EVENTS_MAX,
            schema=schema,
            on_batch=on_batch,
        )
    else:
        parts = await _build_parts(
            conn,
            projection,
            bulk,
            schema,
            until,
            events_max or REPLAY_BULK_BATCH_EVENTS_MAX,
            on_batch,
        )
        async with conn.transaction():
            await conn.execute(
                sql.SQL(
                    "UPDATE {s}.checkpoints SET last_seq = %s, updated_at = clock_timestamp(), "
                    "events_applied = events_applied + (SELECT max(events_applied) "
                    "FROM {s}.checkpoints WHERE projection = ANY(%s)) WHERE projection = %s"
                ).format(s=sql.Identifier(schema)),
                (until, parts, projection.name),
            )
            await conn.execute(
                sql.SQL("DELETE FROM {}.checkpoints WHERE projection = ANY(%s)").format(
                    sql.Identifier(schema)
                ),
                (parts,),
            )
            for table in projection.tables:
                await _index_like_live(conn, schema, table)
            await bulk.finish(conn, schema)
        for table in projection.tables:
            await conn.execute(
                sql.SQL("ANALYZE {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
            )
    value = await _one(
        conn,
        sql.SQL("SELECT last_seq FROM {}.checkpoints WHERE projection = %s").format(
            sql.Identifier(schema)
        ),
        (projection.name,),
    )
    return int(value)


def _part_name(projection: Projection, part: int, parts: int) -> str:
    return f"{projection.name}/part-{part + 1}-of-{parts}"


async def _build_parts(
    conn: psycopg.AsyncConnection[Any],
    projection: Projection,
    bulk: Bulk,
    schema: str,
    until: int,
    events_max: int,
    on_batch: OnBatch | None,
) -> list[str]:
    """Bring every part of a bulk build to `until`, side by side; the parts' checkpoint
    names. A resumed build keeps the parts it started with, each from its checkpoint
    (`on_batch` follows the first part, which sees every event of every batch)."""
    names = sql.Identifier(schema)
    cursor = await conn.execute(
        sql.SQL("SELECT projection FROM {}.checkpoints WHERE projection LIKE %s").format(names),
        (f"{projection.name}/part-%",),
    )
    started = [row[0] for row in await cursor.fetchall()]
    parts = int(started[0].rsplit("-of-", 1)[1]) if started else REPLAY_BULK_PARTS
    part_names = [_part_name(projection, k, parts) for k in range(parts)]
    await conn.execute(
        sql.SQL(
            "INSERT INTO {s}.checkpoints (projection, last_seq) "
            "SELECT p, c.last_seq FROM {s}.checkpoints c, unnest(%s::text[]) AS p "
            "WHERE c.projection = %s ON CONFLICT (projection) DO NOTHING"
        ).format(s=names),
        (part_names, projection.name),
    )
    conninfo = make_conninfo(conn.info.dsn, password=conn.info.password or None)

    def part_apply(part: int) -> Apply:
        async def apply(c: psycopg.AsyncConnection[Any], s: str, after: int, upto: int) -> None:
            await bulk.apply(c, s, after, upto, part, parts)

        return apply

    async def run_part(part: int) -> None:
        own = part > 0
        part_conn = (
            await psycopg.AsyncConnection.connect(conninfo, autocommit=True) if own else conn
        )
        try:
            if own:
                await _replay_settings(part_conn)
            await catch_up(
                part_conn,
                dataclasses.replace(projection, name=part_names[part]),
                until=until,
                events_max=events_max,
                schema=schema,
                on_batch=on_batch if part == 0 else None,
                apply=part_apply(part),
            )
        finally:
            if own:
                await part_conn.close()

    try:
        async with asyncio.TaskGroup() as group:
            for part in range(parts):
                group.create_task(run_part(part))
    except BaseExceptionGroup as failed:
        # The first part to fail stopped the others: its error is the build's.
        raise failed.exceptions[0] from None
    cursor = await conn.execute(
        sql.SQL("SELECT min(last_seq) FROM {}.checkpoints WHERE projection = ANY(%s)").format(
            names
        ),
        (part_names,),
    )
    reached = (await cursor.fetchone() or [None])[0]
    if reached is None or int(reached) < until:
        raise ReplayError(f"the parts of {projection.name} did not reach global_seq {until}")
    return part_names


# The live table's indexes: those behind a constraint (the primary key, UNIQUE), and the
# others with their definition after USING (method, columns, predicate).
_LIVE_INDEXES = """
SELECT c.oid IS NOT NULL, pg_get_constraintdef(c.oid), i.indisunique,
       split_part(pg_get_indexdef(i.indexrelid), ' USING ', 2)
  FROM pg_index i
  LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
 WHERE i.indrelid = %s::regclass
 ORDER BY i.indexrelid
"""


async def _index_like_live(conn: psycopg.AsyncConnection[Any], schema: str, table: str) -> None:
    """Build on `schema.table` the indexes of the live table, as LIKE ... INCLUDING ALL
    would have made them (same definitions, same generated names)."""
    target = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
    cursor = await conn.execute(_LIVE_INDEXES, (f"{LIVE_SCHEMA}.{table}",))
    for constrained, constraint, unique, definition in await cursor.fetchall():
        if constrained:
            await conn.execute(sql.SQL("ALTER TABLE {} ADD {}").format(target, sql.SQL(constraint)))
        else:
            await conn.execute(
                sql.SQL("CREATE {}INDEX ON {} USING {}").format(
                    sql.SQL("UNIQUE " if unique else ""), target, sql.SQL(definition)
                )
            )


async def _live_checkpoint(conn: psycopg.AsyncConnection[Any], name: str) -> int:
    value = await _one(
        conn, "SELECT last_seq FROM projection.checkpoints WHERE projection = %s", (name,)
    )
    if value is None:
        raise ReplayError(f"no live read model named {name!r}")
    return int(value)


async def plan_rebuild(
    conn: psycopg.AsyncConnection[Any], projection: Projection, *, restart: bool = False
) -> Plan:
    await exclusive(conn, projection, SHADOW_SCHEMA)
    start = await _prepare(conn, projection, SHADOW_SCHEMA, restart=restart)
    target = max(await _live_checkpoint(conn, projection.name), await safe_seq(conn))
    return Plan(projection.name, start, target, await count_events(conn, start, target))


async def rebuild(
    conn: psycopg.AsyncConnection[Any],
    projection: Projection,
    *,
    events_max: int | None = None,
    restart: bool = False,
    on_batch: OnBatch | None = None,
) -> int:
    """Rebuild `projection` from event 1 in the shadow schema and swap it in; returns the
    checkpoint the new live model starts from."""
    await exclusive(conn, projection, SHADOW_SCHEMA)
    await _prepare(conn, projection, SHADOW_SCHEMA, restart=restart)
    while True:
        target = max(await _live_checkpoint(conn, projection.name), await safe_seq(conn))
        shadow = await _build(conn, projection, SHADOW_SCHEMA, target, events_max, on_batch)
        live = await _live_checkpoint(conn, projection.name)
        if live - shadow <= SWAP_GAP_EVENTS_MAX:
            return await _swap(conn, projection, events_max or REPLAY_BATCH_EVENTS_MAX, on_batch)


async def _swap(
    conn: psycopg.AsyncConnection[Any],
    projection: Projection,
    events_max: int,
    on_batch: OnBatch | None,
) -> int:
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = {SWAP_LOCK_TIMEOUT_MS}")
        live = await _one(
            conn,
            "SELECT last_seq FROM projection.checkpoints WHERE projection = %s FOR UPDATE",
            (projection.name,),
        )
        while True:
            batch = await apply_batch(
                conn,
                projection,
                until=int(live),
                events_max=events_max,
                schema=SHADOW_SCHEMA,
                wait=True,
            )
            assert batch is not None, "the shadow's checkpoint was prepared"
            if on_batch is not None and batch.upto > batch.after:
                on_batch(batch)
            if batch.upto >= live:
                break
        shadow = int(
            await _one(
                conn,
                "DELETE FROM projection_shadow.checkpoints WHERE projection = %s "
                "RETURNING last_seq",
                (projection.name,),
            )
        )
        for table in projection.tables:
            grants = await (
                await conn.execute(
                    "SELECT a.grantee::regrole::text, a.privilege_type "
                    "FROM pg_class c, aclexplode(c.relacl) a "
                    "WHERE c.oid = %s::regclass AND a.grantee <> c.relowner AND a.grantee <> 0",
                    (f"{LIVE_SCHEMA}.{table}",),
                )
            ).fetchall()
            await conn.execute(
                sql.SQL("DROP TABLE {}.{}").format(
                    sql.Identifier(LIVE_SCHEMA), sql.Identifier(table)
                )
            )
            await conn.execute(
                sql.SQL("ALTER TABLE {}.{} SET SCHEMA {}").format(
                    sql.Identifier(SHADOW_SCHEMA),
                    sql.Identifier(table),
                    sql.Identifier(LIVE_SCHEMA),
                )
            )
            for grantee, privilege in grants:
                await conn.execute(
                    sql.SQL("GRANT {} ON {}.{} TO {}").format(
                        sql.SQL(privilege),
                        sql.Identifier(LIVE_SCHEMA),
                        sql.Identifier(table),
                        sql.Identifier(grantee),
                    )
                )
        await conn.execute(
            "UPDATE projection.checkpoints SET last_seq = %s, updated_at = clock_timestamp() "
            "WHERE projection = %s",
            (shadow, projection.name),
        )
    return shadow


async def plan_materialise(
    conn: psycopg.AsyncConnection[Any],
    projection: Projection,
    schema: str,
    until: int,
    *,
    restart: bool = False,
) -> Plan:
    check_schema_name(schema)
    await exclusive(conn, projection, schema)
    horizon = await safe_seq(conn)
    if until > horizon:
        raise ReplayError(
            f"global_seq {until} is past the safe horizon ({horizon}): events up to it may "
            "still appear; choose an earlier point or wait"
        )
    start = await _prepare(conn, projection, schema, restart=restart)
    if start > until:
        raise ReplayError(
            f"{schema}.{projection.name} is already at global_seq {start}, past {until}; "
            "pass --restart to build it again"
        )
    return Plan(projection.name, start, until, await count_events(conn, start, until))


async def materialise(
    conn: psycopg.AsyncConnection[Any],
    projection: Projection,
    schema: str,
    until: int,
    *,
    events_max: int | None = None,
    on_batch: OnBatch | None = None,
) -> int:
    """Build `projection` into `schema` as it was at global_seq `until` (after
    `plan_materialise` prepared it); returns the checkpoint reached."""
    return await _build(conn, projection, schema, until, events_max, on_batch)
