"""`paysaga ledger verify` and `check`: clean ledgers pass, tampered ones name the event."""

from __future__ import annotations

import re
import subprocess
import uuid

import psycopg
import pytest

from ledger.db import to_libpq_url
from ledger.store import EventStore
from tests.harness.ledger import Payment, fund, open_account
from tests.harness.postgres import IsolatedDatabase
from tests.harness.stack import clean_env, paysaga


@pytest.fixture
async def ledger(store: EventStore) -> list[Payment]:
    """A small, healthy ledger: three accounts, two settled payments, one in flight."""
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await fund(store, "alice", 5_000)
    payments = [Payment(store, "alice", "bob", 1_000), Payment(store, "alice", "bob", 700)]
    for payment in payments:
        await payment.settle_fully()
    in_flight = Payment(store, "alice", "bob", 300)
    await in_flight.run("initiated", "authorized", "reserved")
    return [*payments, in_flight]


def _cli(database: IsolatedDatabase, *args: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(DATABASE_URL=database.urls.owner_url)
    if database.urls.app_url:
        env["DATABASE_APP_URL"] = database.urls.app_url
    return paysaga("ledger", *args, env=env)


def _owner(database: IsolatedDatabase) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(to_libpq_url(database.urls.owner_url), autocommit=True)


def _tamper(database: IsolatedDatabase, statement: str, seq: int) -> None:
    """As the owner: switch the immutability trigger off, change history, switch it on."""
    with _owner(database) as conn:
        conn.execute("ALTER TABLE events DISABLE TRIGGER events_no_update_or_delete")
        conn.execute(statement, (seq,))
        conn.execute("ALTER TABLE events ENABLE TRIGGER events_no_update_or_delete")


def _first_bad(output: str) -> int:
    match = re.search(r"first bad global_seq: (\d+)", output)
    assert match, output
    return int(match.group(1))


async def _seq_of(store: EventStore, payment: Payment, event_type: str) -> int:
    events = await store.read_stream(payment.stream_id)
    return next(e.global_seq for e in events if e.event_type == event_type)


async def test_a_healthy_ledger_verifies_and_checks(
    ledger: list[Payment], database: IsolatedDatabase
) -> None:
    for command in ("verify", "check"):
        result = _cli(database, command)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"ledger {command}: OK" in result.stdout
        # 3 accounts, the funding payment, two settled payments and one in flight.
        assert "18 events in 7 streams" in result.stdout


async def test_a_changed_payload_is_named_by_verify(
    ledger: list[Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    """The tamper test: the owner disables the trigger, edits one payload, re-enables it."""
    target = await _seq_of(store, ledger[0], "PaymentSettled")
    _tamper(
        database,
        "UPDATE events SET payload = jsonb_set(payload, '{fee_minor}', '1') WHERE global_seq = %s",
        target,
    )
    result = _cli(database, "verify")
    assert result.returncode == 1
    assert _first_bad(result.stdout) == target
    assert "hash-mismatch" in result.stdout
    assert "changed after it was written" in result.stdout


async def test_a_removed_event_is_found_by_verify(
    ledger: list[Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    removed = await _seq_of(store, ledger[1], "PaymentAuthorized")
    _tamper(database, "DELETE FROM events WHERE global_seq = %s", removed)
    result = _cli(database, "verify")
    assert result.returncode == 1
    # The event after the gap no longer chains to its predecessor.
    assert _first_bad(result.stdout) == await _seq_of(store, ledger[1], "FundsReserved")
    assert "version-gap" in result.stdout and "broken-link" in result.stdout


async def test_a_truncated_stream_is_found_by_verify(
    ledger: list[Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    last = await _seq_of(store, ledger[0], "PaymentSettled")
    _tamper(database, "DELETE FROM events WHERE global_seq = %s", last)
    result = _cli(database, "verify")
    assert result.returncode == 1
    assert "head-mismatch" in result.stdout
    assert ledger[0].stream_id in result.stdout


async def test_a_changed_position_is_named_by_check(
    ledger: list[Payment], database: IsolatedDatabase
) -> None:
    with _owner(database) as conn:
        conn.execute(
            "UPDATE positions SET credits_posted = credits_posted + 1 "
            "WHERE account_id = 'bob' AND stripe = 0"
        )
        last_seq = conn.execute(
            "SELECT last_seq FROM account_positions WHERE account_id = 'bob'"
        ).fetchone()
    assert last_seq is not None
    assert _cli(database, "verify").returncode == 0  # the events themselves are intact
    result = _cli(database, "check")
    assert result.returncode == 1
    assert "position-mismatch" in result.stdout and "bob" in result.stdout
    assert "zero-sum" in result.stdout
    assert _first_bad(result.stdout) == last_seq[0]


async def test_an_event_inserted_around_the_store_is_caught_by_both(
    ledger: list[Payment], database: IsolatedDatabase
) -> None:
    """Only the owner can still INSERT around the function; both walks catch it."""
    with _owner(database) as conn:
        row = conn.execute(
            "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version,"
            " payload, actor, recorded_at, prev_hash, hash, hash_scheme) VALUES"
            " ('payment-forged', 1, %s, 'PaymentSettled', 1, %s, 'mallory', now(),"
            " decode(repeat('00', 32), 'hex'), decode(repeat('11', 32), 'hex'), 2)"
            " RETURNING global_seq",
            (uuid.uuid4(), '{"payment_id": "forged", "currency": "EUR", "postings": []}'),
        ).fetchone()
    assert row is not None
    forged = row[0]
    verify = _cli(database, "verify")
    assert verify.returncode == 1
    assert _first_bad(verify.stdout) == forged
    check = _cli(database, "check")
    assert check.returncode == 1
    assert _first_bad(check.stdout) == forged
    assert "malformed" in check.stdout


def test_the_commands_explain_an_unreachable_database() -> None:
    result = paysaga("ledger", "verify", env=clean_env(DATABASE_URL="postgresql://x@127.0.0.1:9/x"))
    assert result.returncode == 1
    assert "cannot reach the database" in result.stderr


async def test_both_walks_report_progress_for_every_event(
    ledger: list[Payment], store: EventStore
) -> None:
    from ledger.verify import check_ledger, count_events, verify_chain

    total = await count_events(store.engine)
    for walk in (verify_chain, check_ledger):
        seen: list[int] = []
        report = await walk(store.engine, seen.append)
        assert report.ok
        assert sum(seen) == total == report.events
