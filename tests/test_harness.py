"""The harness itself: real servers, isolated databases, registered search attributes."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.testing import WorkflowEnvironment

from paysaga.settings import Settings
from tests.harness.postgres import PostgresServer
from worker import build_worker
from workflows.diagnostics import PingWorkflow
from workflows.search_attributes import PAYMENT_AMOUNT_MINOR, PAYMENT_STATUS


async def test_each_test_gets_its_own_migrated_database(
    pg_server: PostgresServer, owner_engine: AsyncEngine
) -> None:
    async with owner_engine.begin() as conn:
        name = (await conn.execute(text("SELECT current_database()"))).scalar_one()
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        await conn.execute(
            text(
                "INSERT INTO api_keys (key_id, name, key_hash, scopes) "
                "VALUES ('isolation0', 'x', decode(repeat('00', 32), 'hex'), ARRAY['ops'])"
            )
        )
    assert name.startswith("test_")
    assert name != pg_server.template
    assert version is not None


async def test_rows_from_another_test_are_not_visible(owner_engine: AsyncEngine) -> None:
    # The previous test inserted 'isolation0' into its own database; this one starts empty.
    async with owner_engine.connect() as conn:
        count = (await conn.execute(text("SELECT count(*) FROM api_keys"))).scalar_one()
    assert count == 0


async def test_services_connect_as_the_application_role(app_engine: AsyncEngine) -> None:
    async with app_engine.connect() as conn:
        user = (await conn.execute(text("SELECT current_user"))).scalar_one()
    assert user == "paysaga_app"


async def _list_ids(client: Client, query: str) -> set[str]:
    return {wf.id async for wf in client.list_workflows(query)}


async def _run_with_search_attributes(client: Client, task_queue: str, settings: Settings) -> str:
    workflow_id = f"ping-{uuid.uuid4()}"
    async with build_worker(client, settings, task_queue=task_queue):
        await client.execute_workflow(
            PingWorkflow.run,
            id=workflow_id,
            task_queue=task_queue,
            execution_timeout=timedelta(seconds=30),
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(PAYMENT_STATUS, "HARNESS"),
                    SearchAttributePair(PAYMENT_AMOUNT_MINOR, 12500),
                ]
            ),
        )
    return workflow_id


async def test_dev_server_has_the_search_attributes(
    temporal_env: WorkflowEnvironment, task_queue: str, settings: Settings
) -> None:
    client = temporal_env.client
    workflow_id = await _run_with_search_attributes(client, task_queue, settings)
    # Visibility is eventually consistent; poll briefly.
    for _ in range(50):
        found = await _list_ids(client, 'PaymentStatus="HARNESS" AND PaymentAmountMinor=12500')
        if workflow_id in found:
            break
        await asyncio.sleep(0.1)
    assert workflow_id in found


async def test_time_skipping_server_has_the_search_attributes(
    time_skipping_env: WorkflowEnvironment, task_queue: str, settings: Settings
) -> None:
    client = time_skipping_env.client
    workflow_id = await _run_with_search_attributes(client, task_queue, settings)
    handle = client.get_workflow_handle(workflow_id)
    described = await handle.describe()
    assert described.typed_search_attributes.get(PAYMENT_STATUS) == "HARNESS"
