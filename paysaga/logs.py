"""Structured logging: one JSON object per line, carrying the ids of the work in hand.

Request, payment and workflow ids live in context variables, so every log line written
while handling a request or a payment carries them without being passed around. A line
written inside an activity carries its workflow's id (and payment's, for a payment),
its activity type and attempt, from `activity.info()`; a line written by a workflow's
`workflow.logger` carries its workflow's. While a span is current (PAYSAGA_TRACING on), a
line carries its `trace_id` and `span_id`, as OpenTelemetry prints them (hex).
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from temporalio import activity

from workflows.models import payment_id_of

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
payment_id_var: ContextVar[str | None] = ContextVar("payment_id", default=None)
workflow_id_var: ContextVar[str | None] = ContextVar("workflow_id", default=None)

# The ids a request's handler bound (`bind_payment`), for the middleware's request line:
# the handler runs in a copy of the middleware's context, so its context variables never
# reach the middleware, but this dict does.
request_ids_var: ContextVar[dict[str, str] | None] = ContextVar("request_ids", default=None)

_CONTEXT_VARS = {
    "request_id": request_id_var,
    "payment_id": payment_id_var,
    "workflow_id": workflow_id_var,
}
# Attributes every LogRecord has; anything else was passed through `extra=`.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}


def bind_payment(payment_id: str, workflow_id: str) -> None:
    """Every later log line of this request (its request line included) names the payment."""
    payment_id_var.set(payment_id)
    workflow_id_var.set(workflow_id)
    bound = request_ids_var.get()
    if bound is not None:
        bound.update(payment_id=payment_id, workflow_id=workflow_id)


def _work_ids(record: logging.LogRecord) -> dict[str, Any]:
    """The workflow (and payment) a line was written for, when no context variable says:
    the running activity's, or the workflow's that wrote it through `workflow.logger`."""
    if activity.in_activity():
        info = activity.info()
        ids: dict[str, Any] = {
            "activity_type": info.activity_type,
            "activity_attempt": info.attempt,
        }
        workflow_id = info.workflow_id
    else:
        # temporalio's workflow and activity loggers add these dicts to `extra`.
        details = getattr(record, "temporal_workflow", None)
        if not isinstance(details, dict):
            return {}
        ids = {}
        workflow_id = details.get("workflow_id")
    if workflow_id:
        ids["workflow_id"] = workflow_id
        payment_id = payment_id_of(workflow_id)
        if payment_id is not None:
            ids["payment_id"] = payment_id
    return ids


def _trace_ids() -> dict[str, str]:
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {
        "trace_id": trace.format_trace_id(context.trace_id),
        "span_id": trace.format_span_id(context.span_id),
    }


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, var in _CONTEXT_VARS.items():
            value = var.get()
            if value is not None:
                entry[name] = value
        if "workflow_id" not in entry:
            entry.update(_work_ids(record))
        entry.update(_trace_ids())
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, *, level: str = "INFO", json_lines: bool = True) -> None:
    """Route the root logger to stderr, as JSON lines or as plain text."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"{service} | %(levelname)-7s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Per-request chatter from the HTTP client and migration runner is noise here.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Uvicorn's access log would duplicate the API's own request log, minus the ids.
    logging.getLogger("uvicorn.access").disabled = True
