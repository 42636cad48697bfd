"""The application role, and API keys stored as hashes.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from paysaga.migrate import app_role

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    role = app_role()
    # Roles are cluster-wide: the embedded stack creates it with LOGIN beforehand; on an
    # external server a NOLOGIN role is enough, since services take it on with SET ROLE.
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
    op.execute(
        """
        CREATE TABLE api_keys (
            key_id      text PRIMARY KEY CHECK (key_id ~ '^[a-z0-9]{8,32}$'),
            name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
            -- HMAC-SHA256 of the whole key under PAYSAGA_API_KEY_SECRET; the key itself
            -- is shown once, at creation, and never stored.
            key_hash    bytea NOT NULL CHECK (length(key_hash) = 32),
            scopes      text[] NOT NULL CHECK (cardinality(scopes) >= 1),
            created_at  timestamptz NOT NULL DEFAULT now(),
            revoked_at  timestamptz
        )
        """
    )
    # Services only ever read keys; creating and revoking them is the owner's job (CLI).
    op.execute(f"GRANT SELECT ON api_keys TO {role}")


def downgrade() -> None:
    op.execute("DROP TABLE api_keys")
    # The role stays: it is cluster-wide, and other databases on the server may use it.
    op.execute(f"REVOKE USAGE ON SCHEMA public FROM {app_role()}")
