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
    ScheduleCalendarSpec,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.worker import PollerBehaviorAutoscaling, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.ledger import LedgerActivities
from activities.processor import Authorizer, ProcessorActivities, SimulatedProcessor
from activities.reconciliation import ReconciliationActivities, ReconciliationConfig
from activities.sweeper import SweeperActivities
from ledger.store import EventStore
from paysaga.db import open_store, service_urls
from paysaga.reconciliation import watch_inbox
from paysaga.settings import DEFAULT_TASK_QUEUE, Settings
from paysaga.telemetry import sdk_runtime, tracer_provider, tracing_interceptors, worker_metrics_url
from paysaga.temporal import connect
from recon.rules import MatchRules
from workflows.diagnostics import PingWorkflow
from workflows.models import SweepRequest
from workflows.payment import PaymentWorkflow
from workflows.reconciliation import (
    DiscrepancyWorkflow,
    ReconciliationWorkflow,
    StatementStreamWorkflow,
)
from workflows.reconciliation_models import ReconciliationRequest
from workflows.sweeper import SweeperWorkflow

log = logging.getLogger("paysaga.worker")

# Modules loaded once, outside the sandbox, instead of once per workflow run: without
# this each run re-imports them (about 11x slower). They are deterministic to use.
SANDBOX_PASSTHROUGH_MODULES = ("pydantic", "pydantic_core", "sqlalchemy", "ledger", "workflows")

WORKFLOWS: Sequence[type] = (
    PaymentWorkflow,
    SweeperWorkflow,
    PingWorkflow,
    ReconciliationWorkflow,
    StatementStreamWorkflow,
    DiscrepancyWorkflow,
)
SCHEDULE_RPC_TIMEOUT = timedelta(seconds=10)
SWEEP_EXECUTION_TIMEOUT = timedelta(minutes=15)
RECON_EXECUTION_TIMEOUT = timedelta(hours=2)


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


def recon_config(settings: Settings) -> ReconciliationConfig:
    return ReconciliationConfig(
        app_url=service_urls(settings).app_url,
        inbox=settings.recon_inbox_path,
        task_queue=settings.task_queue,
        rules=MatchRules(
            amount_tolerance_minor=settings.recon_amount_tolerance_minor,
            date_window_days=settings.recon_date_window_days,
            batch_payouts=settings.recon_batch_payouts,
            split_lines=settings.recon_batch_payouts,
            settlement_window_s=settings.recon_settlement_window_s,
        ),
        open_payment_idle_s=settings.sweep_idle_s,
    )


def worker_activities(
    store: EventStore, client: Client, settings: Settings, authorizer: Authorizer | None = None
) -> list[Any]:
    """Every activity of every workflow: the saga's and the sweeper's
    (`payment_activities`), and reconciliation's."""
    ledger = LedgerActivities(store)
    authorizer = authorizer or SimulatedProcessor(store.engine)
    processor = ProcessorActivities(authorizer, ledger)
    sweeper = SweeperActivities(ledger, authorizer, client)
    recon = ReconciliationActivities(store, client, sweeper, recon_config(settings))
    return [*ledger.all(), *processor.all(), *sweeper.all(), *recon.all()]


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
    return await _ensure_schedule(client, sweeper_schedule_id(queue), schedule)


def recon_schedule_ids(task_queue: str) -> tuple[str, str]:
    """`recon-continuous` and `recon-daily` on the default task queue (a test's own queue
    gets its own pair)."""
    prefix = "" if task_queue == DEFAULT_TASK_QUEUE else f"{task_queue}-"
    return f"{prefix}recon-continuous", f"{prefix}recon-daily"


