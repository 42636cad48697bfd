"""The ledger records reconciliation: a run's discrepancies, its totals, each resolution.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-24

The catalog learns `DiscrepancyDetected`, `ReconciliationCompleted` and
`DiscrepancyResolved`, on a run's own `recon-<run_id>` stream
(`0012_ledger_rules.sql`, rendered by `python -m ledger.rules`).
"""

from __future__ import annotations

from collections.abc import Sequence

from migrations.support import load_rules

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    load_rules("0012_ledger_rules")


def downgrade() -> None:
    load_rules("0008_ledger_rules")
