"""The custom search attributes that operations filter payments (and reconciliation's
discrepancies) by in the Temporal UI.

Every Temporal server paysaga talks to must have these registered: the dev server
gets them at start, an external server through `paysaga up`, `paysaga temporal
register`, or docker-compose's registration job.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

PAYMENT_STATUS = SearchAttributeKey.for_keyword("PaymentStatus")
PAYMENT_AMOUNT_MINOR = SearchAttributeKey.for_int("PaymentAmountMinor")
PAYMENT_CURRENCY = SearchAttributeKey.for_keyword("PaymentCurrency")
PAYER_ACCOUNT_ID = SearchAttributeKey.for_keyword("PayerAccountId")
PAYEE_ACCOUNT_ID = SearchAttributeKey.for_keyword("PayeeAccountId")
# A discrepancy's workflow: `DiscrepancyType="amount_mismatch"` lists the open ones.
DISCREPANCY_TYPE = SearchAttributeKey.for_keyword("DiscrepancyType")

ALL_SEARCH_ATTRIBUTES: tuple[SearchAttributeKey[str] | SearchAttributeKey[int], ...] = (
    PAYMENT_STATUS,
    PAYMENT_AMOUNT_MINOR,
    PAYMENT_CURRENCY,
    PAYER_ACCOUNT_ID,
    PAYEE_ACCOUNT_ID,
    DISCREPANCY_TYPE,
)
