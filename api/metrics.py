"""Prometheus metrics for the API, in a registry of the app's own (tests build many apps).

They are served by the API at `/metrics`, or, when `PAYSAGA_METRICS_PORT` is set, on an
address of their own (`MetricsServer`), which keeps them off a public API listener.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from ledger.events import DISCREPANCY_TYPES
from ledger.read_models import ReadModels
from ledger.state_machine import PAYMENT_STATUS_BY_STATE, TERMINAL_STATES
from ledger.store import EventStore
from recon.cases import open_counts

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "paysaga_http_requests",
            "HTTP requests, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "paysaga_http_request_duration_seconds",
            "HTTP request latency, by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )

        self.payments = Gauge(
            "paysaga_payments",
            "Payments in the ledger by terminal status (refreshed every few seconds).",
            ["status"],
            registry=self.registry,
        )
        # A transaction left open anywhere in the database holds the horizon back.
        self.horizon_lag_events = Gauge(
            "paysaga_ledger_horizon_lag_events",
            "Events visible in the ledger but above the safe horizon (not yet readable in order).",
            registry=self.registry,
        )
        self.horizon_lag_s = Gauge(
            "paysaga_ledger_horizon_lag_seconds",
            "Age of the oldest event above the safe horizon.",
            registry=self.registry,
        )
        self.unsealed_events = Gauge(
            "paysaga_ledger_unsealed_events",
            "Events not yet sealed into a block.",
            registry=self.registry,
        )
        self.unsealed_s = Gauge(
            "paysaga_ledger_unsealed_seconds",
            "Age of the oldest event not yet sealed into a block.",
            registry=self.registry,
        )
        self.read_model_lag_events = Gauge(
            "paysaga_read_model_lag_events",
            "Events in the ledger that a read model has not applied yet.",
            ["projection"],
            registry=self.registry,
        )
        self.read_model_lag_s = Gauge(
            "paysaga_read_model_lag_seconds",
            "Age of the oldest event a read model has not applied yet (0 when caught up).",
            ["projection"],
            registry=self.registry,
        )

        self.discrepancies_open = Gauge(
            "paysaga_discrepancies_open",
            "Reconciliation discrepancies not resolved yet, by type.",
            ["type"],
            registry=self.registry,
        )
        # The ageing alert: alert on this above zero.
        self.discrepancies_overdue = Gauge(
            "paysaga_discrepancies_overdue",
            "Open discrepancies older than PAYSAGA_RECON_DISCREPANCY_ALERT_AGE_S, by type.",
            ["type"],
            registry=self.registry,
        )

    async def refresh_discrepancies(self, store: EventStore, overdue_after_s: int) -> None:
        """Open and overdue discrepancies per type (every type, zeros included)."""
        async with store.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            counts = await open_counts(driver, overdue_after_s=overdue_after_s)
            await conn.rollback()
        for kind in DISCREPANCY_TYPES:
            opened, overdue = counts.get(kind, (0, 0))
            self.discrepancies_open.labels(kind).set(opened)
            self.discrepancies_overdue.labels(kind).set(overdue)

    async def refresh_payments(self, store: EventStore) -> None:
        """Count ended payments by status, from the ledger's stream heads."""
        counts = await store.count_streams_by_state("payment", sorted(TERMINAL_STATES))
        for state in TERMINAL_STATES:
            self.payments.labels(PAYMENT_STATUS_BY_STATE[state]).set(counts.get(state, 0))

    async def refresh_ledger_lags(self, store: EventStore) -> None:
        """How far the safe horizon and the seal trail the log."""
        lags = await store.lags()
        self.horizon_lag_events.set(lags.horizon_events)
        self.horizon_lag_s.set(lags.horizon_s)
        self.unsealed_events.set(lags.unsealed_events)
        self.unsealed_s.set(lags.unsealed_s)

    async def refresh_read_model_lags(self, store: EventStore) -> None:
        """How far each read model trails the log."""
        for lag in await ReadModels(store.engine).lags():
            self.read_model_lag_events.labels(lag.projection).set(lag.events)
            self.read_model_lag_s.labels(lag.projection).set(lag.seconds)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def middleware(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            # The route template, not the raw path: ids in paths would explode cardinality.
            route = getattr(request.scope.get("route"), "path", "<unmatched>")
            self.requests.labels(route, request.method, str(status)).inc()
            self.latency.labels(route, request.method).observe(time.perf_counter() - started)


class MetricsServer:
    """A registry served over plain HTTP on its own address, by a thread of its own."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        # Binding happens here: a taken port fails the API's start, loudly.
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)

    async def close(self) -> None:
        # shutdown() waits for the serving loop to notice; not on the event loop.
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        self._thread.join()
