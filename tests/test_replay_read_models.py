"""`paysaga replay`: rebuild read models from event 1 without downtime, resume an
interrupted rebuild, and materialise the models at a point of the log."""

from __future__ import annotations

import asyncio
import io
import re
from datetime import datetime
from typing import Any

import psycopg
import pytest
from rich.console import Console
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.db import to_libpq_url
from ledger.projections import READ_MODELS
from ledger.projections.check import differences, read_table
from ledger.projections.fold import ReadModelFold
from ledger.projector import Batch
from ledger.replay import REPLAY_BULK_PARTS, materialise, plan_materialise, rebuild
from ledger.store import EventStore
from ledger.verify import check_ledger
from paysaga.cli import advance_replay, replay_progress
from tests.harness.ledger import Payment
from tests.harness.postgres import IsolatedDatabase
from tests.harness.read_side import connect_owner, project, projector
from tests.harness.stack import clean_env, paysaga


async def _traffic(store: EventStore, n: int = 20) -> None:
    for i in range(n):
        payment = Payment(store, "alice", "bob", 1_000 + i)
        if i % 4 == 3:
            await payment.run("initiated", "authorized", "reserved", "released", "voided", "failed")
        elif i % 5 == 4:
            await payment.run("initiated", "cancelled")
        else:
            await payment.settle_fully()


