"""`paysaga up` end to end: real processes, real ports, real data on disk."""

from __future__ import annotations

import json
import os
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql
from temporalio.testing import WorkflowEnvironment

from paysaga.temporal import find_binary
from tests.harness.postgres import PostgresServer
from tests.harness.stack import RunningStack, paysaga, wait_all_gone
from workflows.search_attributes import ALL_SEARCH_ATTRIBUTES

pytestmark = pytest.mark.slow

SYSTEM_POSTGRES_URL = os.environ.get(
    "PAYSAGA_TEST_SYSTEM_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[RunningStack]:
    running = RunningStack.new(tmp_path / "data")
    yield running
    if running.process is not None and running.process.poll() is None:
        running.stop(signal.SIGKILL)


def test_up_runs_heals_stops_cleanly_and_keeps_its_data(stack: RunningStack) -> None:
    startup_s = stack.start()
    print(f"paysaga up ready in {startup_s:.1f} s")
    ready = httpx.get(f"{stack.api_url}/readyz").json()
    assert ready["status"] == "ready"
    assert ready["checks"]["database"]["ok"] is True
    assert ready["checks"]["temporal"]["ok"] is True
    assert httpx.get(f"{stack.api_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{stack.api_url}/docs").status_code == 200
    assert "paysaga_http_requests" in httpx.get(f"{stack.api_url}/metrics").text
    assert httpx.get(f"http://127.0.0.1:{stack.ui_port}/").status_code == 200

    listed = paysaga_temporal("operator", "search-attribute", "list", stack=stack)
    for attribute in ALL_SEARCH_ATTRIBUTES:
        assert attribute.name in listed

    created = paysaga(
        "apikey", "create", "--name", "ops", "--scopes", "ops,payments:read", env=stack.env
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("psk_") and "\n" not in key
    assert key not in created.stderr

    first_ping = paysaga("ping", env=stack.env)
    assert first_ping.returncode == 0, first_ping.stderr
    # A workflow left in flight (no worker polls its queue) must survive a restart.
    paysaga_temporal(
        "workflow",
        "start",
        "--type",
        "Ping",
        "--task-queue",
        "parked",
        "--workflow-id",
        "in-flight",
        stack=stack,
    )

    # kill -9 of the worker and of the API heals by itself, within seconds.
    for service in ("worker", "api"):
        old = stack.pid(service)
        os.kill(old, signal.SIGKILL)
        stack.wait_new_pid(service, old)
    stack.wait_ready(timeout_s=20)
    assert paysaga("ping", env=stack.env).returncode == 0
    assert "worker exited with signal SIGKILL" in stack_log(stack)

    tree = stack.process_tree()
    assert len(tree) > 6  # supervisor, postgres (+ its helpers), temporal, worker, projector, api
    assert stack.stop(signal.SIGTERM) == 0
    assert wait_all_gone(tree) == [], "orphans left after SIGTERM"
    assert "paysaga stopped." in stack.read_output()

    # A second start reuses the data: the key and the Temporal history are still there.
    stack.output.clear()
    stack.start()
    keys = paysaga("apikey", "list", env=stack.env)
    assert key.split("_")[1] in keys.stdout
    assert _workflow_status(stack, first_ping.stdout.strip()) == "COMPLETED"
    assert _workflow_status(stack, "in-flight") == "RUNNING"
    tree = stack.process_tree()
    assert stack.stop(signal.SIGINT) == 0
    assert wait_all_gone(tree) == [], "orphans left after Ctrl-C"


def stack_log(stack: RunningStack) -> str:
    # The supervisor's own messages reach the terminal (our pipe) as they happen.
    assert stack.process is not None and stack.process.stdout is not None
    os.set_blocking(stack.process.stdout.fileno(), False)
    chunk = stack.process.stdout.read() or ""
    os.set_blocking(stack.process.stdout.fileno(), True)
    stack.output.append(chunk)
    return "".join(stack.output)


def _workflow_status(stack: RunningStack, workflow_id: str) -> str:
    described = json.loads(
        paysaga_temporal(
            "workflow", "describe", "--workflow-id", workflow_id, "-o", "json", stack=stack
        )
    )
    return str(described["workflowExecutionInfo"]["status"]).removeprefix(
        "WORKFLOW_EXECUTION_STATUS_"
    )


def paysaga_temporal(*args: str, stack: RunningStack) -> str:
    import subprocess

    result = subprocess.run(
        [find_binary("temporal"), *args, "--address", f"127.0.0.1:{stack.temporal_port}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_busy_port_is_named_with_the_setting_that_changes_it(tmp_path: Path) -> None:
    stack = RunningStack.new(tmp_path / "data")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", stack.api_port))
        holder.listen()
        result = paysaga("up", env=stack.env, timeout_s=30)
    assert result.returncode == 2
    assert f"port {stack.api_port}" in result.stderr
    assert "PAYSAGA_API_PORT" in result.stderr
    assert not (tmp_path / "data" / "pg").exists(), "nothing may start when a port is busy"


def _system_postgres_reachable() -> bool:
    try:
        with psycopg.connect(SYSTEM_POSTGRES_URL, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


@pytest.mark.parametrize("server", ["harness", "system"])
def test_up_runs_against_external_postgres_and_temporal(
    server: str, tmp_path: Path, pg_server: PostgresServer, temporal_env: WorkflowEnvironment
) -> None:
    """DATABASE_URL and TEMPORAL_ADDRESS: the supervisor starts only our own services."""
    if server == "system":
        if not _system_postgres_reachable():
            pytest.skip(f"no system PostgreSQL at {SYSTEM_POSTGRES_URL}")
        admin_url = SYSTEM_POSTGRES_URL
    else:
        admin_url = pg_server.admin_url
    name = f"paysaga_ext_{uuid.uuid4().hex[:8]}"
    from ledger.db import to_libpq_url, with_database

    with psycopg.connect(to_libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        version = conn.execute("SHOW server_version").fetchone()
    try:
        database_url = with_database(admin_url, name).render_as_string(hide_password=False)
        stack = RunningStack.new(
            tmp_path / "data",
            DATABASE_URL=database_url,
            TEMPORAL_ADDRESS=temporal_env.client.service_client.config.target_host,
        )
        stack.start()
        try:
            ready = httpx.get(f"{stack.api_url}/readyz").json()
            assert ready["status"] == "ready", ready
            assert set(stack.state()) == {"worker", "sealer", "projector", "api"}
            assert not (tmp_path / "data" / "pg").exists()
            created = paysaga("apikey", "create", "--name", "ext", "--scopes", "ops", env=stack.env)
            assert created.returncode == 0, created.stderr
            print(f"external PostgreSQL {version}")
        finally:
            assert stack.stop() == 0
    finally:
        with psycopg.connect(to_libpq_url(admin_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
