"""Liveness, readiness and metrics: open to all, no API key."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.service import RPCError, RPCStatusCode

router = APIRouter(tags=["health"])
log = logging.getLogger("paysaga.api.health")
READINESS_CHECK_TIMEOUT_S = 2.0


class Health(BaseModel):
    status: str


DependencyReason = Literal["timeout", "unreachable", "failed"]


class DependencyCheck(BaseModel):
    ok: bool
    latency_ms: int = Field(description="How long the check took, failed or not.")
    reason: DependencyReason | None = Field(
        default=None,
        description="Why it is not ok: `timeout` (no answer within the check's bound), "
        "`unreachable` (no connection), `failed` (it answered with an error). The details "
        "are in the API's log, never in this answer.",
    )


class Readiness(BaseModel):
    status: str
    checks: dict[str, DependencyCheck]


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive and serving HTTP."""
    return Health(status="ok")


async def _timed(name: str, probe: Awaitable[None]) -> DependencyCheck:
    started = time.perf_counter()

    def elapsed_ms() -> int:
        return round((time.perf_counter() - started) * 1000)

    try:
        await asyncio.wait_for(probe, READINESS_CHECK_TIMEOUT_S)
    except Exception as error:  # each failure is reported, none is raised
        reason = _reason(error)
        # The error names hosts, users and internals: the log keeps it, the answer never.
        log.warning(
            "readiness check failed",
            extra={"dependency": name, "reason": reason},
            exc_info=error,
        )
        return DependencyCheck(ok=False, latency_ms=elapsed_ms(), reason=reason)
    return DependencyCheck(ok=True, latency_ms=elapsed_ms())


def _reason(error: Exception) -> DependencyReason:
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, RPCError):
        return "unreachable" if error.status == RPCStatusCode.UNAVAILABLE else "failed"
    if isinstance(error, DBAPIError):
        return "unreachable" if isinstance(error, OperationalError) else "failed"
    # The Temporal SDK reports a failed connection as a plain RuntimeError.
    if isinstance(error, OSError | RuntimeError):
        return "unreachable"
    return "failed"


async def _check_database(request: Request) -> None:
    await request.app.state.store.ping()


async def _check_temporal(request: Request) -> None:
    # Connecting gives up before the check's bound, so a dead server reads `unreachable`.
    client = await request.app.state.temporal.get(timeout_s=READINESS_CHECK_TIMEOUT_S / 2)
    await client.service_client.check_health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A dependency is not ready."}},
)
async def readyz(request: Request) -> Response:
    """Ready when the database and Temporal both answer. Each dependency is reported."""
    database, temporal = await asyncio.gather(
        _timed("database", _check_database(request)),
        _timed("temporal", _check_temporal(request)),
    )
    checks = {"database": database, "temporal": temporal}
    ready = all(check.ok for check in checks.values())
    body = Readiness(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus exposition format; not here when PAYSAGA_METRICS_PORT serves them apart."""
    if request.app.state.settings.metrics_address is not None:
        raise StarletteHTTPException(404)
    return request.app.state.metrics.render()  # type: ignore[no-any-return]
