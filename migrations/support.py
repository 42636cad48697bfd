"""What revisions share: the application role's name, and the SQL files they load.

Revisions import nothing from the product. The role comes from Alembic's config
(`paysaga.migrate` puts it there; for Alembic's own CLI, env.py does); the DDL and the
PL/pgSQL live in `migrations/sql/<revision>_<name>.sql`, so that a change to a money
rule is a new file that reviews as a diff against the one it supersedes:

    git diff --no-index migrations/sql/0002_ledger_append.sql migrations/sql/0005_ledger_append.sql
"""

from __future__ import annotations

import re
from pathlib import Path

from alembic import context, op

SQL_DIR = Path(__file__).resolve().parent / "sql"
_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def app_role() -> str:
    """The application role that revisions grant privileges to."""
    role = str(context.config.attributes.get("app_role") or "")
    if not _ROLE_NAME.match(role):
        raise RuntimeError(f"no valid application role in Alembic's config: {role!r}")
    return role


def sql_file(name: str) -> str:
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


def run_sql_file(name: str) -> None:
    """Execute one SQL file of `migrations/sql/` exactly as written.

    Straight to psycopg, in the migration's transaction, with no parameters: SQLAlchemy
    would read `"x":200` in a JSON literal as a bind parameter, and a parameterised
    query would read `%` in PL/pgSQL's RAISE as a placeholder.
    """
    driver = op.get_bind().connection.driver_connection
    assert driver is not None, "the migration has no database connection"
    driver.execute(sql_file(name))


def load_rules(name: str) -> None:
    """Replace the catalog's rows and its payload check with those of one rendered file
    (`python -m ledger.rules > migrations/sql/<revision>_ledger_rules.sql`).

    CREATE OR REPLACE keeps the functions' owner and grants (no one but the ledger's own
    functions may call them)."""
    op.execute("DELETE FROM ledger_transitions")
    op.execute("DELETE FROM ledger_event_types")
    driver = op.get_bind().connection.driver_connection
    assert driver is not None, "the migration has no database connection"
    driver.execute(sql_file(name).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"))