async def _live_tables(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        return {name: await read_table(conn, name) for name in READ_MODELS}


async def test_a_rebuild_is_identical_to_the_live_models_and_never_interrupts_reads(
    bank: EventStore, database: IsolatedDatabase, owner_engine: AsyncEngine
) -> None:
    await _traffic(bank)
    await project(bank, database)
    before = await _live_tables(owner_engine)

    stop = asyncio.Event()
    seen_payments: list[int] = []

    async def read_while_rebuilding() -> None:
        while not stop.is_set():
            async with bank.engine.connect() as conn:
                seen_payments.append(
                    (
                        await conn.execute(text("SELECT count(*) FROM projection.payments"))
                    ).scalar_one()
                )
            await asyncio.sleep(0.005)

    async def write_while_rebuilding() -> None:
        for i in range(6):
            await Payment(bank, "alice", "bob", 77 + i).settle_fully()

    live = projector(bank, database, poll_s=0.05)
    tasks = [
        asyncio.create_task(read_while_rebuilding()),
        asyncio.create_task(live.run(stop)),
    ]
    owner = await connect_owner(database)
    try:
        writer = asyncio.create_task(write_while_rebuilding())
        for projection in READ_MODELS.values():
            await rebuild(owner, projection, events_max=13)
        await writer
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await owner.close()

    assert seen_payments and seen_payments == sorted(seen_payments), (
        "a reader saw the payments list shrink: a half-built table"
    )
    await project(bank, database)
    report = await check_ledger(bank.engine)
    assert report.ok, report.lines()
    after = await _live_tables(owner_engine)
    assert after["payments"].keys() > before["payments"].keys()

    # A rebuild of quiet models reproduces them exactly, and the app role still writes them.
    owner = await connect_owner(database)
    try:
        for projection in READ_MODELS.values():
            await rebuild(owner, projection)
    finally:
        await owner.close()
    assert await _live_tables(owner_engine) == after
    await Payment(bank, "alice", "bob", 5).settle_fully()
    assert await project(bank, database) > 0
    assert (await check_ledger(bank.engine)).ok


class Interrupted(Exception):
    pass


async def test_an_interrupted_rebuild_resumes_where_it_stopped_with_the_same_tables(
    bank: EventStore, database: IsolatedDatabase, owner_engine: AsyncEngine
) -> None:
    await _traffic(bank)
    await project(bank, database)
    before = await _live_tables(owner_engine)
    owner = await connect_owner(database)
    try:
        for projection in READ_MODELS.values():
            batches: list[Batch] = []

            def interrupt(batch: Batch, batches: list[Batch] = batches) -> None:
                batches.append(batch)
                if len(batches) == 2:
                    raise Interrupted

            with pytest.raises(Interrupted):
                await rebuild(owner, projection, events_max=9, on_batch=interrupt)
            if projection.bulk is not None:
                # A build in bulk runs in parts, side by side, each with its checkpoint.
                cursor = await owner.execute(
                    "SELECT projection FROM projection_shadow.checkpoints "
                    "WHERE projection LIKE %s ORDER BY 1",
                    (f"{projection.name}/part-%",),
                )
                parts = [row[0] for row in await cursor.fetchall()]
                assert parts == [
                    f"{projection.name}/part-{k}-of-{REPLAY_BULK_PARTS}"
                    for k in range(1, REPLAY_BULK_PARTS + 1)
                ]
            resumed: list[Batch] = []
            await rebuild(owner, projection, events_max=9, on_batch=resumed.append)
            assert resumed[0].after == batches[-1].upto, "the rebuild started over"
    finally:
        await owner.close()
    assert await _live_tables(owner_engine) == before
    assert (await check_ledger(bank.engine)).ok


async def test_materialised_models_equal_a_fold_of_the_log_up_to_that_point(
    bank: EventStore, database: IsolatedDatabase, owner_engine: AsyncEngine
) -> None:
    await _traffic(bank)
    async with owner_engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM events ORDER BY global_seq"))).all()
    until = rows[len(rows) // 2].global_seq
    fold = ReadModelFold()
    for row in rows:
        if row.global_seq <= until:
            fold.apply(row)
    owner = await connect_owner(database)
    try:
        for projection in READ_MODELS.values():
            await plan_materialise(owner, projection, "inquiry", until)
            await materialise(owner, projection, "inquiry", until, events_max=11)
    finally:
        await owner.close()
    async with owner_engine.connect() as conn:
        for name in READ_MODELS:
            table = await read_table(conn, name, "inquiry")
            assert differences(name, fold.rows(name), table) == [], name


def test_the_replay_progress_bar_shows_events_per_second_and_the_time_left() -> None:
    """The bar `paysaga replay` draws, on a clock of its own: two batches of 1,000 events
    a second apart, 2,000 of 4,000 to go."""
    now = [0.0]
    out = io.StringIO()
    bar = replay_progress(Console(file=out, width=120, color_system=None), lambda: now[0])
    task = bar.add_task("statement", total=4_000, rate="-")
    for _ in range(2):
        now[0] += 1.0
        advance_replay(bar, task, 1_000)
    bar.console.print(bar.get_renderable())
    line = " ".join(out.getvalue().split())
    assert line.endswith("50% 2000/4000 1,000 events/s 0:00:02"), line


def _env(database: IsolatedDatabase) -> dict[str, str]:
    return clean_env(DATABASE_URL=database.urls.owner_url)


async def test_the_replay_command_rebuilds_materialises_and_refuses_bad_requests(
    bank: EventStore, database: IsolatedDatabase, owner_engine: AsyncEngine
) -> None:
    await _traffic(bank, n=6)
    await project(bank, database)
    env = _env(database)

    done = paysaga("replay", "all", env=env)
    assert done.returncode == 0, done.stderr
    for name in READ_MODELS:
        assert f"{name}: swapped in at global_seq" in done.stderr
        # The bar's last frame (printed once at the end, off a terminal): every model
        # done, with its events/s and time-left columns.
        assert re.search(
            rf"^{name} .* 100% (\d+)/\1 \S+ events/s \d+:\d\d:\d\d$", done.stderr, re.M
        ), done.stderr

    # An instant stands for every event before the first one recorded after it.
    async with owner_engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM events ORDER BY global_seq"))).all()
    middle = rows[20].recorded_at
    assert isinstance(middle, datetime)
    until = next(row.global_seq for row in rows if row.recorded_at > middle) - 1
    inquiry = paysaga("replay", "all", "--until", middle.isoformat(), "--into", "inq_cli", env=env)
    assert inquiry.returncode == 0, inquiry.stderr
    fold = ReadModelFold()
    for row in rows:
        if row.global_seq <= until:
            fold.apply(row)
    async with owner_engine.connect() as conn:
        for name in READ_MODELS:
            assert f"{name}: built in inq_cli up to global_seq {until}\n" in inquiry.stderr
            table = await read_table(conn, name, "inq_cli")
            assert differences(name, fold.rows(name), table) == [], name

    for args, message in (
        (("replay", "nonsense"), "no read model 'nonsense'"),
        (("replay", "balances", "--until", "5"), "--until needs --into"),
        (("replay", "balances", "--into", "projection"), "cannot hold a replay"),
        (("replay", "balances", "--into", "x", "--until", "yesterday"), "neither a global_seq"),
        (("replay", "balances", "--into", "x", "--until", "2026-01-01T00:00:00"), "UTC offset"),
        (("replay", "balances", "--into", "x", "--until", "999999999"), "past the safe horizon"),
    ):
        refused = paysaga(*args, env=env)
        assert refused.returncode != 0, args
        assert message in " ".join(refused.stderr.split()), (args, refused.stderr)
    assert (await check_ledger(bank.engine)).ok


async def test_a_read_model_the_app_role_tampers_with_is_named_by_check_and_mended_by_replay(
    bank: EventStore, database: IsolatedDatabase
) -> None:
    await _traffic(bank, n=5)
    await project(bank, database)
    app = await psycopg.AsyncConnection.connect(
        to_libpq_url(database.urls.app_url), autocommit=True
    )
    try:
        # The projector's role never deletes a row or a checkpoint...
        for statement in (
            "DELETE FROM projection.payments",
            "DELETE FROM projection.checkpoints",
            "INSERT INTO projection.checkpoints (projection) VALUES ('mine')",
            "TRUNCATE projection.entries",
            "DROP TABLE projection.balances",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await app.execute(statement)
        # ... but it updates rows, so a compromised service could lie in a read model.
        await app.execute(
            "UPDATE projection.balances SET credits_posted = credits_posted + 1000000 "
            "WHERE account_id = 'bob'"
        )
    finally:
        await app.close()
    report = await check_ledger(bank.engine)
    assert not report.ok
    assert [v.rule for v in report.violations] == ["read-model"]
    assert "balances: row ('bob',): credits_posted=" in report.violations[0].message

    owner = await connect_owner(database)
    try:
        await rebuild(owner, READ_MODELS["balances"])
    finally:
        await owner.close()
    assert (await check_ledger(bank.engine)).ok
