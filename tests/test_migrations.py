"""Migrations go up and down cleanly, one revision at a time and all at once."""

from __future__ import annotations

import psycopg
import pytest
from alembic.script import ScriptDirectory

from ledger.db import to_libpq_url
from paysaga import migrate
from tests.harness.postgres import APP_ROLE, PostgresServer


def _tables(owner_url: str) -> set[str]:
    with psycopg.connect(to_libpq_url(owner_url)) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {str(row[0]) for row in rows}


def _revisions() -> list[str]:
    script = ScriptDirectory.from_config(migrate.alembic_config("postgresql://unused", APP_ROLE))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


@pytest.fixture
def empty_database(pg_server: PostgresServer):
    with pg_server.database(migrated=False) as db:
        yield db


def test_upgrade_to_head_then_downgrade_to_base(empty_database) -> None:
    url = empty_database.urls.owner_url
    assert migrate.current_revision(url) is None
    migrate.upgrade(url, APP_ROLE)
    assert migrate.current_revision(url) == migrate.head_revision()
    assert "api_keys" in _tables(url)
    migrate.downgrade(url, APP_ROLE, "base")
    assert migrate.current_revision(url) is None
    assert _tables(url) <= {"alembic_version"}


def test_every_revision_steps_up_down_and_up_again(empty_database) -> None:
    url = empty_database.urls.owner_url
    for revision in _revisions():
        migrate.upgrade(url, APP_ROLE, revision)
        after_up = _tables(url)
        migrate.downgrade(url, APP_ROLE, "-1")
        migrate.upgrade(url, APP_ROLE, revision)
        assert _tables(url) == after_up, f"revision {revision} does not round-trip"
    assert migrate.current_revision(url) == migrate.head_revision()


def test_upgrading_twice_changes_nothing(empty_database) -> None:
    url = empty_database.urls.owner_url
    migrate.upgrade(url, APP_ROLE)
    tables = _tables(url)
    migrate.upgrade(url, APP_ROLE)
    assert _tables(url) == tables


def test_the_application_role_can_read_but_not_write_api_keys(database) -> None:
    with psycopg.connect(to_libpq_url(database.urls.app_url)) as conn:
        conn.execute("SELECT count(*) FROM api_keys")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "INSERT INTO api_keys (key_id, name, key_hash, scopes) "
                "VALUES ('abcdefgh', 'x', decode(repeat('00', 32), 'hex'), ARRAY['ops'])"
            )
