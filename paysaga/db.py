"""Database connections: which login each role uses, and the engines built from them.

Two roles touch the database, each with a login and credentials of its own:

- the **owner** runs migrations and the administrative CLI (`DATABASE_URL`);
- the **application role** is what the services (worker, API, projector, ...) log in
  as (`DATABASE_APP_URL`). It holds only what the migrations grant it, so a bug or an
  intruder in a service cannot rewrite history.

A service never holds the owner's URL: it cannot `SET ROLE` its way out of the
application role, since it never logged in as anything else. With the embedded
PostgreSQL, every role's password lives in a libpq password file under
`<data dir>/secrets/`, and URLs name the file (`passfile=`), never the password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ledger.db import create_reader_engine, to_libpq_url, to_sqlalchemy_url
from ledger.store import EventStore
from paysaga.settings import Settings

if TYPE_CHECKING:
    from paysaga.embedded_pg import EmbeddedPostgres

SECRETS_DIR_NAME = "secrets"
PASSWORD_BYTES = 32
# PostgreSQL's own default (scram_iterations); more costs every new connection.
SCRAM_ITERATIONS = 4096
SCRAM_SALT_BYTES = 16


class DatabaseConfigError(Exception):
    """This process cannot get the login it needs; the message says how to fix that."""


@dataclass(frozen=True)
class ServiceUrls:
    """Where a service connects: the application role's own login, and nothing more."""

    app_url: str
    app_role: str


@dataclass(frozen=True)
class DatabaseUrls(ServiceUrls):
    """Where the owner and the application role connect (administration and tests)."""

    owner_url: str


# --- credentials -----------------------------------------------------------------------------
def new_password() -> str:
    """A random password with no character that a password file or a URL must escape."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def scram_verifier(password: str) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5803 form).

    Sending the verifier instead of the password keeps the password out of the
    server's logs and statistics, as psql's `\\password` does.
    """
    salt = os.urandom(SCRAM_SALT_BYTES)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def passfile_path(secrets_dir: Path, role: str) -> Path:
    return secrets_dir / f"{role}.pgpass"


def ensure_private_dir(path: Path, mode: int = 0o700) -> None:
    """`path` exists, is a directory of ours that no other user may write to, and has
    `mode`. Raises `DatabaseConfigError` rather than take over someone else's directory."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise DatabaseConfigError(
            f"{path} is not a directory of ours (owner uid {st.st_uid}); paysaga keeps "
            "private files there. Remove it, or choose another PAYSAGA_DATA_DIR"
        )
    if st.st_mode & stat.S_IWOTH:
        raise DatabaseConfigError(
            f"{path} is writable by every user (mode {stat.S_IMODE(st.st_mode):04o}); "
            "paysaga keeps private files there. Choose a PAYSAGA_DATA_DIR of your own"
        )
    path.chmod(mode)


def write_passfile(path: Path, role: str, password: str) -> None:
    """A libpq password file that gives `role` its password on any server (0600)."""
    ensure_private_dir(path.parent)
    # `*` for the host: over a unix socket outside libpq's default directory, libpq
    # matches the host field against the socket directory's path, which can move.
    line = f"*:*:*:{role}:{password}\n"
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def read_passfile(path: Path) -> str | None:
    """The password in a file written by `write_passfile`, or None if there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    fields = text.strip().split(":")
    return fields[4] if len(fields) == 5 and fields[4] else None


def ensure_passfile(path: Path, role: str) -> str:
    """The role's password from its file; a new one (written there) if it has none yet."""
    password = read_passfile(path)
    if password is None:
        password = new_password()
        write_passfile(path, role, password)
    return password


def with_login(url: str, role: str, passfile: Path) -> str:
    """The same server and database, logging in as `role` with the password in `passfile`."""
    parsed = make_url(url).set(username=role, password=None)
    parsed = parsed.update_query_dict({"passfile": str(passfile)})
    return parsed.render_as_string(hide_password=False)


def provision_app_login(owner_url: str, app_role: str, passfile: Path) -> str:
    """Give the application role a login and the password in `passfile` (made if
    missing), connecting as the owner. Returns the application role's URL.

    The owner's login needs CREATEROLE (and, from PostgreSQL 16, ADMIN on the role) or
    superuser; without it, the message says to set DATABASE_APP_URL instead.
    """
    password = ensure_passfile(passfile, app_role)
    role = sql.Identifier(app_role)
    verifier = sql.Literal(scram_verifier(password))
    try:
        with psycopg.connect(to_libpq_url(owner_url), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (app_role,))
            verb = sql.SQL("ALTER" if exists.fetchone() else "CREATE")
            conn.execute(sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(verb, role, verifier))
    except psycopg.errors.InsufficientPrivilege as error:
        raise DatabaseConfigError(
            f"the login in DATABASE_URL may not give the role {app_role} a password "
            f"({error.diag.message_primary}). Create a login for {app_role} yourself and "
            "set DATABASE_APP_URL to it, or give the DATABASE_URL login CREATEROLE"
        ) from None
    return with_login(owner_url, app_role, passfile)


# --- which URL for which process -------------------------------------------------------------
def _embedded(settings: Settings) -> EmbeddedPostgres:
    # Imported here: embedded_pg builds on this module's credential helpers.
    from paysaga.embedded_pg import EmbeddedPostgres

    return EmbeddedPostgres(settings.data_path / "pg", app_role=settings.db_app_role)


def service_urls(settings: Settings) -> ServiceUrls:
    """What a service logs in with: the application role's own login, never the owner's."""
    role = settings.db_app_role
    if settings.database_app_url is not None:
        return ServiceUrls(app_url=settings.database_app_url, app_role=role)
    if settings.database_url is not None:
        raise DatabaseConfigError(
            "DATABASE_URL is the schema owner's login, and services never log in as the "
            f"owner. Set DATABASE_APP_URL to a login of the application role ({role}); "
            "`paysaga up` provisions one when it is unset"
        )
    embedded = _embedded(settings)
    embedded.require_credentials(role)
    return ServiceUrls(app_url=embedded.app_url(), app_role=role)


def owner_url(settings: Settings) -> str:
    """The schema owner's login, for migrations and the administrative commands."""
    if settings.database_url is not None:
        return settings.database_url
    if settings.database_app_url is not None:
        raise DatabaseConfigError(
            "this command runs as the schema owner: set DATABASE_URL to the owner's login "
            "(DATABASE_APP_URL is the services' login, which may not do this)"
        )
    embedded = _embedded(settings)
    embedded.require_credentials(embedded.owner_role)
    return embedded.owner_url()


def create_app_engine(
    urls: ServiceUrls, *, pool_size: int = 10, pool_overflow_max: int = 10
) -> AsyncEngine:
    """An async engine logged in as the application role (see `ledger.db`)."""
    return create_reader_engine(
        urls.app_url, pool_size=pool_size, pool_overflow_max=pool_overflow_max
    )


def create_owner_engine(url: str) -> AsyncEngine:
    """An async engine logged in as the schema owner (administrative commands, tests)."""
    return create_async_engine(to_sqlalchemy_url(url), pool_size=2, max_overflow=2)


async def open_store(
    urls: ServiceUrls, *, pool_size: int = 10, engine: AsyncEngine | None = None
) -> EventStore:
    """The event store, logged in as the application role. Close it when done."""
    return await EventStore.open(urls.app_url, pool_size=pool_size, engine=engine)
