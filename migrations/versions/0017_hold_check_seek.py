"""FundsReserved's hold check is one index seek, not a scan of every payment.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-24

`ledger_apply_money` checks that a FundsReserved holds exactly the payment its stream's
PaymentInitiated recorded. It found that event by stream and type, and the planner's
generic plan for it read a bitmap of every PaymentInitiated in the ledger (a partial
index of them) to AND with the stream's rows: a cost that grew with the number of
payments. It now names the event by its place, the stream's first, so the check is one
seek of the (stream_id, stream_version) key (`0017_ledger_apply_money.sql`; the rules
are otherwise 0005's). CREATE OR REPLACE keeps the function's owner and grants.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import run_sql_file, sql_file

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql_file("0017_ledger_apply_money")


def downgrade() -> None:
    driver = op.get_bind().connection.driver_connection
    assert driver is not None, "the migration has no database connection"
    driver.execute(
        sql_file("0005_ledger_apply_money").replace(
            "CREATE FUNCTION ledger_apply_money", "CREATE OR REPLACE FUNCTION ledger_apply_money"
        )
    )
