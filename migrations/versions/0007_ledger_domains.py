"""The hot tables' one-column rules as domains: the same rules, checked cheaply.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import app_role, run_sql_file

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DOMAINS = (
    "ledger_stream_id, ledger_event_type, ledger_actor, ledger_positive_int, ledger_version, "
    "ledger_json_object, ledger_hash, ledger_hash_scheme, ledger_stripe, ledger_minor_total"
)


def upgrade() -> None:
    run_sql_file("0007_ledger_domains")
    op.execute(f"GRANT SELECT ON account_positions TO {app_role()}")


def downgrade() -> None:
    op.execute("DROP VIEW account_positions")
    op.execute(
        """
        ALTER TABLE events
            ALTER COLUMN stream_id TYPE text,
            ALTER COLUMN stream_version TYPE integer,
            ALTER COLUMN event_type TYPE text,
            ALTER COLUMN schema_version TYPE integer,
            ALTER COLUMN payload TYPE jsonb,
            ALTER COLUMN actor TYPE text,
            ALTER COLUMN prev_hash TYPE bytea,
            ALTER COLUMN hash TYPE bytea,
            ALTER COLUMN hash_scheme TYPE smallint,
            ADD CONSTRAINT events_stream_id_check CHECK (length(stream_id) BETWEEN 3 AND 200),
            ADD CONSTRAINT events_stream_version_check CHECK (stream_version >= 1),
            ADD CONSTRAINT events_event_type_check CHECK (length(event_type) BETWEEN 1 AND 100),
            ADD CONSTRAINT events_schema_version_check CHECK (schema_version >= 1),
            ADD CONSTRAINT events_payload_check CHECK (jsonb_typeof(payload) = 'object'),
            ADD CONSTRAINT events_actor_check CHECK (length(actor) BETWEEN 1 AND 200),
            ADD CONSTRAINT events_prev_hash_check CHECK (length(prev_hash) = 32),
            ADD CONSTRAINT events_hash_check CHECK (length(hash) = 32),
            ADD CONSTRAINT events_hash_scheme_check CHECK (hash_scheme IN (1, 2))
        """
    )
    op.execute(
        """
        ALTER TABLE streams
            ALTER COLUMN version TYPE integer,
            ALTER COLUMN last_hash TYPE bytea,
            ADD CONSTRAINT streams_version_check CHECK (version >= 0),
            ADD CONSTRAINT streams_last_hash_check CHECK (length(last_hash) = 32)
        """
    )
    op.execute(
        """
        ALTER TABLE positions
            ALTER COLUMN stripe TYPE smallint,
            ALTER COLUMN debits_pending TYPE bigint,
            ALTER COLUMN debits_posted TYPE bigint,
            ALTER COLUMN credits_pending TYPE bigint,
            ALTER COLUMN credits_posted TYPE bigint,
            ADD CONSTRAINT positions_stripe_check CHECK (stripe >= 0),
            ADD CONSTRAINT positions_debits_pending_check CHECK (debits_pending >= 0),
            ADD CONSTRAINT positions_debits_posted_check CHECK (debits_posted >= 0),
            ADD CONSTRAINT positions_credits_pending_check CHECK (credits_pending >= 0),
            ADD CONSTRAINT positions_credits_posted_check CHECK (credits_posted >= 0)
        """
    )
    op.execute(
        """
        CREATE VIEW account_positions AS
        SELECT account_id,
               min(currency) AS currency,
               min(overdraft_limit_minor) AS overdraft_limit_minor,
               sum(debits_pending)::bigint AS debits_pending,
               sum(debits_posted)::bigint AS debits_posted,
               sum(credits_pending)::bigint AS credits_pending,
               sum(credits_posted)::bigint AS credits_posted,
               max(last_seq) AS last_seq
          FROM positions
         GROUP BY account_id
        """
    )
    op.execute(f"GRANT SELECT ON account_positions TO {app_role()}")
    op.execute(f"DROP DOMAIN {DOMAINS}")
