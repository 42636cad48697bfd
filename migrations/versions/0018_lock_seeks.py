"""The positions a money event moves are locked by one primary-key seek per account.

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-24

`ledger_apply_money` locked the positions to move with one query joining accounts and
positions for `account_id = ANY (...)`. That query's generic plan, which cannot know
the array holds two or three ids, is a hash join over a sequential scan of every
position; the plan cache judged it dearer than a plan made for the call's own values,
so it planned the query again on every FundsReserved and PaymentSettled. The rows are
now locked one account at a time, each by its primary key, in the same ascending
account order (`0018_ledger_apply_money.sql`; the rules are otherwise 0017's). Each
seek's plan is the same for any values, so the cache keeps one. CREATE OR REPLACE
keeps the function's owner and grants.
"""

from __future__ import annotations

from collections.abc import Sequence

from migrations.support import run_sql_file

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql_file("0018_ledger_apply_money")


def downgrade() -> None:
    run_sql_file("0017_ledger_apply_money")
