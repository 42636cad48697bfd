"""A round trip through the task queue, to prove a worker is polling and executing.

The stack's own tests and operators (`paysaga ping`) use it after a restart: a
workflow that completes means the frontend, the matching service and a worker
are all alive.
"""

from __future__ import annotations

from pydantic import BaseModel
from temporalio import workflow


class Pong(BaseModel):
    workflow_id: str
    task_queue: str


@workflow.defn(name="Ping")
class PingWorkflow:
    @workflow.run
    async def run(self) -> Pong:
        info = workflow.info()
        return Pong(workflow_id=info.workflow_id, task_queue=info.task_queue)


if __name__ == "__main__":
    raise SystemExit("workflow definitions are loaded by the worker, not run directly")
