"""The store's contract, rule by rule, against a real PostgreSQL through the application role."""

from __future__ import annotations

import itertools
import logging
import uuid

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import errors
from ledger.db import to_libpq_url
from ledger.events import AccountOpened, PaymentApproved, PaymentSettled, Posting
from ledger.hashing import GENESIS_HASH
from ledger.store import EventStore, NewEvent
from ledger.verify import check_ledger, verify_chain
from tests.harness.ledger import Payment, fund, open_account
from tests.harness.postgres import IsolatedDatabase, PostgresServer


@pytest.fixture
async def accounts(store: EventStore) -> EventStore:
    """alice (customer, 10 000 EUR cents), bob (merchant), fees; carol holds USD."""
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await open_account(store, "fees", kind="fees")
    await open_account(store, "carol", currency="USD")
    await fund(store, "alice", 10_000)
    return store


async def _count(engine: AsyncEngine, stream_id: str | None = None) -> int:
    async with engine.connect() as conn:
        if stream_id is None:
            return int((await conn.execute(text("SELECT count(*) FROM events"))).scalar_one())
        return int(
            (
                await conn.execute(
                    text("SELECT count(*) FROM events WHERE stream_id = :s"), {"s": stream_id}
                )
            ).scalar_one()
        )


async def _assert_ledger_proves(engine: AsyncEngine) -> None:
    for report in (await verify_chain(engine), await check_ledger(engine)):
        assert report.ok, report.lines()


# --- the happy path -------------------------------------------------------------------------
async def test_a_settled_payment_is_four_events_and_moves_posted_balances(
    accounts: EventStore, app_engine: AsyncEngine
) -> None:
    payment = Payment(accounts, "alice", "bob", 2_500)
    results = await payment.settle_fully()
    assert all(r.appended for r in results)
    events = await accounts.read_stream(payment.stream_id)
    assert [(e.stream_version, e.event_type) for e in events] == [
        (1, "PaymentInitiated"),
        (2, "PaymentAuthorized"),
        (3, "FundsReserved"),
        (4, "PaymentSettled"),
    ]
    assert [e.global_seq for e in events] == sorted(e.global_seq for e in events)
    alice, bob = await accounts.get_position("alice"), await accounts.get_position("bob")
    assert (alice.debits_posted, alice.credits_posted, alice.debits_pending) == (2_500, 10_000, 0)
    assert (bob.credits_posted, bob.credits_pending) == (2_500, 0)
    assert alice.available_minor == 7_500
    await _assert_ledger_proves(app_engine)


async def test_a_reservation_moves_amounts_to_pending_and_a_release_returns_them(
    accounts: EventStore,
) -> None:
    payment = Payment(accounts, "alice", "bob", 4_000)
    await payment.run("initiated", "authorized", "reserved")
    alice, bob = await accounts.get_position("alice"), await accounts.get_position("bob")
    assert (alice.debits_pending, alice.available_minor) == (4_000, 6_000)
    assert (bob.credits_pending, bob.credits_posted) == (4_000, 0)
    await payment.run("released", "voided", "failed")
    alice, bob = await accounts.get_position("alice"), await accounts.get_position("bob")
    assert (alice.debits_pending, alice.available_minor) == (0, 10_000)
    assert bob.credits_pending == 0
    head = await accounts.stream_head(payment.stream_id)
    assert head is not None and head.state == "failed" and head.closed


async def test_a_fee_is_a_balanced_posting_to_the_fees_account(
    accounts: EventStore, app_engine: AsyncEngine
) -> None:
    await Payment(accounts, "alice", "bob", 1_000).run("initiated", "authorized", "reserved")
    payment = Payment(accounts, "alice", "bob", 1_000)
    await payment.run("initiated", "authorized", "reserved")
    await accounts.append(payment.settled(fee_minor=30))
    assert (await accounts.get_position("bob")).credits_posted == 970
    assert (await accounts.get_position("fees")).credits_posted == 30
    await _assert_ledger_proves(app_engine)


# --- the state machine ----------------------------------------------------------------------
async def test_settle_before_reserve_is_refused_and_appends_nothing(
    accounts: EventStore, app_engine: AsyncEngine
) -> None:
    payment = Payment(accounts, "alice", "bob", 100)
    await payment.run("initiated", "authorized")
    with pytest.raises(errors.InvalidTransition, match="may not follow state authorized"):
        await accounts.append(payment.settled())
    assert await _count(app_engine, payment.stream_id) == 2


