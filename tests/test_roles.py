"""Roles and the embedded database: who may connect, as whom, and with what.

Another OS user cannot reach the embedded cluster; no role logs in without its
password; a service's login cannot become the owner; a service never gets the
owner's URL; and the directories that hold all this belong to their owner alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import make_url

from ledger.db import to_libpq_url, with_database
from paysaga.db import (
    DatabaseConfigError,
    passfile_path,
    provision_app_login,
    read_passfile,
    scram_verifier,
    with_login,
    write_passfile,
)
from paysaga.embedded_pg import (
    OWNER_ROLE,
    SUPERUSER,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    bin_dir,
    stop_server,
)
from paysaga.settings import Settings
from paysaga.stack import service_env
from tests.harness.postgres import APP_ROLE, TEST_SERVER_SETTINGS, IsolatedDatabase, PostgresServer
from tests.harness.stack import clean_env, paysaga

ROLES = (SUPERUSER, OWNER_ROLE, APP_ROLE)
as_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="only root can act as another OS user (`nobody`), or own files for one",
)


@pytest.fixture(scope="module")
def cluster(pg_server: PostgresServer) -> Iterator[EmbeddedPostgres]:
    """The session's embedded cluster, or one of this module's own when the session
    runs against DATABASE_URL: these tests are about the embedded cluster."""
    if pg_server.embedded is not None:
        yield pg_server.embedded
        return
    workdir = Path(tempfile.mkdtemp(prefix="paysaga-roles-"))
    pg = EmbeddedPostgres(workdir / "pg", app_role=APP_ROLE, settings=TEST_SERVER_SETTINGS)
    process = pg.start()
    try:
        pg.bootstrap()
        yield pg
    finally:
        stop_server(process)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A directory under /tmp that the server's OS user may pass through."""
    root = Path(tempfile.mkdtemp(prefix="paysaga-roles-"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _psql(
    pg: EmbeddedPostgres, role: str, env: dict[str, str], *, as_nobody: bool = False
) -> subprocess.CompletedProcess[str]:
    """`SELECT current_user` through psql (not Python: ours lives under /root, which
    `nobody` may not enter), over the cluster's socket, as `role`."""
    argv = [str(bin_dir() / "psql"), "-X", "-w", "-A", "-t", "-c", "SELECT current_user"]
    argv += ["-h", str(pg.socket_dir), "-U", role, "-d", pg.database]
    if as_nobody:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd="/",
            user="nobody",
            group="nogroup",
            extra_groups=[],
        )
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)


def _hba_methods(pg: EmbeddedPostgres) -> set[str]:
    lines = (pg.pgdata / "pg_hba.conf").read_text().splitlines()
    return {line.split()[-1] for line in lines if line.strip() and not line.startswith("#")}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- authentication ---------------------------------------------------------------------------
@as_root
@pytest.mark.parametrize("role", ROLES)
def test_another_os_user_cannot_connect_to_the_embedded_cluster(
    cluster: EmbeddedPostgres, role: str
) -> None:
    # Even with the password file in hand, `nobody` cannot reach the socket.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent"}
    env["PGPASSFILE"] = str(cluster.passfile(role))
    intruder = _psql(cluster, role, env, as_nobody=True)
    assert intruder.returncode != 0
    assert "permission denied" in intruder.stderr.lower(), intruder.stderr
    assert role not in intruder.stdout

    # The same command, as us with the role's password file, does connect.
    owner = _psql(cluster, role, env)
    assert owner.returncode == 0, owner.stderr
    assert owner.stdout.strip() == role


def test_the_socket_and_data_directories_are_private(cluster: EmbeddedPostgres) -> None:
    server = cluster.server_user()
    server_uid = server.uid if server is not None else os.geteuid()
    for directory in (cluster.pgdata, cluster.socket_dir):
        assert _mode(directory) == 0o700
        assert directory.stat().st_uid == server_uid
    socket = cluster.socket_dir / ".s.PGSQL.5432"
    assert stat.S_ISSOCK(socket.lstat().st_mode)
    assert _mode(socket) & 0o077 == 0
    assert _mode(cluster.secrets_dir) == 0o700
    for path in cluster.secrets_dir.iterdir():
        assert _mode(path) == 0o600, path
    assert _hba_methods(cluster) == {"scram-sha-256"}


@pytest.mark.parametrize("role", ROLES)
def test_every_role_needs_its_password(cluster: EmbeddedPostgres, role: str) -> None:
    url = cluster.url(role, "postgres")
    no_password = with_login(url, role, Path("/nonexistent"))
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(to_libpq_url(no_password), connect_timeout=5)

    with tempfile.TemporaryDirectory() as tmp:
        wrong = passfile_path(Path(tmp), role)
        write_passfile(wrong, role, "not-the-password")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(to_libpq_url(with_login(url, role, wrong)), connect_timeout=5)

    with psycopg.connect(to_libpq_url(url), connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)


