"""How the console's pages are rendered and served: Jinja2 with autoescaping, every
string made printable and bounded before it is escaped, security headers on every
response under /console, and links into the Temporal UI.

Everything the console shows may be external text (references, metadata, statement
lines, a hostile account id in a URL): autoescaping handles markup, and `_finalize`
handles what escaping does not, control characters (NUL included) and sheer size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import Request, Response
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from ledger.money import format_amount

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "console"
STATIC = Path(__file__).resolve().parent.parent / "static"
PREFIX = "/console"
# Any one value shown on a page, at most: a longer one is cut, and says so.
TEXT_CHARS_SHOWN_MAX = 4_000
# A payload or metadata shown as JSON, at most; and any one string inside it.
JSON_CHARS_SHOWN_MAX = 8_000
JSON_STRING_CHARS_SHOWN_MAX = 500
JSON_DEPTH_SHOWN_MAX = 16
HASH_HEX_SHOWN = 16

# No script runs on any console page; styles come from /console/static; forms post
# only to the console itself; nothing may frame it.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'; img-src 'self' data:"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: under no-referrer Chromium sends `Origin: null` with
    # a form POST, which the CSRF check (rightly) refuses.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str, chars_max: int = TEXT_CHARS_SHOWN_MAX) -> str:
    """`text` with control characters spelled out (`\\x00`) and cut at `chars_max`."""
    shown = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text[:chars_max])
    if len(text) > chars_max:
        shown += f"… ({len(text) - chars_max} more characters)"
    return shown


def _finalize(value: Any) -> Any:
    # Runs on every {{ expression }} before autoescaping.
    if value is None:
        return ""
    if isinstance(value, Markup):  # the templates' own markup (macros), already safe
        return value
    if isinstance(value, str):
        return printable(value)
    return value


def money(amount_minor: int | None, currency: str | None) -> str:
    """`12500, "EUR"` as `125.00 EUR`, from the integer (ISO 4217 exponent); `-` for none."""
    if amount_minor is None or currency is None:
        return "-"
    try:
        return format_amount(amount_minor, currency)
    except ValueError:
        return f"{amount_minor} minor units of {currency}"


def _clipped(value: Any, depth: int = 0) -> Any:
    """`value` with every string in it cut at JSON_STRING_CHARS_SHOWN_MAX, so that one
    huge field cannot hide the others."""
    if isinstance(value, str):
        return printable(value, JSON_STRING_CHARS_SHOWN_MAX)
    if depth >= JSON_DEPTH_SHOWN_MAX:
        return "…"
    if isinstance(value, dict):
        return {_clipped(str(k), depth): _clipped(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clipped(item, depth + 1) for item in value]
    return value


def pretty_json(value: Any) -> str:
    return printable(
        json.dumps(_clipped(value), indent=2, sort_keys=True, ensure_ascii=False, default=str),
        JSON_CHARS_SHOWN_MAX,
    )


def short_hash(value: bytes) -> str:
    return value.hex()[:HASH_HEX_SHOWN] + "…"


def instant(value: datetime | None) -> str:
    """`2026-11-24 12:31:20 UTC`: every time on the console in UTC, to the second."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def query(**params: Any) -> str:
    """A query string of the non-empty `params`, encoded."""
    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return "?" + urlencode(kept) if kept else ""


class TemporalLinks:
    """Links into the Temporal UI (2.x): a workflow by id (the UI opens its latest run),
    a run's history when the run id is known, and a list filtered by a visibility query.
    No links at all when the UI's address is unknown (an external Temporal)."""

    def __init__(self, ui_url: str | None, namespace: str) -> None:
        self.ui_url = ui_url.rstrip("/") if ui_url else None
        self.namespace = quote(namespace, safe="")

    def workflow(self, workflow_id: str, run_id: str | None = None) -> str | None:
        if self.ui_url is None:
            return None
        base = f"{self.ui_url}/namespaces/{self.namespace}/workflows/{quote(workflow_id, safe='')}"
        return f"{base}/{quote(run_id, safe='')}/history" if run_id else base

    def workflows(self, visibility_query: str) -> str | None:
        if self.ui_url is None:
            return None
        return f"{self.ui_url}/namespaces/{self.namespace}/workflows?" + urlencode(
            {"query": visibility_query}, quote_via=quote
        )


environment = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"], default=True),
    finalize=_finalize,
    trim_blocks=True,
    lstrip_blocks=True,
)
environment.filters.update(
    path=lambda value: quote(str(value), safe=""),
    money=lambda amount, currency: money(amount, currency),
    pretty_json=pretty_json,
    short_hash=short_hash,
    instant=instant,
)
environment.globals["query"] = query


def render(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """The page `template` with `context`, as an HTML response."""
    page = environment.get_template(template).render(**context)
    return HTMLResponse(page, status_code=status_code)


async def security_headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Every response under /console carries the console's security headers (a route may
    set a stricter or narrower one of its own)."""
    response = await call_next(request)
    if request.url.path == PREFIX or request.url.path.startswith(PREFIX + "/"):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
    return response
