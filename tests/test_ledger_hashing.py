"""Hashes the verifier can recompute alone, and walks that never crash on bad data.

Scheme 2 hashes what PostgreSQL prints for an envelope as jsonb; `jsonb_text` must
print exactly the same for every value a payload can hold. Scheme 1 (revision 0002's
events) must stay verifiable, since stored events are never rewritten.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.db import to_libpq_url
from ledger.hashing import GENESIS_HASH, chain_hash, content_digest, jsonb_text
from ledger.store import EventStore
from ledger.verify import check_ledger, verify_chain
from tests.harness.ledger import Payment, fund, open_account
from tests.harness.postgres import IsolatedDatabase, PostgresServer
from tests.harness.stack import clean_env, paysaga

# Everything PostgreSQL can store in a jsonb string: no NUL, no lone surrogates.
storable_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
    max_size=20,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | storable_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(storable_text, children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_jsonb_text_prints_exactly_what_postgresql_prints(
    pg_server: PostgresServer, value: Any
) -> None:
    with psycopg.connect(to_libpq_url(pg_server.owner_url)) as conn:
        printed = conn.execute("SELECT %s::jsonb::text", (json.dumps(value),)).fetchone()
    assert printed is not None and printed[0] == jsonb_text(value)


def test_jsonb_text_refuses_what_the_ledger_never_holds() -> None:
    with pytest.raises(ValueError, match="no jsonb text"):
        jsonb_text({"rate": 1.5})


async def test_an_event_hashed_under_scheme_1_still_verifies(
    store: EventStore, database: IsolatedDatabase
) -> None:
    """An event written by revision 0002's function (content digest from the writer)."""
    await open_account(store, "alice")
    await open_account(store, "bob")
    stream_id, event_id = "payment-legacy", uuid.uuid4()
    payload = {
        "payment_id": "legacy",
        "payer_account_id": "alice",
        "payee_account_id": "bob",
        "amount_minor": 5,
        "currency": "EUR",
        "reference": None,
        "metadata": {},
    }
    with psycopg.connect(to_libpq_url(database.urls.owner_url), autocommit=True) as conn:
        seq, recorded_at = conn.execute(
            "SELECT nextval('events_global_seq'), date_trunc('milliseconds', now())"
        ).fetchone()  # type: ignore[misc]
        content = content_digest(
            scheme=1,
            stream_id=stream_id,
            event_id=event_id,
            event_type="PaymentInitiated",
            schema_version=1,
            payload=payload,
            actor="legacy",
            correlation_id=None,
            causation_id=None,
            attempt=None,
        )
        digest = chain_hash(
            GENESIS_HASH, content, global_seq=seq, stream_version=1, recorded_at=recorded_at
        )
        conn.execute(
            "INSERT INTO events (global_seq, stream_id, stream_version, event_id, event_type,"
            " schema_version, payload, actor, recorded_at, prev_hash, hash, hash_scheme)"
            " VALUES (%s, %s, 1, %s, 'PaymentInitiated', 1, %s, 'legacy', %s, %s, %s, 1)",
            (seq, stream_id, event_id, json.dumps(payload), recorded_at, GENESIS_HASH, digest),
        )
        conn.execute(
            "INSERT INTO streams VALUES (%s, 1, 'initiated', %s, %s)", (stream_id, digest, seq)
        )
    for report in (await verify_chain(store.engine), await check_ledger(store.engine)):
        assert report.ok, report.lines()


MALFORMED = {
    "a posting without a side": (
        "PaymentSettled",
        {
            "payment_id": "x",
            "currency": "EUR",
            "fee_minor": 0,
            "postings": [{"account_id": "bob", "amount_minor": 1_000_000}],
        },
    ),
    "a float": (
        "PaymentFailed",
        {"payment_id": "x", "step": "x", "reason": "x", "rate": 1.5},
    ),
    "an unknown event type": ("MoneyPrinted", {"amount_minor": 10**9}),
    "a missing field": ("PaymentAuthorized", {"payment_id": "x"}),
}


@pytest.mark.parametrize("what", sorted(MALFORMED))
async def test_malformed_data_is_a_named_violation_never_a_crash(
    store: EventStore, database: IsolatedDatabase, what: str
) -> None:
    """Only the owner can write such rows now; the walks must still report them."""
    await open_account(store, "alice")
    await open_account(store, "bob")
    await fund(store, "alice", 100)
    await Payment(store, "alice", "bob", 10).settle_fully()
    event_type, payload = MALFORMED[what]
    with psycopg.connect(to_libpq_url(database.urls.owner_url), autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version,"
            " payload, actor, recorded_at, prev_hash, hash, hash_scheme) VALUES"
            " ('payment-x', 1, %s, %s, 1, %s, 'mallory', %s, decode(repeat('00', 32), 'hex'),"
            " decode(repeat('11', 32), 'hex'), 2) RETURNING global_seq",
            (uuid.uuid4(), event_type, json.dumps(payload), datetime.now(UTC)),
        ).fetchone()
    assert row is not None
    bad_seq = row[0]
    for command in ("verify", "check"):
        result = _cli(database, command)
        assert result.returncode == 1, result.stdout
        assert f"first bad global_seq: {bad_seq}" in result.stdout, result.stdout
        assert "Traceback" not in result.stderr, result.stderr


def _cli(database: IsolatedDatabase, *args: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(DATABASE_URL=database.urls.owner_url)
    if database.urls.app_url:
        env["DATABASE_APP_URL"] = database.urls.app_url
    return paysaga("ledger", *args, env=env)