def test_urls_name_the_password_file_never_the_password(cluster: EmbeddedPostgres) -> None:
    for role in ROLES:
        password = read_passfile(cluster.passfile(role))
        assert password is not None and len(password) >= 40
        url = cluster.url(role)
        assert password not in url
        assert f"passfile={cluster.passfile(role)}" in url


# --- a service's login ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "escape",
    [
        "SET ROLE {owner}",
        "SET SESSION AUTHORIZATION {owner}",
        "SET ROLE postgres",
        "SET ROLE NONE",
        "RESET ROLE",
        "RESET SESSION AUTHORIZATION",
    ],
)
def test_a_service_login_cannot_become_the_owner(database: IsolatedDatabase, escape: str) -> None:
    owner = make_url(database.urls.owner_url).username
    assert owner is not None and owner != APP_ROLE
    statement = sql.SQL(escape).format(owner=sql.Identifier(owner))
    with psycopg.connect(to_libpq_url(database.urls.app_url), autocommit=True) as conn:
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)
        who = conn.execute("SELECT current_user, session_user").fetchone()
        assert who == (APP_ROLE, APP_ROLE)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE escaped (id int)")


@pytest.mark.parametrize("service", ["worker", "sealer", "api", "projector"])
def test_a_service_with_only_the_owners_url_refuses_to_start(
    database: IsolatedDatabase, service: str
) -> None:
    result = paysaga(service, env=clean_env(DATABASE_URL=database.urls.owner_url), timeout_s=60)
    assert result.returncode == 2
    assert "DATABASE_APP_URL" in result.stderr
    assert "services never log in as the owner" in " ".join(result.stderr.split())


def test_an_owner_command_with_only_the_services_url_is_refused(
    database: IsolatedDatabase,
) -> None:
    result = paysaga("db", "current", env=clean_env(DATABASE_APP_URL=database.urls.app_url))
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr


def test_up_refuses_the_services_login_without_the_owners(tmp_path: Path) -> None:
    result = paysaga(
        "up",
        env=clean_env(
            DATABASE_APP_URL="postgresql://paysaga_app@127.0.0.1:1/paysaga",
            PAYSAGA_DATA_DIR=str(tmp_path / "data"),
        ),
    )
    assert result.returncode == 2
    assert "needs the schema owner's login (DATABASE_URL)" in " ".join(result.stderr.split())
    assert not (tmp_path / "data").exists()


def test_services_get_the_app_login_and_never_the_owners(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://owner:hunter2@db/paysaga")
    monkeypatch.setenv("PGPASSWORD", "hunter2")
    monkeypatch.setenv("PGSERVICE", "owner")
    settings = Settings(_env_file=None, data_dir=tmp_path, database_url=os.environ["DATABASE_URL"])
    env = service_env(settings, "postgresql://paysaga_app@db/paysaga?passfile=/x")
    assert env["DATABASE_APP_URL"] == "postgresql://paysaga_app@db/paysaga?passfile=/x"
    assert not {"DATABASE_URL", "PGPASSWORD", "PGSERVICE"} & set(env)
    assert not any("hunter2" in value for value in env.values())


# --- provisioning a login on an external server ------------------------------------------------
def test_provisioning_gives_the_app_role_a_working_login(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    role = f"paysaga_app_{uuid.uuid4().hex[:8]}"
    passfile = passfile_path(tmp_path / "secrets", role)
    try:
        url = provision_app_login(pg_server.admin_url, role, passfile)
        password = read_passfile(passfile)
        assert password is not None and password not in url
        with psycopg.connect(to_libpq_url(with_database(url, "postgres"))) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        # A second start keeps the password it gave.
        before = passfile.read_text()
        provision_app_login(pg_server.admin_url, role, passfile)
        assert passfile.read_text() == before
    finally:
        with pg_server.admin() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_provisioning_without_the_right_to_set_passwords_names_database_app_url(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    weak = f"paysaga_weak_{uuid.uuid4().hex[:8]}"
    password = "weak-" + uuid.uuid4().hex
    weak_passfile = passfile_path(tmp_path / "weak", weak)
    write_passfile(weak_passfile, weak, password)
    with pg_server.admin() as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(weak), sql.Literal(scram_verifier(password))
            )
        )
    try:
        weak_url = with_login(pg_server.admin_url, weak, weak_passfile)
        with pytest.raises(DatabaseConfigError, match="DATABASE_APP_URL"):
            provision_app_login(weak_url, APP_ROLE, passfile_path(tmp_path / "secrets", APP_ROLE))
    finally:
        with pg_server.admin() as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(weak)))


