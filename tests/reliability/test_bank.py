"""The bank test: money moves under faults, then the checker judges the run (issue 11, §5).

Against a real `paysaga up` with two workers, `paysaga chaos run` drives the bank workload
(concurrent clients, operators and readers over the HTTP API) while it injects faults,
then `paysaga chaos check` waits for the system to quiesce and checks every invariant.

- `test_a_bank_run_with_one_fault_of_each_kind_is_valid`, in `make test`: 60 s of load
  with one fault of each kind (`RELIABILITY_BANK_DURATION_S` changes the 60).
- `test_a_long_bank_run_with_every_fault_is_valid` (marker `reliability`, left out of
  `make test`; `make reliability` runs it): `RELIABILITY_DURATION_S` (600) of load at
  `RELIABILITY_CLIENTS` clients (16) and `RELIABILITY_READERS` readers (4), every fault
  kind again and again (one in each lane every `RELIABILITY_FAULT_INTERVAL_S`, 20 s, on
  average). It prints the run's summary: operations, faults, retries, payments per
  terminal state, and the invariants checked.

`RELIABILITY_SEED` fixes the seed (otherwise each run draws one, and prints it);
`RELIABILITY_CLOSE_BOUND_S` (600) is the long run's bound on a payment's life.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from paysaga.chaos.history import CHECK_FILE, FAULT_KINDS, load_summary
from tests.harness.stack import RunningStack
from tests.reliability.well_formed import assert_well_formed

BANK_DURATION_S = float(os.environ.get("RELIABILITY_BANK_DURATION_S", "60"))
LONG_DURATION_S = float(os.environ.get("RELIABILITY_DURATION_S", "600"))
LONG_CLIENTS = int(os.environ.get("RELIABILITY_CLIENTS", "16"))
LONG_READERS = int(os.environ.get("RELIABILITY_READERS", "4"))
LONG_FAULT_INTERVAL_S = float(os.environ.get("RELIABILITY_FAULT_INTERVAL_S", "20"))
# Every payment ends within this of its PaymentInitiated. At the long run's load an
# operator's answer to an approval can itself take minutes to come (its reads of the
# payment wait on a busy worker): 238 s, the slowest in a 600 s run here, against 70 s at
# the bank test's load, whose bound is the checker's default (300 s).
LONG_CLOSE_BOUND_S = float(os.environ.get("RELIABILITY_CLOSE_BOUND_S", "600"))
SEED = os.environ.get("RELIABILITY_SEED")
# Far beyond the run: each lane injects each of its kinds once, and nothing more.
ONCE_FAULT_INTERVAL_S = 100_000
# After the load: the operators' pending actions (an approval of a payment submitted at
# the very end, slowed by the last faults, comes within a minute), then the payments
# still open.
DRAIN_TIMEOUT_S = 60
SETTLE_TIMEOUT_S = 60
QUIESCE_TIMEOUT_S = 120
# The chaos run's set-up (accounts, funding), the drain and the settle wait.
RUN_OVERHEAD_S = 240
# The checker past quiescence: the ledger's walks and a reconciliation run.
CHECK_OVERHEAD_S = 240
# `paysaga up`'s start and stop.
STACK_S = 120


def _timeout_s(duration_s: float) -> float:
    return duration_s + RUN_OVERHEAD_S + QUIESCE_TIMEOUT_S + CHECK_OVERHEAD_S + STACK_S


def _paysaga(stack: RunningStack, log: Path, *args: str, timeout_s: float) -> int:
    """Run a `paysaga` command against the stack; its output goes to `log`."""
    with open(log, "a") as out:
        out.write(f"$ paysaga {' '.join(args)}\n")
        out.flush()
        try:
            return subprocess.run(
                [sys.executable, "-m", "paysaga", *args],
                env=stack.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
            ).returncode
        except subprocess.TimeoutExpired:
            pytest.fail(f"paysaga {args[:2]} overran {timeout_s} s:\n{log.read_text()[-5000:]}")


def bank_run(
    stack: RunningStack,
    out: Path,
    *,
    duration_s: float,
    fault_interval_s: float,
    clients: int | None = None,
    readers: int | None = None,
    close_bound_s: float | None = None,
) -> dict[str, Any]:
    """Start the stack, run the workload under every fault kind, check the run; returns
    the summary (with the check) after printing it."""
    started = time.monotonic()
    startup_s = stack.start()
    run_dir = out / "run"
    log = out / "bank.log"
    print(f"the run and its log: {out}")
    options = [
        *("--out", str(run_dir), "--duration-s", str(duration_s), "--faults", "all"),
        *("--fault-interval-s", str(fault_interval_s)),
        *("--drain-timeout-s", str(DRAIN_TIMEOUT_S), "--settle-timeout-s", str(SETTLE_TIMEOUT_S)),
        "--no-check",
    ]
    if SEED is not None:
        options += ["--seed", SEED]
    if clients is not None:
        options += ["--clients", str(clients)]
    if readers is not None:
        options += ["--readers", str(readers)]
    code = _paysaga(stack, log, "chaos", "run", *options, timeout_s=duration_s + RUN_OVERHEAD_S)
    assert code == 0, log.read_text()[-5000:]
    run_s = time.monotonic() - started
    bound = [] if close_bound_s is None else ["--close-bound-s", str(close_bound_s)]
    code = _paysaga(
        stack,
        log,
        *("chaos", "check", str(run_dir), "--quiesce-timeout-s", str(QUIESCE_TIMEOUT_S), *bound),
        timeout_s=QUIESCE_TIMEOUT_S + CHECK_OVERHEAD_S,
    )
    if code not in (0, 1) or not (run_dir / CHECK_FILE).exists():
        pytest.fail(f"the checker did not judge the run (exit {code}):\n{log.read_text()[-5000:]}")
    check = json.loads((run_dir / CHECK_FILE).read_text())
    summary = load_summary(run_dir)
    summary["check"] = check
    summary["timings_s"] = {
        "startup": round(startup_s, 1),
        "run": round(run_s - startup_s, 1),
        "check": round(time.monotonic() - started - run_s, 1),
    }
    print(render_summary(summary))
    invalid = {k: v for k, v in check["invariants"].items() if not v["valid?"]}
    assert check["valid?"] is True and code == 0, (
        f"the run in {run_dir} is not valid (seed {summary['seed']}):\n"
        + json.dumps(invalid, indent=1)[:8000]
        + "\n"
        + log.read_text()[-3000:]
    )
    return summary


def render_summary(summary: dict[str, Any]) -> str:
    """The run in a few lines: operations, faults, retries, payments, invariants."""
    ops, http, faults = summary["operations"], summary["http"], summary["faults"]
    check = summary["check"]
    payments = check["payments"]
    lines = [
        f"bank run {summary.get('run_tag')}: seed {summary['seed']}, "
        f"{summary['duration_s']:.0f} s of load, timings {summary['timings_s']}",
        f"  operations: {ops['submissions']} submissions ({ops['load_submissions']} load, "
        f"{ops['funding_submissions']} funding), {ops['acked']} acknowledged, "
        f"{ops['duplicates_sent']} deliberate duplicates, actions {ops['actions']}, "
        f"reads {ops['reads']}",
        f"  HTTP: {http['requests']} requests, {http['retries']} retries "
        f"({http['retried_because']}), {http['gave_up']} given up",
        f"  faults: {faults['injected']} injected, {faults['failed']} failed: "
        + ", ".join(f"{k} {v['ok']}/{v['injected']}" for k, v in faults["per_kind"].items()),
        f"  payments per terminal state (ledger): {payments['per_state']}; slowest to close "
        f"{payments['slowest_close_s']} s (bound {payments['close_bound_s']} s): "
        f"{payments.get('slowest')}",
        f"  quiescence: {check['quiescence']['waited_s']} s, "
        f"{len(check['quiescence']['sweeps'])} sweep(s), repaired "
        f"{sum(len(s['repaired']) for s in check['quiescence']['sweeps'])}",
        f"  valid? {str(check['valid?']).lower()}; invariants checked:",
    ]
    for name, invariant in check["invariants"].items():
        lines.append(
            f"    {name:<16} valid? {str(invariant['valid?']).lower():<5} "
            f"checked {invariant['checked']:>7}, violations {invariant['violations']}"
            + (f": {invariant['first']}" if invariant["first"] else "")
        )
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(_timeout_s(BANK_DURATION_S))
def test_a_bank_run_with_one_fault_of_each_kind_is_valid(
    stack: RunningStack, tmp_path: Path
) -> None:
    summary = bank_run(
        stack, tmp_path, duration_s=BANK_DURATION_S, fault_interval_s=ONCE_FAULT_INTERVAL_S
    )
    injected = {k: v["injected"] for k, v in summary["faults"]["per_kind"].items()}
    assert set(injected) == set(FAULT_KINDS), injected
    # One of each kind, and each applied: the stack came back from every one.
    assert summary["faults"]["failed"] == 0, summary["faults"]
    assert_well_formed(stack, tmp_path / "run")


@pytest.mark.reliability
@pytest.mark.timeout(_timeout_s(LONG_DURATION_S))
def test_a_long_bank_run_with_every_fault_is_valid(stack: RunningStack, tmp_path: Path) -> None:
    summary = bank_run(
        stack,
        tmp_path,
        duration_s=LONG_DURATION_S,
        fault_interval_s=LONG_FAULT_INTERVAL_S,
        clients=LONG_CLIENTS,
        readers=LONG_READERS,
        close_bound_s=LONG_CLOSE_BOUND_S,
    )
    injected = {k: v["injected"] for k, v in summary["faults"]["per_kind"].items()}
    assert set(injected) == set(FAULT_KINDS), injected
    # Every fault applied, each time: the stack came back from every one.
    assert summary["faults"]["failed"] == 0, summary["faults"]
