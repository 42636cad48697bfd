"""Reconciliation remembers how far it has verified the seal (recon.seal_verifications).

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-24

Each scheduled run verifies the sealed blocks from the last block an earlier run
verified, and records the block it reached: the newest row is where the next run starts.
The table is append-only for the application role (a run adds its row; none is ever
changed), and a daily full run verifies from block 1 whatever the table says, so a row
written to skip verification is caught within a day.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import app_role

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE recon.seal_verifications (
            run_id      text PRIMARY KEY,
            block_no    bigint NOT NULL CHECK (block_no >= 0),
            last_seq    bigint NOT NULL CHECK (last_seq >= 0),
            hash        bytea NOT NULL CHECK (octet_length(hash) = 32),
            full_run    boolean NOT NULL,
            verified_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    )
    op.execute("CREATE INDEX seal_verifications_latest ON recon.seal_verifications (block_no)")
    op.execute(f"GRANT SELECT, INSERT ON recon.seal_verifications TO {app_role()}")


def downgrade() -> None:
    op.execute("DROP TABLE recon.seal_verifications")
