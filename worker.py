"""The Temporal worker: polls task queue `payments` and runs workflows and activities.

`paysaga worker` runs this. On SIGTERM or SIGINT it stops polling, lets in-flight
activities finish for up to PAYSAGA_WORKER_SHUTDOWN_GRACE_S, then cancels the rest,
which Temporal retries on another worker.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.worker import PollerBehaviorAutoscaling, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.ledger import LedgerActivities
from activities.processor import Authorizer, ProcessorActivities, SimulatedProcessor
from activities.sweeper import SweeperActivities
from ledger.store import EventStore
from paysaga.db import open_store, service_urls
from paysaga.settings import Settings
from paysaga.temporal import connect
from workflows.diagnostics import PingWorkflow
from workflows.models import SweepRequest
from workflows.payment import PaymentWorkflow
from workflows.sweeper import SweeperWorkflow

log = logging.getLogger("paysaga.worker")

# Modules loaded once, outside the sandbox, instead of once per workflow run: without
# this each run re-imports them (about 11x slower). They are deterministic to use.
SANDBOX_PASSTHROUGH_MODULES = ("pydantic", "pydantic_core", "sqlalchemy", "ledger", "workflows")

WORKFLOWS: Sequence[type] = (PaymentWorkflow, SweeperWorkflow, PingWorkflow)
SCHEDULE_RPC_TIMEOUT = timedelta(seconds=10)
SWEEP_EXECUTION_TIMEOUT = timedelta(minutes=15)


def sandbox_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(
            *SANDBOX_PASSTHROUGH_MODULES
        )
    )


def worker_tuning(settings: Settings) -> dict[str, Any]:
    """Concurrency and polling for any worker of ours (the benchmarks' floor included).

    Pollers autoscale: with the SDK's fixed default (5 workflow-task polls, of which one
    on the shared queue), a burst of new payments waited seconds for its first workflow
    task to be picked up, on the dev server with SQLite.
    """
    return {
        "max_concurrent_activities": settings.worker_activities_max,
        "max_concurrent_local_activities": settings.worker_local_activities_max,
        "max_concurrent_workflow_tasks": settings.worker_workflow_tasks_max,
        "workflow_task_poller_behavior": PollerBehaviorAutoscaling(
            minimum=2, maximum=20, initial=5
        ),
        "activity_task_poller_behavior": PollerBehaviorAutoscaling(
            minimum=1, maximum=20, initial=5
        ),
        "nonsticky_to_sticky_poll_ratio": 1.0,
    }


def build_worker(
    client: Client,
    settings: Settings,
    *,
    task_queue: str | None = None,
    activities: Sequence[Any] = (),
) -> Worker:
    """The worker with every workflow and activity registered, bounded by the settings."""
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=list(WORKFLOWS),
        activities=list(activities),
        workflow_runner=sandbox_runner(),
        graceful_shutdown_timeout=timedelta(seconds=settings.worker_shutdown_grace_s),
        **worker_tuning(settings),
    )


def payment_activities(
    store: EventStore, client: Client, authorizer: Authorizer | None = None
) -> list[Any]:
    """Every activity the saga and the sweeper call: the ledger's, the processor's (the
    simulator unless another `Authorizer` is given) and the sweeper's."""
    ledger = LedgerActivities(store)
    authorizer = authorizer or SimulatedProcessor(store.engine)
    processor = ProcessorActivities(authorizer, ledger)
    sweeper = SweeperActivities(ledger, authorizer, client)
    return [*ledger.all(), *processor.all(), *sweeper.all()]


def sweeper_schedule_id(task_queue: str) -> str:
    return f"{task_queue}-sweeper"


async def ensure_sweeper_schedule(client: Client, settings: Settings) -> bool:
    """The sweeper's schedule on the task queue: created if missing, else brought to the
    configured interval. Returns True if it was created. Any number of workers may call
    this at once."""
    queue = settings.task_queue
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            SweeperWorkflow.run,
            SweepRequest(idle_s=settings.sweep_idle_s),
            id=f"{queue}-sweep",
            task_queue=queue,
            execution_timeout=SWEEP_EXECUTION_TIMEOUT,
        ),
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=timedelta(seconds=settings.sweep_interval_s))]
        ),
        # A sweep still running when the next is due: the next one is skipped.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    schedule_id = sweeper_schedule_id(queue)
    try:
        await client.create_schedule(schedule_id, schedule, rpc_timeout=SCHEDULE_RPC_TIMEOUT)
        return True
    except ScheduleAlreadyRunningError:

        def keep_configured(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(schedule_id).update(
            keep_configured, rpc_timeout=SCHEDULE_RPC_TIMEOUT
        )
        return False


async def run_worker(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    client = await connect(settings)
    # One connection per concurrent local activity is all the ledger can use.
    store = await open_store(
        service_urls(settings), pool_size=min(settings.worker_local_activities_max, 32)
    )
    worker = build_worker(client, settings, activities=payment_activities(store, client))
    created = await ensure_sweeper_schedule(client, settings)
    log.info(
        "sweeper schedule " + ("created" if created else "in place"),
        extra={"schedule_id": sweeper_schedule_id(settings.task_queue)},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "worker started",
        extra={"task_queue": settings.task_queue, "namespace": settings.temporal_namespace},
    )
    try:
        async with worker:
            await stop.wait()
            log.info("worker stopping: finishing in-flight activities")
    finally:
        await store.close()
    log.info("worker stopped")


def main() -> None:
    """Run the worker with the process's settings (`paysaga worker` calls this)."""
    from paysaga.logs import configure_logging
    from paysaga.settings import get_settings

    settings = get_settings()
    configure_logging("worker", level=settings.log_level, json_lines=settings.log_json)
    asyncio.run(run_worker(settings))


if __name__ == "__main__":
    import os

    main()
    # A process that used a Temporal client can abort at exit (sdk-python issue 300).
    os._exit(0)
