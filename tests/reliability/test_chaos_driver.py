"""`paysaga chaos run` against a real `paysaga up`: every fault applied, a history the
checker can read.

One short run (20 s of load, every fault kind) against a stack with two workers. It
proves the driver, not the product's invariants (that is the checker's, in
test_bank.py): each kind of fault was injected and the stack came back from it, the
history and the summary have the shape the contract gives them, and the supervisor
really restarted what the faults killed.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from paysaga.chaos.history import (
    FAULT_KINDS,
    RECORD_TYPES,
    SUMMARY_FILE,
    load_history,
    load_summary,
)
from paysaga.embedded_pg import EmbeddedPostgres
from tests.harness.stack import RunningStack

pytestmark = pytest.mark.slow

SEED = 11
# 20 s of load; set-up, the faults' tails, the drain and the settle add about 25 s.
CHAOS_TIMEOUT_S = 100
SUBMIT_FIELDS = {
    "key",
    "payer",
    "payee",
    "amount_minor",
    "currency",
    "simulate",
    "approval",
    "cancel_at_s",
    "attempts",
    "duplicates",
    "acked",
    "payment_id",
    "final_status_code",
    "error",
}
OP_FIELDS = {"op", "payment_id", "status_code", "attempts"}
READ_FIELDS = {
    "what",
    "account_id",
    "posted",
    "pending",
    "available",
    "overdraft_limit",
    "as_of_seq",
    "as_of",
    "entries_min_running_balance",
}
FAULT_FIELDS = {"kind", "target", "detail", "ok"}


@pytest.fixture
def stack() -> Iterator[RunningStack]:
    # PostgreSQL's OS user (when we are root) must pass through the parent directory.
    root = Path(tempfile.mkdtemp(prefix="paysaga-chaos-"))
    root.chmod(0o711)
    running = RunningStack.new(
        root / "data",
        PAYSAGA_WORKERS="2",
        PAYSAGA_FEE_BPS="100",
        PAYSAGA_FEES_ACCOUNT_ID="fees",
        PAYSAGA_SWEEP_INTERVAL_S="5",
        PAYSAGA_SWEEP_IDLE_S="2",
    )
    yield running
    if running.process is not None and running.process.poll() is None:
        running.stop(signal.SIGKILL)
    shutil.rmtree(EmbeddedPostgres(running.data_dir / "pg").socket_dir, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


def _by_type(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {kind: [] for kind in RECORD_TYPES}
    for record in records:
        grouped[record["type"]].append(record)
    return grouped


def test_a_short_chaos_run_applies_every_fault_and_records_a_well_formed_history(
    stack: RunningStack,
) -> None:
    stack.start()
    run_dir = stack.data_dir.parent / "run"
    log = stack.data_dir.parent / "chaos.log"
    # The run's progress goes to a file: if it overruns, the file says where it was.
    command = [
        *(sys.executable, "-m", "paysaga", "chaos", "run", "--out", str(run_dir)),
        *("--duration-s", "20", "--seed", str(SEED), "--clients", "4", "--readers", "2"),
        *("--drain-timeout-s", "5", "--settle-timeout-s", "10", "--no-check"),
    ]
    with open(log, "w") as progress:
        try:
            result = subprocess.run(
                command,
                env=stack.env,
                stdout=subprocess.PIPE,
                stderr=progress,
                text=True,
                timeout=CHAOS_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"the chaos run overran {CHAOS_TIMEOUT_S} s:\n{log.read_text()}")
    assert result.returncode == 0, log.read_text()[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(run_dir)

    info, records = load_history(run_dir)
    assert info.seed == SEED
    assert info.faults_requested == list(FAULT_KINDS)
    assert info.ended_at is not None
    assert datetime.fromisoformat(info.started_at) < datetime.fromisoformat(info.ended_at)
    accounts = info.accounts
    assert len(accounts.customers) == 8
    assert accounts.fees == "fees"  # the stack's own fees account (PAYSAGA_FEES_ACCOUNT_ID)
    assert len({*accounts.customers, accounts.merchant, accounts.fees, accounts.external}) == 11

    for record in records:
        assert record["type"] in RECORD_TYPES
        assert 0 <= record["t"] <= record["t_end"], record
    grouped = _by_type(records)

    # Every fault kind was injected, and each was applied (the stack came back).
    faults = grouped["fault"]
    for fault in faults:
        assert fault.keys() >= FAULT_FIELDS
    injected = Counter(f["kind"] for f in faults)
    assert set(injected) == set(FAULT_KINDS), injected
    failed = [f for f in faults if not f["ok"]]
    assert failed == [], json.dumps(failed, indent=1)

    submits = grouped["submit"]
    for submit in submits:
        assert submit.keys() >= SUBMIT_FIELDS, submit
        assert submit["acked"] == (submit["payment_id"] is not None)
        assert submit["attempts"] >= 1 + submit["duplicates"]
        assert "payment_ids" not in submit, submit  # one payment per Idempotency-Key
    load = [s for s in submits if s["purpose"] == "load"]
    funding = [s for s in submits if s["purpose"] == "funding"]
    assert len(funding) >= 8 and all(s["acked"] for s in funding)
    assert len(load) >= 20
    assert len({s["simulate"] for s in load}) >= 3
    assert any(s["duplicates"] for s in load)
    assert any(s["approval"] for s in load)
    assert any(s["cancel_at_s"] is not None for s in load)

    for op in grouped["op"]:
        assert op.keys() >= OP_FIELDS and op["op"] in ("approve", "reject", "cancel"), op
    assert {op["op"] for op in grouped["op"]} >= {"cancel"}

    reads = grouped["read"]
    for read in reads:
        assert read.keys() >= READ_FIELDS, read
        for name in ("posted", "pending", "available", "overdraft_limit"):
            assert isinstance(read[name], int), read
    assert {r["what"] for r in reads} == {"balance", "entries", "balance_as_of"}
    assert all(r["as_of"] for r in reads if r["what"] == "balance_as_of")

    # The summary counts what the history holds.
    summary = load_summary(run_dir)
    assert (run_dir / SUMMARY_FILE).exists()
    assert summary["seed"] == SEED
    assert summary["operations"]["submissions"] == len(submits)
    assert summary["operations"]["acked"] == sum(1 for s in submits if s["acked"])
    assert summary["faults"]["failed"] == 0
    per_kind = summary["faults"]["per_kind"]
    assert {k: v["injected"] for k, v in per_kind.items()} == dict(injected)
    assert summary["payments"]["acknowledged"] == len(
        {s["payment_id"] for s in submits if s["acked"]}
    )
    assert sum(summary["payments"]["per_status"].values()) == summary["payments"]["acknowledged"]
    assert summary["http"]["retries"] == summary["http"]["attempts"] - summary["http"]["requests"]
    assert summary["ready_at_end"] is True

    # What the faults killed, the supervisor restarted; the stack is ready again.
    restarts = {name: entry["restarts"] for name, entry in stack.state().items()}
    for service in ("api", "projector", "postgres", "temporal"):
        assert restarts[service] >= 1, restarts
    assert restarts["worker"] + restarts["worker-2"] >= 1, restarts
    assert httpx.get(f"{stack.api_url}/readyz", timeout=5).status_code == 200
