"""The HTTP API's cost: payments driven through the API against the stack `make up` runs.

Starts `paysaga up` (its own data directory and free ports, so it never disturbs a
running one), creates an API key and accounts, then runs, in one run:

1. **floor**: FloorWorkflow (4 regular no-op activities) on the stack's Temporal;
2. **saga only**: payments started straight on Temporal, run by the stack's worker;
3. **API, wait=settled**: `POST /v1/payments?wait=settled` from C concurrent clients;
4. **API, 202**: `POST /v1/payments` from C clients, then waits until all have ended.

It prints accepted and settled payments per second, p50/p99 submit-to-202 and
submit-to-settled, and settled/s as a ratio to the floor and to the saga-only run (the
target: API ≥ 0.9 × saga only). Writes bench/results/api-<time>.json.

    .venv/bin/python bench/api.py --payments 300 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from temporalio.client import Client  # noqa: E402
from temporalio.contrib.pydantic import pydantic_data_converter  # noqa: E402

from bench.common import drive, run_floor  # noqa: E402
from paysaga.payments import policy_from_settings, start_payment  # noqa: E402
from paysaga.settings import Settings  # noqa: E402
from workflows.models import PaymentRequest  # noqa: E402

console = Console(stderr=True)
TERMINAL = {"SETTLED", "DECLINED", "REJECTED", "FAILED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_stack(data_dir: Path) -> tuple[subprocess.Popen[bytes], dict[str, str], str, str]:
    api_port, temporal_port, ui_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in Settings.env_names()} | {
        "PAYSAGA_DATA_DIR": str(data_dir),
        "PAYSAGA_API_PORT": str(api_port),
        "PAYSAGA_TEMPORAL_PORT": str(temporal_port),
        "PAYSAGA_TEMPORAL_UI_PORT": str(ui_port),
        "PAYSAGA_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "paysaga", "up"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{api_port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("paysaga up did not become ready")
        time.sleep(0.3)
    key = subprocess.run(
        [
            sys.executable,
            "-m",
            "paysaga",
            "apikey",
            "create",
            "--name",
            "bench",
            "--scopes",
            "payments:write,payments:read,accounts:write,accounts:read,ops",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return process, env, url, key


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payments", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    n, c = args.payments, args.concurrency

    data_dir = Path(tempfile.mkdtemp(prefix="paysaga-bench-api-"))
    stack, env, url, api_key = start_stack(data_dir)
    try:
        settings = Settings(_env_file=None, temporal_port=int(env["PAYSAGA_TEMPORAL_PORT"]))
        client = await Client.connect(
            settings.temporal_target, data_converter=pydantic_data_converter
        )
        headers = {"Authorization": f"Bearer {api_key}"}
        limits = httpx.Limits(max_connections=c * 2, max_keepalive_connections=c * 2)
        async with httpx.AsyncClient(
            base_url=url, headers=headers, timeout=60, limits=limits
        ) as http:

            async def post(path: str, body: dict[str, object], **params: str) -> httpx.Response:
                response = await http.post(
                    path, json=body, params=params, headers={"Idempotency-Key": str(uuid.uuid4())}
                )
                response.raise_for_status()
                return response

            await post(
                "/v1/accounts",
                {
                    "id": "world",
                    "currency": "EUR",
                    "kind": "external",
                    "overdraft_limit_minor": None,
                },
            )
            await post("/v1/accounts", {"id": "shop", "currency": "EUR", "kind": "merchant"})
            for i in range(c):
                await post(
                    "/v1/accounts", {"id": f"payer-{i}", "currency": "EUR", "kind": "customer"}
                )
                await post(
                    "/v1/payments",
                    {
                        "payer_account_id": "world",
                        "payee_account_id": f"payer-{i}",
                        "amount_minor": 900_000,
                        "currency": "EUR",
                    },
                    wait="settled",
                )

            def body(index: int) -> dict[str, object]:
                return {
                    "payer_account_id": f"payer-{index % c}",
                    "payee_account_id": "shop",
                    "amount_minor": 100,
                    "currency": "EUR",
                }

            # 1. The floor, on the same Temporal server.
            console.print("floor ...")
            floor = await run_floor(client, settings, n, c)

            # 2. The saga alone: straight to Temporal, run by the stack's worker.
            async def saga_one(index: int) -> None:
                b = body(index)
                handle = await start_payment(
                    client,
                    PaymentRequest(
                        payment_id=f"saga-{uuid.uuid4().hex}",
                        policy=policy_from_settings(settings),
                        **b,
                    ),
                    task_queue=settings.task_queue,
                )
                outcome = await handle.result()
                assert outcome.status == "SETTLED", outcome

            console.print("saga only ...")
            saga = await drive("saga only (Temporal client)", n, c, saga_one)

            # 3. Through the API, waiting for each payment to end.
            async def api_wait_one(index: int) -> None:
                response = await post("/v1/payments", body(index), wait="settled")
                assert response.json()["status"] == "SETTLED", response.text

            console.print("API, wait=settled ...")
            api_settled = await drive("API ?wait=settled (submit-to-settled)", n, c, api_wait_one)

            # 4. Through the API, 202 at once; then until every payment has ended.
            submitted: list[str] = []

            async def api_accept_one(index: int) -> None:
                submitted.append((await post("/v1/payments", body(index))).json()["id"])

            console.print("API, 202 ...")
            started = time.perf_counter()
            accepted = await drive("API 202 (submit-to-202)", n, c, api_accept_one)
            pending = set(submitted)
            while pending:
                page = (
                    await http.get("/v1/payments", params={"account_id": "shop", "limit": 200})
                ).json()
                for payment in page["payments"]:
                    if payment["status"] in TERMINAL:
                        pending.discard(payment["id"])
                if pending:
                    # Anything older than one page is read one by one.
                    for payment_id in list(pending)[:50]:
                        status = (await http.get(f"/v1/payments/{payment_id}")).json()["status"]
                        if status in TERMINAL:
                            pending.discard(payment_id)
                    await asyncio.sleep(0.2)
            accepted_all_ended_s = time.perf_counter() - started
    finally:
        stack.send_signal(signal.SIGTERM)
        try:
            stack.wait(60)
        except subprocess.TimeoutExpired:
            stack.kill()

    runs = [floor, saga, api_settled, accepted]
    table = Table(title=f"API vs saga vs floor: {n} payments, {c} concurrent clients")
    for column in ("run", "per s", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for run in runs:
        table.add_row(run.name, f"{run.per_s:.2f}", f"{run.p50_ms:.0f}", f"{run.p99_ms:.0f}")
    Console(width=140).print(table)
    settled_after_202 = round(n / accepted_all_ended_s, 2)
    figures = {
        "accepted_per_s": accepted.per_s,
        "settled_per_s_wait": api_settled.per_s,
        "settled_per_s_after_202": settled_after_202,
        "submit_to_202_ms": {"p50": accepted.p50_ms, "p99": accepted.p99_ms},
        "submit_to_settled_ms": {"p50": api_settled.p50_ms, "p99": api_settled.p99_ms},
        "floor_per_s": floor.per_s,
        "saga_only_per_s": saga.per_s,
        "ratio_settled_to_floor": round(api_settled.per_s / floor.per_s, 3),
        "ratio_settled_to_saga_only": round(api_settled.per_s / saga.per_s, 3),
    }
    for name, value in figures.items():
        print(f"{name}: {value}")
    out = ROOT / "bench" / "results" / f"api-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "api",
                "payments": n,
                "concurrency": c,
                "runs": [asdict(r) for r in runs],
                **figures,
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # see DEVELOPERS.md: the Temporal client can abort at interpreter exit
