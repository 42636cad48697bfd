"""API keys (401, 403, revocation, no key material in logs), the accounts routes, and the
`ops` scope that creating money needs."""

from __future__ import annotations

import io
import logging
import time
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.keys import revoke_api_key
from ledger.store import EventStore
from paysaga.logs import JsonFormatter
from paysaga.settings import Settings
from tests.harness.api import CALLERS, Api
from tests.harness.saga import Payments, wait_for

# Every protected route, and the scope it needs.
ROUTES: list[tuple[str, str, str]] = [
    ("POST", "/v1/accounts", "accounts:write"),
    ("GET", "/v1/accounts/alice", "accounts:read"),
    ("POST", "/v1/payments", "payments:write"),
    ("GET", "/v1/payments", "payments:read"),
    ("GET", "/v1/payments/pay_x", "payments:read"),
    ("GET", "/v1/payments/pay_x/events", "payments:read"),
    ("POST", "/v1/payments/pay_x/cancel", "payments:write|ops"),
    ("POST", "/v1/payments/pay_x/approve", "ops"),
    ("POST", "/v1/payments/pay_x/reject", "ops"),
    ("GET", "/v1/events", "payments:read|ops"),
]


@pytest.mark.parametrize(("method", "path", "scope"), ROUTES)
async def test_a_missing_or_invalid_key_is_401(
    api: Api, method: str, path: str, scope: str
) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer psk_000000000000_" + "A" * 43},
        {"Authorization": "Bearer not-a-key"},
    ):
        response = await api.http.request(method, path, headers=headers, json={})
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(("method", "path", "scope"), ROUTES)
async def test_the_wrong_scope_is_403(api: Api, method: str, path: str, scope: str) -> None:
    accepted = set(scope.split("|"))
    caller = next(name for name, scopes in CALLERS.items() if not scopes & accepted)
    response = await api.http.request(
        method, path, headers={**api.headers(caller), "Idempotency-Key": "k"}, json={}
    )
    assert response.status_code == 403, response.text
    assert response.json()["code"] == "insufficient_scope"


async def test_health_readiness_metrics_and_docs_need_no_key(api: Api) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert (await api.http.get(path)).status_code == 200, path


async def test_a_revoked_key_stops_working_within_the_cache_lifetime(
    api: Api, owner_engine: AsyncEngine, settings: Settings
) -> None:
    assert (await api.get("/v1/payments", caller="reader")).status_code == 200
    key_id = api.keys["reader"].split("_")[1]
    await revoke_api_key(owner_engine, key_id)
    revoked_at = time.monotonic()

    async def refused() -> bool:
        return (await api.get("/v1/payments", caller="reader")).status_code == 401

    await wait_for(refused, timeout_s=settings.api_key_cache_s + 2, what="the revocation")
    assert time.monotonic() - revoked_at <= settings.api_key_cache_s + 1
    response = await api.get("/v1/payments", caller="reader")
    assert response.json()["code"] == "invalid_api_key"


async def test_key_material_never_reaches_the_logs(api: Api) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("api"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.DEBUG)
    try:
        await api.get("/v1/payments")
        await api.http.get(
            "/v1/payments", headers={"Authorization": f"Bearer {api.keys['client']}x"}
        )
        await api.open_account(f"acct-{uuid.uuid4().hex[:6]}")
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
    logged = stream.getvalue()
    assert '"msg": "request"' in logged
    for key in api.keys.values():
        assert key not in logged
        assert key.split("_", 2)[2] not in logged


async def test_an_account_is_opened_and_read_with_its_position(api: Api) -> None:
    response = await api.post(
        "/v1/accounts",
        {
            "id": "alice",
            "currency": "EUR",
            "kind": "customer",
            "overdraft_limit_minor": 500,
            "metadata": {"tier": "gold"},
        },
    )
    assert response.status_code == 201
    assert response.headers["Location"] == "/v1/accounts/alice"
    account = response.json()
    assert (account["id"], account["currency"], account["kind"]) == ("alice", "EUR", "customer")
    assert account["metadata"] == {"tier": "gold"}
    assert account["position"] == {
        "debits_pending": 0,
        "debits_posted": 0,
        "credits_pending": 0,
        "credits_posted": 0,
        "posted": 0,
        "pending": 0,
        "available": 500,
        "as_of_seq": account["position"]["as_of_seq"],
    }
    read = await api.get("/v1/accounts/alice", caller="reader")
    assert read.status_code == 200 and read.json() == account


