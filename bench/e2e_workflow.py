"""The saga end to end: payments straight through Temporal, against two floors.

On a Temporal dev server persisting to a SQLite file (as `paysaga up` runs it) and
the embedded PostgreSQL, it runs, in one process and one run, at each concurrency:

1. the empty floor: EmptyWorkflow, a workflow that starts and returns;
2. the floor: FloorWorkflow, the saga's step shape as 4 regular no-op activities;
3. the saga: PaymentWorkflow doing real work (ledger appends with the hash chain and
   positions, risk rules, the processor simulator, search-attribute upserts).

It prints payments per second, p50/p99 start-to-settled latency, CPU per workflow in
this process (client and worker), and the ratios of the saga to both floors, and
writes bench/results/e2e_workflow-<time>.json. With several concurrencies
(`--concurrency 1,5,10,20,40`) it sweeps them in turn; `--seconds` bounds each run by
time instead of by count (`--payments` is then its upper bound), and `--per-client N`
makes each run go on until each client has made N (so that a run at high concurrency
is not all ramp-up and tail).

    .venv/bin/python bench/e2e_workflow.py
    .venv/bin/python bench/e2e_workflow.py --payments 400 --concurrency 32
    .venv/bin/python bench/e2e_workflow.py --concurrency 1,5,10,20,40 --seconds 5 --per-client 3
    .venv/bin/python bench/e2e_workflow.py --ledger-activities regular   # compare
    .venv/bin/python bench/e2e_workflow.py --capture-activity regular    # compare
    .venv/bin/python bench/e2e_workflow.py --sdk-metrics --tracing      # what they cost

`--sdk-metrics` runs floor and saga on a client whose runtime serves the SDK's Prometheus
metrics (as `paysaga up`'s workers do); `--tracing` gives that client the tracing
interceptor, its spans exported in batches to /dev/null (PAYSAGA_TRACING's cost, minus
the exporter's own I/O).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import (  # noqa: E402
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from temporalio.client import Client, Interceptor  # noqa: E402

from bench.common import (  # noqa: E402
    add_sweep_arguments,
    drive,
    local_servers,
    run_floor,
    sweep_concurrencies,
)
from ledger.events import AccountOpened  # noqa: E402
from ledger.store import EventStore  # noqa: E402
from paysaga.payments import start_payment  # noqa: E402
from paysaga.settings import Settings  # noqa: E402
from paysaga.telemetry import SPAN_EXPORT_DELAY_MS, sdk_runtime, tracing_interceptors  # noqa: E402
from worker import build_worker, payment_activities  # noqa: E402
from workflows.models import PaymentPolicy, PaymentRequest  # noqa: E402

console = Console(stderr=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def open_bench_accounts(store: EventStore, payers: int) -> None:
    """`world` (external), `shop` (merchant), and `payer-<i>` customers."""
    await store.open_account(
        AccountOpened(
            account_id="world", currency="EUR", kind="external", overdraft_limit_minor=None
        ),
        actor="bench",
    )
    await store.open_account(
        AccountOpened(account_id="shop", currency="EUR", kind="merchant"), actor="bench"
    )
    for i in range(payers):
        await store.open_account(
            AccountOpened(account_id=f"payer-{i}", currency="EUR", kind="customer"),
            actor="bench",
        )


# Each payer's funds (not timed): 9,000 payments' worth, and below the approval
# threshold (PaymentPolicy), so that funding never waits for an operator.
PAYER_FUNDING_MINOR = 900_000
PAYMENT_MINOR = 100


async def run_saga(
    client: Client,
    store: EventStore,
    settings: Settings,
    policy: PaymentPolicy,
    concurrencies: list[int],
    n: int,
    seconds_max: float | None,
    per_client: int,
) -> list[dict[str, Any]]:
    """At each concurrency: the empty floor, the floor, then the saga, back to back."""
    queue = f"payments-{uuid.uuid4()}"
    lanes = max(concurrencies)
    levels: list[dict[str, Any]] = []
    async with build_worker(
        client, settings, task_queue=queue, activities=payment_activities(store, client)
    ):
        # Fund each lane's payer (not timed), then pay the shop from it.
        for i in range(lanes):
            funding = PaymentRequest(
                payment_id=f"fund-{i}-{uuid.uuid4().hex[:8]}",
                payer_account_id="world",
                payee_account_id=f"payer-{i}",
                amount_minor=PAYER_FUNDING_MINOR,
                currency="EUR",
                policy=policy,
            )
            await (await start_payment(client, funding, task_queue=queue)).result()

        name = (
            f"saga (ledger as {policy.ledger_activities} activities, "
            f"capture as a {policy.capture_activity} one)"
        )
        for c in concurrencies:

            async def one(index: int, c: int = c) -> None:
                request = PaymentRequest(
                    payment_id=f"bench-{uuid.uuid4().hex}",
                    payer_account_id=f"payer-{index % c}",
                    payee_account_id="shop",
                    amount_minor=PAYMENT_MINOR,
                    currency="EUR",
                    policy=policy,
                )
                outcome = await (await start_payment(client, request, task_queue=queue)).result()
                assert outcome.status == "SETTLED", outcome

            console.print(f"concurrency {c}: empty workflow, floor, saga")
            bounds: dict[str, Any] = {"seconds_max": seconds_max, "count_min": per_client * c}
            empty = await run_floor(client, settings, n, c, empty=True, **bounds)
            floor = await run_floor(client, settings, n, c, **bounds)
            saga = await drive(name, n, c, one, **bounds)
            levels.append(
                {
                    "concurrency": c,
                    "empty": asdict(empty),
                    "floor": asdict(floor),
                    "saga": asdict(saga),
                    "saga_over_empty": round(saga.per_s / empty.per_s, 3),
                    "saga_over_floor": round(saga.per_s / floor.per_s, 3),
                }
            )
    return levels


class SerializedAway(SpanExporter):
    """An exporter that does the console exporter's work, JSON per span, and drops it."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            span.to_json(indent=None)
        return SpanExportResult.SUCCESS


