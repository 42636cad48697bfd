"""The real `paysaga api` process over HTTP: a payment end to end, a retry after the
process was killed mid-request, metrics on their own address, and a schemathesis run."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error, response_schema_conformance
from sqlalchemy import text
from temporalio.client import Client

from api.idempotency import IN_FLIGHT_LEASE_S, derived_id
from ledger.events import payment_stream
from ledger.store import EventStore
from paysaga.settings import Settings
from tests.harness.api import make_keys
from tests.harness.ledger import fund, open_account
from tests.harness.processes import Services, api_and_worker, service_env, start_api, stop
from tests.harness.saga import wait_for
from tests.harness.stack import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    with api_and_worker(settings) as running:
        yield running


@pytest.fixture
async def keys(owner_engine, settings: Settings) -> dict[str, str]:
    return await make_keys(owner_engine, settings.api_key_secret.get_secret_value())


async def test_a_payment_settles_through_the_real_api_process(
    services: Services, keys: dict[str, str], store: EventStore
) -> None:
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await fund(store, "alice", 10_000)
    headers = {"Authorization": f"Bearer {keys['client']}", "Idempotency-Key": str(uuid.uuid4())}
    async with httpx.AsyncClient(base_url=services.url, timeout=40) as http:
        response = await http.post(
            "/v1/payments",
            params={"wait": "settled"},
            json={
                "payer_account_id": "alice",
                "payee_account_id": "bob",
                "amount_minor": 4_200,
                "currency": "EUR",
            },
            headers=headers,
        )
        assert response.status_code == 202, response.text
        payment = response.json()
        assert payment["status"] == "SETTLED"
        read = await http.get(
            payment["status_url"], headers={"Authorization": headers["Authorization"]}
        )
        assert read.json()["status"] == "SETTLED"
        bob = await http.get(
            "/v1/accounts/bob", headers={"Authorization": headers["Authorization"]}
        )
        assert bob.json()["position"]["posted"] == 4_200
        assert response.headers["X-Request-Id"]


# A retry after the API died mid-request is answered within the dead request's lease,
# plus a generous margin for a loaded machine: seconds, not the minute it used to be.
TAKEOVER_WITHIN_S = IN_FLIGHT_LEASE_S + 10.0
SLOW_PAYMENT_S = 6


async def test_a_retry_after_the_api_was_killed_mid_request_finishes_the_same_payment(
    services: Services, keys: dict[str, str], store: EventStore, temporal_client: Client
) -> None:
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await fund(store, "alice", 10_000)
    idempotency_key = str(uuid.uuid4())
    payment_id = derived_id("pay", keys["client"].split("_")[1], idempotency_key)
    headers = {"Authorization": f"Bearer {keys['client']}", "Idempotency-Key": idempotency_key}
    body = {
        "payer_account_id": "alice",
        "payee_account_id": "bob",
        "amount_minor": 4_200,
        "currency": "EUR",
        "metadata": {"simulate": "slow", "simulate_delay_s": SLOW_PAYMENT_S},
    }
    async with httpx.AsyncClient(base_url=services.url, timeout=40) as http:
        interrupted = asyncio.create_task(
            http.post("/v1/payments", params={"wait": "settled"}, json=body, headers=headers)
        )

        async def started() -> bool:
            return bool(await store.read_stream(payment_stream(payment_id)))

        await wait_for(started, what="the workflow to start")
        services.kill_api()
        with pytest.raises(httpx.TransportError):
            await interrupted
    await asyncio.to_thread(services.restart_api)
    restarted_at = time.monotonic()

    async with httpx.AsyncClient(base_url=services.url, timeout=40) as http:
        other = await http.post("/v1/payments", json={**body, "amount_minor": 1}, headers=headers)
        assert other.status_code == 422, other.text
        assert other.json()["code"] == "idempotency_key_reused"
        while True:
            retried = await http.post(
                "/v1/payments", params={"wait": "settled"}, json=body, headers=headers
            )
            if retried.status_code != 409:
                break
            assert time.monotonic() - restarted_at < TAKEOVER_WITHIN_S, "the key stayed held"
            await asyncio.sleep(float(retried.headers["Retry-After"]))
        assert retried.status_code == 202, retried.text
        assert retried.json()["id"] == payment_id
        assert retried.json()["status"] == "SETTLED"

    async with store.engine.connect() as conn:
        initiated = (
            await conn.execute(
                text(
                    "SELECT stream_id FROM events WHERE event_type = 'PaymentInitiated' "
                    "AND payload->>'payer_account_id' = 'alice'"
                )
            )
        ).scalars()
        assert list(initiated) == [payment_stream(payment_id)]
    runs = [
        run async for run in temporal_client.list_workflows(f'WorkflowId="payment-{payment_id}"')
    ]
    assert len(runs) == 1
    assert (await store.get_position("bob")).credits_posted == 4_200


def test_metrics_can_be_served_on_an_address_of_their_own(settings: Settings) -> None:
    api_port, metrics_port = free_port(), free_port()
    api = start_api(
        service_env(
            settings, PAYSAGA_API_PORT=str(api_port), PAYSAGA_METRICS_PORT=str(metrics_port)
        )
    )
    try:
        assert httpx.get(f"http://127.0.0.1:{api_port}/healthz").status_code == 200
        on_the_api = httpx.get(f"http://127.0.0.1:{api_port}/metrics")
        assert on_the_api.status_code == 404
        assert on_the_api.json()["code"] == "not_found"
        apart = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert apart.status_code == 200
        assert 'paysaga_http_requests_total{method="GET",route="/healthz",status="200"}' in (
            apart.text
        )
        assert 'route="/metrics",status="404"' in apart.text
    finally:
        stop(api)


SCHEMATHESIS_EXAMPLES_PER_OPERATION = 25


def test_the_api_never_answers_5xx_and_matches_its_schema(
    services: Services, keys: dict[str, str]
) -> None:
    """Schemathesis over every operation: generated (and mostly invalid) requests must
    never get a 5xx, and every response must match the OpenAPI schema."""
    schema = schemathesis.openapi.from_url(f"{services.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 12
    for operation in operations:
        _fuzz(
            operation, keys["ops" if operation.path.endswith(("/approve", "/reject")) else "client"]
        )


def _fuzz(operation, api_key: str) -> None:
    """A bounded hypothesis run over one operation."""

    @given(case=operation.as_strategy())
    @hypothesis_settings(
        max_examples=SCHEMATHESIS_EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def check(case) -> None:
        # A real key, so that routes are exercised past authentication; a fresh
        # Idempotency-Key, so that creations are attempted rather than replayed.
        headers = {
            "Authorization": f"Bearer {api_key}",
            "Idempotency-Key": str(uuid.uuid4()),
        }
        case.call_and_validate(
            headers=headers,
            checks=[not_a_server_error, response_schema_conformance],
            timeout=45,
        )

    check()
