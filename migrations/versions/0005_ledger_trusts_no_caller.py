"""A ledger that trusts no caller: rules from its own tables, a safe horizon, a seal.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24

- `ledger_append` takes its transitions from `ledger_transitions` and the shape of
  every payload from `ledger_event_types` (both rendered from the Python rules by
  `python -m ledger.rules`), checks every posting, computes every input of the hash,
  and runs with `pg_temp` last on its search path.
- The application role loses INSERT on events and USAGE on the sequence: it holds
  SELECT, and EXECUTE on the ledger's functions, nothing else.
- `ledger_safe_horizon()` is the one way to read the log in order without skipping a
  late commit; `ledger_seal()` chains the log into blocks up to it.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.support import app_role, run_sql_file

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_0002 = (
    "ledger_append(uuid, text, text, integer, jsonb, bytea, text, text, text, integer, "
    "text[], text[], integer)"
)
APPEND = "ledger_append(uuid, text, text, integer, jsonb, text, text, text, integer, integer)"
APPLY_MONEY = "ledger_apply_money(text, text, jsonb)"
PAYLOAD_PROBLEM = "ledger_payload_problem(text, jsonb)"
INTEGERS_ONLY = "ledger_integers_only(jsonb)"
SAFE_HORIZON = "ledger_safe_horizon()"
SEAL = "ledger_seal(integer)"
REFUSE_CHANGE = "ledger_refuse_change()"
EVENTS_REFUSE_CHANGE = "events_refuse_change()"
NEW_TABLES = "ledger_transitions, ledger_event_types, ledger_blocks"


def upgrade() -> None:
    role = app_role()
    run_sql_file("0005_ledger_trust_tables")
    run_sql_file("0005_ledger_rules")
    op.execute(f"DROP FUNCTION {APPEND_0002}")
    op.execute(f"DROP FUNCTION {APPLY_MONEY}")
    run_sql_file("0005_ledger_apply_money")
    run_sql_file("0005_ledger_append")
    run_sql_file("0005_ledger_safe_horizon")
    run_sql_file("0005_ledger_seal")
    # 0002's trigger function reads nothing, but no function of the ledger takes the
    # caller's search path.
    op.execute(f"ALTER FUNCTION {EVENTS_REFUSE_CHANGE} SET search_path = pg_catalog, pg_temp")
    # Functions are executable by PUBLIC unless revoked.
    for function in (
        APPEND,
        APPLY_MONEY,
        PAYLOAD_PROBLEM,
        INTEGERS_ONLY,
        SAFE_HORIZON,
        SEAL,
        REFUSE_CHANGE,
    ):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
    for function in (APPEND, SAFE_HORIZON, SEAL):
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {role}")
    # The application reads; it writes the ledger only through the functions above.
    op.execute(f"REVOKE INSERT ON events FROM {role}")
    op.execute(f"REVOKE USAGE ON SEQUENCE events_global_seq FROM {role}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {role}")
    op.execute(f"GRANT SELECT ON {NEW_TABLES} TO {role}")


def downgrade() -> None:
    role = app_role()
    for function in (SEAL, SAFE_HORIZON, APPEND, APPLY_MONEY, PAYLOAD_PROBLEM, INTEGERS_ONLY):
        op.execute(f"DROP FUNCTION {function}")
    op.execute("DROP TABLE ledger_blocks, ledger_horizon_marks, ledger_event_types")
    op.execute("DROP TABLE ledger_transitions")
    op.execute("DROP FUNCTION ledger_refuse_change()")
    op.execute("ALTER TABLE accounts DROP CONSTRAINT accounts_currency_code")
    op.execute("ALTER TABLE events DROP COLUMN hash_scheme")
    op.execute(f"ALTER FUNCTION {EVENTS_REFUSE_CHANGE} RESET search_path")
    run_sql_file("0002_ledger_apply_money")
    run_sql_file("0002_ledger_append")
    op.execute(f"REVOKE ALL ON FUNCTION {APPEND_0002} FROM PUBLIC")
    op.execute(f"REVOKE ALL ON FUNCTION {APPLY_MONEY} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {APPEND_0002} TO {role}")
    op.execute(f"GRANT INSERT ON events TO {role}")
    op.execute(f"GRANT USAGE ON SEQUENCE events_global_seq TO {role}")
