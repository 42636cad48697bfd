"""OpenAPI links: how one operation's answer feeds the next.

A created payment's id leads to its status, its audit trail, and its cancel, approve
and reject; an opened account's id to its position, statement, balance and payments.
Clients can follow them, and so does a stateful API tester (schemathesis), which chains
real calls instead of guessing ids.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

Link = dict[str, Any]


def _to(operation_id: str, description: str, **parameters: str) -> Link:
    return {"operationId": operation_id, "description": description, "parameters": parameters}


def _account_links(account_id: str, currency: str) -> dict[str, Link]:
    return {
        "GetAccount": _to(
            "get_account_v1_accounts__account_id__get",
            "The account and its position.",
            account_id=account_id,
        ),
        "ListEntries": _to(
            "list_entries_v1_accounts__account_id__entries_get",
            "The account's statement.",
            account_id=account_id,
        ),
        "GetBalance": _to(
            "get_balance_v1_accounts__account_id__balance_get",
            "The account's balance, now or at an instant.",
            account_id=account_id,
        ),
        "ListPayments": _to(
            "list_payments_v1_payments_get",
            "The payments in or out of the account.",
            **{"query.account_id": account_id},
        ),
        "PayFromAccount": {
            "operationId": "create_payment_v1_payments_post",
            "description": "A payment out of the account, in its currency.",
            "requestBody": {"payer_account_id": account_id, "currency": currency},
        },
    }


def _payment_links(payment_id: str) -> dict[str, Link]:
    return {
        "GetPayment": _to(
            "get_payment_v1_payments__payment_id__get",
            "The payment's status.",
            payment_id=payment_id,
        ),
        "GetPaymentEvents": _to(
            "payment_events_v1_payments__payment_id__events_get",
            "The payment's audit trail.",
            payment_id=payment_id,
        ),
        "CancelPayment": _to(
            "cancel_payment_v1_payments__payment_id__cancel_post",
            "Cancel the payment before it settles.",
            payment_id=payment_id,
        ),
        "ApprovePayment": _to(
            "approve_payment_v1_payments__payment_id__approve_post",
            "Approve the payment, if it waits for approval (scope ops).",
            payment_id=payment_id,
        ),
        "RejectPayment": _to(
            "reject_payment_v1_payments__payment_id__reject_post",
            "Reject the payment, if it waits for approval (scope ops).",
            payment_id=payment_id,
        ),
    }


def _payment_and_account_links(prefix: str) -> dict[str, Link]:
    return {
        **_payment_links(f"{prefix}/id"),
        "GetPayer": _to(
            "get_account_v1_accounts__account_id__get",
            "The payer's account.",
            account_id=f"{prefix}/payer_account_id",
        ),
        "GetPayee": _to(
            "get_account_v1_accounts__account_id__get",
            "The payee's account.",
            account_id=f"{prefix}/payee_account_id",
        ),
        "PayAgain": {
            "operationId": "create_payment_v1_payments_post",
            "description": "Another payment between the same accounts.",
            "requestBody": {
                "payer_account_id": f"{prefix}/payer_account_id",
                "payee_account_id": f"{prefix}/payee_account_id",
                "currency": f"{prefix}/currency",
            },
        },
    }


def _run_link(run_id: str) -> dict[str, Link]:
    return {
        "GetReconciliation": _to(
            "get_reconciliation_v1_reconciliations__run_id__get",
            "The run, its counts and its discrepancies (`running` until it is done).",
            run_id=run_id,
        )
    }


def _report_link(run_id: str) -> dict[str, Link]:
    # Only from a run already read: a run just started has no report yet.
    return {
        "GetReconciliationReport": _to(
            "reconciliation_report_v1_reconciliations__run_id__report_get",
            "The run's report as a page.",
            run_id=run_id,
        )
    }


_BODY = "$response.body#"
# (method, path, status) -> the links of that response.
LINKS: dict[tuple[str, str, str], dict[str, Link]] = {
    ("post", "/v1/accounts", "201"): _account_links(f"{_BODY}/id", f"{_BODY}/currency"),
    ("get", "/v1/accounts/{account_id}", "200"): _account_links(f"{_BODY}/id", f"{_BODY}/currency"),
    ("post", "/v1/payments", "202"): _payment_and_account_links(_BODY),
    ("get", "/v1/payments/{payment_id}", "200"): _payment_and_account_links(_BODY),
    ("get", "/v1/payments", "200"): _payment_links(f"{_BODY}/payments/0/id"),
    ("post", "/v1/payments/{payment_id}/cancel", "202"): _payment_links(f"{_BODY}/id"),
    ("post", "/v1/payments/{payment_id}/approve", "202"): _payment_links(f"{_BODY}/id"),
    ("post", "/v1/reconciliations", "202"): _run_link(f"{_BODY}/id"),
    ("get", "/v1/reconciliations/{run_id}", "200"): {
        **_report_link(f"{_BODY}/id"),
        "ResolveDiscrepancy": _to(
            "resolve_discrepancy_v1_discrepancies__discrepancy_id__resolve_post",
            "Resolve the run's first discrepancy (scope ops).",
            discrepancy_id=f"{_BODY}/discrepancies/0/id",
        ),
    },
    ("get", "/v1/discrepancies", "200"): {
        "ResolveDiscrepancy": _to(
            "resolve_discrepancy_v1_discrepancies__discrepancy_id__resolve_post",
            "Resolve the newest discrepancy (scope ops).",
            discrepancy_id=f"{_BODY}/discrepancies/0/id",
        ),
        **_run_link(f"{_BODY}/discrepancies/0/run_id"),
    },
}


def add_links(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (FastAPI's OpenAPI document) with LINKS on their responses, in place.

    A link to an operation or a response the document lacks is a programmer's error.
    """
    operation_ids = {
        operation["operationId"]
        for item in schema["paths"].values()
        for operation in item.values()
        if isinstance(operation, dict) and "operationId" in operation
    }
    for (method, path, status), links in LINKS.items():
        response = schema["paths"][path][method]["responses"][status]
        for name, link in links.items():
            assert link["operationId"] in operation_ids, (name, link["operationId"])
        response["links"] = {**response.get("links", {}), **links}
    return schema


def install(app: FastAPI) -> None:
    """Serve the app's OpenAPI document with its links (built once, as FastAPI does)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_links(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
