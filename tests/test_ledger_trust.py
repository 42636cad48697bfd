"""The append function trusts no caller: the application role, calling it directly.

Rows 2 to 5 of issue 8 were reproduced as the application role: a posting without a
side credited money out of nothing; an INSERT around the function made the API say
SETTLED with the hold still pending; forged transitions moved a reserved stream
straight to `declined`, stranding its hold; a temporary table named `events` fooled
the SECURITY DEFINER function. Each is a test here, and a hypothesis test throws
hostile arguments at the function, checking the design's invariants after every call.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ledger.db import to_libpq_url
from ledger.fold import zero_sum_violations
from ledger.rules import event_type_rows, render_payload_check, transition_rows
from ledger.store import EventStore
from ledger.verify import check_ledger, verify_chain
from paysaga.db import DatabaseUrls, open_store
from tests.harness.ledger import Payment, fund, open_account
from tests.harness.postgres import IsolatedDatabase, PostgresServer

APPEND = (
    "SELECT * FROM ledger_append(%(event_id)s, %(stream_id)s, %(event_type)s, "
    "%(schema_version)s, %(payload)s::jsonb, %(actor)s, %(correlation_id)s, "
    "%(causation_id)s, %(attempt)s, %(expected_version)s)"
)


@contextmanager
def app_connection(urls: DatabaseUrls) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """A raw session as the application role, as a compromised service would hold."""
    with psycopg.connect(to_libpq_url(urls.app_url), autocommit=True) as conn:
        yield conn


def call(
    conn: psycopg.Connection[tuple[Any, ...]],
    *,
    stream_id: str,
    event_type: str,
    payload: Any,
    event_id: uuid.UUID | None = None,
    schema_version: int | None = 1,
    actor: str | None = "mallory",
    correlation_id: str | None = None,
    causation_id: str | None = None,
    attempt: int | None = None,
    expected_version: int | None = None,
) -> tuple[Any, ...] | None:
    return conn.execute(
        APPEND,
        {
            "event_id": event_id or uuid.uuid4(),
            "stream_id": stream_id,
            "event_type": event_type,
            "schema_version": schema_version,
            "payload": json.dumps(payload) if payload is not None else None,
            "actor": actor,
            "correlation_id": correlation_id,
            "causation_id": causation_id,
            "attempt": attempt,
            "expected_version": expected_version,
        },
    ).fetchone()


def refusal_of(conn: psycopg.Connection[tuple[Any, ...]], **arguments: Any) -> str | None:
    """The SQLSTATE the function refused this call with, or None if it appended."""
    try:
        call(conn, **arguments)
    except psycopg.Error as refused:
        return refused.sqlstate or "unknown"
    return None


async def _positions(store: EventStore) -> dict[str, tuple[int, int, int, int]]:
    async with store.engine.connect() as conn:
        from sqlalchemy import text

        rows = await conn.execute(
            text(
                "SELECT account_id, debits_pending, debits_posted, credits_pending, "
                "credits_posted FROM account_positions"
            )
        )
        return {r.account_id: (r[1], r[2], r[3], r[4]) for r in rows}


async def assert_invariants(store: EventStore) -> None:
    """Invariants 1, 2, 3, 5 and 6 of the design, on the ledger as it is now."""
    ids = list(await _positions(store))
    positions = [await store.get_position(account_id) for account_id in ids]
    assert zero_sum_violations(positions) == []
    for position in positions:
        assert position.available_minor is None or position.available_minor >= 0
    for report in (await verify_chain(store.engine), await check_ledger(store.engine)):
        assert report.ok, report.lines()


@pytest.fixture
async def bank(store: EventStore) -> dict[str, Payment]:
    """alice (customer, funded), bob (merchant), fees, carol (USD), and a payment in each
    state that moves money: initiated, authorized, reserved, settled."""
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await open_account(store, "fees", kind="fees")
    await open_account(store, "carol", currency="USD")
    await fund(store, "alice", 10_000)
    payments = {name: Payment(store, "alice", "bob", 1_000) for name in ("i", "a", "r", "s")}
    await payments["i"].run("initiated")
    await payments["a"].run("initiated", "authorized")
    await payments["r"].run("initiated", "authorized", "reserved")
    await payments["s"].settle_fully()
    return payments


def _settled_payload(payment: Payment, postings: list[Any], fee_minor: int = 0) -> dict[str, Any]:
    return {
        "payment_id": payment.payment_id,
        "currency": "EUR",
        "postings": postings,
        "fee_minor": fee_minor,
    }


# --- the rules live in the database -------------------------------------------------------
async def test_the_database_enforces_exactly_the_python_rules(
    store: EventStore, database: IsolatedDatabase
) -> None:
    with app_connection(database.urls) as conn:
        transitions = sorted(
            conn.execute(
                "SELECT stream_kind, from_state, event_type, to_state FROM ledger_transitions"
            ).fetchall()
        )
        types = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT event_type, schema_version, stream_kind, entity_field, starts_stream, "
                "moves_money FROM ledger_event_types"
            )
        }
        body = conn.execute(
            "SELECT prosrc FROM pg_proc WHERE proname = 'ledger_payload_problem'"
        ).fetchone()[0]  # type: ignore[index]
    assert transitions == transition_rows()
    assert body == render_payload_check(event_type_rows()).split("$rules$")[1]
    assert types == {
        row.event_type: (
            row.schema_version,
            row.stream_kind,
            row.entity_field,
            row.starts_stream,
            row.moves_money,
        )
        for row in event_type_rows()
    }


async def test_every_security_definer_or_plpgsql_function_searches_pg_temp_last(
    store: EventStore, database: IsolatedDatabase
) -> None:
    """SQL helpers (the stripe hash, the payload check) read no table and are inlined
    into their callers, whose search path is pinned."""
    with app_connection(database.urls) as conn:
        rows = conn.execute(
            "SELECT p.proname, p.proconfig FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace "
            "JOIN pg_language l ON l.oid = p.prolang "
            "WHERE n.nspname = 'public' AND (p.prosecdef OR l.lanname = 'plpgsql')"
        ).fetchall()
    checked = {str(name) for name, _ in rows}
    assert {"ledger_append", "ledger_apply_money", "ledger_safe_horizon", "ledger_seal"} <= checked
    for name, config in rows:
        paths = [c for c in config or [] if c.startswith("search_path=")]
        assert paths, f"{name} runs with the caller's search_path"
        assert paths[0].replace(" ", "").endswith(",pg_temp"), f"{name}: {paths[0]}"


# --- rows 2 to 5 of the issue ---------------------------------------------------------------
async def test_a_posting_without_a_side_is_refused_and_moves_nothing(
    bank: dict[str, Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    """Row 2: it used to credit the payee a second time and break the zero sum."""
    reserved = bank["r"]
    before = await _positions(store)
    postings = [
        {"account_id": "alice", "side": "debit", "amount_minor": 1_000},
        {"account_id": "bob", "side": "credit", "amount_minor": 1_000},
        {"account_id": "bob", "amount_minor": 1_000_000},
    ]
    with app_connection(database.urls) as conn, pytest.raises(psycopg.Error) as refused:
        call(
            conn,
            stream_id=reserved.stream_id,
            event_type="PaymentSettled",
            payload=_settled_payload(reserved, postings),
        )
    assert refused.value.sqlstate == "PS007"
    assert await _positions(store) == before
    await assert_invariants(store)


@pytest.mark.parametrize(
    ("postings", "fee_minor", "why"),
    [
        (
            [
                {"account_id": "alice", "side": None, "amount_minor": 1000},
                {"account_id": "bob", "side": "credit", "amount_minor": 1000},
            ],
            0,
            "null side",
        ),
        (
            [
                {"account_id": "alice", "side": "DEBIT", "amount_minor": 1000},
                {"account_id": "bob", "side": "credit", "amount_minor": 1000},
            ],
            0,
            "unknown side",
        ),
        (
            [
                {"account_id": "alice", "side": "debit", "amount_minor": -1000},
                {"account_id": "bob", "side": "credit", "amount_minor": -1000},
            ],
            0,
            "negative",
        ),
        (
            [
                {"account_id": "alice", "side": "debit", "amount_minor": "1000"},
                {"account_id": "bob", "side": "credit", "amount_minor": 1000},
            ],
            0,
            "string amount",
        ),
        (
            [
                {"account_id": "alice", "side": "debit", "amount_minor": 1000},
                {"account_id": "bob", "side": "credit", "amount_minor": 1000, "memo": "x"},
            ],
            0,
            "extra field",
        ),
        (
            [
                {"account_id": "bob", "side": "debit", "amount_minor": 1000},
                {"account_id": "alice", "side": "credit", "amount_minor": 1000},
            ],
            0,
            "payee debited",
        ),
        (
            [
                {"account_id": "alice", "side": "debit", "amount_minor": 2000},
                {"account_id": "bob", "side": "credit", "amount_minor": 2000},
            ],
            0,
            "more than the hold",
        ),
        (
            [
                {"account_id": "alice", "side": "debit", "amount_minor": 1000},
                {"account_id": "bob", "side": "credit", "amount_minor": 900},
            ],
            0,
            "unbalanced",
        ),
        (
            [
                {"account_id": "alice", "side": "debit", "amount_minor": 1000},
                {"account_id": "bob", "side": "credit", "amount_minor": 900},
                {"account_id": "carol", "side": "credit", "amount_minor": 100},
            ],
            100,
            "a third party credited",
        ),
        (
            [
                {"account_id": "alice", "side": "debit", "amount_minor": 1000},
                {"account_id": "bob", "side": "credit", "amount_minor": 900},
                {"account_id": "fees", "side": "credit", "amount_minor": 100},
            ],
            0,
            "fee_minor lies",
        ),
        (
            [
                {"account_id": "alice", "side": "debit", "amount_minor": 1000},
                {"account_id": "fees", "side": "credit", "amount_minor": 1000},
            ],
            1000,
            "payee not credited",
        ),
        (
            [
                {"account_id": "alice", "side": "debit", "amount_minor": 1000},
                {"account_id": "alice", "side": "credit", "amount_minor": 1000},
            ],
            0,
            "payer credited",
        ),
        (
            [
                {"account_id": "alice", "side": "debit", "amount_minor": 1000},
                {"account_id": "ghost", "side": "credit", "amount_minor": 1000},
            ],
            0,
            "unknown account",
        ),
    ],
)
async def test_every_malformed_or_dishonest_posting_is_refused(
    bank: dict[str, Payment],
    store: EventStore,
    database: IsolatedDatabase,
    postings: list[Any],
    fee_minor: int,
    why: str,
) -> None:
    reserved = bank["r"]
    before = await _positions(store)
    with app_connection(database.urls) as conn, pytest.raises(psycopg.Error) as refused:
        call(
            conn,
            stream_id=reserved.stream_id,
            event_type="PaymentSettled",
            payload=_settled_payload(reserved, postings, fee_minor),
        )
    assert refused.value.sqlstate in ("PS007", "PS009"), why
    assert await _positions(store) == before, why
    await assert_invariants(store)


async def test_an_honest_settlement_with_a_fee_is_accepted(
    bank: dict[str, Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    """The positive space: the same checks let the real thing through."""
    reserved = bank["r"]
    postings = [
        {"account_id": "alice", "side": "debit", "amount_minor": 1000},
        {"account_id": "bob", "side": "credit", "amount_minor": 900},
        {"account_id": "fees", "side": "credit", "amount_minor": 100},
    ]
    with app_connection(database.urls) as conn:
        row = call(
            conn,
            stream_id=reserved.stream_id,
            event_type="PaymentSettled",
            payload=_settled_payload(reserved, postings, 100),
        )
    assert row is not None and row[5] is True and row[10] == "settled"
    assert (await store.get_position("fees")).credits_posted == 100
    await assert_invariants(store)


async def test_the_application_role_cannot_insert_an_event_around_the_function(
    bank: dict[str, Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    """Row 3: a PaymentSettled INSERTed straight into events made the API say SETTLED."""
    with app_connection(database.urls) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(
            "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version,"
            " payload, actor, recorded_at, prev_hash, hash) VALUES (%s, 4, %s, 'PaymentSettled',"
            " 1, '{}', 'mallory', now(), decode(repeat('00', 32), 'hex'),"
            " decode(repeat('00', 32), 'hex'))",
            (bank["r"].stream_id, uuid.uuid4()),
        )
    with app_connection(database.urls) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT nextval('events_global_seq')")
    head = await store.stream_head(bank["r"].stream_id)
    assert head is not None and head.state == "reserved"
    await assert_invariants(store)


async def test_transitions_cannot_be_forged(
    bank: dict[str, Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    """Row 4: the caller used to hand the function its allowed transitions."""
    reserved = bank["r"]
    decline = {
        "payment_id": reserved.payment_id,
        "declined_by": "risk",
        "reason": "forged",
        "rule": None,
    }
    with app_connection(database.urls) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            conn.execute(
                "SELECT * FROM ledger_append(%s, %s, 'PaymentDeclined', 1, %s::jsonb, "
                "decode(repeat('00', 32), 'hex'), 'mallory', NULL, NULL, NULL, "
                "ARRAY['reserved'], ARRAY['declined'], NULL)",
                (uuid.uuid4(), reserved.stream_id, json.dumps(decline)),
            )
        with pytest.raises(psycopg.Error) as refused:
            call(conn, stream_id=reserved.stream_id, event_type="PaymentDeclined", payload=decline)
    assert refused.value.sqlstate == "PS001"
    head = await store.stream_head(reserved.stream_id)
    assert head is not None and head.state == "reserved"
    await assert_invariants(store)


async def test_temporary_tables_cannot_shadow_the_ledgers(
    bank: dict[str, Payment], store: EventStore, database: IsolatedDatabase
) -> None:
    """Row 5: a temporary `events` table made the function place a hold for a payment that
    exists nowhere."""
    ghost = "ghost-payment"
    before = await _positions(store)
    with app_connection(database.urls) as conn:
        conn.execute("CREATE TEMPORARY TABLE events (LIKE public.events)")
        conn.execute("CREATE TEMPORARY TABLE streams (LIKE public.streams)")
        conn.execute(
            "INSERT INTO pg_temp.events (global_seq, stream_id, stream_version, event_id, "
            "event_type, schema_version, payload, actor, recorded_at, tx_id, prev_hash, hash, "
            "hash_scheme) VALUES (1, %s, 1, %s, 'PaymentInitiated', 1, %s, 'mallory', now(), "
            "pg_current_xact_id(), decode(repeat('00', 32), 'hex'), "
            "decode(repeat('00', 32), 'hex'), 2)",
            (
                f"payment-{ghost}",
                uuid.uuid4(),
                json.dumps(
                    {
                        "payment_id": ghost,
                        "payer_account_id": "alice",
                        "payee_account_id": "bob",
                        "amount_minor": 5_000,
                        "currency": "EUR",
                        "reference": None,
                        "metadata": {},
                    }
                ),
            ),
        )
        conn.execute(
            "INSERT INTO pg_temp.streams VALUES (%s, 2, 'authorized', "
            "decode(repeat('00', 32), 'hex'), 1)",
            (f"payment-{ghost}",),
        )
        hold = {
            "payment_id": ghost,
            "payer_account_id": "alice",
            "payee_account_id": "bob",
            "amount_minor": 5_000,
            "currency": "EUR",
            "expires_at": "2030-01-01T00:00:00Z",
        }
        with pytest.raises(psycopg.Error) as refused:
            call(conn, stream_id=f"payment-{ghost}", event_type="FundsReserved", payload=hold)
    assert refused.value.sqlstate == "PS001"
    assert await _positions(store) == before
    assert await store.stream_head(f"payment-{ghost}") is None
    await assert_invariants(store)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda p: p.pop("currency"), "a missing field"),
        (lambda p: p.update(currency=None), "a null field"),
        (lambda p: p.update(memo="x"), "an unknown field"),
        (lambda p: p.update(amount_minor=10.5), "a fraction"),
        (lambda p: p.update(amount_minor=2**70), "beyond int64"),
        (lambda p: p.update(amount_minor=0), "zero"),
        (lambda p: p.update(currency="eur"), "a malformed currency"),
        (lambda p: p.update(payment_id="someone-else"), "another payment's id"),
        (lambda p: p.update(payee_account_id="alice"), "payer as payee"),
        (lambda p: p.update(metadata={"rate": 1.5}), "a float in metadata"),
        (lambda p: p.update(reference="x" * 201), "an over-long reference"),
    ],
)
async def test_a_malformed_payload_is_refused_whatever_the_caller(
    store: EventStore, database: IsolatedDatabase, change: Any, why: str
) -> None:
    payment_id = f"p-{uuid.uuid4().hex[:8]}"
    payload = {
        "payment_id": payment_id,
        "payer_account_id": "alice",
        "payee_account_id": "bob",
        "amount_minor": 100,
        "currency": "EUR",
        "reference": None,
        "metadata": {},
    }
    change(payload)
    with app_connection(database.urls) as conn, pytest.raises(psycopg.Error) as refused:
        call(
            conn,
            stream_id=f"payment-{payment_id}",
            event_type="PaymentInitiated",
            payload=payload,
        )
    assert refused.value.sqlstate in ("PS009", "PS007"), why
    assert await store.stream_head(f"payment-{payment_id}") is None


# --- hostile arguments, at random -----------------------------------------------------------
EVENT_TYPES = [row.event_type for row in event_type_rows()]
STREAMS = ("i", "a", "r", "s", "new", "account", "risk", "recon", "junk")
_JUNK: list[Any] = [
    None,
    0,
    -1,
    2**63,
    2**64,
    1.5,
    "",
    "x" * 600,
    "DEBIT",
    [],
    {},
    True,
    "2030-13-45T00:00:00Z",
]
_JUNK_VALUES = st.sampled_from(_JUNK)


def _valid_payload(event_type: str, payment: Payment, account_id: str) -> dict[str, Any]:
    """A well-formed payload of this type for this payment (or account)."""
    base = {"payment_id": payment.payment_id}
    terms = {
        "payer_account_id": payment.payer,
        "payee_account_id": payment.payee,
        "amount_minor": payment.amount_minor,
        "currency": payment.currency,
    }
    shapes: dict[str, dict[str, Any]] = {
        "AccountOpened": {
            "account_id": account_id,
            "currency": "EUR",
            "kind": "customer",
            "overdraft_limit_minor": 0,
            "metadata": {},
        },
        "PaymentInitiated": {**base, **terms, "reference": None, "metadata": {}},
        "PaymentAuthorized": {**base, "authorization_id": "auth-x", "processor": "sim"},
        "FundsReserved": {**base, **terms, "expires_at": "2030-01-01T00:00:00Z"},
        "PaymentSettled": {
            **base,
            "currency": payment.currency,
            "postings": [
                {
                    "account_id": payment.payer,
                    "side": "debit",
                    "amount_minor": payment.amount_minor,
                },
                {
                    "account_id": payment.payee,
                    "side": "credit",
                    "amount_minor": payment.amount_minor,
                },
            ],
            "fee_minor": 0,
        },
        "PaymentDeclined": {**base, "declined_by": "risk", "reason": "x", "rule": None},
        "ApprovalRequested": {
            **base,
            "threshold_minor": 1,
            "deadline_at": "2030-01-01T00:00:00Z",
        },
        "PaymentApproved": {**base, "approved_by": "ops", "note": None},
        "PaymentRejected": {**base, "rejected_by": "ops", "reason": "x"},
        "FundsReleased": {**base, "amount_minor": payment.amount_minor, "reason": "x"},
        "AuthorizationVoided": {**base, "authorization_id": "auth-x", "reason": "x"},
        "PaymentFailed": {**base, "step": "x", "reason": "x"},
        "PaymentCancelled": {**base, "step": "x", "reason": "x", "cancelled_by": "ops"},
        "RiskAlertRaised": {
            **base,
            "account_id": "alice",
            "rule": "velocity",
            "trigger_seq": 1,
            "reason": "x",
        },
        "DiscrepancyDetected": {
            "run_id": "run-1",
            "discrepancy_id": "d-1",
            "discrepancy_type": "missing_in_ledger",
            "payment_id": payment.payment_id,
            "reference": payment.payment_id,
            "statement_amount_minor": payment.amount_minor,
            "statement_currency": payment.currency,
            "ledger_amount_minor": None,
            "ledger_currency": None,
            "statement_line_id": 1,
            "ledger_seq": None,
            "description": "x",
        },
        "ReconciliationCompleted": {
            "run_id": "run-1",
            "kind": "manual",
            **dict.fromkeys(
                (
                    "lines_matched",
                    "items_matched",
                    "lines_unmatched",
                    "items_unmatched",
                    "discrepancies",
                    "missing_in_ledger",
                    "missing_in_statement",
                    "amount_mismatch",
                    "currency_mismatch",
                    "duplicate_in_statement",
                    "internal_drift",
                    "line_checkpoint",
                    "item_checkpoint",
                ),
                0,
            ),
        },
        "DiscrepancyResolved": {
            "run_id": "run-1",
            "discrepancy_id": "d-1",
            "resolution": "accepted",
            "note": "x",
            "resolved_by": "ops",
            "evidence_line_id": None,
        },
    }
    return copy.deepcopy(shapes[event_type])


# What each target stream may take next, so that many calls get past the state machine
# and reach the payload and money rules.
NEXT_TYPES = {
    "i": ["PaymentAuthorized", "PaymentDeclined", "PaymentFailed", "PaymentCancelled"],
    "a": ["FundsReserved", "ApprovalRequested", "AuthorizationVoided"],
    "r": ["PaymentSettled", "PaymentSettled", "FundsReleased"],
    "s": ["PaymentSettled", "FundsReleased", "FundsReserved"],
    "new": ["PaymentInitiated"],
    "account": ["AccountOpened"],
    "risk": ["RiskAlertRaised"],
    "recon": ["DiscrepancyDetected", "ReconciliationCompleted", "DiscrepancyResolved"],
    "junk": ["PaymentInitiated"],
}


@st.composite
def hostile_calls(draw: st.DrawFn) -> dict[str, Any]:
    target = draw(st.sampled_from(STREAMS))
    event_type = draw(
        st.one_of(
            st.sampled_from(NEXT_TYPES[target]),
            st.sampled_from(NEXT_TYPES[target]),
            st.sampled_from([*EVENT_TYPES, "MoneyPrinted", ""]),
        )
    )
    mutation = draw(
        st.sampled_from(
            [
                *("none", "none", "drop", "junk", "extra"),
                *("postings", "postings", "amount", "entity", "not-object"),
            ]
        )
    )
    return {
        "event_type": event_type,
        "target": target,
        "mutation": mutation,
        "field_index": draw(st.integers(0, 10)),
        "junk": draw(_JUNK_VALUES),
        "posting_index": draw(st.integers(0, 3)),
        "posting_change": draw(
            st.sampled_from(["drop-side", "null-side", "flip-side", "double", "ghost", "fees"])
        ),
        "reuse_event_id": draw(st.sampled_from([False, False, False, True])),
        "schema_version": draw(st.sampled_from([1] * 8 + [2, 0, None])),
        "actor": draw(st.sampled_from(["mallory"] * 8 + ["", "m" * 300, None])),
        "expected_version": draw(st.sampled_from([None] * 8 + [0, 1, 3, -1])),
        "shadow": draw(st.booleans()),
    }


def _build(
    spec: dict[str, Any], bank: dict[str, Payment], existing_ids: list[uuid.UUID]
) -> dict[str, Any]:
    target = spec["target"]
    fresh = Payment(bank["i"].store, "alice", "bob", 700)
    payment = bank.get(target, fresh)
    stream_id = {
        "new": fresh.stream_id,
        "account": "account-mallory",
        "risk": "risk-alice",
        "recon": "recon-run-1",
        "junk": "payment-../../etc",
    }.get(target, payment.stream_id)
    event_type = spec["event_type"]
    payload: Any = (
        _valid_payload(event_type, payment, "mallory") if event_type in EVENT_TYPES else {}
    )
    keys = sorted(payload) if isinstance(payload, dict) else []
    mutation = spec["mutation"]
    if mutation == "drop" and keys:
        payload.pop(keys[spec["field_index"] % len(keys)])
    elif mutation == "junk" and keys:
        payload[keys[spec["field_index"] % len(keys)]] = spec["junk"]
    elif mutation == "extra":
        payload["extra"] = spec["junk"]
    elif mutation == "amount" and "amount_minor" in payload:
        payload["amount_minor"] = spec["junk"]
    elif mutation == "entity" and keys:
        payload[keys[0]] = "someone-else"
    elif mutation == "not-object":
        payload = [payload]
    elif mutation == "postings" and "postings" in payload:
        postings = payload["postings"]
        posting = postings[spec["posting_index"] % len(postings)]
        change = spec["posting_change"]
        if change == "drop-side":
            posting.pop("side")
        elif change == "null-side":
            posting["side"] = None
        elif change == "flip-side":
            posting["side"] = "credit" if posting["side"] == "debit" else "debit"
        elif change == "double":
            postings.append(dict(posting))
        elif change == "ghost":
            posting["account_id"] = "ghost"
        elif change == "fees":
            postings.append({"account_id": "fees", "side": "credit", "amount_minor": 1})
    event_id = (
        existing_ids[spec["field_index"] % len(existing_ids)]
        if spec["reuse_event_id"] and existing_ids
        else uuid.uuid4()
    )
    return {
        "stream_id": stream_id,
        "event_type": event_type,
        "payload": payload,
        "event_id": event_id,
        "schema_version": spec["schema_version"],
        "actor": spec["actor"],
        "expected_version": spec["expected_version"],
    }


_SHADOW = "CREATE TEMPORARY TABLE IF NOT EXISTS {table} (LIKE public.{table} INCLUDING DEFAULTS)"


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=st.lists(hostile_calls(), min_size=1, max_size=8))
async def test_hostile_calls_never_break_an_invariant(
    pg_server: PostgresServer, calls: list[dict[str, Any]]
) -> None:
    with pg_server.database() as db:
        store = await open_store(db.urls, pool_size=2)
        try:
            await open_account(store, "alice")
            await open_account(store, "bob", kind="merchant")
            await open_account(store, "fees", kind="fees")
            await open_account(store, "carol", currency="USD")
            await fund(store, "alice", 10_000)
            bank = {name: Payment(store, "alice", "bob", 1_000) for name in ("i", "a", "r", "s")}
            await bank["i"].run("initiated")
            await bank["a"].run("initiated", "authorized")
            await bank["r"].run("initiated", "authorized", "reserved")
            await bank["s"].settle_fully()
            existing_ids = [e.event_id for e in await store.read_range(after_seq=0, limit=100)]
            with app_connection(db.urls) as conn:
                for spec in calls:
                    if spec["shadow"]:
                        for table in ("events", "streams", "accounts", "positions"):
                            conn.execute(_SHADOW.format(table=table))
                    refusal = refusal_of(conn, **_build(spec, bank, existing_ids))
                    event(f"{spec['event_type']}/{spec['mutation']}: {refusal or 'appended'}")
                    # A refusal is the ledger's own (class PS), or a data or integrity
                    # error the database raises before any row moves: never anything else.
                    assert refusal is None or refusal[:2] in ("PS", "22", "23"), refusal
                    await assert_invariants(store)
        finally:
            await store.close()
