"""What an operator does to a payment's workflow: the `temporal` CLI, resets, sweeps.

Tests act as operations staff would, through Temporal's own CLI where the issue names
it (terminate, reset), and through the same service API the UI uses elsewhere.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import Client
from temporalio.common import RetryPolicy

from activities.ledger import LedgerActivities
from activities.processor import ProcessorActivities, SimulatedProcessor
from activities.sweeper import SWEEPER_ACTOR, SweeperActivities
from ledger.store import EventStore
from paysaga.settings import Settings
from paysaga.temporal import find_binary
from tests.harness.saga import Payments
from worker import build_worker
from workflows.models import (
    CaptureRequest,
    CaptureResult,
    Recorded,
    RecordEvent,
    SweepReport,
    SweepRequest,
)
from workflows.sweeper import SweeperWorkflow

CLI_TIMEOUT_S = 30
SWEEP_TIMEOUT = timedelta(seconds=60)


def temporal_cli(client: Client, *args: str) -> str:
    """Run `temporal <args>` against the client's server and namespace."""
    result = subprocess.run(
        [
            find_binary("temporal"),
            *args,
            "--address",
            client.service_client.config.target_host,
            "--namespace",
            client.namespace,
        ],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert result.returncode == 0, f"temporal {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


async def reset_points(client: Client, workflow_id: str, run_id: str) -> list[int]:
    """Every point a run can be reset to: its completed workflow tasks."""
    history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    return [
        event.event_id
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    ]


async def reset_to(client: Client, workflow_id: str, run_id: str, event_id: int) -> str:
    """Reset a run to just after a workflow task; returns the new run's id."""
    response = await client.workflow_service.reset_workflow_execution(
        ResetWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
            reason=f"test: reset to event {event_id}",
            workflow_task_finish_event_id=event_id,
            request_id=str(uuid.uuid4()),
        )
    )
    return response.run_id


async def sweep(client: Client, task_queue: str) -> SweepReport:
    """One sweep, now, on the test's queue (the schedule would start the same workflow)."""
    report: SweepReport = await client.execute_workflow(
        SweeperWorkflow.run,
        SweepRequest(idle_s=0),
        id=f"sweep-{uuid.uuid4()}",
        task_queue=task_queue,
        execution_timeout=SWEEP_TIMEOUT,
        retry_policy=RetryPolicy(maximum_attempts=1),
    )
    return report


@dataclass
class Gate:
    """Holds one step of every payment (its ledger append) until it is opened."""

    step: str
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    # What each held append did once let through: how a stale step fared.
    outcomes: list[str] = field(default_factory=list)


class GatedLedger(LedgerActivities):
    def __init__(self, store: EventStore, gate: Gate) -> None:
        super().__init__(store)
        self.gate = gate

    async def _append(self, record: RecordEvent) -> Recorded:
        # The saga's step is held, never the sweeper's repair of it (which may post the
        # same step: a captured payment's settlement).
        if record.step != self.gate.step or record.actor == SWEEPER_ACTOR:
            return await super()._append(record)
        self.gate.reached.set()
        await self.gate.opened.wait()
        try:
            recorded = await super()._append(record)
        except Exception as error:
            self.gate.outcomes.append(f"refused: {error}")
            raise
        self.gate.outcomes.append("appended" if recorded.appended else "found")
        return recorded


class GatedProcessor(SimulatedProcessor):
    """The simulator, its captures held by the gate when the gate's step is "capture"."""

    def __init__(self, engine: AsyncEngine, gate: Gate) -> None:
        super().__init__(engine)
        self.gate = gate

    async def capture(self, request: CaptureRequest, attempt: int) -> CaptureResult:
        if self.gate.step != "capture":
            return await super().capture(request, attempt)
        self.gate.reached.set()
        await self.gate.opened.wait()
        result = await super().capture(request, attempt)
        self.gate.outcomes.append("captured" if result.captured else f"refused: {result.refusal}")
        return result


@asynccontextmanager
async def gated_worker(
    client: Client, store: EventStore, settings: Settings, task_queue: str, gate: Gate
) -> AsyncIterator[Payments]:
    """A worker with every activity (the sweeper's too), one saga step held by `gate`:
    a ledger append, or the processor's capture (step "capture")."""
    ledger = GatedLedger(store, gate)
    authorizer = GatedProcessor(store.engine, gate)
    activities = [
        *ledger.all(),
        *ProcessorActivities(authorizer, ledger).all(),
        *SweeperActivities(ledger, authorizer, client).all(),
    ]
    async with build_worker(client, settings, task_queue=task_queue, activities=activities):
        try:
            yield Payments(client, store, task_queue)
        finally:
            gate.opened.set()