async def test_an_account_id_is_generated_when_not_given(api: Api) -> None:
    response = await api.post(
        "/v1/accounts",
        {"currency": "JPY", "kind": "external", "overdraft_limit_minor": None},
        caller="treasury",
    )
    assert response.status_code == 201
    account = response.json()
    assert account["id"].startswith("acct_")
    assert account["position"]["available"] is None  # unlimited


async def test_an_existing_account_id_is_409_and_an_unknown_one_404(api: Api) -> None:
    await api.open_account("alice")
    again = await api.post("/v1/accounts", {"id": "alice", "currency": "EUR", "kind": "customer"})
    assert again.status_code == 409
    assert again.json()["code"] == "account_exists"
    assert (await api.get("/v1/accounts/nobody")).status_code == 404
    assert (await api.get("/v1/accounts/no%20body")).status_code == 404


async def test_opening_an_account_is_idempotent(api: Api) -> None:
    key = str(uuid.uuid4())
    body = {"currency": "EUR", "kind": "merchant"}
    first = await api.post("/v1/accounts", body, idempotency_key=key)
    again = await api.post("/v1/accounts", body, idempotency_key=key)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"


async def _footprint(store: EventStore) -> tuple[int, int, int]:
    """Accounts, ledger events and idempotency keys: what a refused request must not add."""
    async with store.engine.connect() as conn:
        counts = [
            (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
            for table in ("accounts", "events", "idempotency_keys")
        ]
    return counts[0], counts[1], counts[2]


async def test_opening_an_external_account_needs_the_ops_scope(api: Api, store: EventStore) -> None:
    world = {"id": "world", "currency": "EUR", "kind": "external", "overdraft_limit_minor": None}
    before = await _footprint(store)
    key = str(uuid.uuid4())
    refused = await api.post("/v1/accounts", world, idempotency_key=key)
    assert refused.status_code == 403, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["code"] == "insufficient_scope"
    assert "ops" in refused.json()["detail"]
    # Even with a limit, an external account is a funding source: still refused.
    limited = await api.post("/v1/accounts", {**world, "overdraft_limit_minor": 10})
    assert limited.status_code == 403
    assert await _footprint(store) == before
    assert (await api.get("/v1/accounts/world")).status_code == 404

    opened = await api.post("/v1/accounts", world, caller="treasury", idempotency_key=key)
    assert opened.status_code == 201, opened.text
    assert opened.json()["kind"] == "external"


async def test_paying_out_of_an_external_account_needs_the_ops_scope(
    api: Api, store: EventStore, payments: Payments, task_queue: str
) -> None:
    """Row 1 of issue 8: a client key opened a funding account and paid itself from it."""
    await api.open_account("world", kind="external", overdraft_limit_minor=None, caller="treasury")
    await api.open_account("mallory")
    before = await _footprint(store)
    workflows_before = await _workflows(payments, task_queue)
    key = str(uuid.uuid4())
    minting = {
        "payer_account_id": "world",
        "payee_account_id": "mallory",
        "amount_minor": 999_999,
        "currency": "EUR",
    }
    refused = await api.post("/v1/payments", minting, idempotency_key=key)
    assert refused.status_code == 403, refused.text
    assert refused.json()["code"] == "insufficient_scope"
    assert await _footprint(store) == before
    assert await _workflows(payments, task_queue) == workflows_before
    mallory = (await api.get("/v1/accounts/mallory")).json()["position"]
    assert (mallory["posted"], mallory["pending"]) == (0, 0)

    funded = await api.pay("world", "mallory", 5_000, caller="treasury")
    assert funded.json()["status"] == "SETTLED", funded.text
    # Paying into an external account moves money out of the system: a client may.
    paid_out = await api.pay("mallory", "world", 1_000)
    assert paid_out.json()["status"] == "SETTLED", paid_out.text
    assert (await api.get("/v1/accounts/mallory")).json()["position"]["posted"] == 4_000


async def _workflows(payments: Payments, task_queue: str) -> int:
    return len([wf async for wf in payments.client.list_workflows(f'TaskQueue="{task_queue}"')])
