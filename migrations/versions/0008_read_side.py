"""The read side: read models projected from the log, risk alerts in the ledger.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24

- The catalog learns `RiskAlertRaised`, on a payer's own `risk-<account>` stream
  (`0008_ledger_rules.sql`, rendered by `python -m ledger.rules`).
- Schema `projection`: the read models and their checkpoints, which the application
  role's projector writes (SELECT, INSERT and UPDATE; only SELECT and UPDATE on the
  checkpoints); `projection_shadow`, where `paysaga replay` (the owner)
  rebuilds one.
- `ledger_append` finds a retried append in a stream whose machine loops (a risk
  stream), where 0005 hit the unique event id (`0008_ledger_append.sql`).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import app_role, load_rules, sql_file

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PROJECTION_TABLES = "checkpoints, balances, entries, payments, risk_alerts, risk_payers"


def upgrade() -> None:
    role = app_role()
    load_rules("0008_ledger_rules")
    driver = op.get_bind().connection.driver_connection
    assert driver is not None, "the migration has no database connection"
    driver.execute(sql_file("0008_read_models"))
    # CREATE OR REPLACE: the function keeps its owner, SECURITY DEFINER and grants.
    driver.execute(sql_file("0008_ledger_append"))
    op.execute(f"GRANT USAGE ON SCHEMA projection TO {role}")
    # What the projector needs and no more: it adds and updates rows, never deletes
    # them, and it moves checkpoints, never adds or removes one.
    op.execute(f"GRANT SELECT, UPDATE ON projection.checkpoints TO {role}")
    for table in PROJECTION_TABLES.split(", "):
        if table != "checkpoints":
            op.execute(f"GRANT SELECT, INSERT, UPDATE ON projection.{table} TO {role}")


def downgrade() -> None:
    op.execute("DROP SCHEMA projection_shadow CASCADE")
    op.execute("DROP SCHEMA projection CASCADE")
    load_rules("0005_ledger_rules")
    driver = op.get_bind().connection.driver_connection
    assert driver is not None, "the migration has no database connection"
    driver.execute(
        sql_file("0005_ledger_append").replace(
            "CREATE FUNCTION ledger_append(", "CREATE OR REPLACE FUNCTION ledger_append(", 1
        )
    )
