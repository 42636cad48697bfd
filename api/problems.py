"""Errors as `application/problem+json` (RFC 9457), every one of them.

Each problem has a stable `type` (`urn:paysaga:problem:<code>`) and `code`, so clients
branch on those, never on the wording of `title` or `detail`. Validation problems add
an `errors` list naming each field.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.client import RPCTimeoutOrCancelledError
from temporalio.service import RPCError

from api.models import UNSTORABLE_ERROR, printable
from paysaga.logs import request_id_var

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("paysaga.api")

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Unprocessable request",
    500: "Internal error",
    503: "Service unavailable",
}


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """The body of every error response."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    request_id: str | None = None
    errors: list[FieldError] | None = None


class ProblemError(Exception):
    """Raise to answer with a problem."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


def workflow_unresponsive(action: str, wait_s: float) -> ProblemError:
    """An Update its workflow did not take within `wait_s`. Temporal keeps it, so the
    workflow may still take it: the client reads before it retries."""
    return ProblemError(
        503,
        "workflow_unresponsive",
        f"the workflow did not take the {action} within {wait_s:g} s (its worker is down or "
        "busy); it may still take it: read the resource before you retry",
        headers={"Retry-After": "5"},
    )


def _documented(status: int, description: str) -> dict[str, Any]:
    return {
        "model": Problem,
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


# Declared on every protected route, so clients (and schemathesis) know the error shapes.
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _documented(400, "Malformed request: bad JSON, a missing Idempotency-Key, a bad cursor."),
    401: _documented(401, "No API key, or an unknown or revoked one."),
    403: _documented(403, "The API key lacks the scope this route needs."),
    404: _documented(404, "No such resource."),
    409: _documented(409, "Refused in the resource's current state; `detail` says why."),
    413: _documented(413, "The request body is too large."),
    422: _documented(422, "Validation failed; `errors` names each field."),
    503: _documented(503, "A dependency (Temporal) is unavailable; retry."),
}


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = Problem(
        type=f"urn:paysaga:problem:{code}",
        title=_TITLES.get(status, "Error"),
        status=status,
        detail=detail,
        code=code,
        request_id=request_id_var.get(),
        errors=errors,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def _field(location: tuple[Any, ...], below: str = "") -> str:
    """The dotted name of a field, printable even when a key in it is not."""
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header")]
    return printable(".".join(filter(None, (*parts, below)))) or "body"


def validation_errors(exc: RequestValidationError) -> tuple[str, list[FieldError]]:
    errors = []
    malformed = False
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            malformed = True
        message = printable(str(error.get("msg", "invalid")))
        below = ""
        if error.get("type") == UNSTORABLE_ERROR:
            # Named down to the key inside the field (metadata), not just the field.
            below = str(error.get("ctx", {}).get("path", ""))
        field = _field(tuple(error.get("loc", ())), below)
        errors.append(FieldError(field=field, message=message))
    return ("malformed_json" if malformed else "validation_failed"), errors


def install(app: FastAPI) -> None:
    """Route every error through problem+json."""

    @app.exception_handler(ProblemError)
    async def on_problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(
            exc.status, exc.code, exc.detail, errors=exc.errors, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        code, errors = validation_errors(exc)
        if code == "malformed_json":
            return problem_response(400, code, "the request body is not valid JSON", errors=errors)
        return problem_response(
            422, code, f"{len(errors)} field(s) failed validation", errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return problem_response(
            exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(DBAPIError)
    async def on_database(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated or isinstance(exc, OperationalError):
            log.warning("database unavailable", extra={"error": str(exc.orig)})
            return problem_response(
                503,
                "database_unavailable",
                "the database cannot be reached right now; retry shortly",
                headers={"Retry-After": "1"},
            )
        log.exception("database error")
        return problem_response(500, "internal_error", "an unexpected error occurred")

    @app.exception_handler(RPCError)
    @app.exception_handler(RPCTimeoutOrCancelledError)
    async def on_temporal(request: Request, exc: Exception) -> JSONResponse:
        # The error names hosts and internals: the log keeps it, the client never sees it.
        log.warning("temporal call failed", exc_info=exc)
        return problem_response(
            503,
            "temporal_unavailable",
            "Temporal cannot serve this request right now; retry shortly",
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return problem_response(500, "internal_error", "an unexpected error occurred")
