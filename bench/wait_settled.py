"""`POST /v1/payments?wait=settled`: update-with-start, or start then await the result?

Both answer once the payment has ended. This runs N payments each way, C at a time,
on the dev server with its SQLite file, interleaving the two in rounds so that the
machine's noise hits both alike, and prints submit-to-ended latency and throughput.
Writes bench/results/wait_settled-<time>.json.

    .venv/bin/python bench/wait_settled.py --payments 200 --concurrency 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Run, drive, local_servers  # noqa: E402
from bench.e2e_workflow import open_bench_accounts  # noqa: E402
from paysaga.payments import start_payment, start_payment_and_wait  # noqa: E402
from paysaga.settings import Settings  # noqa: E402
from worker import build_worker, payment_activities  # noqa: E402
from workflows.models import PaymentRequest  # noqa: E402

ROUNDS = 4


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payments", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, list[Run]] = {"update_with_start": [], "start_then_result": []}
    async with local_servers("paysaga-wait-") as servers:
        await open_bench_accounts(servers.store, 0)
        client, queue = servers.client, f"wait-{uuid.uuid4()}"

        def request() -> PaymentRequest:
            return PaymentRequest(
                payment_id=f"wait-{uuid.uuid4().hex}",
                payer_account_id="world",
                payee_account_id="shop",
                amount_minor=100,
                currency="EUR",
            )

        async def with_update(_: int) -> None:
            state = await start_payment_and_wait(client, request(), task_queue=queue)
            assert state.status == "SETTLED"

        async def with_result(_: int) -> None:
            handle = await start_payment(client, request(), task_queue=queue)
            assert (await handle.result()).status == "SETTLED"

        per_round = max(1, args.payments // ROUNDS)
        activities = payment_activities(servers.store, servers.client)
        async with build_worker(
            client, Settings(_env_file=None), task_queue=queue, activities=activities
        ):
            await drive("warm-up", 20, args.concurrency, with_result)
            for _ in range(ROUNDS):
                results["update_with_start"].append(
                    await drive("update-with-start", per_round, args.concurrency, with_update)
                )
                results["start_then_result"].append(
                    await drive("start, then the result", per_round, args.concurrency, with_result)
                )

    summary = {}
    for name, runs in results.items():
        summary[name] = {
            "per_s": round(sum(r.payments for r in runs) / sum(r.seconds for r in runs), 2),
            "p50_ms_by_round": [r.p50_ms for r in runs],
            "p99_ms_by_round": [r.p99_ms for r in runs],
        }
        print(
            f"{name:>18}: {summary[name]['per_s']:6.2f} payments/s, "
            f"p50 {summary[name]['p50_ms_by_round']} ms, p99 {summary[name]['p99_ms_by_round']} ms"
        )
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    out = args.out or ROOT / "bench" / "results" / f"wait_settled-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"benchmark": "wait_settled", "concurrency": args.concurrency, **summary}, indent=2
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # see DEVELOPERS.md: the Temporal client can abort at interpreter exit
