"""The operations console's sessions, kept on the server; reconciliation runs listed by time.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-24

A console session is a random token in an HttpOnly cookie. The server keeps only its
SHA-256 (`token_hash`): a copy of the table cannot be replayed as a cookie. Each session
belongs to the API key that logged in; every request checks, in the same statement,
that the key is still live and holds `ops`, so revoking the key ends its sessions at
once. A session ends at logout (`ended_at`), after `PAYSAGA_CONSOLE_SESSION_IDLE_S`
without a request (`last_seen_at`), or at `expires_at` (the absolute bound, set at login).

Trust boundary: the application role creates, reads and ends sessions and deletes
those long over; it cannot move a session's key, its creation or its absolute expiry.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import app_role

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    role = app_role()
    op.execute(
        """
        CREATE TABLE console_sessions (
            token_hash   bytea PRIMARY KEY CHECK (octet_length(token_hash) = 32),
            key_id       text NOT NULL REFERENCES api_keys (key_id) ON DELETE CASCADE,
            created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
            last_seen_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            expires_at   timestamptz NOT NULL,
            ended_at     timestamptz,
            CONSTRAINT console_sessions_expiry CHECK (expires_at > created_at)
        )
        """
    )
    op.execute("CREATE INDEX console_sessions_key ON console_sessions (key_id, created_at)")
    op.execute("CREATE INDEX console_sessions_expires ON console_sessions (expires_at)")
    op.execute(f"GRANT SELECT, INSERT, DELETE ON console_sessions TO {role}")
    op.execute(f"GRANT UPDATE (last_seen_at, ended_at) ON console_sessions TO {role}")
    # The console lists runs newest first, a page at a time.
    op.execute("CREATE INDEX runs_started ON recon.runs (started_at, run_id)")


def downgrade() -> None:
    op.execute("DROP INDEX recon.runs_started")
    op.execute("DROP TABLE console_sessions")
