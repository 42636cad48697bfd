"""`paysaga up` end to end: real processes, real ports, real data on disk."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import make_url
from temporalio.testing import WorkflowEnvironment

from paysaga.db import read_passfile
from paysaga.embedded_pg import EmbeddedPostgres
from paysaga.temporal import find_binary
from tests.harness.postgres import PostgresServer
from tests.harness.stack import RunningStack, paysaga, private_stack, wait_all_gone
from workflows.search_attributes import ALL_SEARCH_ATTRIBUTES

pytestmark = pytest.mark.slow

PYTHON_SERVICES = ("worker", "sealer", "projector", "api")
SYSTEM_POSTGRES_URL = os.environ.get(
    "PAYSAGA_TEST_SYSTEM_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def stack() -> Iterator[RunningStack]:
    with private_stack() as running:
        yield running


def _modes(paths: Iterator[Path] | list[Path]) -> dict[Path, tuple[int, int, int]]:
    return {p: (p.stat().st_mode, p.stat().st_uid, p.stat().st_gid) for p in paths}


def _assert_private(stack: RunningStack) -> None:
    """The data directory lets PostgreSQL's user through and nobody else; everything in
    it, and the socket directory, belongs to its owner alone."""
    data = stack.data_dir
    pg = EmbeddedPostgres(data / "pg")
    server = pg.server_user()
    server_uid = server.uid if server is not None else os.geteuid()
    data_st = data.stat()
    if server is not None:
        assert (stat.S_IMODE(data_st.st_mode), data_st.st_gid) == (0o710, server.gid)
    else:
        assert stat.S_IMODE(data_st.st_mode) == 0o700
    for path in data.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path} is open to others: {mode:04o}"
    for directory in (pg.pgdata, pg.socket_dir, pg.secrets_dir, data / "logs", data / "run"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert pg.socket_dir != pg.pgdata, "this data directory needs the fallback socket directory"
    assert pg.pgdata.stat().st_uid == pg.socket_dir.stat().st_uid == server_uid
    for role in ("postgres", "paysaga_owner", "paysaga_app"):
        assert stat.S_IMODE(pg.passfile(role).stat().st_mode) == 0o600
    private_files = [data / "temporal.sqlite", *(data / "logs").iterdir()]
    assert {p.name for p in private_files} >= {"temporal.sqlite", "worker.log", "api.log"}
    for path in private_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def _assert_services_hold_only_their_own_login(stack: RunningStack) -> None:
    """What each service was started with: the application role's URL, with no password
    in it, and nothing of the owner's or the superuser's."""
    pg = EmbeddedPostgres(stack.data_dir / "pg")
    passwords = [read_passfile(path) for path in pg.secrets_dir.iterdir()]
    assert len(passwords) == 3 and all(passwords)
    for service in PYTHON_SERVICES:
        raw = Path(f"/proc/{stack.pid(service)}/environ").read_bytes()
        environ = dict(entry.decode().split("=", 1) for entry in raw.split(b"\0") if b"=" in entry)
        assert "DATABASE_URL" not in environ, service
        app_url = make_url(environ["DATABASE_APP_URL"])
        assert (app_url.username, app_url.password) == ("paysaga_app", None)
        for secret in (*passwords, pg.owner_url(), "paysaga_owner", "postgres.pgpass"):
            assert str(secret).encode() not in raw, f"{service} holds {secret!r:.20}"
    with psycopg.connect(pg.superuser_url(), autocommit=True) as conn:
        logins = conn.execute(
            "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = 'paysaga'"
        ).fetchall()
    assert logins == [("paysaga_app",)]


def test_up_runs_heals_stops_cleanly_and_keeps_its_data(stack: RunningStack) -> None:
    ancestors = _modes(list(stack.data_dir.parents))
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
    _assert_private(stack)
    _assert_services_hold_only_their_own_login(stack)

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
    completed = [
        line
        for line in _worker_sdk_metrics(stack).splitlines()
        if line.startswith("temporal_workflow_completed{")
    ]
    assert any('workflow_type="Ping"' in line for line in completed), completed
    _assert_the_sealer_and_the_sweeper_run(stack)
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
    _assert_private(stack)
    assert _modes(list(stack.data_dir.parents)) == ancestors, "paysaga up changed a parent"


def _worker_sdk_metrics(stack: RunningStack) -> str:
    """The Temporal SDK's metrics, from the port `paysaga up` gave the worker and showed."""
    environ = Path(f"/proc/{stack.pid('worker')}/environ").read_bytes().split(b"\0")
    port = next(
        e.split(b"=", 1)[1] for e in environ if e.startswith(b"PAYSAGA_WORKER_METRICS_PORT=")
    )
    url = f"http://127.0.0.1:{port.decode()}/metrics"
    assert url in stack.read_output(), "the banner names the worker's metrics"
    return httpx.get(url).text


