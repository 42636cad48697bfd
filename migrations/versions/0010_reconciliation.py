"""Reconciliation: statements, settlement items, matches and discrepancies (schema recon).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24

The tables are in `0010_reconciliation.sql`. The application role ingests statements,
derives settlement items from the ledger, matches, and resolves discrepancies: it may
add rows to every table, and update only a run (its status and checkpoints), a file's
count of what it added, and a discrepancy's resolution. It deletes nothing: a
statement received, an item derived, a match made or a problem found stays on record.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import app_role, run_sql_file

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    "statement_files",
    "statements",
    "statement_lines",
    "items",
    "matched_lines",
    "matched_items",
    "runs",
    "discrepancies",
)
# What may change after a row is written; nothing else may.
UPDATABLE_COLUMNS = {
    "statement_files": "statements_new, lines_new",
    "runs": "kind, status, started_at, finished_at, completed_seq, ledger_seq, "
    "line_checkpoint, item_checkpoint, young_after, as_of, counts",
    "discrepancies": "status, resolution_code, resolution_note, resolved_by, resolved_at",
}


def upgrade() -> None:
    role = app_role()
    run_sql_file("0010_reconciliation")
    op.execute(f"GRANT USAGE ON SCHEMA recon TO {role}")
    for table in TABLES:
        op.execute(f"GRANT SELECT, INSERT ON recon.{table} TO {role}")
    for table, columns in UPDATABLE_COLUMNS.items():
        op.execute(f"GRANT UPDATE ({columns}) ON recon.{table} TO {role}")
    op.execute(f"GRANT USAGE ON SEQUENCE recon.run_completions TO {role}")


def downgrade() -> None:
    op.execute("DROP SCHEMA recon CASCADE")
