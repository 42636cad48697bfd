"""The `paysaga` CLI against a real database: API keys and migrations."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from api.keys import authenticate
from paysaga.cli import app
from paysaga.settings import Settings, get_settings
from tests.harness.postgres import IsolatedDatabase, PostgresServer
from tests.harness.stack import clean_env, paysaga

SECRET = "cli-test-secret-0123456789"


def _env(db: IsolatedDatabase) -> dict[str, str]:
    env = clean_env(DATABASE_URL=db.urls.owner_url, PAYSAGA_API_KEY_SECRET=SECRET)
    if db.urls.app_url:
        env["DATABASE_APP_URL"] = db.urls.app_url
    return env


async def _key_rows(engine: AsyncEngine) -> list[dict[str, object]]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT * FROM api_keys"))
        return [dict(row._mapping) for row in rows]


async def test_apikey_create_prints_only_the_key_on_stdout_and_stores_only_its_hash(
    database: IsolatedDatabase, owner_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    result = paysaga(
        "apikey",
        "create",
        "--name",
        "billing",
        "--scopes",
        "payments:write,payments:read",
        env=_env(database),
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert result.stdout == key + "\n"
    assert key.startswith("psk_")
    assert key not in result.stderr
    assert "billing" in result.stderr

    (row,) = await _key_rows(owner_engine)
    assert row["name"] == "billing"
    assert row["scopes"] == ["payments:read", "payments:write"]
    assert isinstance(row["key_hash"], bytes)
    assert key.encode() not in row["key_hash"]
    assert key.split("_", 2)[2] not in str(row)

    async with app_engine.connect() as conn:
        principal = await authenticate(conn, SECRET, key)
        assert principal is not None and principal.name == "billing"
        assert await authenticate(conn, SECRET, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert await authenticate(conn, "another-secret-000000", key) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "x", "--scopes", "payments:write,admin"], "unknown scope(s): admin"),
        (["--name", "x", "--scopes", ""], "at least one scope"),
        (["--name", "   ", "--scopes", "ops"], "name must be"),
        (["--scopes", "ops"], "--name"),
    ],
)
async def test_apikey_create_refuses_bad_input_and_creates_nothing(
    database: IsolatedDatabase, owner_engine: AsyncEngine, args: list[str], message: str
) -> None:
    result = paysaga("apikey", "create", *args, env=_env(database))
    assert result.returncode != 0
    assert result.stdout == ""
    assert message in " ".join(result.stderr.split())
    assert await _key_rows(owner_engine) == []


async def test_apikey_revoke_disables_a_key_for_good(
    database: IsolatedDatabase, app_engine: AsyncEngine
) -> None:
    env = _env(database)
    key = paysaga("apikey", "create", "--name", "ops", "--scopes", "ops", env=env).stdout.strip()
    key_id = key.split("_")[1]
    revoked = paysaga("apikey", "revoke", key_id, env=env)
    assert revoked.returncode == 0, revoked.stderr
    async with app_engine.connect() as conn:
        assert await authenticate(conn, SECRET, key) is None
    listed = paysaga("apikey", "list", env=env).stdout
    assert key_id in listed and '"revoked_at": null' not in listed
    unknown = paysaga("apikey", "revoke", "nosuchkey123", env=env)
    assert unknown.returncode == 1
    assert "no API key with id" in unknown.stderr


def test_apikey_commands_explain_an_unreachable_database() -> None:
    env = clean_env(DATABASE_URL="postgresql://nobody@127.0.0.1:9/none")
    result = paysaga("apikey", "list", env=env)
    assert result.returncode == 1
    assert "cannot reach the database" in result.stderr


def test_db_commands_migrate_up_and_down(pg_server: PostgresServer) -> None:
    with pg_server.database(migrated=False) as db:
        env = _env(db)
        assert paysaga("db", "current", env=env).stdout.strip() == "base"
        assert paysaga("db", "upgrade", env=env).returncode == 0
        head = paysaga("db", "current", env=env).stdout.strip()
        assert head != "base"
        assert paysaga("db", "downgrade", "base", env=env).returncode == 0
        assert paysaga("db", "current", env=env).stdout.strip() == "base"


@pytest.mark.parametrize(
    ("overrides", "args", "code", "message"),
    [
        (
            {"PAYSAGA_API_HOST": "10.1.2.3"},
            [],
            1,
            "host 10.1.2.3 is not a loopback address (PAYSAGA_API_HOST)",
        ),
        (
            {"TEMPORAL_ADDRESS": "temporal.example.com:7233"},
            [],
            1,
            "host temporal.example.com is not a loopback address (TEMPORAL_ADDRESS)",
        ),
        ({}, ["--faults", "kill-api,bogus"], 2, "unknown fault kind(s) bogus"),
    ],
)
def test_chaos_run_refuses_a_stack_off_this_machine_or_an_unknown_fault_before_it_starts(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    overrides: dict[str, str],
    args: list[str],
    code: int,
    message: str,
) -> None:
    # In this process (a `paysaga` process of its own costs 3 s a case here), with the
    # environment `paysaga` would get: nothing answers on these addresses, so a run that
    # went as far as connecting would say so.
    for name in Settings.env_names():
        monkeypatch.delenv(name, raising=False)
    env = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none", "PAYSAGA_API_PORT": "9"}
    for name, value in {**env, **overrides}.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["chaos", "run", "--out", str(run_dir), *args])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == code, result.output
    assert message in " ".join(result.stderr.replace("│", " ").split()), result.stderr
    assert "cannot reach" not in result.stderr and "readyz" not in result.stderr
    assert result.stdout == ""
    assert not run_dir.exists()