def recon_schedules(settings: Settings) -> dict[str, Schedule]:
    """The reconciliation schedules as configured: an incremental run every
    PAYSAGA_RECON_INTERVAL_S, and a full run every day at PAYSAGA_RECON_DAILY_HOUR_UTC
    that still runs if Temporal was down then and is back within the catch-up window."""
    queue = settings.task_queue
    continuous_id, daily_id = recon_schedule_ids(queue)
    return {
        continuous_id: Schedule(
            action=ScheduleActionStartWorkflow(
                ReconciliationWorkflow.run,
                ReconciliationRequest(kind="continuous"),
                id=continuous_id,
                task_queue=queue,
                execution_timeout=RECON_EXECUTION_TIMEOUT,
                static_summary="Incremental reconciliation: what is new or still open",
            ),
            spec=ScheduleSpec(
                intervals=[ScheduleIntervalSpec(every=timedelta(seconds=settings.recon_interval_s))]
            ),
            # A run still going when the next is due: the next one is skipped.
            policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        ),
        daily_id: Schedule(
            action=ScheduleActionStartWorkflow(
                ReconciliationWorkflow.run,
                ReconciliationRequest(kind="daily", full=True),
                id=daily_id,
                task_queue=queue,
                execution_timeout=RECON_EXECUTION_TIMEOUT,
                static_summary="Daily full reconciliation",
            ),
            spec=ScheduleSpec(
                calendars=[
                    ScheduleCalendarSpec(
                        hour=[ScheduleRange(settings.recon_daily_hour_utc)],
                        minute=[ScheduleRange(0)],
                        second=[ScheduleRange(0)],
                    )
                ],
                time_zone_name="UTC",
            ),
            policy=SchedulePolicy(
                overlap=ScheduleOverlapPolicy.SKIP,
                catchup_window=timedelta(seconds=settings.recon_daily_catchup_window_s),
            ),
        ),
    }


async def ensure_recon_schedules(client: Client, settings: Settings) -> list[str]:
    """Create the reconciliation schedules, or bring existing ones to the configuration;
    returns the ids created. Any number of workers may call this at once."""
    created = []
    for schedule_id, schedule in recon_schedules(settings).items():
        if await _ensure_schedule(client, schedule_id, schedule):
            created.append(schedule_id)
    return created


async def _ensure_schedule(client: Client, schedule_id: str, schedule: Schedule) -> bool:
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
    # The SDK's metrics and the tracing interceptor belong to the client, so to every
    # worker built on it. One runtime per process: this runs once per process.
    tracing = tracer_provider(settings, "worker")
    client = await connect(
        settings, runtime=sdk_runtime(settings), interceptors=tracing_interceptors(tracing)
    )
    # One connection per concurrent local activity is all the ledger can use.
    store = await open_store(
        service_urls(settings), pool_size=min(settings.worker_local_activities_max, 32)
    )
    worker = build_worker(client, settings, activities=worker_activities(store, client, settings))
    created = await ensure_sweeper_schedule(client, settings)
    log.info(
        "sweeper schedule " + ("created" if created else "in place"),
        extra={"schedule_id": sweeper_schedule_id(settings.task_queue)},
    )
    recon_created = await ensure_recon_schedules(client, settings)
    log.info(
        "reconciliation schedules in place",
        extra={
            "schedule_ids": list(recon_schedule_ids(settings.task_queue)),
            "schedules_created": recon_created,
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "worker started",
        extra={
            "task_queue": settings.task_queue,
            "namespace": settings.temporal_namespace,
            "sdk_metrics_url": (
                worker_metrics_url(settings.worker_metrics_host, settings.worker_metrics_port)
                if settings.worker_metrics_port is not None
                else None
            ),
            "tracing": settings.tracing,
        },
    )
    inbox = asyncio.create_task(watch_inbox(client, settings, stop))
    try:
        async with worker:
            await stop.wait()
            log.info("worker stopping: finishing in-flight activities")
    finally:
        await inbox
        await store.close()
        if tracing is not None:
            # The last batch of spans; the process then leaves through os._exit.
            await asyncio.to_thread(tracing.shutdown)
    log.info("worker stopped")


def main() -> None:
    """Run the worker with the process's settings (`python -m worker`, as `paysaga worker` does)."""
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
