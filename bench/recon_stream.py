"""Streaming reconciliation: how long from a statement's upload to its discrepancy in
the ledger.

Starts `paysaga up` (its own data directory and free ports, as `bench/api.py` does),
creates an API key, then uploads --statements processor reports one after another,
each with one line the ledger has never seen (so one `missing_in_ledger`). For each it
times the upload's answer, and the time from sending the upload to the moment its
`DiscrepancyDetected` is readable in the ledger's event feed (`GET /v1/events`, polled
every --poll-ms): the path through the API's ingestion, the statement stream workflow
(signal-with-start), a reconciliation run's activities, and the ledger append.

It prints p50, p99 and max of both, and writes bench/results/recon-stream-<time>.json.

    .venv/bin/python bench/recon_stream.py --statements 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.api import start_stack  # noqa: E402
from bench.common import percentile  # noqa: E402

console = Console(stderr=True)
DETECTION_TIMEOUT_S = 60.0
FEED_PAGE = 1000


async def feed_head(http: httpx.AsyncClient) -> int:
    """The feed's position now: every event at or below it has been handed out."""
    response = await http.get("/v1/events", params={"after_seq": 0, "limit": 1})
    response.raise_for_status()
    return int(response.json()["safe_seq"])


async def wait_for_discrepancy(
    http: httpx.AsyncClient, after_seq: int, reference: str, poll_s: float
) -> float:
    """When the DiscrepancyDetected naming `reference` was first readable (monotonic)."""
    deadline = time.monotonic() + DETECTION_TIMEOUT_S
    while time.monotonic() < deadline:
        response = await http.get("/v1/events", params={"after_seq": after_seq, "limit": FEED_PAGE})
        response.raise_for_status()
        page = response.json()
        for event in page["events"]:
            if (
                event["event_type"] == "DiscrepancyDetected"
                and event["payload"]["reference"] == reference
            ):
                return time.monotonic()
        after_seq = page["next_after_seq"]
        await asyncio.sleep(poll_s)
    raise SystemExit(f"no DiscrepancyDetected for {reference} within {DETECTION_TIMEOUT_S} s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--statements", type=int, default=30)
    parser.add_argument("--poll-ms", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="paysaga-bench-recon-"))
    stack, _env, url, api_key = start_stack(data_dir)
    uploads_ms: list[float] = []
    detections_ms: list[float] = []
    try:
        headers = {"Authorization": f"Bearer {api_key}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
            today = datetime.now(UTC).date().isoformat()
            for index in range(args.statements):
                reference = f"bench-{uuid.uuid4().hex[:16]}"
                content = (
                    "date,reference,amount,currency,type\n"
                    f"{today},{reference},{index + 1}.00,EUR,capture\n"
                ).encode()
                after = await feed_head(http)
                sent = time.monotonic()
                response = await http.post(
                    "/v1/statements", files={"file": (f"{reference}.csv", content, "text/csv")}
                )
                answered = time.monotonic()
                if response.status_code != 201:
                    raise SystemExit(f"upload refused: {response.status_code} {response.text}")
                seen = await wait_for_discrepancy(http, after, reference, args.poll_ms / 1000)
                uploads_ms.append((answered - sent) * 1000)
                detections_ms.append((seen - sent) * 1000)
                console.print(
                    f"{index + 1}/{args.statements}: upload {uploads_ms[-1]:.0f} ms, "
                    f"in the ledger after {detections_ms[-1]:.0f} ms"
                )
    finally:
        stack.send_signal(signal.SIGINT)
        stack.wait(timeout=60)
        shutil.rmtree(data_dir, ignore_errors=True)

    figures = {
        "upload_ms": {
            "p50": percentile(uploads_ms, 0.5),
            "p99": percentile(uploads_ms, 0.99),
            "max": max(uploads_ms),
        },
        "upload_to_discrepancy_detected_ms": {
            "p50": percentile(detections_ms, 0.5),
            "p99": percentile(detections_ms, 0.99),
            "max": max(detections_ms),
        },
    }
    table = Table(title=f"upload to DiscrepancyDetected, {args.statements} statements")
    for column in ("figure", "p50 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="right" if column != "figure" else "left")
    for name, values in figures.items():
        table.add_row(name, *(f"{values[k]:.0f}" for k in ("p50", "p99", "max")))
    Console().print(table)
    out = args.out or ROOT / "bench" / "results" / (
        f"recon-stream-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "script": "recon_stream.py",
                "at": datetime.now(UTC).isoformat(),
                "statements": args.statements,
                "poll_ms": args.poll_ms,
                "uploads_ms": uploads_ms,
                "detections_ms": detections_ms,
                **figures,
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
    # A process that used a Temporal client can abort at exit (sdk-python issue 300).
    os._exit(0)
