"""The application role, and API keys stored as hashes.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import app_role, run_sql_file

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    role = app_role()
    # Roles are cluster-wide. The embedded stack creates it with a login and a password
    # beforehand; elsewhere `paysaga up` (or the operator) gives it one. A NOLOGIN role
    # created here is only a placeholder for the grants below.
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                CREATE ROLE {role} NOLOGIN;
            END IF;
        END
        $$
        """
    )
    op.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
    run_sql_file("0001_api_keys")
    # Services only ever read keys; creating and revoking them is the owner's job (CLI).
    op.execute(f"GRANT SELECT ON api_keys TO {role}")


def downgrade() -> None:
    op.execute("DROP TABLE api_keys")
    # The role stays: it is cluster-wide, and other databases on the server may use it.
    op.execute(f"REVOKE USAGE ON SCHEMA public FROM {app_role()}")
