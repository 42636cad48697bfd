"""Stored histories replay against the current workflow code.

A change that would make a payment in flight behave differently on replay (a new
activity in the middle, a reordered step) fails here, in CI, instead of in production.
Record new histories with `python -m tests.histories.record` when a change is meant to
be incompatible, after versioning it with `workflow.patched`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from worker import WORKFLOWS, sandbox_runner

HISTORIES = sorted((Path(__file__).resolve().parent / "histories").glob("*.json"))


def test_the_recorded_scenarios_are_all_there() -> None:
    names = {path.stem for path in HISTORIES}
    assert {"settled", "declined_by_processor", "cancelled_while_authorizing", "rejected"} <= names


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_a_recorded_history_replays_deterministically(path: Path) -> None:
    recorded = path.read_text()  # noqa: ASYNC240 - a small local file, read once
    history = WorkflowHistory.from_json(f"payment-{path.stem}", recorded)
    replayer = Replayer(
        workflows=list(WORKFLOWS),
        data_converter=pydantic_data_converter,
        workflow_runner=sandbox_runner(),
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
