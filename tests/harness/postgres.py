"""A session-wide PostgreSQL server, and one isolated database per test.

Migrations run once per session, into a template database. Each test then gets
`CREATE DATABASE ... TEMPLATE`, a file-level copy that takes milliseconds, so tests
cannot see each other's rows and never pay for migrations again.
"""

from __future__ import annotations

import os
import subprocess
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
from paysaga.db import DatabaseUrls
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

    def __init__(self, admin_url: str, owner_url: str, owner_login_has_app_url: bool) -> None:
        self.admin_url = admin_url
        self.owner_url = owner_url
        self._app_login = owner_login_has_app_url
        self.template = f"paysaga_tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.version = ""

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(to_libpq_url(self.admin_url), autocommit=True)

    def urls_for(self, database: str) -> DatabaseUrls:
        owner = with_database(self.owner_url, database).render_as_string(hide_password=False)
        app_url = None
        if self._app_login:
            app = make_url(owner).set(username=APP_ROLE, password=None)
            app_url = app.render_as_string(hide_password=False)
        return DatabaseUrls(owner_url=owner, app_url=app_url, app_role=APP_ROLE)

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
        return IsolatedDatabase(name, self.urls_for(name))

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
def postgres_server(workdir: Path) -> Iterator[PostgresServer]:
    """The server for this session, with the migrated template database in place."""
    external = os.environ.get("DATABASE_URL")
    process: subprocess.Popen[bytes] | None = None
    if external:
        server = PostgresServer(external, external, owner_login_has_app_url=False)
        with server.admin() as conn:
            conn.execute(
                sql.SQL(
                    "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {role}) "
                    "THEN CREATE ROLE {ident} NOLOGIN; END IF; END $$"
                ).format(role=sql.Literal(APP_ROLE), ident=sql.Identifier(APP_ROLE))
            )
    else:
        pg = EmbeddedPostgres(workdir / "pgdata", app_role=APP_ROLE, settings=TEST_SERVER_SETTINGS)
        process = pg.start(log_path=workdir / "postgres.log")
        pg.bootstrap()
        server = PostgresServer(pg.superuser_url(), pg.owner_url(), owner_login_has_app_url=True)
    try:
        server.create_template()
        yield server
    finally:
        if process is not None:
            stop_server(process)
        else:
            server.drop_database(server.template)
