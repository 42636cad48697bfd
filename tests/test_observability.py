"""Observability: the Temporal SDK's metrics from the worker, one trace from an HTTP request
through the payment's workflow to each of its activities, and the ids in the JSON logs."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_trace_id
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from api.app import create_app
from ledger.store import EventStore
from paysaga.logs import JsonFormatter
from paysaga.settings import Settings
from paysaga.stack import StackError, check_ports_free, worker_metrics_ports
from paysaga.telemetry import tracer_provider, tracing_interceptors
from tests.harness.api import Api, make_keys, serve
from tests.harness.ledger import fund, open_account
from tests.harness.processes import api_and_worker
from tests.harness.saga import wait_for
from tests.harness.stack import free_port
from worker import build_worker, payment_activities
from workflows.models import workflow_id_for

# The saga's happy path: three local activities and one regular one (DEVELOPERS.md).
HAPPY_PATH_ACTIVITIES = {
    "ledger.initiate",
    "processor.authorize",
    "ledger.record_event",
    "processor.capture",
}
PAYMENT = {"payer_account_id": "alice", "payee_account_id": "bob", "currency": "EUR"}


@contextmanager
def json_log_lines(service: str = "api") -> Iterator[list[dict[str, Any]]]:
    """Every line paysaga logs meanwhile, as the JSON the services write (parsed on exit)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(service))
    logger = logging.getLogger("paysaga")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    lines: list[dict[str, Any]] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        lines += [json.loads(line) for line in stream.getvalue().splitlines()]


# --- Tracing, in process ------------------------------------------------------------------
@dataclass
class TracedApi:
    api: Api
    client: Client
    spans: InMemorySpanExporter


