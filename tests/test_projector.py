"""The projector under the failures it must survive: a late commit, a kill -9 in the
middle of a batch, and a second projector running at the same time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.db import to_libpq_url
from ledger.projections import READ_MODELS
from ledger.store import EventStore, NewEvent
from ledger.verify import check_ledger
from tests.harness.ledger import Payment, open_account
from tests.harness.postgres import IsolatedDatabase
from tests.harness.read_side import connect_app, project, projector
from tests.harness.stack import clean_env


async def _checkpoints(engine: AsyncEngine) -> dict[str, tuple[int, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT projection, last_seq, events_applied FROM projection.checkpoints")
        )
        return {r.projection: (r.last_seq, r.events_applied) for r in rows}


async def _head(engine: AsyncEngine) -> tuple[int, int]:
    """The newest global_seq, and how many events there are."""
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT max(global_seq), count(*) FROM events"))).one()
        return int(row[0]), int(row[1])


async def _append_unannounced(conn: psycopg.AsyncConnection[Any], new: NewEvent) -> int:
    """Append `new` as the app role may, straight through ledger_append, in `conn`'s
    transaction; its global_seq. No NOTIFY follows (the event store sends those): only a
    projector's poll finds the event."""
    cursor = await conn.execute(
        "SELECT global_seq FROM ledger_append(%s, %s, %s, 1, %s::jsonb, 'test', %s, NULL, 1, NULL)",
        (
            new.event_id,
            new.stream_id,
            new.event.event_type,
            json.dumps(new.event.payload()),
            new.correlation_id,
        ),
    )
    (seq,) = await cursor.fetchone() or (0,)
    return int(seq)


async def _assert_read_models_match_the_log(store: EventStore) -> None:
    report = await check_ledger(store.engine)
    assert report.ok, report.lines()
    assert report.read_models == len(READ_MODELS)


async def test_a_late_commit_is_projected_exactly_once_after_the_events_that_passed_it(
    bank: EventStore, database: IsolatedDatabase
) -> None:
    await project(bank, database)
    held = Payment(bank, "alice", "bob", 4_200)
    # A writer takes a global_seq and holds its transaction open...
    writer = await psycopg.AsyncConnection.connect(to_libpq_url(database.urls.app_url))
    held_seq = await _append_unannounced(writer, held.initiated())
    # ... while later events commit.
    later = Payment(bank, "alice", "bob", 1_000)
    await later.settle_fully()
    head, _ = await _head(bank.engine)
    assert head > held_seq

    await project(bank, database)
    checkpoints = await _checkpoints(bank.engine)
    assert all(last_seq < held_seq for last_seq, _ in checkpoints.values()), (
        "no read model may pass an event that has not committed"
    )

    await writer.commit()
    await writer.close()
    await project(bank, database)
    async with bank.engine.connect() as conn:
        listed = (
            await conn.execute(
                text("SELECT count(*) FROM projection.payments WHERE payment_id = :id"),
                {"id": held.payment_id},
            )
        ).scalar_one()
    assert listed == 1
    checkpoints = await _checkpoints(bank.engine)
    _, events = await _head(bank.engine)
    for name in READ_MODELS:
        assert checkpoints[name][0] >= head
        assert checkpoints[name][1] == events, f"{name} applied some event twice or not at all"
    await _assert_read_models_match_the_log(bank)


