"""The HTTP API's cost: payments driven through the API against the stack `make up` runs.

Starts `paysaga up` (its own data directory and free ports, so it never disturbs a
running one), creates an API key and accounts, then runs, in one run, at each
concurrency C (`--concurrency 1,5,10,20,40` sweeps them in turn):

1. **saga only**: payments started straight on Temporal, run by the stack's worker;
2. **API, wait=settled**: `POST /v1/payments?wait=settled` from C concurrent clients;

and at the last concurrency also:

3. **floor**: FloorWorkflow (4 regular no-op activities) on the stack's Temporal;
4. **API, 202**: `POST /v1/payments` from C clients, then waits until all have ended.

It prints accepted and settled payments per second, p50/p99 submit-to-202 and
submit-to-settled, and settled/s as a ratio to the floor and to the saga-only run (the
target: API ≥ 0.9 × saga only). `--seconds` bounds each run by time instead of by
count (`--payments` is then its upper bound), and `--per-client N` makes each run go on
until each client has made N. Writes bench/results/api-<time>.json.

    .venv/bin/python bench/api.py --payments 300 --concurrency 16
    .venv/bin/python bench/api.py --concurrency 1,5,10,20,40 --seconds 5 --per-client 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from temporalio.client import Client  # noqa: E402
from temporalio.contrib.pydantic import pydantic_data_converter  # noqa: E402

from bench.common import add_sweep_arguments, drive, run_floor, sweep_concurrencies  # noqa: E402
from paysaga.payments import policy_from_settings, start_payment  # noqa: E402
from paysaga.settings import Settings  # noqa: E402
from workflows.models import PaymentRequest  # noqa: E402

console = Console(stderr=True)
TERMINAL = {"SETTLED", "DECLINED", "REJECTED", "FAILED", "CANCELLED"}
# How long the payments accepted with 202 may take, all together, to end.
ACCEPTED_END_S_MAX = 300.0


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
    add_sweep_arguments(parser, concurrency_default="16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    n, seconds_max = args.payments, args.seconds
    concurrencies = sweep_concurrencies(parser, args)
    c = concurrencies[-1]
    lanes = max(concurrencies)

    data_dir = Path(tempfile.mkdtemp(prefix="paysaga-bench-api-"))
    stack, env, url, api_key = start_stack(data_dir)
    try:
        settings = Settings(_env_file=None, temporal_port=int(env["PAYSAGA_TEMPORAL_PORT"]))
        client = await Client.connect(
            settings.temporal_target, data_converter=pydantic_data_converter
        )
        headers = {"Authorization": f"Bearer {api_key}"}
        limits = httpx.Limits(max_connections=lanes * 2, max_keepalive_connections=lanes * 2)
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
            for i in range(lanes):
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

            def body(index: int, lanes: int) -> dict[str, object]:
                return {
                    "payer_account_id": f"payer-{index % lanes}",
                    "payee_account_id": "shop",
                    "amount_minor": 100,
                    "currency": "EUR",
                }

            levels: list[dict[str, Any]] = []
            for level_c in concurrencies:
                # 1. The saga alone: straight to Temporal, run by the stack's worker.
                async def saga_one(index: int, level_c: int = level_c) -> None:
                    handle = await start_payment(
                        client,
                        PaymentRequest(
                            payment_id=f"saga-{uuid.uuid4().hex}",
                            policy=policy_from_settings(settings),
                            **body(index, level_c),
                        ),
                        task_queue=settings.task_queue,
                    )
                    outcome = await handle.result()
                    assert outcome.status == "SETTLED", outcome

                # 2. Through the API, waiting for each payment to end.
                async def api_wait_one(index: int, level_c: int = level_c) -> None:
                    response = await post("/v1/payments", body(index, level_c), wait="settled")
                    assert response.json()["status"] == "SETTLED", response.text

                console.print(f"concurrency {level_c}: saga only, API wait=settled ...")
                bounds: dict[str, Any] = {
                    "seconds_max": seconds_max,
                    "count_min": args.per_client * level_c,
                }
                saga = await drive("saga only (Temporal client)", n, level_c, saga_one, **bounds)
                api_settled = await drive(
                    "API ?wait=settled (submit-to-settled)", n, level_c, api_wait_one, **bounds
                )
                levels.append(
                    {
                        "concurrency": level_c,
                        "saga_only": asdict(saga),
                        "api_settled": asdict(api_settled),
                        "api_over_saga_only": round(api_settled.per_s / saga.per_s, 3),
                    }
                )

            # 3. The floor, on the same Temporal server, at the last concurrency.
            console.print("floor ...")
            floor = await run_floor(
                client, settings, n, c, seconds_max=seconds_max, count_min=args.per_client * c
            )

            # 4. Through the API, 202 at once; then until every payment has ended.
            submitted: list[str] = []

            async def api_accept_one(index: int) -> None:
                submitted.append((await post("/v1/payments", body(index, c))).json()["id"])

            console.print("API, 202 ...")
            started = time.perf_counter()
            accepted = await drive(
                "API 202 (submit-to-202)",
                n,
                c,
                api_accept_one,
                seconds_max=seconds_max,
                count_min=args.per_client * c,
            )
            pending = set(submitted)
            ended_deadline = time.monotonic() + ACCEPTED_END_S_MAX
            while pending:
                if time.monotonic() > ended_deadline:
                    raise SystemExit(f"{len(pending)} accepted payments had not ended in time")
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
        shutil.rmtree(data_dir, ignore_errors=True)

    # The saga-only and wait=settled runs of the last concurrency: the figures a single
    # run has always had (compare.py reads them).
    runs = [floor, saga, api_settled, accepted]
    table = Table(title="API vs saga vs floor (the stack of `paysaga up`)")
    for column in ("run", "concurrency", "payments", "per s", "p50 ms", "p99 ms", "API / saga"):
        table.add_column(column, justify="right")
    for level in levels:
        for key in ("saga_only", "api_settled"):
            run = level[key]
            table.add_row(
                run["name"],
                str(run["concurrency"]),
                str(run["payments"]),
                f"{run['per_s']:.2f}",
                f"{run['p50_ms']:.0f}",
                f"{run['p99_ms']:.0f}",
                f"{level['api_over_saga_only']:.2f}" if key == "api_settled" else "",
            )
    for run in (floor, accepted):
        table.add_row(
            run.name,
            str(run.concurrency),
            str(run.payments),
            f"{run.per_s:.2f}",
            f"{run.p50_ms:.0f}",
            f"{run.p99_ms:.0f}",
            "",
        )
    Console(width=140).print(table)
    settled_after_202 = round(accepted.payments / accepted_all_ended_s, 2)
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
    out = args.out or ROOT / "bench" / "results" / f"api-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "api",
                "payments": n,
                "concurrency": c,
                "seconds_per_run": seconds_max,
                "per_client_min": args.per_client,
                "sweep": levels,
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