# --- directories --------------------------------------------------------------------------------
def _long_cluster(root: Path) -> EmbeddedPostgres:
    pg = EmbeddedPostgres(root / f"data-{'d' * 80}" / "pg", app_role=APP_ROLE)
    assert pg.socket_dir != pg.pgdata, "this path must be too long for a socket"
    shutil.rmtree(pg.socket_dir, ignore_errors=True)
    return pg


def test_the_fallback_socket_directory_is_made_private(scratch_dir: Path) -> None:
    pg = _long_cluster(scratch_dir)
    try:
        pg.prepare_directories()
        server = pg.server_user()
        assert _mode(pg.socket_dir) == 0o700
        assert pg.socket_dir.stat().st_uid == (server.uid if server else os.geteuid())
        pg.prepare_directories()  # and reused as it is
    finally:
        shutil.rmtree(pg.socket_dir, ignore_errors=True)


@pytest.mark.parametrize("how", ["world-writable", "another-owner"])
def test_a_fallback_socket_directory_made_by_someone_else_is_refused(
    scratch_dir: Path, how: str
) -> None:
    pg = _long_cluster(scratch_dir)
    pg.socket_dir.mkdir(mode=0o700)
    try:
        if how == "world-writable":
            pg.socket_dir.chmod(0o777)
        elif os.geteuid() == 0:
            os.chown(pg.socket_dir, 65534, 65534)  # nobody
        else:
            pytest.skip("only root can make a directory that belongs to another user")
        before = pg.socket_dir.lstat()
        with pytest.raises(EmbeddedPostgresError, match=f"rm -rf {pg.socket_dir}"):
            pg.prepare_directories()
        after = pg.socket_dir.lstat()
        assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)
    finally:
        shutil.rmtree(pg.socket_dir, ignore_errors=True)


@as_root
def test_a_data_directory_the_server_user_cannot_reach_is_refused_and_left_as_it_was() -> None:
    private = Path(tempfile.mkdtemp(prefix="paysaga-roles-"))  # 0700, root's
    try:
        pg = EmbeddedPostgres(private / "data" / "pg", app_role=APP_ROLE)
        with pytest.raises(EmbeddedPostgresError) as refused:
            pg.prepare_directories()
        message = " ".join(str(refused.value).split())
        assert f"may not enter {private}" in message
        assert f"chmod o+x {private}" in message
        assert "PAYSAGA_DATA_DIR" in message
        assert _mode(private) == 0o700
        assert not pg.pgdata.exists()
    finally:
        shutil.rmtree(private, ignore_errors=True)


# --- a cluster from before ----------------------------------------------------------------------
def test_a_cluster_initialised_with_trust_is_upgraded_in_place(scratch_dir: Path) -> None:
    """As an older paysaga left it: initdb --auth=trust, roles without passwords."""
    pg = EmbeddedPostgres(scratch_dir / "data" / "pg", app_role=APP_ROLE)
    pg.prepare_directories()
    subprocess.run(
        [str(bin_dir() / "initdb"), "-D", str(pg.pgdata), "--auth=trust", "-U", SUPERUSER],
        check=True,
        capture_output=True,
        **pg.process_kwargs(),
    )
    for path in pg.secrets_dir.iterdir():
        path.unlink()
    assert _hba_methods(pg) == {"trust"}
    old = subprocess.Popen(pg.server_argv(), **pg.process_kwargs())
    try:
        pg.wait_ready(process=old)  # its password file is gone: trust lets it in anyway
        no_password = with_login(pg.superuser_url(), SUPERUSER, Path("/none"))
        with psycopg.connect(to_libpq_url(no_password), autocommit=True) as conn:
            for role in (OWNER_ROLE, APP_ROLE):
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    finally:
        stop_server(old)

    assert pg.ensure_initialized() == "upgraded"
    assert _hba_methods(pg) == {"scram-sha-256"}
    process = pg.start()
    try:
        pg.bootstrap()
        for role in ROLES:
            with psycopg.connect(to_libpq_url(pg.url(role, "postgres"))) as conn:
                assert conn.execute("SELECT current_user").fetchone() == (role,)
            with pytest.raises(psycopg.OperationalError, match="no password supplied"):
                psycopg.connect(to_libpq_url(with_login(pg.url(role), role, Path("/none"))))
    finally:
        stop_server(process)
    assert pg.ensure_initialized() == "reused"