def _projector_process(
    database: IsolatedDatabase, batch_events_max: int, **settings: str
) -> subprocess.Popen[str]:
    env = clean_env(
        DATABASE_APP_URL=database.urls.app_url,
        PAYSAGA_PROJECTOR_BATCH_EVENTS_MAX=str(batch_events_max),
        PAYSAGA_PROJECTOR_POLL_S="0.2",
        **settings,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "paysaga", "projector"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _until_checkpoint_passes(
    bank: EventStore, seq: int, process: subprocess.Popen[str], timeout_s: float = 30
) -> None:
    deadline = time.monotonic() + timeout_s
    while (await _checkpoints(bank.engine))["statement"][0] <= seq:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the projector applied nothing: {process.communicate()[1]}")
        await asyncio.sleep(0.05)


async def _waiting_on_lock(owner: AsyncEngine, timeout_s: float = 20) -> int:
    """The pid of the projector's backend once it waits on a lock, mid-batch."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with owner.connect() as conn:
            pid = (
                await conn.execute(
                    text(
                        "SELECT pid FROM pg_locks WHERE NOT granted "
                        "AND relation = 'projection.entries'::regclass"
                    )
                )
            ).scalar()
        if pid:
            return int(pid)
        await asyncio.sleep(0.05)
    raise AssertionError("the projector never reached the locked table")


# Risk alert thresholds that are not the defaults: alice's 30 payments within the hour
# trip the velocity rule once, at her 30th, and the alert's reason names both.
RISK_ALERT_SETTINGS = {
    "PAYSAGA_RISK_ALERT_VELOCITY_WINDOW_S": "3600",
    "PAYSAGA_RISK_ALERT_VELOCITY_COUNT_MAX": "29",
}


async def test_a_projector_killed_mid_batch_loses_nothing_and_doubles_nothing(
    bank: EventStore, database: IsolatedDatabase, owner_engine: AsyncEngine
) -> None:
    for i in range(30):
        await Payment(bank, "alice", "bob", 100 + i).settle_fully()
    # Hold the statement's table so that the projector stops inside a batch: its
    # checkpoint row is locked, the balances batch before it may have committed (the
    # risk consumer, last in the pass, never starts).
    blocker = await psycopg.AsyncConnection.connect(to_libpq_url(database.urls.owner_url))
    await blocker.execute("LOCK TABLE projection.entries IN SHARE MODE")
    process = _projector_process(database, batch_events_max=7, **RISK_ALERT_SETTINGS)
    try:
        try:
            await _waiting_on_lock(owner_engine)
        except AssertionError:
            process.kill()
            raise AssertionError(process.communicate()[1][-3000:]) from None
        before = await _checkpoints(bank.engine)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        await blocker.rollback()
        await blocker.close()
        if process.poll() is None:
            process.kill()
    assert before["statement"][0] == 0, "the statement's first batch never committed"
    # The killed batch rolled back with its connection; a new projector, restarted as a
    # supervisor would, starts from the checkpoints and applies every event exactly
    # once. Its risk consumer raises the alert its settings ask for, which the next pass
    # projects.
    process = _projector_process(database, batch_events_max=5_000, **RISK_ALERT_SETTINGS)
    try:
        deadline = time.monotonic() + 30
        while True:
            checkpoints = await _checkpoints(bank.engine)
            head, events = await _head(bank.engine)
            done = all(checkpoints[name] == (head, events) for name in READ_MODELS)
            if done and checkpoints["risk_consumer"][0] == head and await _alerts(bank.engine):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"the projector never caught up: {process.communicate()[1]}")
            await asyncio.sleep(0.05)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)
    assert process.returncode == 0, process.communicate()[1][-3000:]
    assert await _alerts(bank.engine) == [
        "payer alice started 30 payments within 3600 s (at most 29)"
    ]
    checkpoints = await _checkpoints(bank.engine)
    head, events = await _head(bank.engine)
    for name in READ_MODELS:
        assert checkpoints[name] == (head, events), name
    await _assert_read_models_match_the_log(bank)


async def _alerts(engine: AsyncEngine) -> list[str]:
    """The reasons of the alerts listed in the risk_alerts read model, in order."""
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT reason FROM projection.risk_alerts ORDER BY 1"))
        return [r.reason for r in rows]


async def test_a_projector_killed_again_and_again_under_writes_converges(
    bank: EventStore, database: IsolatedDatabase
) -> None:
    stop = asyncio.Event()

    async def write() -> None:
        while not stop.is_set():
            await Payment(bank, "alice", "bob", 1).settle_fully()

    writer = asyncio.create_task(write())
    try:
        for after_progress_s in (0.0, 0.3, 0.6, 0.9):
            # Each projector is killed once it has committed a batch of its own (a fixed
            # lifetime could end before a slow start on a loaded machine ever got that
            # far), at a different moment after it.
            before = (await _checkpoints(bank.engine))["statement"][0]
            process = _projector_process(database, batch_events_max=5)
            await _until_checkpoint_passes(bank, before, process)
            await asyncio.sleep(after_progress_s)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    finally:
        stop.set()
        await writer
    await project(bank, database)
    checkpoints = await _checkpoints(bank.engine)
    head, events = await _head(bank.engine)
    for name in READ_MODELS:
        assert checkpoints[name] == (head, events), name
    await _assert_read_models_match_the_log(bank)


async def test_two_projectors_at_once_apply_each_event_once(
    bank: EventStore, database: IsolatedDatabase
) -> None:
    stop = asyncio.Event()
    passes: list[int] = [0, 0]

    async def run(i: int) -> None:
        async def counted(applied: int) -> None:
            passes[i] += applied

        await projector(bank, database, events_max=3, poll_s=0.05).run(stop, on_pass=counted)

    runners = [asyncio.create_task(run(0)), asyncio.create_task(run(1))]
    for i in range(25):
        await Payment(bank, "alice", "bob", 10 + i).settle_fully()
    head, events = await _head(bank.engine)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        checkpoints = await _checkpoints(bank.engine)
        if all(checkpoints[name][0] >= head for name in READ_MODELS):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*runners)
    checkpoints = await _checkpoints(bank.engine)
    for name in READ_MODELS:
        assert checkpoints[name] == (head, events), name
    assert sum(passes) == events * len(READ_MODELS)
    await _assert_read_models_match_the_log(bank)


async def test_the_projector_wakes_on_a_notification_and_polls_for_an_append_without_one(
    bank: EventStore, database: IsolatedDatabase
) -> None:
    app = await connect_app(database)
    try:
        unannounced = await _sleeps_through_an_append_without_a_notification(bank, database, app)
        # A runner that polls every `poll_s` finds such an append by its poll alone.
        poll_s = 0.2
        idle = asyncio.Event()

        async def on_pass(applied: int) -> None:
            if applied == 0:
                idle.set()  # caught up, `unannounced` included: it waits now

        stop = asyncio.Event()
        runner = asyncio.create_task(
            projector(bank, database, poll_s=poll_s).run(stop, on_pass=on_pass)
        )
        try:
            await asyncio.wait_for(idle.wait(), 10)
            assert (await _checkpoints(bank.engine))["balances"][0] >= unannounced
            started = time.monotonic()
            unannounced = await _append_unannounced(
                app, Payment(bank, "alice", "bob", 6).initiated()
            )
            while (await _checkpoints(bank.engine))["balances"][0] < unannounced:
                assert time.monotonic() - started < 20 * poll_s, "the projector never polled"
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await runner
    finally:
        await app.close()


async def _sleeps_through_an_append_without_a_notification(
    bank: EventStore, database: IsolatedDatabase, app: psycopg.AsyncConnection[Any]
) -> int:
    """A projector polling every 30 s wakes on an append's notification at once, and
    sleeps through an append made outside the event store, which sends none; that
    append's global_seq."""
    stop = asyncio.Event()
    runner = asyncio.create_task(projector(bank, database, poll_s=30).run(stop))
    try:
        await project(bank, database)
        await asyncio.sleep(0.3)  # the runner is now waiting for a notification
        started = time.monotonic()
        await open_account(bank, f"late-{uuid.uuid4().hex[:6]}")
        head, _ = await _head(bank.engine)
        while (await _checkpoints(bank.engine))["balances"][0] < head:
            assert time.monotonic() - started < 5, "the projector slept through the commit"
            await asyncio.sleep(0.01)

        await asyncio.sleep(0.1)  # a notification still on its way has arrived
        unannounced = await _append_unannounced(app, Payment(bank, "alice", "bob", 5).initiated())
        await asyncio.sleep(0.25)
        assert (await _checkpoints(bank.engine))["balances"][0] < unannounced, (
            "an append outside the event store woke the projector: the poll goes untested"
        )
        return unannounced
    finally:
        stop.set()
        await runner