async def test_a_stream_must_start_with_its_first_event(accounts: EventStore) -> None:
    payment = Payment(accounts, "alice", "bob", 100)
    with pytest.raises(errors.InvalidTransition):
        await accounts.append(payment.authorized())
    assert await accounts.stream_head(payment.stream_id) is None


async def test_nothing_may_follow_a_terminal_event(accounts: EventStore) -> None:
    payment = Payment(accounts, "alice", "bob", 100)
    await payment.settle_fully()
    for step in ("released", "voided", "failed", "cancelled"):
        with pytest.raises(errors.StreamClosed, match="closed"):
            await accounts.append(getattr(payment, step)())


async def test_compensation_runs_in_reverse_order_only(accounts: EventStore) -> None:
    payment = Payment(accounts, "alice", "bob", 100)
    await payment.run("initiated", "authorized", "reserved")
    # Voiding the authorization while funds are still held is out of order.
    with pytest.raises(errors.InvalidTransition):
        await accounts.append(payment.voided())
    # A terminal failure may not leave a hold behind.
    with pytest.raises(errors.InvalidTransition):
        await accounts.append(payment.failed())
    await payment.run("released", "voided", "failed")


async def test_an_event_from_another_kind_of_stream_is_refused(accounts: EventStore) -> None:
    opened = AccountOpened(account_id="x", currency="EUR", kind="customer")
    with pytest.raises(errors.InvalidTransition, match="does not belong"):
        await accounts.append(NewEvent("payment-p1", opened, uuid.uuid4(), "test"))
    approved = PaymentApproved(payment_id="p", approved_by="ops")
    with pytest.raises(errors.InvalidTransition, match="does not belong in stream thing-1"):
        await accounts.append(NewEvent("thing-1", approved, uuid.uuid4(), "test"))


# --- idempotency ----------------------------------------------------------------------------
async def test_the_same_event_appended_again_returns_the_stored_event(
    accounts: EventStore, app_engine: AsyncEngine
) -> None:
    payment = Payment(accounts, "alice", "bob", 700)
    first = (await payment.run("initiated"))[0]
    before = await _count(app_engine)
    retried = await accounts.append(payment.initiated())
    assert not retried.appended
    assert retried.event == first.event
    assert await _count(app_engine) == before


async def test_a_retried_reservation_is_not_a_second_hold(accounts: EventStore) -> None:
    payment = Payment(accounts, "alice", "bob", 700)
    await payment.run("initiated", "authorized", "reserved")
    again = await accounts.append(payment.reserved())
    assert not again.appended
    # The same fact under another event id is a no-op too.
    other_id = NewEvent(payment.stream_id, payment.reserved().event, uuid.uuid4(), "test")
    assert not (await accounts.append(other_id)).appended
    assert (await accounts.get_position("alice")).debits_pending == 700


async def test_the_same_event_id_with_other_content_is_a_domain_error(accounts: EventStore) -> None:
    payment = Payment(accounts, "alice", "bob", 700)
    await payment.run("initiated", "authorized", "reserved")
    different = NewEvent(
        payment.stream_id,
        payment.reserved(amount_minor=300).event,
        payment.reserved().event_id,
        "test",
    )
    with pytest.raises(errors.IdempotencyConflict, match="different content"):
        await accounts.append(different)
    assert (await accounts.get_position("alice")).debits_pending == 700


async def test_an_event_id_already_used_by_another_stream_is_a_domain_error(
    accounts: EventStore,
) -> None:
    first = Payment(accounts, "alice", "bob", 100)
    await first.run("initiated")
    second = Payment(accounts, "alice", "bob", 100)
    stolen_id = NewEvent(
        second.stream_id, second.initiated().event, first.initiated().event_id, "t"
    )
    with pytest.raises(errors.IdempotencyConflict):
        await accounts.append(stolen_id)


async def test_opening_an_account_twice(accounts: EventStore) -> None:
    again = await open_account(accounts, "alice")
    assert not again.appended
    with pytest.raises(errors.AccountExists):
        await accounts.open_account(
            AccountOpened(account_id="alice", currency="USD", kind="customer"), actor="t"
        )


