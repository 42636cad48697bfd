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

from paysaga.migrate import app_role

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    role = app_role()
    op.execute(
        """
        CREATE TABLE processor_authorizations (
            -- One authorization per payment: the payment id is the idempotency key.
            payment_id        text PRIMARY KEY,
            authorization_id  text NOT NULL UNIQUE,
            amount_minor      bigint NOT NULL CHECK (amount_minor > 0),
            currency          char(3) NOT NULL,
            status            text NOT NULL CHECK (status IN ('authorized', 'voided')),
            authorized_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
            voided_at         timestamptz
        );
        CREATE TABLE processor_calls (
            call_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            payment_id        text NOT NULL,
            operation         text NOT NULL CHECK (operation IN ('authorize', 'void')),
            -- What the call did: authorized, declined, failed, voided, already_voided,
            -- nothing_to_void, replayed (an idempotent repeat of an authorization).
            outcome           text NOT NULL,
            attempt           integer NOT NULL,
            called_at         timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        CREATE INDEX processor_calls_by_payment ON processor_calls (payment_id);

        -- Velocity rule: a payer's recent payments, without scanning the ledger.
        CREATE INDEX events_initiated_by_payer
            ON events ((payload->>'payer_account_id'), recorded_at)
            WHERE event_type = 'PaymentInitiated';
        """
    )
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON processor_authorizations TO {role}")
    op.execute(f"GRANT SELECT, INSERT ON processor_calls TO {role}")


def downgrade() -> None:
    op.execute("DROP INDEX events_initiated_by_payer")
    op.execute("DROP TABLE processor_calls, processor_authorizations")