SEAL_DEADLINE_S = 10.0  # the bound: sealed within 10 seconds of a commit


def _assert_the_sealer_and_the_sweeper_run(stack: RunningStack) -> None:
    """The supervised sealer seals a commit within SEAL_DEADLINE_S; the worker created the
    sweeper's schedule, and `paysaga sweep` runs one now."""
    created = paysaga(
        "apikey", "create", "--name", "treasury", "--scopes", "accounts:write,ops", env=stack.env
    )
    assert created.returncode == 0, created.stderr
    opened = httpx.post(
        f"{stack.api_url}/v1/accounts",
        json={"id": "world", "currency": "EUR", "kind": "external", "overdraft_limit_minor": None},
        headers={
            "Authorization": f"Bearer {created.stdout.strip()}",
            "Idempotency-Key": str(uuid.uuid4()),
        },
    )
    assert opened.status_code == 201, opened.text
    committed_seq = opened.json()["position"]["as_of_seq"]
    deadline = time.monotonic() + SEAL_DEADLINE_S
    sealed_seq = 0
    while sealed_seq < committed_seq and time.monotonic() < deadline:
        digest = paysaga("ledger", "digest", env=stack.env)
        if digest.returncode == 0:
            sealed_seq = int(digest.stdout.split(":")[0])
        time.sleep(0.2)
    assert sealed_seq >= committed_seq, f"not sealed within {SEAL_DEADLINE_S} s"
    verified = paysaga("ledger", "verify", "--digest", digest.stdout.strip(), env=stack.env)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    schedule = paysaga_temporal(
        "schedule", "describe", "--schedule-id", "payments-sweeper", stack=stack
    )
    assert "SweeperWorkflow" in schedule
    swept = paysaga("sweep", env=stack.env)
    assert swept.returncode == 0, swept.stderr
    assert json.loads(swept.stdout)["repaired"] == []


def stack_log(stack: RunningStack) -> str:
    # The supervisor's own messages reach the terminal (our pipe) as they happen; the
    # harness reads the pipe as it fills.
    time.sleep(0.2)
    return stack.read_output()


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
    """DATABASE_URL and TEMPORAL_ADDRESS: the supervisor starts only our own services, and
    gives them a login of the application role's own, never DATABASE_URL."""
    if server == "system":
        if not _system_postgres_reachable():
            pytest.skip(f"no system PostgreSQL at {SYSTEM_POSTGRES_URL}")
        admin_url = SYSTEM_POSTGRES_URL
    else:
        admin_url = pg_server.admin_url
    name = f"paysaga_ext_{uuid.uuid4().hex[:8]}"
    # A role of this test's own: provisioning sets its password, which must not change
    # the password of the role the rest of the suite logs in as.
    app_role = f"paysaga_app_{uuid.uuid4().hex[:8]}"
    from ledger.db import to_libpq_url, with_database

    with psycopg.connect(to_libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        version = conn.execute("SHOW server_version").fetchone()
    try:
        database_url = with_database(admin_url, name).render_as_string(hide_password=False)
        stack = RunningStack.new(
            tmp_path / "data",
            DATABASE_URL=database_url,
            PAYSAGA_DB_APP_ROLE=app_role,
            TEMPORAL_ADDRESS=temporal_env.client.service_client.config.target_host,
        )
        stack.start()
        try:
            ready = httpx.get(f"{stack.api_url}/readyz").json()
            assert ready["status"] == "ready", ready
            assert set(stack.state()) == {"worker", "sealer", "projector", "api"}
            assert not (tmp_path / "data" / "pg").exists()
            for service in PYTHON_SERVICES:
                environ = Path(f"/proc/{stack.pid(service)}/environ").read_bytes()
                assert b"DATABASE_URL=" not in environ.replace(b"DATABASE_APP_URL=", b"")
                assert f"DATABASE_APP_URL=postgresql://{app_role}@".encode() in environ
            with psycopg.connect(to_libpq_url(admin_url), autocommit=True) as conn:
                logins = conn.execute(
                    "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = %s", (name,)
                ).fetchall()
            assert logins == [(app_role,)]
            created = paysaga("apikey", "create", "--name", "ext", "--scopes", "ops", env=stack.env)
            assert created.returncode == 0, created.stderr
            print(f"external PostgreSQL {version}")
        finally:
            assert stack.stop() == 0
    finally:
        with psycopg.connect(to_libpq_url(admin_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(app_role)))