# --- money ----------------------------------------------------------------------------------
async def test_a_reservation_beyond_the_available_balance_is_refused_and_appends_nothing(
    accounts: EventStore, app_engine: AsyncEngine
) -> None:
    payment = Payment(accounts, "alice", "bob", 10_001)
    await payment.run("initiated", "authorized")
    with pytest.raises(errors.InsufficientFunds) as refused:
        await accounts.append(payment.reserved())
    assert refused.value.details["available_minor"] == 10_000
    assert refused.value.details["requested_minor"] == 10_001
    assert await _count(app_engine, payment.stream_id) == 2
    assert (await accounts.get_position("alice")).debits_pending == 0
    assert (await accounts.stream_head(payment.stream_id)).version == 2  # type: ignore[union-attr]


async def test_an_overdraft_limit_lets_the_balance_go_down_to_minus_the_limit(
    accounts: EventStore,
) -> None:
    await open_account(accounts, "dave", overdraft_limit_minor=500)
    await Payment(accounts, "dave", "bob", 500).settle_fully()
    assert (await accounts.get_position("dave")).posted_minor == -500
    with pytest.raises(errors.InsufficientFunds):
        await Payment(accounts, "dave", "bob", 1).run("initiated", "authorized", "reserved")


async def test_an_external_account_is_unlimited(accounts: EventStore) -> None:
    await fund(accounts, "bob", 10**15)
    world = await accounts.get_position("world-eur")
    assert world.available_minor is None
    assert world.posted_minor == -(10**15 + 10_000)


async def test_currencies_must_match(accounts: EventStore) -> None:
    payment = Payment(accounts, "alice", "carol", 100)
    await payment.run("initiated", "authorized")
    with pytest.raises(errors.CurrencyMismatch, match="carol holds USD"):
        await accounts.append(payment.reserved())


async def test_an_unknown_account_is_refused(accounts: EventStore) -> None:
    payment = Payment(accounts, "alice", "nobody", 100)
    await payment.run("initiated", "authorized")
    with pytest.raises(errors.UnknownAccount, match="nobody"):
        await accounts.append(payment.reserved())
    with pytest.raises(errors.UnknownAccount):
        await accounts.get_position("nobody")


async def test_the_hold_must_match_the_payment(accounts: EventStore) -> None:
    payment = Payment(accounts, "alice", "bob", 500)
    await payment.run("initiated", "authorized")
    with pytest.raises(errors.InvalidPostings, match="does not match"):
        await accounts.append(payment.reserved(amount_minor=499))


async def test_postings_must_debit_only_the_payer_by_the_hold(accounts: EventStore) -> None:
    payment = Payment(accounts, "alice", "bob", 500)
    await payment.run("initiated", "authorized", "reserved")
    wrong_payer = PaymentSettled(
        payment_id=payment.payment_id,
        currency="EUR",
        postings=[
            Posting(account_id="fees", side="debit", amount_minor=500),
            Posting(account_id="bob", side="credit", amount_minor=500),
        ],
    )
    with pytest.raises(errors.InvalidPostings):
        await accounts.append(payment.new("settle", wrong_payer))
    with pytest.raises(ValueError, match="do not balance"):
        PaymentSettled(
            payment_id="p",
            currency="EUR",
            postings=[
                Posting(account_id="alice", side="debit", amount_minor=500),
                Posting(account_id="bob", side="credit", amount_minor=499),
            ],
        )


async def test_optimistic_concurrency_on_the_expected_version(accounts: EventStore) -> None:
    payment = Payment(accounts, "alice", "bob", 100)
    await payment.run("initiated")
    with pytest.raises(errors.WrongExpectedVersion, match="at version 1, not 0"):
        await accounts.append(payment.authorized(), expected_version=0)
    result = await accounts.append(payment.authorized(), expected_version=1)
    assert result.event.stream_version == 2


# --- reading --------------------------------------------------------------------------------
async def test_events_are_read_by_global_sequence_ranges(accounts: EventStore) -> None:
    everything = await accounts.read_range(after_seq=0, limit=10_000)
    seqs = [e.global_seq for e in everything]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    middle = await accounts.read_range(after_seq=seqs[2], limit=3)
    assert [e.global_seq for e in middle] == seqs[3:6]
    assert await accounts.read_range(after_seq=seqs[-1]) == []
    with pytest.raises(ValueError, match="limit"):
        await accounts.read_range(limit=0)


