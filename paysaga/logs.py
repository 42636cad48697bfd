"""Structured logging: one JSON object per line, carrying the ids of the work in hand.

Request, payment and workflow ids live in context variables, so every log line written
while handling a request or a payment carries them without being passed around.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
payment_id_var: ContextVar[str | None] = ContextVar("payment_id", default=None)
workflow_id_var: ContextVar[str | None] = ContextVar("workflow_id", default=None)

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