async def observed_client(client: Client, sdk_metrics: bool, tracing: bool) -> Client:
    """`client` itself, or one on the same server with the SDK's metrics and/or tracing."""
    if not (sdk_metrics or tracing):
        return client
    runtime = None
    if sdk_metrics:
        runtime = sdk_runtime(Settings(_env_file=None, worker_metrics_port=free_port()))
    interceptors: Sequence[Interceptor] = ()
    if tracing:
        provider = TracerProvider()
        provider.add_span_processor(
            BatchSpanProcessor(SerializedAway(), schedule_delay_millis=SPAN_EXPORT_DELAY_MS)
        )
        interceptors = tracing_interceptors(provider)
    return await Client.connect(
        client.service_client.config.target_host,
        namespace=client.namespace,
        data_converter=client.data_converter,
        runtime=runtime,
        interceptors=interceptors,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_arguments(parser, concurrency_default="20")
    parser.add_argument("--ledger-activities", choices=("local", "regular"), default="local")
    parser.add_argument(
        "--capture-activity", choices=("local", "regular"), default=PaymentPolicy().capture_activity
    )
    parser.add_argument("--sdk-metrics", action="store_true")
    parser.add_argument("--tracing", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    n = args.payments
    concurrencies = sweep_concurrencies(parser, args)
    settings = Settings(_env_file=None)
    policy = PaymentPolicy(
        ledger_activities=args.ledger_activities, capture_activity=args.capture_activity
    )

    async with local_servers("paysaga-e2e-") as servers:
        await open_bench_accounts(servers.store, max(concurrencies))
        client = await observed_client(servers.client, args.sdk_metrics, args.tracing)
        levels = await run_saga(
            client,
            servers.store,
            settings,
            policy,
            concurrencies,
            n,
            args.seconds,
            args.per_client,
        )

    table = Table(title="PaymentWorkflow vs the floors (dev server, SQLite file)")
    for column in (
        "run",
        "concurrency",
        "workflows",
        "per s",
        "p50 ms",
        "p99 ms",
        "CPU ms",
        "saga / it",
    ):
        table.add_column(column, justify="right")
    for level in levels:
        for key in ("empty", "floor", "saga"):
            run = level[key]
            ratio = level.get(f"saga_over_{key}")
            table.add_row(
                run["name"],
                str(run["concurrency"]),
                str(run["payments"]),
                f"{run['per_s']:.2f}",
                f"{run['p50_ms']:.0f}",
                f"{run['p99_ms']:.0f}",
                f"{run['process_cpu_ms']:.1f}",
                "" if ratio is None else f"{ratio:.2f}",
            )
    Console(width=150).print(table)
    # The last concurrency's run, under the keys a single run always had (compare.py).
    last = levels[-1]
    ratio = last["saga_over_floor"]
    print(f"ratio saga/floor: {ratio:.2f}, saga/empty: {last['saga_over_empty']:.2f}")

    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    out = args.out or ROOT / "bench" / "results" / f"e2e_workflow-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "e2e_workflow",
                "temporal": "dev server, SQLite file",
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "seconds_per_run": args.seconds,
                "per_client_min": args.per_client,
                "payments_per_run_max": n,
                "sweep": levels,
                "floor": last["floor"],
                "saga": last["saga"],
                "ratio": ratio,
                "ledger_activities": args.ledger_activities,
                "capture_activity": args.capture_activity,
                "sdk_metrics": args.sdk_metrics,
                "tracing": args.tracing,
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