async def test_stored_events_parse_back_into_their_models(accounts: EventStore) -> None:
    payment = Payment(accounts, "alice", "bob", 100)
    await payment.settle_fully()
    events = await accounts.read_stream(payment.stream_id)
    assert [type(e.to_event()).__name__ for e in events] == [e.event_type for e in events]


async def test_each_stream_is_a_hash_chain(accounts: EventStore) -> None:
    payment = Payment(accounts, "alice", "bob", 100)
    await payment.settle_fully()
    events = await accounts.read_stream(payment.stream_id)
    assert events[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(events):
        assert after.prev_hash == before.hash
    assert len({e.hash for e in events}) == len(events)


# --- immutability, enforced by PostgreSQL ---------------------------------------------------
def _app_connection(database: IsolatedDatabase) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(to_libpq_url(database.urls.app_url), autocommit=True)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET actor = 'mallory'",
        "DELETE FROM events",
        "TRUNCATE events",
        "UPDATE positions SET credits_posted = credits_posted + 1000000",
        "DELETE FROM streams",
        "INSERT INTO positions (account_id, currency, last_seq) VALUES ('x', 'EUR', 1)",
    ],
)
async def test_the_application_role_cannot_change_history_or_positions(
    accounts: EventStore, database: IsolatedDatabase, statement: str
) -> None:
    with _app_connection(database) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


# The ledger's relations and what the application role may do with each: read, no more.
# `ledger_horizon_marks` is the safe horizon's, written and read by its function only.
LEDGER_RELATIONS = {
    "events": {"SELECT"},
    "streams": {"SELECT"},
    "accounts": {"SELECT"},
    "positions": {"SELECT"},
    "account_positions": {"SELECT"},
    "ledger_transitions": {"SELECT"},
    "ledger_event_types": {"SELECT"},
    "ledger_blocks": {"SELECT"},
    "ledger_horizon_marks": set(),
    "events_global_seq": set(),
}
# The functions it may call: the append, the safe horizon and the seal (each SECURITY
# DEFINER, checking its caller's every argument); the credit stripe, a pure function of
# its arguments that a view calls (a view's caller needs EXECUTE on what it calls); and,
# through PUBLIC, the immutability trigger's function, which can only fire as a trigger.
LEDGER_FUNCTIONS = {
    "ledger_append",
    "ledger_safe_horizon",
    "ledger_seal",
    "ledger_credit_stripe",
    "events_refuse_change",
}
SECURITY_DEFINER_FUNCTIONS = {"ledger_append", "ledger_safe_horizon", "ledger_seal"}
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
COLUMN_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "REFERENCES")
SEQUENCE_PRIVILEGES = ("USAGE", "SELECT", "UPDATE")
_LEDGER_NAMES = (
    "c.relname IN ('events', 'streams', 'accounts', 'positions', 'account_positions') "
    "OR c.relname LIKE 'ledger\\_%%' OR c.relname LIKE 'events\\_%%'"
)


