"""The processor simulator's outages: windows during which every call errors or hangs.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-24

A row of `processor_faults` is a window (`starts_at`, `ends_at`) in which the simulator
answers every call with a retryable error (`error`) or does not answer at all until the
window ends (`hang`). The simulator consults it on each call (activities/processor.py).

Trust boundary: the application role may only read the windows. Setting one stops
every payment's processor calls, which is an operator's or a test's decision
(`paysaga processor fault`, `paysaga chaos run`, both as the schema owner), never a
service's: a compromised service cannot take the processor down for everyone.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import app_role

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE processor_faults (
            fault_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            mode       text NOT NULL CHECK (mode IN ('error', 'hang')),
            starts_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
            ends_at    timestamptz NOT NULL,
            reason     text NOT NULL DEFAULT '' CHECK (length(reason) <= 200),
            created_by text NOT NULL DEFAULT current_user,
            CHECK (ends_at > starts_at)
        )
        """
    )
    op.execute("CREATE INDEX processor_faults_by_end ON processor_faults (ends_at)")
    op.execute(f"GRANT SELECT ON processor_faults TO {app_role()}")


def downgrade() -> None:
    op.execute("DROP TABLE processor_faults")
