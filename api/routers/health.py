"""Liveness, readiness and metrics: open to all, no API key."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

router = APIRouter(tags=["health"])
READINESS_CHECK_TIMEOUT_S = 2.0


class Health(BaseModel):
    status: str


class DependencyCheck(BaseModel):
    ok: bool
    latency_ms: int | None = None
    error: str | None = None


class Readiness(BaseModel):
    status: str
    checks: dict[str, DependencyCheck]


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive and serving HTTP."""
    return Health(status="ok")


async def _timed(probe: Any) -> DependencyCheck:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(probe, READINESS_CHECK_TIMEOUT_S)
    except Exception as err:  # each failure is reported, none is raised
        return DependencyCheck(ok=False, error=f"{type(err).__name__}: {err}"[:300])
    return DependencyCheck(ok=True, latency_ms=round((time.perf_counter() - started) * 1000))


async def _check_database(request: Request) -> None:
    await request.app.state.store.ping()


async def _check_temporal(request: Request) -> None:
    client = await request.app.state.temporal.get()
    await client.service_client.check_health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A dependency is not ready."}},
)
async def readyz(request: Request) -> Response:
    """Ready when the database and Temporal both answer. Each dependency is reported."""
    database, temporal = await asyncio.gather(
        _timed(_check_database(request)), _timed(_check_temporal(request))
    )
    checks = {"database": database, "temporal": temporal}
    ready = all(check.ok for check in checks.values())
    body = Readiness(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus exposition format."""
    return request.app.state.metrics.render()  # type: ignore[no-any-return]
