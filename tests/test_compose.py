"""docker-compose.yml cannot run here (no Docker engine), so it is checked by reading it,
and the script it mounts into PostgreSQL is run against a real one."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import typer.main
import yaml
from sqlalchemy import make_url

from ledger.db import to_libpq_url
from paysaga.cli import app
from paysaga.db import with_login, write_passfile
from paysaga.embedded_pg import EmbeddedPostgres, bin_dir, stop_server
from paysaga.settings import Settings
from workflows.search_attributes import ALL_SEARCH_ATTRIBUTES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OURS = {name: svc for name, svc in SERVICES.items() if "build" in svc}
DEFAULTS = Settings(_env_file=None)


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert command, "a service built from our Dockerfile must say which command it runs"
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _resolves(argv: list[str]) -> bool:
    """True if argv names a real `paysaga` command (every word a known subcommand)."""
    if argv[0] != "paysaga":
        return False
    command = typer.main.get_command(app)
    for word in argv[1:]:
        if word.startswith("-"):
            break
        if _is_group(command):
            sub = command.get_command(typer.Context(command), word)  # type: ignore[attr-defined]
            if sub is None:
                return False
            command = sub
        else:
            break  # a positional argument of a leaf command
    return not _is_group(command)


def _is_group(command: object) -> bool:
    return hasattr(command, "list_commands")


def _host_ports(service: dict[str, Any]) -> dict[int, int]:
    """{container port: host port}."""
    mapping = {}
    for entry in service.get("ports", []):
        host, container = str(entry).rsplit(":", 1)
        mapping[int(container)] = int(host.rsplit(":", 1)[-1])
    return mapping


def test_the_stack_has_every_service_of_the_design() -> None:
    expected = {"postgres", "temporal", "temporal-ui", "worker", "sealer", "api", "projector"}
    assert expected <= set(SERVICES)
    assert {"worker", "sealer", "api", "projector"} <= set(OURS)


def test_postgres_keeps_its_data_in_a_named_volume() -> None:
    named = set(COMPOSE.get("volumes") or {})
    mounts = [str(v).split(":")[0] for v in SERVICES["postgres"]["volumes"]]
    assert any(mount in named for mount in mounts)


def test_temporal_uses_the_official_images_with_postgres_persistence() -> None:
    temporal = SERVICES["temporal"]
    assert temporal["image"].startswith("temporalio/")
    assert temporal["environment"]["DB"].startswith("postgres")
    assert temporal["environment"]["POSTGRES_SEEDS"] == "postgres"
    assert SERVICES["temporal-ui"]["image"].startswith("temporalio/ui:")


def test_a_job_registers_the_search_attributes() -> None:
    jobs = [
        svc for svc in OURS.values() if _command(svc)[:3] == ["paysaga", "temporal", "register"]
    ]
    assert len(jobs) == 1
    # That command registers exactly the attributes the workflows upsert.
    assert {key.name for key in ALL_SEARCH_ATTRIBUTES} == {
        "PaymentStatus",
        "PaymentAmountMinor",
        "PaymentCurrency",
        "PayerAccountId",
        "PayeeAccountId",
        "DiscrepancyType",
    }


@pytest.mark.parametrize("name", sorted(OURS))
def test_each_service_command_exists_in_the_cli(name: str) -> None:
    assert _resolves(_command(OURS[name])), f"{name}: {_command(OURS[name])} is not a command"


@pytest.mark.parametrize("name", sorted(OURS))
def test_each_service_sets_only_variables_the_settings_know(name: str) -> None:
    unknown = set(OURS[name].get("environment", {})) - Settings.env_names()
    assert not unknown, f"{name} sets variables paysaga never reads: {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(OURS))
def test_each_service_builds_from_the_one_dockerfile(name: str) -> None:
    assert OURS[name]["build"] in (".", {"context": "."})
    assert (ROOT / "Dockerfile").is_file()


def test_ports_match_the_defaults() -> None:
    assert _host_ports(SERVICES["api"]) == {DEFAULTS.api_port: DEFAULTS.api_port}
    assert SERVICES["api"]["environment"]["PAYSAGA_API_PORT"] == str(DEFAULTS.api_port)
    assert _host_ports(SERVICES["temporal"]) == {7233: DEFAULTS.temporal_port}
    assert DEFAULTS.temporal_ui_port in _host_ports(SERVICES["temporal-ui"]).values()


def test_services_reach_each_other_by_service_name() -> None:
    env = OURS["api"]["environment"]
    assert env["TEMPORAL_ADDRESS"].split(":")[0] in SERVICES
    for url in (env["DATABASE_APP_URL"], OURS["migrate"]["environment"]["DATABASE_URL"]):
        host = re.search(r"@([^:/]+)", url)
        assert host is not None and host.group(1) in SERVICES


def _long_running(service: dict[str, Any]) -> bool:
    return service.get("restart") != "on-failure"


def test_only_the_migration_job_holds_the_owners_login() -> None:
    holders = {name for name, svc in OURS.items() if "DATABASE_URL" in svc.get("environment", {})}
    assert holders == {"migrate"}
    assert _command(OURS["migrate"]) == ["paysaga", "db", "upgrade"]
    assert not _long_running(OURS["migrate"])


@pytest.mark.parametrize("name", sorted(name for name, svc in OURS.items() if _long_running(svc)))
def test_each_long_running_service_logs_in_as_the_application_role(name: str) -> None:
    env = OURS[name].get("environment", {})
    assert "DATABASE_URL" not in env, f"{name} holds the owner's login"
    app_url = make_url(env["DATABASE_APP_URL"])
    assert app_url.username == DEFAULTS.db_app_role
    assert app_url.database == SERVICES["postgres"]["environment"]["POSTGRES_DB"]


def test_the_services_role_is_made_with_a_login_and_a_password_from_the_environment() -> None:
    assert {"worker", "api", "projector"} <= {n for n, s in OURS.items() if _long_running(s)}
    mount = next(v for v in SERVICES["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v)
    script = (ROOT / mount.split(":")[0]).read_text()
    assert f"CREATE ROLE {DEFAULTS.db_app_role} LOGIN PASSWORD :'app_password'" in script
    assert "\\getenv app_password POSTGRES_APP_PASSWORD" in script
    assert SERVICES["postgres"]["environment"]["POSTGRES_APP_PASSWORD"].startswith("${")


def test_no_password_is_written_in_the_file() -> None:
    """Every password comes from the environment of `docker compose up`."""
    urls = [
        value
        for svc in OURS.values()
        for key, value in svc.get("environment", {}).items()
        if key in ("DATABASE_URL", "DATABASE_APP_URL")
    ]
    assert urls
    for url in urls:
        password = make_url(url).password
        assert password is not None and str(password).startswith("${"), url
    for service, key in (("postgres", "POSTGRES_PASSWORD"), ("temporal", "POSTGRES_PWD")):
        assert SERVICES[service]["environment"][key].startswith("${")


def test_files_mounted_from_the_repo_exist() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def test_the_dockerfile_copies_only_what_exists_and_installs_the_cli() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    assert "pip install ." in dockerfile


def test_the_dockerfile_copies_every_package_the_project_installs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    modules = pyproject["tool"]["setuptools"]["py-modules"]
    copied = {
        source.rstrip("/")
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    }
    for package in packages:
        assert package.rstrip("*") in copied, f"the image lacks the {package} package"
    for module in modules:
        assert f"{module}.py" in copied, f"the image lacks {module}.py"


def test_the_command_check_rejects_what_is_not_a_command() -> None:
    assert not _resolves(["paysaga", "no-such-command"])
    assert not _resolves(["paysaga", "db"])  # a group, not something that runs
    assert not _resolves(["python", "worker.py"])
    assert _resolves(["paysaga", "db", "downgrade", "base"])


def test_the_init_script_gives_the_services_role_a_login_with_its_own_password(
    tmp_path: Path,
) -> None:
    """Run as the postgres image runs it: psql on PATH, POSTGRES_* in the environment."""
    mount = next(v for v in SERVICES["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v)
    script = ROOT / mount.split(":")[0]
    workdir = Path(tempfile.mkdtemp(prefix="paysaga-compose-"))
    pg = EmbeddedPostgres(workdir / "pg")  # a bare cluster: no paysaga role exists yet
    process = pg.start()
    try:
        env = {
            "PATH": f"{bin_dir()}:{os.environ['PATH']}",
            "PGHOST": str(pg.socket_dir),
            "PGPASSFILE": str(pg.passfile("postgres")),
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": "postgres",
        }
        without = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
        assert without.returncode != 0

        password = uuid.uuid4().hex
        env["POSTGRES_APP_PASSWORD"] = password
        made = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        role = DEFAULTS.db_app_role
        passfile = tmp_path / "app.pgpass"
        write_passfile(passfile, role, password)
        url = with_login(pg.url("postgres", "postgres"), role, passfile)
        with psycopg.connect(to_libpq_url(url)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
    finally:
        stop_server(process)
        shutil.rmtree(workdir, ignore_errors=True)
