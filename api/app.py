"""The FastAPI application: assembled here, served by `paysaga api` (uvicorn)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from api.metrics import ApiMetrics
from api.routers import health
from paysaga.db import create_app_engine, database_urls
from paysaga.settings import Settings, get_settings
from paysaga.temporal import LazyClient


def create_app(
    settings: Settings | None = None,
    *,
    engine: AsyncEngine | None = None,
    temporal_client: Client | None = None,
) -> FastAPI:
    """The app. Tests pass their own engine and client; `paysaga api` passes neither."""
    settings = settings or get_settings()
    owns_engine = engine is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = engine or create_app_engine(
            database_urls(settings),
            pool_size=settings.db_pool_size,
            pool_overflow_max=settings.db_pool_overflow_max,
        )
        app.state.temporal = LazyClient(settings, temporal_client)
        try:
            yield
        finally:
            if owns_engine:
                await app.state.engine.dispose()

    app = FastAPI(
        title="paysaga",
        version="1",
        summary="Payments as durable Temporal workflows over an append-only event ledger.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ApiMetrics()
    app.middleware("http")(app.state.metrics.middleware)
    app.include_router(health.router)
    return app
