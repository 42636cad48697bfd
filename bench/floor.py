"""The floors: workflows with the saga's step shape, or none, and no work at all.

FloorWorkflow runs four regular activities that do nothing (initiate, authorize,
reserve, settle), one after the other; EmptyWorkflow returns at once, so it costs only
what Temporal charges for a workflow that starts and completes. bench/e2e_workflow.py
measures the real saga against both.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy

STEPS = ("initiate", "authorize", "reserve", "settle")
NO_OP_RETRY = RetryPolicy(maximum_attempts=3)


@activity.defn(name="floor.no_op")
async def no_op(step: str) -> str:
    return step


@workflow.defn(name="FloorWorkflow")
class FloorWorkflow:
    @workflow.run
    async def run(self, payment_id: str) -> str:
        for step in STEPS:
            await workflow.execute_activity(
                no_op,
                step,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=NO_OP_RETRY,
            )
        return payment_id


@workflow.defn(name="EmptyWorkflow")
class EmptyWorkflow:
    @workflow.run
    async def run(self, payment_id: str) -> str:
        return payment_id


if __name__ == "__main__":
    raise SystemExit("workflow definitions are loaded by the worker, not run directly")
