"""Idempotency keys for the API, and indexes for listing payments.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

A key is scoped to the API key that sent it. The row outlives the workflow's history
in Temporal: 30 days (`expires_at`), after which `paysaga` may delete it. Even then a
repeat cannot move money twice, because the payment id derives from the two keys and
the ledger refuses a second, different PaymentInitiated for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import app_role, run_sql_file

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    role = app_role()
    run_sql_file("0004_idempotency_keys")
    # DELETE: a request that fails before creating anything takes its key back.
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_keys TO {role}")


def downgrade() -> None:
    op.execute("DROP INDEX events_initiated_by_payee")
    op.execute("DROP INDEX events_initiated_by_seq")
    op.execute("DROP TABLE idempotency_keys")
