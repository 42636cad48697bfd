"""The saga end to end: N payments straight through Temporal, against a no-op floor.

On a Temporal dev server persisting to a SQLite file (as `paysaga up` runs it) and
the embedded PostgreSQL, it runs, in one process and one run:

1. the floor: FloorWorkflow, the saga's step shape as 4 regular no-op activities;
2. the saga: PaymentWorkflow doing real work (ledger appends with the hash chain and
   positions, risk rules, the processor simulator, search-attribute upserts).

It prints payments per second, p50/p99 start-to-settled latency, and the ratio of the
saga to the floor, and writes bench/results/e2e_workflow-<time>.json.

    .venv/bin/python bench/e2e_workflow.py
    .venv/bin/python bench/e2e_workflow.py --payments 400 --concurrency 32
    .venv/bin/python bench/e2e_workflow.py --ledger-activities regular   # compare
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from temporalio.client import Client  # noqa: E402
from temporalio.contrib.pydantic import pydantic_data_converter  # noqa: E402
from temporalio.testing import WorkflowEnvironment  # noqa: E402
from temporalio.worker import Worker  # noqa: E402

from bench.floor import FloorWorkflow, no_op  # noqa: E402
from ledger.events import AccountOpened  # noqa: E402
from ledger.store import EventStore  # noqa: E402
from paysaga import migrate  # noqa: E402
from paysaga.db import DatabaseUrls  # noqa: E402
from paysaga.embedded_pg import EmbeddedPostgres, stop_server  # noqa: E402
from paysaga.payments import start_payment  # noqa: E402
from paysaga.settings import Settings  # noqa: E402
from paysaga.temporal import find_binary  # noqa: E402
from worker import build_worker, payment_activities, sandbox_runner, worker_tuning  # noqa: E402
from workflows.models import PaymentPolicy, PaymentRequest  # noqa: E402
from workflows.search_attributes import ALL_SEARCH_ATTRIBUTES  # noqa: E402

console = Console(stderr=True)


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


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def drive(
    name: str, count: int, concurrency: int, one: Callable[[int], Awaitable[None]]
) -> Run:
    """Run `one(i)` for i in range(count), `concurrency` at a time; time each."""
    latencies_ms: list[float] = []
    next_index = 0

    async def lane() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            await one(index)
            latencies_ms.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    cpu_started = time.process_time()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    cpu_ms = (time.process_time() - cpu_started) * 1000 / count
    return Run(
        name=name,
        payments=count,
        concurrency=concurrency,
        seconds=round(seconds, 2),
        per_s=round(count / seconds, 2),
        p50_ms=round(percentile(latencies_ms, 0.5), 1),
        p99_ms=round(percentile(latencies_ms, 0.99), 1),
        process_cpu_ms=round(cpu_ms, 1),
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payments", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--ledger-activities", choices=("local", "regular"), default="local")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="paysaga-e2e-"))
    pg = EmbeddedPostgres(workdir / "pg")
    pg_process = pg.start(log_path=workdir / "postgres.log")
    pg.bootstrap()
    migrate.upgrade(pg.owner_url(), "paysaga_app")
    urls = DatabaseUrls(owner_url=pg.owner_url(), app_url=pg.app_url(), app_role="paysaga_app")
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal"),
        dev_server_database_filename=str(workdir / "temporal.sqlite"),
        search_attributes=ALL_SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
        dev_server_log_level="error",
    )
    client: Client = env.client
    store = await EventStore.open(urls, pool_size=16)
    try:
        for account, kind in (("world", "external"), ("shop", "merchant")):
            await store.open_account(
                AccountOpened(
                    account_id=account,
                    currency="EUR",
                    kind=kind,
                    overdraft_limit_minor=None if kind == "external" else 0,
                ),
                actor="bench",
            )
        for i in range(args.concurrency):
            await store.open_account(
                AccountOpened(account_id=f"payer-{i}", currency="EUR", kind="customer"),
                actor="bench",
            )
        settings = Settings(_env_file=None)
        policy = PaymentPolicy(ledger_activities=args.ledger_activities)

        # The floor.
        floor_queue = f"floor-{uuid.uuid4()}"
        async with Worker(
            client,
            task_queue=floor_queue,
            workflows=[FloorWorkflow],
            activities=[no_op],
            workflow_runner=sandbox_runner(),
            # The same concurrency and polling as the saga's worker: a fair floor.
            **worker_tuning(settings),
        ):

            async def floor_one(index: int) -> None:
                await client.execute_workflow(
                    FloorWorkflow.run,
                    f"floor-{index}",
                    id=f"floor-{uuid.uuid4()}",
                    task_queue=floor_queue,
                )

            console.print(f"floor: {args.payments} workflows, {args.concurrency} at a time")
            floor = await drive(
                "floor (4 regular no-op activities)", args.payments, args.concurrency, floor_one
            )

        # The saga.
        saga_queue = f"payments-{uuid.uuid4()}"
        async with build_worker(
            client, settings, task_queue=saga_queue, activities=payment_activities(store)
        ):
            # Fund each lane's payer (not timed), then pay the shop from it.
            for i in range(args.concurrency):
                handle = await start_payment(
                    client,
                    PaymentRequest(
                        payment_id=f"fund-{i}-{uuid.uuid4().hex[:8]}",
                        payer_account_id="world",
                        payee_account_id=f"payer-{i}",
                        amount_minor=100_000,
                        currency="EUR",
                        policy=policy,
                    ),
                    task_queue=saga_queue,
                )
                await handle.result()

            async def saga_one(index: int) -> None:
                handle = await start_payment(
                    client,
                    PaymentRequest(
                        payment_id=f"bench-{uuid.uuid4().hex}",
                        payer_account_id=f"payer-{index % args.concurrency}",
                        payee_account_id="shop",
                        amount_minor=100,
                        currency="EUR",
                        policy=policy,
                    ),
                    task_queue=saga_queue,
                )
                outcome = await handle.result()
                assert outcome.status == "SETTLED", outcome

            console.print(f"saga: {args.payments} payments, {args.concurrency} at a time")
            saga = await drive(
                f"saga (ledger as {args.ledger_activities} activities)",
                args.payments,
                args.concurrency,
                saga_one,
            )
    finally:
        await store.close()
        await env.shutdown()
        stop_server(pg_process)

    ratio = round(saga.per_s / floor.per_s, 3)
    table = Table(title="PaymentWorkflow vs the floor (dev server, SQLite file)")
    for column in ("run", "workflows", "concurrency", "per s", "p50 ms", "p99 ms", "CPU ms"):
        table.add_column(column, justify="right")
    for run in (floor, saga):
        table.add_row(
            run.name,
            str(run.payments),
            str(run.concurrency),
            f"{run.per_s:.2f}",
            f"{run.p50_ms:.0f}",
            f"{run.p99_ms:.0f}",
            f"{run.process_cpu_ms:.1f}",
        )
    Console(width=140).print(table)
    print(f"ratio saga/floor: {ratio:.2f}")

    out = (
        args.out
        or ROOT / "bench" / "results" / f"e2e_workflow-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "e2e_workflow",
                "temporal": "dev server, SQLite file",
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "floor": asdict(floor),
                "saga": asdict(saga),
                "ratio": ratio,
                "ledger_activities": args.ledger_activities,
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see DEVELOPERS.md: the Temporal client can abort at interpreter exit
