"""Liveness, readiness and metrics: open to all, no API key."""

from __future__ import annotations

import asyncio
import contextlib
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

from ledger.read_models import ReadModels

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


class ReadModelLag(BaseModel):
    last_seq: int = Field(description="The read model holds every event up to this one.")
    events: int = Field(description="Events in the ledger after last_seq.")
    seconds: float = Field(description="Age of the oldest event not applied yet; 0 if none.")


class Readiness(BaseModel):
    status: str
    checks: dict[str, DependencyCheck]
    read_models: dict[str, ReadModelLag] | None = Field(
        default=None,
        description="How far each read model trails the ledger (absent when it cannot be "
        "read). A trailing read model never makes the API unready: payments are still "
        "taken, and strongly consistent reads still answer.",
    )


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


async def _read_model_lags(request: Request) -> dict[str, ReadModelLag] | None:
    """Each read model's lag, or None when it cannot be read in time."""
    try:
        lags = await asyncio.wait_for(
            ReadModels(request.app.state.store.engine).lags(), READINESS_CHECK_TIMEOUT_S
        )
    except Exception as error:  # the database check reports the failure
        log.info("read model lags unavailable", extra={"reason": _reason(error)})
        return None
    return {
        lag.projection: ReadModelLag(last_seq=lag.last_seq, events=lag.events, seconds=lag.seconds)
        for lag in lags
    }


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
    """Ready when the database and Temporal both answer. Each dependency is reported, and
    so is each read model's lag, which does not bear on readiness."""
    database, temporal, lags = await asyncio.gather(
        _timed("database", _check_database(request)),
        _timed("temporal", _check_temporal(request)),
        _read_model_lags(request),
    )
    checks = {"database": database, "temporal": temporal}
    ready = all(check.ok for check in checks.values())
    body = Readiness(status="ready" if ready else "not_ready", checks=checks, read_models=lags)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus exposition format; not here when PAYSAGA_METRICS_PORT serves them apart."""
    if request.app.state.settings.metrics_address is not None:
        raise StarletteHTTPException(404)
    # Lag is worth most when fresh: read it at scrape, within the readiness bound. A
    # failure leaves the last values (the background refresher keeps trying).
    with contextlib.suppress(Exception):
        await asyncio.wait_for(
            request.app.state.metrics.refresh_read_model_lags(request.app.state.store),
            READINESS_CHECK_TIMEOUT_S,
        )
    return request.app.state.metrics.render()  # type: ignore[no-any-return]
