"""What bounds a chaos run, without a stack: the fault kinds asked for (`--faults`) and
the number of payment submissions (`--ops`).

The nemesis runs against a data directory with no stack in it, so every fault it injects
fails at once (no service to kill, no database for an outage) and is recorded as failed:
what it injected, and when, is all there is to see.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from paysaga.chaos.faults import FaultTargets, Nemesis
from paysaga.chaos.history import HistoryWriter
from paysaga.chaos.workload import ApiClient, OpsBudget, Registry, Workload, WorkloadConfig

# Nothing listens here.
NOWHERE = "127.0.0.1:9"
WINDOW_S = 0.5
RUN_TIMEOUT_S = 10.0


def _nemesis(tmp_path: Path, history: HistoryWriter, kinds: list[str]) -> Nemesis:
    return Nemesis(
        FaultTargets(
            data_dir=tmp_path / "no-stack",
            api_url=f"http://{NOWHERE}",
            temporal_address=NOWHERE,
            temporal_namespace="default",
            run_tag="bounds",
        ),
        history,
        Registry(),
        kinds=kinds,
        seed=11,
        window_start_t=0.0,
        window_end_t=WINDOW_S,
        interval_s=0.02,
        owner_engine=None,
    )


async def test_the_nemesis_injects_only_the_fault_kinds_asked_for(tmp_path: Path) -> None:
    # One kind in each of three lanes (processes, servers, the processor), none of the
    # operators', and not every kind of a lane.
    chosen = ["kill-api", "pg-restart-fast", "processor-error"]
    history = HistoryWriter(tmp_path / "run")
    nemesis = _nemesis(tmp_path, history, chosen)
    try:
        await asyncio.wait_for(nemesis.run(asyncio.Event()), RUN_TIMEOUT_S)
    finally:
        await nemesis.close()
        history.close()
    faults = [r for r in history.records if r["type"] == "fault"]
    injected = Counter(f["kind"] for f in faults)
    # Each kind asked for at least once (the first pass), then more of them at random
    # until the window closed (and the nemesis stopped by itself); never another kind.
    assert set(injected) == set(chosen), injected
    assert len(faults) > len(chosen), injected
    assert not any(f["ok"] for f in faults), faults


async def test_a_nemesis_asked_for_no_fault_injects_none_and_one_asked_for_a_bogus_one_refuses(
    tmp_path: Path,
) -> None:
    history = HistoryWriter(tmp_path / "run")
    nemesis = _nemesis(tmp_path, history, [])
    try:
        await asyncio.wait_for(nemesis.run(asyncio.Event()), RUN_TIMEOUT_S)
    finally:
        await nemesis.close()
        history.close()
    assert history.records == []
    with pytest.raises(ValueError, match="unknown fault kinds: bogus"):
        _nemesis(tmp_path, history, ["kill-api", "bogus"])


async def test_the_load_ends_once_its_operations_are_spent(tmp_path: Path) -> None:
    stop = asyncio.Event()
    budget = OpsBudget(3, stop)
    assert [budget.take() for _ in range(3)] == [True, True, True]
    # The last submission ends the run: the driver waits on `stop`, and so does the load.
    assert stop.is_set() and budget.used == 3
    assert budget.take() is False and budget.used == 3

    # Clients that find the budget spent send nothing, and the load ends by itself.
    stop = asyncio.Event()
    history = HistoryWriter(tmp_path / "run")
    api = ApiClient(f"http://{NOWHERE}", None)
    workload = Workload(
        api,
        history,
        WorkloadConfig(clients=4, readers=0),
        seed=3,
        run_tag="bounds",
        registry=Registry(),
        run_started=datetime.now(UTC),
    )
    try:
        await asyncio.wait_for(workload.run(stop, OpsBudget(0, stop)), RUN_TIMEOUT_S)
    finally:
        await api.close()
        history.close()
    assert stop.is_set()
    assert history.records == [] and api.stats.requests == 0
