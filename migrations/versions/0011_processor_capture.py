"""The processor captures: settlement is real at the processor, and it reports it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-24

Captures (`processor_captures`), the capture fence a closer sets before it releases a
hold (`processor_authorizations.capture_fenced_at`), and capture, fence and void as
functions that lock the authorization's row before they decide
(`migrations/sql/0011_processor_capture.sql`). The downgrade forgets every capture:
a captured authorization goes back to plain `authorized`, as the simulator before
this revision would have left it.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import app_role, run_sql_file

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = (
    "processor_capture(text, text, bigint, text, integer)",
    "processor_fence_capture(text, integer)",
    "processor_void(text, integer)",
)


def upgrade() -> None:
    role = app_role()
    run_sql_file("0011_processor_capture")
    # The saga captures; a settlement report's injected late settlement moves
    # `settles_at`, and nothing else of a capture ever changes.
    op.execute(f"GRANT SELECT, INSERT ON processor_captures TO {role}")
    op.execute(f"GRANT UPDATE (settles_at) ON processor_captures TO {role}")
    for function in FUNCTIONS:
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {role}")


def downgrade() -> None:
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION {function}")
    op.execute("DROP TABLE processor_captures")
    op.execute("DELETE FROM processor_calls WHERE operation IN ('capture', 'fence_capture')")
    op.execute(
        """
        ALTER TABLE processor_calls
            DROP CONSTRAINT processor_calls_operation_check,
            ADD CONSTRAINT processor_calls_operation_check
                CHECK (operation IN ('authorize', 'void'))
        """
    )
    op.execute(
        "UPDATE processor_authorizations SET status = 'authorized' WHERE status = 'captured'"
    )
    op.execute(
        """
        ALTER TABLE processor_authorizations
            DROP COLUMN capture_fenced_at,
            DROP CONSTRAINT processor_authorizations_status_check,
            ADD CONSTRAINT processor_authorizations_status_check
                CHECK (status IN ('authorized', 'voided', 'fenced'))
        """
    )
