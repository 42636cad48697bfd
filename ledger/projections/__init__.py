"""The read side: read models projected from the event log (see `base.py`).

Each read model is rebuilt from the log by `paysaga replay`, kept current by the
projector (`ledger/projector.py`) and checked against a fresh fold of the log by
`paysaga ledger check` (`ledger/projections/fold.py`).
"""

from __future__ import annotations

from ledger.projections.balances import BALANCES
from ledger.projections.base import LIVE_SCHEMA, SHADOW_SCHEMA, Projection
from ledger.projections.payments import PAYMENTS
from ledger.projections.risk_alerts import RISK_ALERTS
from ledger.projections.statement import STATEMENT

READ_MODELS: dict[str, Projection] = {
    p.name: p for p in (BALANCES, STATEMENT, PAYMENTS, RISK_ALERTS)
}

__all__ = ["LIVE_SCHEMA", "READ_MODELS", "SHADOW_SCHEMA", "Projection"]
