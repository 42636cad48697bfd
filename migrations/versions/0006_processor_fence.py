"""A void before any authorization fences the payment off at the processor simulator.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import run_sql_file

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql_file("0006_processor_fence")


def downgrade() -> None:
    op.execute("DELETE FROM processor_authorizations WHERE status = 'fenced'")
    op.execute(
        """
        ALTER TABLE processor_authorizations
            DROP CONSTRAINT processor_authorizations_fence_or_authorization,
            DROP CONSTRAINT processor_authorizations_status_check,
            ADD CONSTRAINT processor_authorizations_status_check
                CHECK (status IN ('authorized', 'voided')),
            ALTER COLUMN authorization_id SET NOT NULL,
            ALTER COLUMN amount_minor SET NOT NULL,
            ALTER COLUMN currency SET NOT NULL
        """
    )
