"""Record the histories that tests/test_replay.py replays.

    .venv/bin/python -m tests.histories.record [SCENARIO ...]   # all, or only these

Run it only when a workflow change is meant to be incompatible (and then version the
workflow, e.g. with `workflow.patched`, so that payments in flight keep replaying).
It starts its own PostgreSQL and Temporal dev server, runs one payment per scenario,
and writes each history as JSON next to this file.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from paysaga.db import open_store
from paysaga.settings import Settings
from tests.harness.ledger import fund, open_account
from tests.harness.postgres import postgres_server
from tests.harness.saga import TEST_POLICY, Payments, wait_for_state
from tests.harness.temporal import start_dev_server
from worker import build_worker, payment_activities
from workflows.models import ApproveRequest, CancelRequest, RejectRequest
from workflows.payment import PaymentWorkflow

HERE = Path(__file__).resolve().parent
APPROVAL = TEST_POLICY.model_copy(update={"approval_threshold_minor": 5_000})


async def _approve(payments: Payments, handle: Any) -> None:
    await wait_for_state(handle, lambda s: s.status == "PENDING_APPROVAL")
    await handle.execute_update(PaymentWorkflow.approve, ApproveRequest(actor="ops:recorder"))


async def _reject(payments: Payments, handle: Any) -> None:
    await wait_for_state(handle, lambda s: s.status == "PENDING_APPROVAL")
    await handle.execute_update(
        PaymentWorkflow.reject, RejectRequest(actor="ops:recorder", reason="recorded rejection")
    )


async def _cancel(payments: Payments, handle: Any) -> None:
    await wait_for_state(handle, lambda s: "processor" in (s.waiting_for or ""))
    await handle.execute_update(PaymentWorkflow.cancel, CancelRequest(actor="ops:recorder"))


Action = Callable[[Payments, Any], Awaitable[None]]
SCENARIOS: dict[str, tuple[int, dict[str, Any], Any, Action | None]] = {
    "settled": (12_500, {}, TEST_POLICY, None),
    # Settlement since the processor captures (workflow.patched "processor-capture"):
    # "settled" and the others keep the shape of payments started before it.
    "settled_with_capture": (12_500, {}, TEST_POLICY, None),
    "declined_by_processor": (500, {"simulate": "decline"}, TEST_POLICY, None),
    "declined_by_risk": (
        2_000,
        {},
        TEST_POLICY.model_copy(update={"risk_payment_limit_minor": 1_000}),
        None,
    ),
    "insufficient_funds": (900_000, {}, TEST_POLICY, None),
    "flaky_processor": (
        700,
        {"simulate": "flaky"},
        TEST_POLICY.model_copy(update={"processor_attempts_max": 3}),
        None,
    ),
    "cancelled_while_authorizing": (
        400,
        {"simulate": "slow", "simulate_delay_s": 30},
        TEST_POLICY,
        _cancel,
    ),
    "approved": (6_000, {}, APPROVAL, _approve),
    "rejected": (6_000, {}, APPROVAL, _reject),
}


async def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(unknown)}")
    scenarios = {name: SCENARIOS[name] for name in names or SCENARIOS}
    with tempfile.TemporaryDirectory() as workdir, postgres_server(Path(workdir)) as pg:
        database = pg.create_database()
        env = await start_dev_server()
        store = await open_store(database.urls, pool_size=4)
        try:
            await open_account(store, "alice")
            await open_account(store, "bob", kind="merchant")
            await fund(store, "alice", 500_000)
            task_queue = f"record-{uuid.uuid4()}"
            settings = Settings(_env_file=None, task_queue=task_queue)
            payments = Payments(env.client, store, task_queue)
            activities = payment_activities(store, env.client)
            async with build_worker(
                env.client, settings, task_queue=task_queue, activities=activities
            ):
                for name, (amount, metadata, policy, action) in scenarios.items():
                    handle = await payments.start(
                        "alice", "bob", amount, metadata=metadata, policy=policy
                    )
                    if action is not None:
                        await action(payments, handle)
                    try:
                        await handle.result()
                    except Exception as error:
                        print(f"{name}: ended with {error!r}")
                    history = await handle.fetch_history()
                    (HERE / f"{name}.json").write_text(history.to_json())
                    print(f"recorded {name}.json")
        finally:
            await store.close()
            await env.shutdown()
            pg.drop_database(database.name)


if __name__ == "__main__":
    import os
    import sys

    asyncio.run(main(sys.argv[1:]))

    sys.stdout.flush()
    os._exit(0)  # see DEVELOPERS.md: the Temporal client can abort at exit
