"""Bad input: a clear 4xx problem, and nothing created: no workflow, no ledger row, no key."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from temporalio.client import Client

from ledger.store import EventStore
from tests.harness.api import Api

BODY: dict[str, Any] = {
    "payer_account_id": "alice",
    "payee_account_id": "bob",
    "amount_minor": 250,
    "currency": "EUR",
}


@pytest.fixture
async def bank(api: Api) -> Api:
    await api.open_account("alice")
    await api.open_account("bob", kind="merchant")
    await api.open_account("yen", currency="JPY")
    await api.open_account("yen2", currency="JPY")
    return api


async def _footprint(store: EventStore, client: Client, task_queue: str) -> tuple[int, int, int]:
    async with store.engine.connect() as conn:
        events = (await conn.execute(text("SELECT count(*) FROM events"))).scalar_one()
        keys = (await conn.execute(text("SELECT count(*) FROM idempotency_keys"))).scalar_one()
    workflows = len([wf async for wf in client.list_workflows(f'TaskQueue="{task_queue}"')])
    return int(events), int(keys), workflows


CASES: list[tuple[str, dict[str, Any], str]] = [
    ("zero amount", {"amount_minor": 0}, "amount_minor"),
    ("negative amount", {"amount_minor": -5}, "amount_minor"),
    ("fractional amount", {"amount_minor": 12.5}, "amount_minor"),
    ("float amount", {"amount_minor": 250.0}, "amount_minor"),
    ("string amount", {"amount_minor": "250"}, "amount_minor"),
    ("boolean amount", {"amount_minor": True}, "amount_minor"),
    ("beyond int64", {"amount_minor": 2**63}, "amount_minor"),
    ("unknown currency", {"currency": "ZZZ"}, "currency"),
    ("lowercase currency", {"currency": "eur"}, "currency"),
    ("currency without minor unit", {"currency": "XAU"}, "currency"),
    ("currency unlike the accounts'", {"currency": "USD"}, "payer_account_id"),
    ("same payer and payee", {"payee_account_id": "alice"}, "body"),
    ("unknown payer", {"payer_account_id": "nobody"}, "payer_account_id"),
    ("unknown payee", {"payee_account_id": "nobody"}, "payee_account_id"),
    ("malformed account id", {"payee_account_id": "no spaces allowed"}, "payee_account_id"),
    ("reference too long", {"reference": "r" * 201}, "reference"),
    ("too many metadata keys", {"metadata": {f"k{i}": i for i in range(51)}}, "metadata"),
    ("metadata too large", {"metadata": {"blob": "x" * 5000}}, "metadata"),
    ("a float in metadata", {"metadata": {"rate": 1.5}}, "metadata"),
    ("an unknown field", {"priority": "high"}, "priority"),
    ("a missing field", {"currency": None}, "currency"),
]


@pytest.mark.parametrize(("name", "change", "field"), CASES, ids=[c[0] for c in CASES])
async def test_bad_payment_input_is_a_422_naming_the_field_and_changes_nothing(
    bank: Api,
    store: EventStore,
    payments,
    task_queue: str,
    name: str,
    change: dict[str, Any],
    field: str,
) -> None:
    before = await _footprint(store, payments.client, task_queue)
    body = {k: v for k, v in {**BODY, **change}.items() if v is not None}
    response = await bank.post("/v1/payments", body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert {"type", "title", "status", "detail", "code"} <= problem.keys()
    assert problem["status"] == 422
    fields = [error["field"] for error in problem["errors"]]
    assert any(f == field or f.startswith(field) for f in fields), fields
    assert await _footprint(store, payments.client, task_queue) == before


async def test_an_exponent_zero_currency_still_takes_integer_minor_units(
    bank: Api, store: EventStore
) -> None:
    from tests.harness.ledger import fund

    await fund(store, "yen", 5_000, currency="JPY")
    ok = await bank.pay("yen", "yen2", 500, currency="JPY")
    assert ok.json()["status"] == "SETTLED"
    assert (await bank.get("/v1/accounts/yen2")).json()["position"]["posted"] == 500
    fractional = await bank.post(
        "/v1/payments",
        {
            **BODY,
            "payer_account_id": "yen",
            "payee_account_id": "yen2",
            "currency": "JPY",
            "amount_minor": 1.5,
        },
    )
    assert fractional.status_code == 422


async def test_malformed_json_is_a_400(
    bank: Api, store: EventStore, payments, task_queue: str
) -> None:
    before = await _footprint(store, payments.client, task_queue)
    response = await bank.http.post(
        "/v1/payments",
        content=b'{"payer_account_id": "alice", ',
        headers={
            **bank.headers(),
            "Idempotency-Key": str(uuid.uuid4()),
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 400
    assert response.json()["code"] == "malformed_json"
    assert await _footprint(store, payments.client, task_queue) == before


async def test_an_oversized_body_is_a_413(
    bank: Api, store: EventStore, payments, task_queue: str
) -> None:
    before = await _footprint(store, payments.client, task_queue)
    huge = json.dumps({**BODY, "reference": "x" * 70_000}).encode()
    response = await bank.http.post(
        "/v1/payments",
        content=huge,
        headers={
            **bank.headers(),
            "Idempotency-Key": str(uuid.uuid4()),
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large"
    assert response.headers["X-Request-Id"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * 4096

    streamed = await bank.http.post(
        "/v1/payments",
        content=chunks(),
        headers={
            **bank.headers(),
            "Idempotency-Key": str(uuid.uuid4()),
            "Content-Type": "application/json",
        },
    )
    assert streamed.status_code == 413
    assert await _footprint(store, payments.client, task_queue) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"currency": "EUR", "kind": "wizard"}, "kind"),
        ({"currency": "EURO", "kind": "customer"}, "currency"),
        (
            {"currency": "EUR", "kind": "customer", "overdraft_limit_minor": -1},
            "overdraft_limit_minor",
        ),
        ({"currency": "EUR", "kind": "customer", "overdraft_limit_minor": None}, "body"),
        (
            {"currency": "EUR", "kind": "customer", "overdraft_limit_minor": "10"},
            "overdraft_limit_minor",
        ),
        ({"id": "bad id", "currency": "EUR", "kind": "customer"}, "id"),
    ],
)
async def test_bad_account_input_is_a_422_and_opens_nothing(
    bank: Api, store: EventStore, body: dict[str, Any], field: str
) -> None:
    async with store.engine.connect() as conn:
        accounts_before = (await conn.execute(text("SELECT count(*) FROM accounts"))).scalar_one()
    response = await bank.post("/v1/accounts", body)
    assert response.status_code == 422, response.text
    fields = [error["field"] for error in response.json()["errors"]]
    assert any(f == field or f.startswith(field) for f in fields), fields
    async with store.engine.connect() as conn:
        assert (
            await conn.execute(text("SELECT count(*) FROM accounts"))
        ).scalar_one() == accounts_before


# Strings PostgreSQL cannot store (U+0000) or that are not Unicode at all (a lone
# surrogate, which JSON can spell as "\ud800"), in every place a request can carry one.
UNSTORABLE_PAYMENTS: list[tuple[str, dict[str, Any], str]] = [
    ("NUL in reference", {"reference": "order\u00001"}, "reference"),
    ("surrogate in reference", {"reference": "\ud800"}, "reference"),
    ("NUL in a metadata value", {"metadata": {"note": "a\u0000"}}, "metadata.note"),
    ("NUL in a metadata key", {"metadata": {"k\u0000": "v"}}, "metadata.k\\u0000"),
    (
        "surrogate deep in metadata",
        {"metadata": {"lines": [{"sku": "x"}, {"sku": "\udfff"}]}},
        "metadata.lines.1.sku",
    ),
    ("surrogate in an unknown field's name", {"\udc80": "x"}, "\\udc80"),
    ("NUL in an account id", {"payee_account_id": "bob\u0000"}, "payee_account_id"),
]


async def _post_raw(api: Api, path: str, body: dict[str, Any], key: str) -> Any:
    """POST `body` as ASCII JSON: httpx itself cannot encode a lone surrogate."""
    return await api.http.post(
        path,
        content=json.dumps(body).encode(),
        headers={**api.headers(), "Idempotency-Key": key, "Content-Type": "application/json"},
    )


@pytest.mark.parametrize(
    ("name", "change", "field"), UNSTORABLE_PAYMENTS, ids=[c[0] for c in UNSTORABLE_PAYMENTS]
)
async def test_an_unstorable_character_in_a_payment_is_a_422_and_leaves_no_key(
    bank: Api,
    store: EventStore,
    payments,
    task_queue: str,
    name: str,
    change: dict[str, Any],
    field: str,
) -> None:
    """Row 13 of issue 8: a 500, and the key stuck in flight so that retries got 409."""
    before = await _footprint(store, payments.client, task_queue)
    key = str(uuid.uuid4())
    for _attempt in ("first", "retry"):
        response = await _post_raw(bank, "/v1/payments", {**BODY, **change}, key)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["code"] == "validation_failed"
        assert [error["field"] for error in problem["errors"]] == [field]
        assert "cannot be stored" in problem["errors"][0]["message"]
    assert await _footprint(store, payments.client, task_queue) == before
    # The key is free: the same key with a good body is a new payment.
    good = await bank.post("/v1/payments", BODY, idempotency_key=key)
    assert good.status_code == 202, good.text
    assert "Idempotent-Replayed" not in good.headers


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/v1/accounts",
            {"currency": "EUR", "kind": "customer", "metadata": {"a": "\u0000"}},
            "metadata.a",
        ),
        ("/v1/accounts", {"id": "carol\ud800", "currency": "EUR", "kind": "customer"}, "id"),
        ("/v1/payments/pay_x/cancel", {"reason": "no\u0000"}, "reason"),
        ("/v1/payments/pay_x/approve", {"note": "\ud83d"}, "note"),
        ("/v1/payments/pay_x/reject", {"reason": "\u0000"}, "reason"),
    ],
)
async def test_an_unstorable_character_in_any_request_body_is_a_422(
    bank: Api,
    store: EventStore,
    payments,
    task_queue: str,
    path: str,
    body: dict[str, Any],
    field: str,
) -> None:
    before = await _footprint(store, payments.client, task_queue)
    caller = "ops" if path.endswith(("/approve", "/reject")) else "client"
    response = await bank.http.post(
        path,
        content=json.dumps(body).encode(),
        headers={
            **bank.headers(caller),
            "Idempotency-Key": str(uuid.uuid4()),
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == [field]
    assert await _footprint(store, payments.client, task_queue) == before


async def test_an_unstorable_character_in_a_query_parameter_is_a_422(bank: Api) -> None:
    for params, field in (
        ({"account_id": "alice\u0000"}, "account_id"),
        ({"cursor": "\u0000"}, "cursor"),
    ):
        response = await bank.get("/v1/payments", params=params)
        assert response.status_code == 422, response.text
        assert [error["field"] for error in response.json()["errors"]] == [field]