async def test_the_application_role_holds_only_select_on_the_ledger_and_execute_on_its_functions(
    database: IsolatedDatabase,
) -> None:
    """Listed, not tried: every privilege the services' login holds on the ledger's
    relations and functions, granted to it, to PUBLIC or to a role it belongs to, on a
    table or on one column. A GRANT beyond SELECT and EXECUTE fails here, and so does a
    new ledger relation until its privileges are written down above."""
    with _app_connection(database) as conn:
        version = int(str(conn.execute("SHOW server_version_num").fetchone()[0]))  # type: ignore[index]
        table_privileges = TABLE_PRIVILEGES + (("MAINTAIN",) if version >= 170_000 else ())
        relations = conn.execute(
            "SELECT c.oid, c.relname, c.relkind FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') "
            f"AND ({_LEDGER_NAMES})"
        ).fetchall()
        granted: dict[str, set[str]] = {}
        for oid, name, kind in relations:
            held = granted.setdefault(str(name), set())
            if kind == "S":
                for privilege in SEQUENCE_PRIVILEGES:
                    if conn.execute(
                        "SELECT has_sequence_privilege(%s, %s)", (oid, privilege)
                    ).fetchone()[0]:  # type: ignore[index]
                        held.add(privilege)
                continue
            for privilege in table_privileges:
                query = "SELECT has_table_privilege(%s, %s)"
                if privilege in COLUMN_PRIVILEGES:
                    query = "SELECT has_any_column_privilege(%s, %s)"  # table or any column
                if conn.execute(query, (oid, privilege)).fetchone()[0]:  # type: ignore[index]
                    held.add(privilege)
        functions = conn.execute(
            "SELECT p.proname, p.prosecdef FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND has_function_privilege(p.oid, 'EXECUTE') "
            "AND (p.prosecdef OR p.proname LIKE 'ledger\\_%%' OR p.proname LIKE 'events\\_%%')"
        ).fetchall()
        # Nor may it create what the ledger's functions would find, or become the owner.
        schema_create, owner_member = conn.execute(
            "SELECT has_schema_privilege('public', 'CREATE'), "
            "pg_has_role(current_user, (SELECT relowner FROM pg_class "
            "WHERE oid = 'public.events'::regclass), 'MEMBER')"
        ).fetchone()  # type: ignore[misc]
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="only be called as triggers"):
            conn.execute("SELECT events_refuse_change()")
    assert granted == LEDGER_RELATIONS
    assert {str(name) for name, _ in functions} == LEDGER_FUNCTIONS
    assert {str(name) for name, definer in functions if definer} == SECURITY_DEFINER_FUNCTIONS
    assert (schema_create, owner_member) == (False, False)


@pytest.mark.parametrize(
    "statement",
    ["UPDATE events SET actor = 'mallory'", "DELETE FROM events", "TRUNCATE events"],
)
async def test_even_the_owner_is_stopped_by_the_triggers(
    accounts: EventStore, database: IsolatedDatabase, statement: str
) -> None:
    with psycopg.connect(to_libpq_url(database.urls.owner_url), autocommit=True) as conn:
        with pytest.raises(psycopg.Error, match="events are immutable") as refused:
            conn.execute(statement)
        assert refused.value.sqlstate == "PS100"
        count = conn.execute("SELECT count(*) FROM events").fetchone()
    assert count is not None and count[0] > 0


# --- hot accounts -----------------------------------------------------------------------------
async def test_a_merchants_credits_spread_over_stripes_but_read_as_one_position(
    accounts: EventStore, database: IsolatedDatabase, app_engine: AsyncEngine
) -> None:
    for _ in range(12):
        await Payment(accounts, "alice", "bob", 100).settle_fully()
    with _app_connection(database) as conn:
        rows = conn.execute(
            "SELECT credits_posted FROM positions WHERE account_id = 'bob' ORDER BY stripe"
        ).fetchall()
    credits = [int(str(row[0])) for row in rows]
    assert len(credits) == 8
    assert sum(1 for c in credits if c) > 1, "12 payments all hit one stripe"
    assert sum(credits) == 1_200
    assert (await accounts.get_position("bob")).credits_posted == 1_200
    await _assert_ledger_proves(app_engine)


async def test_a_merchant_can_spend_what_it_was_paid_whichever_stripe_holds_it(
    accounts: EventStore,
) -> None:
    for _ in range(5):
        await Payment(accounts, "alice", "bob", 200).settle_fully()
    await Payment(accounts, "bob", "alice", 1_000).settle_fully()
    with pytest.raises(errors.InsufficientFunds):
        await Payment(accounts, "bob", "alice", 1).run("initiated", "authorized", "reserved")
    bob = await accounts.get_position("bob")
    assert (bob.posted_minor, bob.available_minor) == (0, 0)


async def test_a_lost_connection_is_retried_inside_the_store(
    accounts: EventStore,
    database: IsolatedDatabase,
    app_engine: AsyncEngine,
    pg_server: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    payment = Payment(accounts, "alice", "bob", 100)
    await payment.run("initiated")
    # Every pooled connection dies under the store's feet (a failover, a restart).
    with pg_server.admin() as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database.name,),
        )
    with caplog.at_level(logging.WARNING, logger="paysaga.ledger"):
        result = await accounts.append(payment.authorized())
    assert result.appended
    assert any("retrying" in record.message for record in caplog.records)
    # Reads recover too (once the pool has dropped its dead connections).
    assert len(await accounts.read_stream(payment.stream_id)) == 2
