"""Discrepancy ids unique to their ledger, not only to their problem.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-24

A discrepancy's id was md5 of its problem key (`missing_in_ledger:line=1:item=-`), and
its workflow is `discrepancy-<id>`. Line and item ids are sequences of their database,
so two ledgers on one Temporal namespace (a database rebuilt while Temporal keeps its
history; or each test's database beside the session's Temporal server) named different
problems alike: the second's case found the first's workflow, running on a task queue
nobody polls, or closed, and was never worked on. Each ledger now has a random
identity, made once here, and every discrepancy id is derived from it and the problem
key: still deterministic, so a retried recording writes nothing twice. A copy of the
database (a restore, a `CREATE DATABASE ... TEMPLATE`) is the same ledger and keeps it.

Trust boundary: the application role reads the identity; nothing but the owner writes it.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import app_role, run_sql_file

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql_file("0016_recon_installation")
    op.execute(f"GRANT SELECT ON recon.installation TO {app_role()}")


def downgrade() -> None:
    op.execute("DROP TRIGGER discrepancies_id_from_problem ON recon.discrepancies")
    op.execute("DROP FUNCTION recon.discrepancy_id_from_problem()")
    # Ids derived with the ledger's identity would fail the old check: it holds for
    # what is recorded from here on.
    op.execute(
        "ALTER TABLE recon.discrepancies ADD CONSTRAINT discrepancies_id_from_problem "
        "CHECK (discrepancy_id = md5(problem_key)::uuid) NOT VALID"
    )
    op.execute("DROP TABLE recon.installation")