@pytest.fixture
async def traced(
    settings: Settings,
    store: EventStore,
    temporal_client: Client,
    task_queue: str,
    owner_engine: AsyncEngine,
) -> AsyncIterator[TracedApi]:
    """The API and a worker on the test's queue, both tracing into one in-memory exporter
    through the interceptor `paysaga api` and `paysaga worker` install."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    config = temporal_client.config()
    config["interceptors"] = tracing_interceptors(provider)
    client = Client(**config)
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await fund(store, "alice", 100_000)
    keys = await make_keys(owner_engine, settings.api_key_secret.get_secret_value())
    app = create_app(settings, store=store, temporal_client=client, tracing=provider)
    worker = build_worker(
        client, settings, task_queue=task_queue, activities=payment_activities(store, client)
    )
    async with worker, serve(app) as http:
        yield TracedApi(Api(http, keys), client, spans)
    provider.shutdown()


async def test_one_trace_follows_a_payment_from_its_request_to_each_activity(
    traced: TracedApi,
) -> None:
    with json_log_lines() as logs:
        response = await traced.api.post(
            "/v1/payments", {**PAYMENT, "amount_minor": 1_250}, idempotency_key="trace-1"
        )
        assert response.status_code == 202, response.text
        payment_id = response.json()["id"]
        workflow_id = workflow_id_for(payment_id)
        await traced.client.get_workflow_handle(workflow_id).result()
        read = await traced.api.get(f"/v1/payments/{payment_id}")
    assert read.json()["status"] == "SETTLED"

    spans = traced.spans.get_finished_spans()
    request = _one(spans, "POST /v1/payments")
    assert request.kind == SpanKind.SERVER
    assert request.attributes is not None and request.attributes["http.route"] == "/v1/payments"
    trace_id = _trace_id(request)
    of_the_payment = [s for s in spans if _attribute(s, "temporalWorkflowID") == workflow_id]
    assert {_trace_id(s) for s in of_the_payment} == {trace_id}
    names = {s.name for s in of_the_payment}
    assert {"StartWorkflow:PaymentWorkflow", "RunWorkflow:PaymentWorkflow"} <= names
    assert {f"RunActivity:{name}" for name in HAPPY_PATH_ACTIVITIES} <= names
    # Parent to child: the request starts the workflow, and each step runs as its own span
    # under the workflow's StartActivity (local activities included).
    start = _one(spans, "StartWorkflow:PaymentWorkflow")
    assert start.parent is not None and start.parent.span_id == _span_id(request)
    started = {_span_id(s) for s in of_the_payment if s.name.startswith("StartActivity:")}
    for span in of_the_payment:
        if span.name.startswith("RunActivity:"):
            assert span.parent is not None and span.parent.span_id in started, span.name

    # The request's log lines carry its trace, and the payment it was about.
    request_line = next(line for line in logs if line["msg"] == "request")
    assert (request_line["route"], request_line["status"]) == ("/v1/payments", 202)
    assert request_line["trace_id"] == format_trace_id(trace_id)
    assert (request_line["payment_id"], request_line["workflow_id"]) == (payment_id, workflow_id)
    # A later request about the payment is a trace of its own, and its line names it too.
    read_span = _one(spans, "GET /v1/payments/{payment_id}")
    assert _trace_id(read_span) != trace_id
    read_line = [line for line in logs if line["msg"] == "request"][-1]
    assert read_line["route"] == "/v1/payments/{payment_id}"
    assert read_line["payment_id"] == payment_id
    assert read_line["trace_id"] == format_trace_id(_trace_id(read_span))


def _one(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    named = [span for span in spans if span.name == name]
    assert len(named) == 1, (name, sorted(span.name for span in spans))
    return named[0]


def _trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def _span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def _attribute(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {}).get(key)


def test_tracing_off_installs_nothing(settings: Settings) -> None:
    """The default: no provider, no interceptor on any client or worker, no server span."""
    assert settings.tracing == "off"
    assert tracer_provider(settings, "api") is None
    assert tracing_interceptors(None) == ()
    app = create_app(settings)
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)


# --- `paysaga up`: a metrics port per worker ---------------------------------------------
def test_up_gives_each_worker_a_metrics_port_and_names_a_busy_one() -> None:
    chosen = Settings(_env_file=None, workers=3, worker_metrics_port=free_port())
    first = chosen.worker_metrics_port
    assert first is not None
    assert worker_metrics_ports(chosen) == [first, first + 1, first + 2]
    picked = worker_metrics_ports(Settings(_env_file=None, workers=2))
    assert len(set(picked)) == 2
    # Only the API's port besides (a free one): Temporal is external here.
    alone = chosen.model_copy(update={"api_port": free_port(), "temporal_address": "127.0.0.1:7"})
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", first))
        holder.listen()
        with pytest.raises(StackError, match=f"port {first} .*PAYSAGA_WORKER_METRICS_PORT"):
            check_ports_free(alone)


# --- Logs ---------------------------------------------------------------------------------
async def test_a_line_logged_in_an_activity_names_its_payment_workflow_and_attempt() -> None:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info,
        workflow_id="payment-pay_abc123",
        workflow_type="PaymentWorkflow",
        activity_type="processor.authorize",
        attempt=2,
    )

    async def authorize() -> None:
        logging.getLogger("paysaga.processor").warning("the processor is slow")

    with json_log_lines("worker") as logs:
        await env.run(authorize)
    (line,) = logs
    assert line["msg"] == "the processor is slow"
    assert line["workflow_id"] == "payment-pay_abc123"
    assert line["payment_id"] == "pay_abc123"
    assert (line["activity_type"], line["activity_attempt"]) == ("processor.authorize", 2)
    assert "trace_id" not in line, "no span is current when tracing is off"


def test_a_workflow_loggers_line_names_its_workflow_and_no_payment_for_other_workflows() -> None:
    # temporalio's `workflow.logger` puts its workflow's details in `temporal_workflow`.
    record = logging.makeLogRecord(
        {
            "name": "temporalio.workflow",
            "levelname": "WARNING",
            "msg": "a statement pass failed",
            "temporal_workflow": {
                "workflow_id": "recon-statements",
                "workflow_type": "StatementStreamWorkflow",
            },
        }
    )
    line = json.loads(JsonFormatter("worker").format(record))
    assert line["workflow_id"] == "recon-statements"
    assert "payment_id" not in line


# --- Real processes: the SDK's metrics, and spans on the console --------------------------
SDK_METRIC = re.compile(r"^(?P<name>temporal_[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def sdk_metrics(text: str) -> dict[tuple[str, str], float]:
    """{(metric name, activity or workflow type): value} from a Prometheus scrape."""
    found: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = SDK_METRIC.match(line)
        if match is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        kind = labels.get("activity_type") or labels.get("workflow_type") or ""
        found[(match["name"], kind)] = float(match["value"])
    return found


def console_spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.mark.slow
async def test_worker_and_api_processes_export_sdk_metrics_and_console_spans(
    settings: Settings, store: EventStore, owner_engine: AsyncEngine, tmp_path: Path
) -> None:
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await fund(store, "alice", 100_000)
    keys = await make_keys(owner_engine, settings.api_key_secret.get_secret_value())
    metrics_port = free_port()
    with api_and_worker(
        settings,
        output_dir=tmp_path,
        PAYSAGA_WORKER_METRICS_PORT=str(metrics_port),
        PAYSAGA_TRACING="console",
    ) as services:
        async with httpx.AsyncClient(base_url=services.url, timeout=40) as http:
            response = await http.post(
                "/v1/payments",
                params={"wait": "settled"},
                json={**PAYMENT, "amount_minor": 700},
                headers={
                    "Authorization": f"Bearer {keys['client']}",
                    "Idempotency-Key": str(uuid.uuid4()),
                },
            )
            assert response.json()["status"] == "SETTLED", response.text
            scraped: dict[tuple[str, str], float] = {}

            async def completion_counted() -> bool:
                scraped.update(
                    sdk_metrics((await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text)
                )
                return scraped.get(("temporal_workflow_completed", "PaymentWorkflow"), 0) >= 1

            await wait_for(completion_counted, what="the worker's temporal_workflow_completed")
    # The Temporal SDK's own names: one for the regular activity, one for the local ones.
    assert scraped[("temporal_activity_execution_latency_count", "processor.authorize")] == 1
    for local in HAPPY_PATH_ACTIVITIES - {"processor.authorize"}:
        assert scraped[("temporal_local_activity_execution_latency_count", local)] >= 1
    assert scraped[("temporal_workflow_endtoend_latency_count", "PaymentWorkflow")] >= 1

    # Each process wrote its spans on stdout, and flushed them as it stopped.
    api_spans = console_spans(tmp_path / "api.out")
    worker_spans = console_spans(tmp_path / "worker.out")
    request = next(s for s in api_spans if s["name"] == "POST /v1/payments")
    assert request["resource"]["attributes"]["service.name"] == "paysaga-api"
    trace_id = request["context"]["trace_id"]
    in_the_worker = {s["name"] for s in worker_spans if s["context"]["trace_id"] == trace_id}
    assert "RunWorkflow:PaymentWorkflow" in in_the_worker
    assert {f"RunActivity:{name}" for name in HAPPY_PATH_ACTIVITIES} <= in_the_worker
    assert worker_spans[0]["resource"]["attributes"]["service.name"] == "paysaga-worker"
