"""SweeperWorkflow: one sweep for payments whose workflow is gone (activities/sweeper.py).

A Temporal schedule starts it every `PAYSAGA_SWEEP_INTERVAL_S` (a minute by default);
the worker creates the schedule at start, idempotently (`ensure_sweeper_schedule`).
An operator can also trigger the schedule from the UI, or run `paysaga sweep`.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.models import SweepReport, SweepRequest

SWEEP_TIMEOUT = timedelta(minutes=10)
SWEEP_HEARTBEAT = timedelta(seconds=60)
SWEEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=3,
)


@workflow.defn(name="SweeperWorkflow")
class SweeperWorkflow:
    @workflow.run
    async def run(self, request: SweepRequest) -> SweepReport:
        report: SweepReport = await workflow.execute_activity(
            "sweeper.sweep",
            request,
            result_type=SweepReport,
            start_to_close_timeout=SWEEP_TIMEOUT,
            heartbeat_timeout=SWEEP_HEARTBEAT,
            retry_policy=SWEEP_RETRY,
        )
        return report


if __name__ == "__main__":
    raise SystemExit("workflow definitions are loaded by the worker, not run directly")
