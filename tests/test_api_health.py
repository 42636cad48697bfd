"""Health, readiness, docs and metrics, against the real database and Temporal."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import create_async_engine
from temporalio.client import Client

from api.app import create_app
from ledger.store import EventStore
from paysaga.settings import Settings


async def _serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://paysaga") as http:
            yield http


@pytest.fixture
async def http(
    settings: Settings, store: EventStore, temporal_client: Client
) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _serve(create_app(settings, store=store, temporal_client=temporal_client)):
        yield client


async def test_healthz_answers_without_a_key(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_reports_each_dependency(http: httpx.AsyncClient) -> None:
    response = await http.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"database", "temporal"}
    for check in body["checks"].values():
        assert check["ok"] is True
        assert isinstance(check["latency_ms"], int)
        assert "reason" not in check


async def test_readyz_is_503_and_names_the_database_when_it_is_down(
    settings: Settings,
    store: EventStore,
    temporal_client: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = create_async_engine(
        "postgresql+psycopg://nobody@127.0.0.1:9/none", connect_args={"connect_timeout": 1}
    )
    app = create_app(
        settings, store=EventStore(dead, store.appends), temporal_client=temporal_client
    )
    async for http in _serve(app):
        response = await http.get("/readyz")
    await dead.dispose()
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["database"]["ok"] is False
    assert body["checks"]["database"]["reason"] == "unreachable"
    assert isinstance(body["checks"]["database"]["latency_ms"], int)
    assert body["checks"]["temporal"]["ok"] is True
    _tells_nothing_of_the_error(response)
    # The full error goes to the API's log instead.
    logged = [r for r in caplog.records if r.getMessage() == "readiness check failed"]
    assert logged and logged[0].exc_info is not None
    assert isinstance(logged[0].exc_info[1], OperationalError)


async def test_readyz_is_503_and_names_temporal_when_it_is_unreachable(
    settings: Settings, store: EventStore
) -> None:
    unreachable = settings.model_copy(update={"temporal_address": "127.0.0.1:9"})
    async for http in _serve(create_app(unreachable, store=store)):
        response = await http.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["temporal"]["ok"] is False
    assert checks["temporal"]["reason"] == "unreachable"
    assert checks["database"]["ok"] is True
    _tells_nothing_of_the_error(response)


def _tells_nothing_of_the_error(response: httpx.Response) -> None:
    """No exception text: not its class, not the host, port or user it names."""
    for leak in ("Error", "Exception", "127.0.0.1", "nobody", "connect", "refused"):
        assert leak not in response.text, leak
    assert set(response.json()["checks"]["database"]) <= {"ok", "latency_ms", "reason"}


async def test_docs_and_openapi_are_served(http: httpx.AsyncClient) -> None:
    assert (await http.get("/docs")).status_code == 200
    schema = (await http.get("/openapi.json")).json()
    assert "/readyz" in schema["paths"]


async def test_metrics_count_requests_by_route_and_status(http: httpx.AsyncClient) -> None:
    await http.get("/healthz")
    await http.get("/no-such-route")
    text = (await http.get("/metrics")).text
    assert 'paysaga_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text
    assert 'route="<unmatched>",status="404"' in text
    assert "paysaga_http_request_duration_seconds_bucket" in text


async def test_a_lost_database_is_a_503_problem_not_a_crash(
    settings: Settings, store: EventStore, temporal_client: Client
) -> None:
    dead = create_async_engine(
        "postgresql+psycopg://nobody@127.0.0.1:9/none", connect_args={"connect_timeout": 1}
    )
    app = create_app(
        settings, store=EventStore(dead, store.appends), temporal_client=temporal_client
    )
    async for http in _serve(app):
        response = await http.get(
            "/v1/payments", headers={"Authorization": "Bearer psk_000000000000_" + "A" * 43}
        )
    await dead.dispose()
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "database_unavailable"
    assert response.headers["Retry-After"] == "1"


@pytest.mark.parametrize(
    ("variables", "problem"),
    [
        ({"PAYSAGA_METRICS_HOST": "127.0.0.1"}, "PAYSAGA_METRICS_PORT is not"),
        ({"PAYSAGA_METRICS_PORT": "8000"}, "must differ from PAYSAGA_API_PORT"),
        (
            {"PAYSAGA_METRICS_PORT": "8000", "PAYSAGA_METRICS_HOST": "0.0.0.0"},
            "must differ from PAYSAGA_API_PORT",
        ),
    ],
)
def test_metrics_apart_must_not_collide_with_the_api(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], problem: str
) -> None:
    for name in ("PAYSAGA_API_HOST", "PAYSAGA_API_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=problem):
        Settings(_env_file=None)


def test_metrics_stay_on_the_api_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PAYSAGA_METRICS_HOST", "PAYSAGA_METRICS_PORT", "PAYSAGA_API_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PAYSAGA_API_PORT", raising=False)
    settings = Settings(_env_file=None)
    assert settings.metrics_address is None
    assert settings.metrics_url == f"{settings.api_url}/metrics"
    monkeypatch.setenv("PAYSAGA_METRICS_PORT", "9464")
    settings = Settings(_env_file=None)
    assert settings.metrics_address == ("127.0.0.1", 9464)
    # `paysaga up`'s banner names this address, not the API's /metrics, which is a 404 now
    assert settings.metrics_url == "http://127.0.0.1:9464/metrics"
    monkeypatch.setenv("PAYSAGA_METRICS_HOST", "0.0.0.0")
    assert Settings(_env_file=None).metrics_url == "http://127.0.0.1:9464/metrics"
