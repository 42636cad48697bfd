"""Telemetry besides the logs: the Temporal SDK's own metrics, and OpenTelemetry tracing.

- **SDK metrics.** A worker given PAYSAGA_WORKER_METRICS_PORT runs its Temporal client on a
  `Runtime` whose Prometheus exporter serves `/metrics` on that port (the SDK's core binds
  it). A process gets one such runtime, made before its first client.
- **Tracing.** With PAYSAGA_TRACING on, the API opens a server span per request
  (opentelemetry-instrumentation-fastapi) and its Temporal client, like the worker's,
  carries the SDK's `TracingInterceptor`: the span context travels in the workflow's
  headers, so the HTTP request, StartWorkflow, RunWorkflow and every StartActivity and
  RunActivity span share one trace id. Off (the default), no tracing code is installed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from paysaga.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from temporalio.client import Interceptor

# Spans wait in memory this long at most before they are exported (BatchSpanProcessor).
SPAN_EXPORT_DELAY_MS = 1_000
# Never traced: probes and scrapes, which would bury the payments' traces.
UNTRACED_PATHS = "/healthz,/readyz,/metrics"


def worker_metrics_url(host: str, port: int) -> str:
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{port}/metrics"


def sdk_runtime(settings: Settings) -> Runtime | None:
    """The runtime for a worker's client: the SDK's metrics served on
    PAYSAGA_WORKER_METRICS_PORT, or None (the SDK's default runtime, no metrics) when it
    is unset. Binding happens here: a taken port fails the worker's start, loudly."""
    if settings.worker_metrics_port is None:
        return None
    return Runtime(
        telemetry=TelemetryConfig(
            # The SDK's default names and units (latencies in milliseconds), which
            # Temporal's documentation and its Grafana dashboards expect.
            metrics=PrometheusConfig(
                bind_address=f"{settings.worker_metrics_host}:{settings.worker_metrics_port}"
            )
        )
    )


def tracer_provider(settings: Settings, service: str) -> TracerProvider | None:
    """A tracer provider exporting as PAYSAGA_TRACING says, or None when it is off.

    Spans are exported in batches; the caller shuts the provider down before the process
    exits (the CLI leaves through os._exit, which runs no atexit hook).
    """
    if settings.tracing == "off":
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporter: SpanExporter
    if settings.tracing == "console":
        # One span per line, so a span is one line in the service's log too.
        exporter = ConsoleSpanExporter(
            service_name=f"paysaga-{service}",
            formatter=lambda span: span.to_json(indent=None) + os.linesep,
        )
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"paysaga-{service}"}),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(
        BatchSpanProcessor(exporter, schedule_delay_millis=SPAN_EXPORT_DELAY_MS)
    )
    return provider


def tracing_interceptors(provider: TracerProvider | None) -> Sequence[Interceptor]:
    """The client interceptors that carry a trace through Temporal (workers made from
    the client inherit them); none when tracing is off."""
    if provider is None:
        return ()
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return (TracingInterceptor(provider.get_tracer("paysaga.temporal")),)


def instrument_api(app: FastAPI, provider: TracerProvider) -> None:
    """A server span for every request, continuing a caller's trace (W3C traceparent)."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=provider,
        excluded_urls=UNTRACED_PATHS,
        # The ASGI send and receive of each message would triple the spans for nothing.
        exclude_spans=["receive", "send"],
    )
