"""What the benchmarks share: timing a workload, the floor, and a local stack to run on."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from bench.floor import EmptyWorkflow, FloorWorkflow, no_op
from ledger.store import EventStore
from paysaga import migrate
from paysaga.db import DatabaseUrls, open_store
from paysaga.embedded_pg import EmbeddedPostgres, stop_server
from paysaga.settings import Settings
from paysaga.temporal import find_binary
from worker import sandbox_runner, worker_tuning
from workflows.search_attributes import ALL_SEARCH_ATTRIBUTES

APP_ROLE = "paysaga_app"
STORE_POOL_SIZE = 16


@dataclass
class Run:
    name: str
    payments: int
    concurrency: int
    seconds: float
    per_s: float
    p50_ms: float
    p99_ms: float
    # CPU this process spent per workflow (client and, where it runs here, the worker).
    process_cpu_ms: float = 0.0


def add_sweep_arguments(parser: argparse.ArgumentParser, concurrency_default: str) -> None:
    """The options of a run swept over concurrencies (e2e_workflow.py and api.py)."""
    parser.add_argument("--payments", type=int, default=300, help="per run (an upper bound)")
    parser.add_argument(
        "--concurrency", default=concurrency_default, help="one, or a list: 1,5,10,20,40"
    )
    parser.add_argument("--seconds", type=float, default=None, help="bound each run by time")
    parser.add_argument(
        "--per-client",
        type=int,
        default=0,
        help="with --seconds: each run goes on until each client has made this many",
    )


def sweep_concurrencies(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    """--concurrency as a list, once every sweep option is checked to be positive."""
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if (
        args.payments < 1
        or min(concurrencies) < 1
        or (args.seconds is not None and args.seconds <= 0)
    ):
        parser.error("--payments, every --concurrency and --seconds must be positive")
    return concurrencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def drive(
    name: str,
    count: int,
    concurrency: int,
    one: Callable[[int], Awaitable[None]],
    *,
    seconds_max: float | None = None,
    count_min: int = 0,
) -> Run:
    """Run `one(i)` for i in range(count), `concurrency` at a time; time each. With
    `seconds_max`, no new one starts after that many seconds once `count_min` have
    started (those under way finish), so the run may end before `count`: its figures
    count what was done."""
    latencies_ms: list[float] = []
    next_index = 0
    deadline = None if seconds_max is None else time.perf_counter() + seconds_max

    def more() -> bool:
        if next_index >= count:
            return False
        return deadline is None or next_index < count_min or time.perf_counter() < deadline

    async def lane() -> None:
        nonlocal next_index
        while more():
            index = next_index
            next_index += 1
            started = time.perf_counter()
            await one(index)
            latencies_ms.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    cpu_started = time.process_time()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    done = len(latencies_ms)
    cpu_ms = (time.process_time() - cpu_started) * 1000 / done
    return Run(
        name=name,
        payments=done,
        concurrency=concurrency,
        seconds=round(seconds, 2),
        per_s=round(done / seconds, 2),
        p50_ms=round(percentile(latencies_ms, 0.5), 1),
        p99_ms=round(percentile(latencies_ms, 0.99), 1),
        process_cpu_ms=round(cpu_ms, 1),
    )


FLOOR_NAME = "floor (4 regular no-op activities)"
EMPTY_NAME = "empty workflow"


async def run_floor(
    client: Client,
    settings: Settings,
    count: int,
    concurrency: int,
    *,
    seconds_max: float | None = None,
    count_min: int = 0,
    empty: bool = False,
) -> Run:
    """FloorWorkflow (or, with `empty`, EmptyWorkflow) `count` times, or for
    `seconds_max` and at least `count_min` times, with a worker tuned exactly like the
    saga's."""
    queue = f"floor-{uuid.uuid4()}"
    workflow = EmptyWorkflow if empty else FloorWorkflow
    async with Worker(
        client,
        task_queue=queue,
        workflows=[workflow],
        activities=[] if empty else [no_op],
        workflow_runner=sandbox_runner(),
        **worker_tuning(settings),
    ):

        async def one(index: int) -> None:
            await client.execute_workflow(
                workflow.run,
                f"floor-{index}",
                id=f"floor-{uuid.uuid4()}",
                # Started with the same options as the saga (start_payment: no
                # workflow timeout), so that the ratio compares the work alone.
                task_queue=queue,
            )

        name = EMPTY_NAME if empty else FLOOR_NAME
        return await drive(
            name, count, concurrency, one, seconds_max=seconds_max, count_min=count_min
        )


@dataclass
class LocalServers:
    client: Client
    store: EventStore


@asynccontextmanager
async def local_servers(prefix: str) -> AsyncIterator[LocalServers]:
    """An embedded PostgreSQL and a Temporal dev server persisting to SQLite, as `make up`."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    pg = EmbeddedPostgres(workdir / "pg", app_role=APP_ROLE)
    pg_process = pg.start(log_path=workdir / "postgres.log")
    try:
        pg.bootstrap()
        migrate.upgrade(pg.owner_url(), APP_ROLE)
        urls = DatabaseUrls(owner_url=pg.owner_url(), app_url=pg.app_url(), app_role=APP_ROLE)
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=find_binary("temporal"),
            dev_server_database_filename=str(workdir / "temporal.sqlite"),
            search_attributes=ALL_SEARCH_ATTRIBUTES,
            data_converter=pydantic_data_converter,
            dev_server_log_level="error",
        )
        store = await open_store(urls, pool_size=STORE_POOL_SIZE)
        try:
            yield LocalServers(env.client, store)
        finally:
            await store.close()
            await env.shutdown()
    finally:
        stop_server(pg_process)
        shutil.rmtree(workdir, ignore_errors=True)
