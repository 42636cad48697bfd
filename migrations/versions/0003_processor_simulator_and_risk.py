"""The payment processor simulator's own records, and an index for risk velocity checks.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

The simulator stands in for an external processor, so its state is mutable, unlike
the ledger: an authorization is created, then maybe voided. Every call is logged, so
tests can prove each authorization was voided exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import app_role, run_sql_file

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    role = app_role()
    run_sql_file("0003_processor_simulator_and_risk")
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON processor_authorizations TO {role}")
    op.execute(f"GRANT SELECT, INSERT ON processor_calls TO {role}")


def downgrade() -> None:
    op.execute("DROP INDEX events_initiated_by_payer")
    op.execute("DROP TABLE processor_calls, processor_authorizations")
