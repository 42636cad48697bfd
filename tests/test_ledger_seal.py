"""The seal: the log chained into blocks up to the safe horizon, so deleting anything shows.

Row 10 of issue 8: as the owner, with the trigger disabled, every event of one payment
and its stream head were deleted, and `ledger verify` and `ledger check` both said OK.
A per-stream chain cannot see a stream that is gone; the blocks can.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import uuid

import psycopg
import pytest

from ledger.db import to_libpq_url
from ledger.sealer import run_sealer, seal_all
from ledger.store import EventStore
from ledger.verify import Digest, latest_digest, verify_chain, verify_seal_since
from tests.harness.ledger import (
    Payment,
    as_owner,
    fund,
    open_account,
    seal_until_everything_is_sealed,
)
from tests.harness.postgres import IsolatedDatabase
from tests.harness.stack import clean_env, paysaga


@pytest.fixture
async def sealed(store: EventStore, database: IsolatedDatabase) -> dict[str, Payment]:
    """Accounts, a settled payment, a failed one (it moved no money) and one in flight,
    all sealed, with a global_seq that an append took and rolled back in the middle."""
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    with psycopg.connect(to_libpq_url(database.urls.owner_url), autocommit=True) as conn:
        conn.execute("SELECT nextval('events_global_seq')")
    await fund(store, "alice", 5_000)
    payments = {
        "settled": Payment(store, "alice", "bob", 1_000),
        "failed": Payment(store, "alice", "bob", 700),
        "open": Payment(store, "alice", "bob", 300),
    }
    await payments["settled"].settle_fully()
    await payments["failed"].run("initiated", "failed")
    await payments["open"].run("initiated", "authorized", "reserved")
    await seal_until_everything_is_sealed(store)
    return payments


def _cli(database: IsolatedDatabase, *args: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(DATABASE_URL=database.urls.owner_url)
    if database.urls.app_url:
        env["DATABASE_APP_URL"] = database.urls.app_url
    return paysaga("ledger", *args, env=env)


async def test_a_sealed_ledger_verifies_and_its_digest_is_printed(
    sealed: dict[str, Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    report = await verify_chain(store.engine)
    assert report.ok, report.lines()
    assert report.blocks >= 1 and report.unsealed == 0
    digest = _cli(database, "digest")
    assert digest.returncode == 0, digest.stderr
    assert re.fullmatch(r"\d+:[0-9a-f]{64}\n", digest.stdout)
    latest = await latest_digest(store.engine)
    assert latest is not None and digest.stdout.strip() == str(latest)
    verified = _cli(database, "verify", "--digest", digest.stdout.strip())
    assert verified.returncode == 0, verified.stdout
    assert "sealed blocks" in verified.stdout


async def test_a_removed_stream_is_named(
    sealed: dict[str, Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    """Row 10: every event of a payment that moved no money, and its head, deleted."""
    failed = sealed["failed"]
    seqs = [e.global_seq for e in await store.read_stream(failed.stream_id)]
    as_owner(
        database,
        ("DELETE FROM events WHERE stream_id = %s", (failed.stream_id,)),
        ("DELETE FROM streams WHERE stream_id = %s", (failed.stream_id,)),
    )
    check = _cli(database, "check")
    assert check.returncode == 0, "this deletion is invisible to the fold"
    verify = _cli(database, "verify")
    assert verify.returncode == 1, verify.stdout
    assert f"[removed-stream] global_seq {seqs[0]}: {failed.stream_id} was removed" in (
        verify.stdout
    )
    assert f"first bad global_seq: {seqs[0]}" in verify.stdout
    for seq in seqs:
        assert f"[deleted-event] global_seq {seq}:" in verify.stdout


async def test_the_last_event_of_a_stream_deleted_with_its_head_fixed_up_is_named(
    sealed: dict[str, Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    """A careful attacker also rewinds the stream head; the block still remembers."""
    settled = sealed["settled"]
    events = await store.read_stream(settled.stream_id)
    last, before = events[-1], events[-2]
    as_owner(
        database,
        ("DELETE FROM events WHERE global_seq = %s", (last.global_seq,)),
        (
            "UPDATE streams SET version = %s, state = 'reserved', last_hash = %s, last_seq = %s "
            "WHERE stream_id = %s",
            (before.stream_version, before.hash, before.global_seq, settled.stream_id),
        ),
    )
    verify = _cli(database, "verify")
    assert verify.returncode == 1
    assert f"[deleted-event] global_seq {last.global_seq}:" in verify.stdout
    assert settled.stream_id in verify.stdout


async def test_an_event_inserted_into_a_sealed_range_is_named(
    sealed: dict[str, Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    block = await latest_digest(store.engine)
    assert block is not None
    free = await _unused_seq_below(database, block.last_seq)
    assert free is not None, "the fixture leaves a rolled-back global_seq in the sealed range"
    as_owner(
        database,
        (
            "INSERT INTO events (global_seq, stream_id, stream_version, event_id, event_type,"
            " schema_version, payload, actor, recorded_at, prev_hash, hash, hash_scheme)"
            " VALUES (%s, 'payment-forged', 1, %s, 'PaymentInitiated', 1, %s, 'mallory', now(),"
            " decode(repeat('00', 32), 'hex'), decode(repeat('11', 32), 'hex'), 2)",
            (free, uuid.uuid4(), json.dumps({"payment_id": "forged"})),
        ),
    )
    verify = _cli(database, "verify")
    assert verify.returncode == 1
    assert f"[inserted-event] global_seq {free}:" in verify.stdout


async def _unused_seq_below(database: IsolatedDatabase, last_seq: int) -> int | None:
    with psycopg.connect(to_libpq_url(database.urls.owner_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT s FROM generate_series(1, %s) AS s "
            "WHERE NOT EXISTS (SELECT 1 FROM events WHERE global_seq = s) LIMIT 1",
            (last_seq,),
        ).fetchone()
    return None if row is None else int(row[0])


async def test_an_event_rewritten_with_its_hashes_recomputed_is_named(
    sealed: dict[str, Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    """Change an actor and recompute that event's hash: its own chain then checks out if
    nothing follows it, but the block holds the hash it was sealed with."""
    stream = await store.read_stream(sealed["failed"].stream_id)
    last = stream[-1]
    forged = bytes(32)
    as_owner(
        database,
        (
            "UPDATE events SET actor = 'mallory', hash = %s WHERE global_seq = %s",
            (forged, last.global_seq),
        ),
        ("UPDATE streams SET last_hash = %s WHERE stream_id = %s", (forged, last.stream_id)),
    )
    verify = _cli(database, "verify")
    assert verify.returncode == 1
    assert f"[rewritten-event] global_seq {last.global_seq}:" in verify.stdout


async def test_the_seal_verifies_from_the_last_verified_block(
    sealed: dict[str, Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    """A scheduled check verifies only what was sealed since the last one, trusting the
    block it reached; tampering after that block is found, before it only by a full walk."""
    full = await verify_chain(store.engine)
    first, point = await verify_seal_since(store.engine, None)
    assert first.ok and full.ok, first.lines()
    assert point is not None and point == full.seal_point
    assert first.blocks == full.blocks and first.events == full.events - full.unsealed

    nothing, same = await verify_seal_since(store.engine, point)
    assert nothing.ok and nothing.events == 0 and same == point

    later = Payment(store, "alice", "bob", 200)
    await later.settle_fully()
    await seal_until_everything_is_sealed(store)
    incremental, reached = await verify_seal_since(store.engine, point)
    assert incremental.ok, incremental.lines()
    assert reached is not None and reached.block_no > point.block_no
    # Only the new blocks' events, each chained to a predecessor sealed before `point`.
    assert 0 < incremental.events < full.events
    assert incremental.streams >= 1

    new_event = (await store.read_stream(later.stream_id))[-1]
    old_event = (await store.read_stream(sealed["failed"].stream_id))[-1]
    as_owner(
        database,
        ("UPDATE events SET actor = 'mallory' WHERE global_seq = %s", (new_event.global_seq,)),
        ("UPDATE events SET actor = 'mallory' WHERE global_seq = %s", (old_event.global_seq,)),
    )
    after_tamper, _ = await verify_seal_since(store.engine, point)
    assert {v.global_seq for v in after_tamper.violations} == {new_event.global_seq}
    assert {v.global_seq for v in (await verify_chain(store.engine)).violations} >= {
        new_event.global_seq,
        old_event.global_seq,
    }

    as_owner(
        database,
        ("UPDATE ledger_blocks SET hash = %s WHERE block_no = %s", (bytes(32), point.block_no)),
    )
    rewritten, _ = await verify_seal_since(store.engine, point)
    assert f"block {point.block_no} no longer carries the hash" in "\n".join(rewritten.lines())

    # The newest blocks removed: a check from the newest verified one still sees it.
    as_owner(database, ("DELETE FROM ledger_blocks WHERE block_no >= %s", (reached.block_no,)))
    removed, kept = await verify_seal_since(store.engine, reached)
    assert f"block {reached.block_no}, verified before, is gone" in "\n".join(removed.lines())
    assert kept == reached


async def test_a_digest_kept_elsewhere_catches_a_rewritten_seal(
    sealed: dict[str, Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    """Delete a stream, then rebuild every block from what is left: the blocks agree with
    the log again, and only the digest taken before knows."""
    digest = await latest_digest(store.engine)
    assert digest is not None
    failed = sealed["failed"]
    as_owner(
        database,
        ("DELETE FROM events WHERE stream_id = %s", (failed.stream_id,)),
        ("DELETE FROM streams WHERE stream_id = %s", (failed.stream_id,)),
        ("DELETE FROM ledger_blocks", ()),
        ("DELETE FROM ledger_horizon_marks", ()),
    )
    await seal_until_everything_is_sealed(store)
    assert (await verify_chain(store.engine)).ok, "the rebuilt seal is self-consistent"
    verify = _cli(database, "verify", "--digest", str(digest))
    assert verify.returncode == 1
    assert "[digest]" in verify.stdout
    assert str(digest) in verify.stdout
    bad = _cli(database, "verify", "--digest", "not-a-digest")
    assert bad.returncode == 2
    assert "<global_seq>:<sha-256 in hex>" in bad.stderr


async def test_nothing_is_sealed_past_an_append_that_has_not_committed(
    store: EventStore, database: IsolatedDatabase
) -> None:
    await open_account(store, "alice")
    await seal_until_everything_is_sealed(store)
    urls = database.urls
    with psycopg.connect(to_libpq_url(urls.app_url)) as held:
        held_seq = held.execute(
            "SELECT global_seq FROM ledger_append(%s, 'account-held', 'AccountOpened', 1, "
            "%s::jsonb, 'test', NULL, NULL, NULL, NULL)",
            (
                uuid.uuid4(),
                json.dumps(
                    {
                        "account_id": "held",
                        "currency": "EUR",
                        "kind": "customer",
                        "overdraft_limit_minor": 0,
                        "metadata": {},
                    }
                ),
            ),
        ).fetchone()[0]  # type: ignore[index]
        await open_account(store, "bob")
        for _ in range(5):
            await seal_all(store)
        digest = await latest_digest(store.engine)
        assert digest is not None and digest.last_seq < held_seq
        held.commit()
    await seal_until_everything_is_sealed(store)
    report = await verify_chain(store.engine)
    assert report.ok and report.unsealed == 0, report.lines()


async def test_the_sealer_seals_new_events_within_two_intervals(store: EventStore) -> None:
    stop = asyncio.Event()
    sealer = asyncio.create_task(run_sealer(store, stop, interval_s=0.2))
    try:
        await open_account(store, "alice")
        head = (await store.safe_horizon()).head_seq
        for _ in range(100):
            digest = await latest_digest(store.engine)
            if digest is not None and digest.last_seq >= head:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the sealer did not seal a committed event")
    finally:
        stop.set()
        await sealer


async def test_the_application_role_cannot_write_or_lock_the_seal(
    sealed: dict[str, Payment], database: IsolatedDatabase
) -> None:
    urls = database.urls
    with psycopg.connect(to_libpq_url(urls.app_url), autocommit=True) as conn:
        for statement in (
            "DELETE FROM ledger_blocks",
            "INSERT INTO ledger_horizon_marks VALUES ('1'::xid8, 1000000)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        with conn.transaction(), pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("LOCK TABLE ledger_blocks IN SHARE ROW EXCLUSIVE MODE")
        # A horizon taken by a transaction that already has an id would prove nothing.
        with conn.transaction():
            conn.execute("SELECT pg_current_xact_id()")
            with pytest.raises(psycopg.Error) as refused:
                conn.execute("SELECT * FROM ledger_safe_horizon()")
        assert refused.value.sqlstate == "PS010"


def test_a_digest_reads_back_what_it_prints() -> None:
    digest = Digest(42, bytes(range(32)))
    assert Digest.parse(str(digest)) == digest
    for bad in ("42", "x:00", f"0:{'00' * 32}", f"42:{'00' * 31}"):
        with pytest.raises(ValueError, match="global_seq"):
            Digest.parse(bad)
