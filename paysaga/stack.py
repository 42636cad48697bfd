"""`paysaga up`: the whole product, supervised from one process tree.

Start order: PostgreSQL (embedded, unless DATABASE_URL) → migrations → Temporal (dev
server, unless TEMPORAL_ADDRESS) → search attributes → worker → sealer → read side → API.
Stop order is the reverse. Everything persists under the data directory, so a second
`paysaga up` picks up where the first stopped, in-flight workflows included.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from paysaga import migrate
from paysaga.db import (
    SECRETS_DIR_NAME,
    DatabaseConfigError,
    ensure_private_dir,
    passfile_path,
    provision_app_login,
)
from paysaga.embedded_pg import EmbeddedPostgres
from paysaga.settings import Settings
from paysaga.supervisor import ServiceSpec, Supervisor
from paysaga.telemetry import worker_metrics_url
from paysaga.temporal import connect, dev_server_argv, ensure_search_attributes

STARTUP_TIMEOUT_S = 90.0
ALL_SCOPES = "payments:write,payments:read,accounts:write,accounts:read,ops"
# Every file the stack and its children create is theirs alone: logs, Temporal's
# SQLite file, run state.
STACK_UMASK = 0o077
# Variables through which libpq would hand a service credentials other than its own.
LIBPQ_CREDENTIAL_VARIABLES = frozenset(
    {
        "PGUSER",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGOPTIONS",
        "PGSSLCERT",
        "PGSSLKEY",
    }
)


class StackError(Exception):
    """A start-up problem the user can fix; the message says how."""


@dataclass(frozen=True)
class PortNeed:
    port: int
    host: str
    what: str
    setting: str


def ports_needed(settings: Settings) -> list[PortNeed]:
    needs = [PortNeed(settings.api_port, settings.api_host, "the API", "PAYSAGA_API_PORT")]
    if settings.uses_dev_temporal:
        needs += [
            PortNeed(settings.temporal_port, "127.0.0.1", "Temporal", "PAYSAGA_TEMPORAL_PORT"),
            PortNeed(
                settings.temporal_ui_port,
                "127.0.0.1",
                "the Temporal UI",
                "PAYSAGA_TEMPORAL_UI_PORT",
            ),
        ]
    if settings.worker_metrics_port is not None:
        needs += [
            PortNeed(
                port,
                settings.worker_metrics_host,
                f"the metrics of {name}",
                "PAYSAGA_WORKER_METRICS_PORT",
            )
            for name, port in zip(
                worker_names(settings), worker_metrics_ports(settings), strict=True
            )
        ]
    return needs


def worker_metrics_ports(settings: Settings) -> list[int]:
    """The port each worker (`worker_names`) serves the SDK's metrics on: from
    PAYSAGA_WORKER_METRICS_PORT on, else free ones picked now."""
    if settings.worker_metrics_port is not None:
        first = settings.worker_metrics_port
        return [first + n for n in range(settings.workers)]
    ports = []
    for _ in range(settings.workers):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((settings.worker_metrics_host, 0))
            ports.append(int(sock.getsockname()[1]))
    return ports


def check_ports_free(settings: Settings) -> None:
    """Fail before starting anything if a port we must listen on is taken."""
    for need in ports_needed(settings):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((need.host, need.port))
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise
                raise StackError(
                    f"port {need.port} ({need.what}) is already in use on {need.host}. "
                    f"Stop whatever holds it, or choose another port: {need.setting}=<port>"
                ) from None


@contextlib.contextmanager
def exclusive_data_dir(data_dir: Path) -> Iterator[None]:
    """One `paysaga up` per data directory: a second one would corrupt the first's state."""
    run_dir = data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "up.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise StackError(
                f"paysaga is already running with data directory {data_dir} (pid {holder}). "
                "Stop it first, or set PAYSAGA_DATA_DIR to use another directory."
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def secure_data_dir(data: Path) -> None:
    """The data directory and what the stack keeps in it are private: directories 0700,
    files 0600 (the embedded cluster then opens the data directory to its server's user
    alone). Nothing above the data directory changes."""
    ensure_private_dir(data)
    for name in ("logs", "run"):
        ensure_private_dir(data / name)
        for path in (data / name).iterdir():
            if path.is_file() and not path.is_symlink():
                path.chmod(0o600)
    # Made by older versions with the default umask, and world-readable.
    for path in data.glob("temporal.sqlite*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o600)


def service_env(settings: Settings, app_url: str) -> dict[str, str]:
    """Children run against exactly the servers the supervisor started or was given, and
    hold only the application role's login: never DATABASE_URL, nor any other way to
    the owner's credentials."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name != "DATABASE_URL" and name not in LIBPQ_CREDENTIAL_VARIABLES
    }
    env.update(
        {
            "DATABASE_APP_URL": app_url,
            "TEMPORAL_ADDRESS": settings.temporal_target,
            "TEMPORAL_NAMESPACE": settings.temporal_namespace,
            "PAYSAGA_DATA_DIR": str(settings.data_path),
            "PAYSAGA_API_HOST": settings.api_host,
            "PAYSAGA_API_PORT": str(settings.api_port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def worker_names(settings: Settings) -> list[str]:
    """The worker services: `worker`, then `worker-2`, `worker-3`, ... (PAYSAGA_WORKERS)."""
    return ["worker", *(f"worker-{n}" for n in range(2, settings.workers + 1))]


def restart_holds_dir(settings: Settings) -> Path:
    """Where a restart of a crashed service can be held back (see Supervisor)."""
    return settings.data_path / "run" / "restart-holds"


def python_service(
    name: str, settings: Settings, env: dict[str, str], command: str | None = None
) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        argv=[sys.executable, "-m", "paysaga", command or name],
        env=env,
        log_file=settings.data_path / "logs" / f"{name}.log",
        # The worker's graceful shutdown may take its whole grace period.
        stop_timeout_s=settings.worker_shutdown_grace_s + 10.0,
    )


async def _wait_http_ok(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as http:
        while True:
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise StackError(f"{url} did not answer 200 within {timeout_s:.0f} s")
            await asyncio.sleep(0.2)


async def _wait_until(check: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise StackError(f"{what} was not ready within {timeout_s:.0f} s")
        await asyncio.sleep(0.1)


def banner(settings: Settings, started_s: float, worker_metrics: Sequence[int] = ()) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("API", f"{settings.api_url}   docs {settings.api_url}/docs")
    table.add_row("Console", f"{settings.api_url}/console   (an API key with the ops scope)")
    table.add_row("Metrics", settings.metrics_url)
    if worker_metrics:
        urls = [worker_metrics_url(settings.worker_metrics_host, port) for port in worker_metrics]
        table.add_row("Worker metrics", "  ".join(urls) + "   (Temporal SDK)")
    if settings.tracing != "off":
        table.add_row("Tracing", f"{settings.tracing} (PAYSAGA_TRACING)")
    if settings.temporal_ui_url:
        table.add_row("Temporal UI", settings.temporal_ui_url)
    table.add_row(
        "Temporal", f"{settings.temporal_target}  namespace {settings.temporal_namespace}"
    )
    where = (
        f"embedded, in {settings.data_path / 'pg'}, passwords in "
        f"{settings.data_path / SECRETS_DIR_NAME}"
        if settings.uses_embedded_postgres
        else "external (DATABASE_URL)"
    )
    table.add_row("PostgreSQL", where)
    table.add_row("Data", str(settings.data_path))
    table.add_row("Logs", str(settings.data_path / "logs"))
    table.add_row("Statements", f"drop them in {settings.recon_inbox_path}")
    table.add_row(
        "API key",
        f"paysaga apikey create --name me --scopes {ALL_SCOPES}",
    )
    return Panel(
        table,
        title=f"paysaga is up ({started_s:.1f} s)",
        subtitle="Ctrl-C stops everything",
        expand=False,
    )


async def run_stack(settings: Settings, console: Console) -> None:
    """Start everything, print the banner, and run until SIGINT or SIGTERM."""
    started = time.monotonic()
    data = settings.data_path
    if settings.database_app_url is not None and settings.database_url is None:
        raise StackError(
            "DATABASE_APP_URL is set but DATABASE_URL is not: `paysaga up` needs the schema "
            "owner's login (DATABASE_URL) to apply migrations. Set it too, or unset "
            "DATABASE_APP_URL to run the embedded PostgreSQL"
        )
    os.umask(STACK_UMASK)
    check_ports_free(settings)
    try:
        secure_data_dir(data)
    except DatabaseConfigError as error:
        raise StackError(str(error)) from None
    with exclusive_data_dir(data):
        supervisor = Supervisor(
            console=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True),
            state_file=data / "run" / "stack.json",
            restart_holds_dir=restart_holds_dir(settings),
        )
        stop = asyncio.Event()
        main_task = asyncio.current_task()
        assert main_task is not None
        ready = False

        def on_signal() -> None:
            # Before the stack is up, abandon start-up; after, begin an orderly stop.
            if ready:
                stop.set()
            else:
                main_task.cancel()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            app_url = await _start_servers(settings, supervisor, console)
            env = service_env(settings, app_url)
            # The worker also creates the reconciliation and sweeper schedules, and watches
            # the reconciliation inbox. Several workers may: each creates or updates the
            # same schedules to the same configuration, and a second signal to the
            # statement stream only starts another (idempotent) matching pass.
            metrics_ports = worker_metrics_ports(settings)
            for name, port in zip(worker_names(settings), metrics_ports, strict=True):
                # Each worker serves the Temporal SDK's metrics on a port of its own.
                worker_env = {**env, "PAYSAGA_WORKER_METRICS_PORT": str(port)}
                await supervisor.start(python_service(name, settings, worker_env, command="worker"))
            # Chains the ledger into blocks, so that deleting any event is detected.
            await supervisor.start(python_service("sealer", settings, env))
            # The read side: read models and the risk consumer.
            await supervisor.start(python_service("projector", settings, env))
            await supervisor.start(python_service("api", settings, env))
            await _wait_http_ok(f"{settings.api_url}/healthz", STARTUP_TIMEOUT_S)
            ready = True
            console.print(banner(settings, time.monotonic() - started, metrics_ports))
            await stop.wait()
            console.print("stopping: api, projector, sealer, worker, temporal, postgres ...")
        except asyncio.CancelledError:
            console.print("start-up interrupted; stopping what was started ...")
        except DatabaseConfigError as error:
            raise StackError(str(error)) from None
        finally:
            await supervisor.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        console.print("paysaga stopped.")


_CLUSTER_MESSAGES = {
    "created": "initialised a new cluster (password authentication) in",
    "upgraded": "upgraded the cluster from trust to password authentication in",
    "reused": "reusing the cluster in",
}


async def _start_servers(settings: Settings, supervisor: Supervisor, console: Console) -> str:
    """Start the servers the stack runs itself and migrate. Returns the services' URL."""
    logs = settings.data_path / "logs"
    role = settings.db_app_role
    if settings.uses_embedded_postgres:
        pg = EmbeddedPostgres(settings.data_path / "pg", app_role=role)
        initialisation = await asyncio.to_thread(pg.ensure_initialized)
        console.print(f"postgres | {_CLUSTER_MESSAGES[initialisation]} {pg.pgdata}")
        await supervisor.start(
            ServiceSpec(
                name="postgres",
                argv=pg.server_argv(),
                log_file=logs / "postgres.log",
                echo=False,
                # SIGINT is PostgreSQL's fast shutdown: roll back, checkpoint, exit.
                stop_signal=signal.SIGINT,
                process_kwargs=pg.process_kwargs(),
            )
        )
        await _wait_until(pg.is_ready, "PostgreSQL", STARTUP_TIMEOUT_S)
        await asyncio.to_thread(pg.bootstrap)
        owner_url, app_url = pg.owner_url(), pg.app_url()
    else:
        assert settings.database_url is not None
        owner_url, app_url = settings.database_url, settings.database_app_url or ""
    await asyncio.to_thread(migrate.upgrade, owner_url, role)
    console.print(f"postgres | migrated to revision {migrate.head_revision()}")
    if not app_url:
        # The owner's login stays here; the services get one of their own.
        passfile = passfile_path(settings.data_path / SECRETS_DIR_NAME, role)
        app_url = await asyncio.to_thread(provision_app_login, owner_url, role, passfile)
        console.print(f"postgres | services log in as {role}, with the password in {passfile}")

    if settings.uses_dev_temporal:
        await supervisor.start(
            ServiceSpec(
                name="temporal",
                argv=dev_server_argv(settings),
                log_file=logs / "temporal.log",
                echo=False,
            )
        )
    client = await connect(settings, timeout_s=STARTUP_TIMEOUT_S)
    added = await ensure_search_attributes(client, settings.temporal_namespace)
    if added:
        console.print(f"temporal | registered search attributes: {', '.join(added)}")
    return app_url
