"""The real `paysaga api` process over HTTP: a payment end to end, and a schemathesis run."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from ledger.store import EventStore
from paysaga.settings import Settings
from tests.harness.api import make_keys
from tests.harness.ledger import fund, open_account
from tests.harness.processes import Services, api_and_worker

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
