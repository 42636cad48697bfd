"""The FastAPI application: assembled here, served by `paysaga api` (uvicorn)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.client import Client

from api import openapi_links, problems
from api.metrics import ApiMetrics, MetricsServer
from api.routers import accounts, console, events, health, payments, reconciliation, risk
from api.routers.reconciliation import STATEMENT_BYTES_MAX
from ledger.store import EventStore
from paysaga.db import open_store, service_urls
from paysaga.logs import request_id_var, request_ids_var
from paysaga.settings import Settings, get_settings
from paysaga.telemetry import instrument_api, tracer_provider, tracing_interceptors
from paysaga.temporal import LazyClient

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("paysaga.api")

BODY_BYTES_MAX = 64 * 1024
# A statement upload (multipart): the file and its envelope.
BODY_BYTES_MAX_BY_PATH = {"/v1/statements": STATEMENT_BYTES_MAX + 64 * 1024}
REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PAYMENT_METRICS_REFRESH_S = 10.0


class BodyLimit:
    """Refuse bodies over BODY_BYTES_MAX (413), declared or streamed, before parsing them.

    A body without a declared length is read (up to the limit) before the app sees it,
    then handed on: the app's own parsing would report an overflow as a 400.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = BODY_BYTES_MAX_BY_PATH.get(scope.get("path", ""), BODY_BYTES_MAX)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(scope, receive, send)
            return
        buffered: list[Message] = []
        received = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = BODY_BYTES_MAX_BY_PATH.get(scope.get("path", ""), BODY_BYTES_MAX)
        response = problems.problem_response(
            413, "body_too_large", f"request bodies are limited to {limit} bytes"
        )
        await response(scope, receive, send)


async def request_context(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Give every request an id (the caller's, if well-formed), echo it, and log once."""
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = incoming if _REQUEST_ID_PATTERN.match(incoming) else str(uuid.uuid4())
    token = request_id_var.set(request_id)
    bound: dict[str, str] = {}
    bound_token = request_ids_var.set(bound)
    started = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        response.headers[REQUEST_ID_HEADER] = request_id
        return response
    finally:
        route = getattr(request.scope.get("route"), "path", "<unmatched>")
        # Never the headers: they carry the API key.
        log.info(
            "request",
            extra={
                "method": request.method,
                "route": route,
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                "api_key_id": getattr(request.state, "api_key_id", None),
                # The payment (and its workflow) the route was about, if any.
                **bound,
            },
        )
        request_ids_var.reset(bound_token)
        request_id_var.reset(token)


async def _refresh_payment_metrics(app: FastAPI) -> None:
    while True:
        with contextlib.suppress(Exception):
            await app.state.metrics.refresh_payments(app.state.store)
            await app.state.metrics.refresh_ledger_lags(app.state.store)
            await app.state.metrics.refresh_read_model_lags(app.state.store)
            await app.state.metrics.refresh_discrepancies(
                app.state.store, app.state.settings.recon_discrepancy_alert_age_s
            )
        await asyncio.sleep(PAYMENT_METRICS_REFRESH_S)


def create_app(
    settings: Settings | None = None,
    *,
    store: EventStore | None = None,
    temporal_client: Client | None = None,
    tracing: TracerProvider | None = None,
) -> FastAPI:
    """The app. Tests pass their own store and client (and tracer provider, whose spans
    the client's interceptor must then share); `paysaga api` passes none of them, and
    tracing follows PAYSAGA_TRACING."""
    settings = settings or get_settings()
    owns_store = store is None
    owns_tracing = tracing is None
    if tracing is None:
        tracing = tracer_provider(settings, "api")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = store or await open_store(
            service_urls(settings), pool_size=settings.db_pool_size
        )
        app.state.temporal = LazyClient(
            settings, temporal_client, interceptors=tracing_interceptors(tracing)
        )
        apart = settings.metrics_address
        metrics_server = MetricsServer(app.state.metrics.registry, *apart) if apart else None
        refresher = asyncio.create_task(_refresh_payment_metrics(app))
        try:
            yield
        finally:
            if metrics_server is not None:
                await metrics_server.close()
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            if owns_store:
                await app.state.store.close()
            if owns_tracing and tracing is not None:
                # The last batch of spans; `paysaga api` then leaves through os._exit.
                await asyncio.to_thread(tracing.shutdown)

    app = FastAPI(
        title="paysaga",
        version="1",
        summary="Payments as durable Temporal workflows over an append-only event ledger.",
        description=(
            "Every route but health, readiness, metrics and docs needs "
            "`Authorization: Bearer <api key>`. Errors are `application/problem+json`. "
            "POSTs that create something need an `Idempotency-Key` header."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ApiMetrics()
    app.state.api_key_cache = {}
    problems.install(app)
    # Outermost last: every response, a 413 included, gets its request id and is counted.
    app.add_middleware(BodyLimit)
    app.middleware("http")(app.state.metrics.middleware)
    app.middleware("http")(request_context)
    app.include_router(health.router)
    app.include_router(accounts.router)
    app.include_router(payments.router)
    app.include_router(events.router)
    app.include_router(risk.router)
    app.include_router(reconciliation.router)
    console.install(app)
    openapi_links.install(app)
    if tracing is not None:
        instrument_api(app, tracing)
    return app
