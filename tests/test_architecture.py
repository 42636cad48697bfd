"""Dependencies point one way, and every query on the ledger's tables lives in `ledger/`.

Read from the source with `ast`, so a violation fails the suite before it can spread.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("paysaga", "api", "activities", "workflows", "worker", "ledger", "migrations", "recon")
LEDGER_TABLES = ("events", "streams", "accounts", "positions", "account_positions")
_LEDGER_SQL = re.compile(
    r"\b(?:FROM|JOIN|INTO|UPDATE)\s+(?:public\.)?(" + "|".join(LEDGER_TABLES) + r")\b",
    re.IGNORECASE,
)


def _python_files(*folders: str) -> Iterator[Path]:
    for folder in folders:
        path = ROOT / folder
        if path.suffix == ".py":
            yield path
        else:
            yield from sorted(path.rglob("*.py"))


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", list(_python_files("ledger")), ids=lambda p: p.name)
def test_the_ledger_imports_nothing_from_the_rest_of_the_product(path: Path) -> None:
    foreign = _imported_top_levels(path) & (set(PRODUCT) - {"ledger"})
    assert not foreign, f"{path.relative_to(ROOT)} imports {sorted(foreign)}"


@pytest.mark.parametrize("path", list(_python_files("migrations")), ids=lambda p: p.name)
def test_migrations_import_nothing_from_the_product(path: Path) -> None:
    foreign = _imported_top_levels(path) & (set(PRODUCT) - {"migrations"})
    assert not foreign, f"{path.relative_to(ROOT)} imports {sorted(foreign)}"


def test_the_worker_and_the_cli_do_not_import_each_other() -> None:
    assert "paysaga.cli" not in _imported_modules(ROOT / "worker.py")
    # Not even inside a function: `paysaga worker` execs `python -m worker`.
    assert not {"worker", "worker.main"} & _imported_modules(ROOT / "paysaga" / "cli.py")


def test_money_rules_live_in_versioned_sql_files_not_in_python_strings() -> None:
    for path in _python_files("migrations"):
        assert "LANGUAGE plpgsql" not in path.read_text(), (
            f"{path.relative_to(ROOT)} holds PL/pgSQL; put it in migrations/sql/"
        )


@pytest.mark.parametrize(
    "path",
    list(_python_files("api", "activities", "workflows", "paysaga", "recon", "worker.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_queries_on_ledger_tables_live_in_the_ledger(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _LEDGER_SQL.search(node.value)
            assert match is None, (
                f"{path.relative_to(ROOT)}:{node.lineno} queries {match.group(1)}; "
                "call an EventStore method instead"
            )
