"""A session-wide PostgreSQL server, and one isolated database per test.

Migrations run once per session, into a template database. Each test then gets
`CREATE DATABASE ... TEMPLATE`, a file-level copy that takes milliseconds, so tests
cannot see each other's rows and never pay for migrations again.

Every test logs in as the services do: the application role with a password of its
own, from a libpq password file. The embedded server lives in a directory the harness
makes under the system's temporary directory, which its OS user can reach without
any change to directories the harness does not own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy import make_url

from ledger.db import to_libpq_url, with_database
from paysaga import migrate
from paysaga.db import DatabaseUrls, passfile_path, provision_app_login
from paysaga.embedded_pg import EmbeddedPostgres, stop_server

APP_ROLE = "paysaga_app"
# Speed over durability: a crashed test server is simply thrown away.
TEST_SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


@dataclass
class IsolatedDatabase:
    """One test's database, and the URLs of its two roles."""

    name: str
    urls: DatabaseUrls


class PostgresServer:
    """Either the embedded server (started here) or an external one (DATABASE_URL)."""

    def __init__(
        self, admin_url: str, owner_url: str, app_url: str, embedded: EmbeddedPostgres | None
    ) -> None:
        self.admin_url = admin_url
        self.owner_url = owner_url
        self.app_url = app_url
        self.embedded = embedded
        self.template = f"paysaga_tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.version = ""

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(to_libpq_url(self.admin_url), autocommit=True)

    def urls_for(self, database: str) -> DatabaseUrls:
        def on(url: str) -> str:
            return with_database(url, database).render_as_string(hide_password=False)

        return DatabaseUrls(
            owner_url=on(self.owner_url), app_url=on(self.app_url), app_role=APP_ROLE
        )

    @property
    def owner(self) -> str:
        owner = make_url(self.owner_url).username
        assert owner, "the owner URL must name a user"
        return owner

    def create_template(self) -> None:
        owner = self.owner
        with self.admin() as conn:
            self.version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(self.template), sql.Identifier(owner)
                )
            )
        migrate.upgrade(self.urls_for(self.template).owner_url, APP_ROLE)

    def create_database(
        self, name: str | None = None, *, migrated: bool = True
    ) -> IsolatedDatabase:
        name = name or f"test_{uuid.uuid4().hex[:12]}"
        owner = self.owner
        template = self.template if migrated else "template0"
        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(template), sql.Identifier(owner)
                )
            )
        urls = self.urls_for(name)
        if migrated:
            # A copy keeps the template's ledger identity; each test's database is a
            # ledger of its own beside the session's one Temporal (migration 0016).
            with psycopg.connect(to_libpq_url(urls.owner_url), autocommit=True) as conn:
                conn.execute("UPDATE recon.installation SET ledger_id = gen_random_uuid()")
        return IsolatedDatabase(name, urls)

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    @contextmanager
    def database(self, *, migrated: bool = True) -> Iterator[IsolatedDatabase]:
        db = self.create_database(migrated=migrated)
        try:
            yield db
        finally:
            self.drop_database(db.name)


@contextmanager
def postgres_server(workdir: Path | None = None) -> Iterator[PostgresServer]:
    """The server for this session, with the migrated template database in place.

    Its files go to `workdir` (which the server's OS user must be able to reach), or to
    a directory of its own, removed at the end.
    """
    owns_workdir = workdir is None
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="paysaga-test-pg-"))
    external = os.environ.get("DATABASE_URL")
    process: subprocess.Popen[bytes] | None = None
    try:
        if external:
            # The services' role gets a login and a password of its own there too.
            passfile = passfile_path(workdir / "secrets", APP_ROLE)
            app_url = provision_app_login(external, APP_ROLE, passfile)
            server = PostgresServer(external, external, app_url, embedded=None)
        else:
            pg = EmbeddedPostgres(workdir / "pg", app_role=APP_ROLE, settings=TEST_SERVER_SETTINGS)
            process = pg.start(log_path=workdir / "postgres.log")
            pg.bootstrap()
            server = PostgresServer(pg.superuser_url(), pg.owner_url(), pg.app_url(), embedded=pg)
        try:
            server.create_template()
            yield server
        finally:
            if process is None:
                server.drop_database(server.template)
    finally:
        if process is not None:
            stop_server(process)
        if owns_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
