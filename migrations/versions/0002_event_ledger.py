"""The event ledger: append-only events, stream heads, accounts and positions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

One function, `ledger_append`, is the only way the application writes money: under
the stream's lock it checks the state machine, chains the hash, inserts the event
and moves the positions, all in one transaction and one round trip. It runs with the
owner's rights (SECURITY DEFINER), so the application role needs no UPDATE right on
anything: it holds INSERT and SELECT on events, SELECT on the rest, and EXECUTE.

Errors it raises on purpose carry SQLSTATEs of class PS, which the store translates
into domain errors (ledger/errors.py):

    PS001 invalid transition     PS005 currency mismatch
    PS002 idempotency conflict   PS006 wrong expected version
    PS003 insufficient funds     PS007 invalid postings or hold
    PS004 unknown account        PS008 account exists
    PS100 events are immutable
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import app_role, run_sql_file

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_SIGNATURE = (
    "ledger_append(uuid, text, text, integer, jsonb, bytea, text, text, text, integer, "
    "text[], text[], integer)"
)
APPLY_MONEY_SIGNATURE = "ledger_apply_money(text, text, jsonb)"


def upgrade() -> None:
    role = app_role()
    run_sql_file("0002_event_ledger_tables")
    run_sql_file("0002_events_immutable")
    run_sql_file("0002_ledger_apply_money")
    run_sql_file("0002_ledger_append")
    # Functions are executable by PUBLIC unless revoked.
    op.execute(f"REVOKE ALL ON FUNCTION {APPEND_SIGNATURE} FROM PUBLIC")
    op.execute(f"REVOKE ALL ON FUNCTION {APPLY_MONEY_SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {APPEND_SIGNATURE} TO {role}")
    # The application may read everything, and insert events; it may never change them.
    op.execute(f"GRANT SELECT, INSERT ON events TO {role}")
    op.execute(f"GRANT USAGE ON SEQUENCE events_global_seq TO {role}")
    op.execute(f"GRANT SELECT ON streams, accounts, positions, account_positions TO {role}")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {APPEND_SIGNATURE}")
    op.execute(f"DROP FUNCTION {APPLY_MONEY_SIGNATURE}")
    op.execute("DROP VIEW account_positions")
    op.execute("DROP FUNCTION ledger_credit_stripe(text, smallint)")
    op.execute("DROP TABLE positions, accounts, streams")
    # The immutability triggers refuse TRUNCATE, not DROP: a downgrade is the owner's act.
    op.execute("DROP TABLE events")
    op.execute("DROP FUNCTION events_refuse_change()")
