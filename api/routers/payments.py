"""Payments: each one a PaymentWorkflow, its facts in the ledger.

- `POST /v1/payments` starts the workflow and answers 202; with `?wait=settled` it
  answers once the payment ends (bounded by `WAIT_SETTLED_S_MAX`), through
  update-with-start (`PaymentWorkflow.wait_ended`). Measured with
  bench/wait_settled.py against starting then awaiting the result: 15.9 vs 15.5 and
  17.7 vs 17.0 payments/s in two runs (dev server with SQLite), no more than noise. It
  wins in the API because its answer is the payment's final state, which saves the
  ledger read the other way needs to build the response; and starting it is
  idempotent (an existing workflow is joined, not refused).
- Reads come from the ledger when the payment has ended, and from the workflow's
  `status` query while it runs. A closed payment never needs Temporal, so a payment
  stays readable after its history is gone from Temporal (retention).
- The list comes from the payments read model, eventually consistent: each page says
  how fresh it is (`as_of_seq`).
- Cancel, approve and reject are Workflow Updates; a validator's refusal is a 409.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Header, Query, Request, Response
from temporalio.client import (
    Client,
    RPCTimeoutOrCancelledError,
    WorkflowFailureError,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import QueryRejectCondition
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.cursors import decode_cursor, encode_cursor
from api.deps import (
    CancelKey,
    OpsKey,
    PaymentsReadKey,
    PaymentsWriteKey,
    SettingsDep,
    StoreDep,
    TemporalDep,
    get_temporal,
)
from api.idempotency import REPLAYED_HEADER, IdempotencyStore, derived_id, request_hash, require_key
from api.keys import ApiKey
from api.models import (
    ActionAccepted,
    ApproveIn,
    CancelIn,
    EventOut,
    PaymentCreate,
    PaymentEvents,
    PaymentList,
    PaymentOut,
    RejectIn,
    StorableStr,
)
from api.problems import COMMON_RESPONSES, FieldError, ProblemError, workflow_unresponsive
from ledger.events import PAYMENT_ID_PATTERN, payment_stream
from ledger.read_models import SEQ_MAX, PaymentRow, ReadModels
from ledger.state_machine import PAYMENT_STATUS_BY_STATE, TERMINAL_STATES, replay
from ledger.store import EventStore, RecordedEvent
from paysaga.logs import bind_payment, request_id_var
from paysaga.payments import policy_from_settings, start_payment, start_payment_and_wait
from paysaga.temporal import execute_update_within
from workflows.models import (
    TERMINAL_STATUSES,
    ApproveRequest,
    CancelRequest,
    PaymentRequest,
    PaymentState,
    PaymentStatus,
    RejectRequest,
    UpdateAccepted,
    workflow_id_for,
)
from workflows.payment import PaymentWorkflow

router = APIRouter(prefix="/v1/payments", tags=["payments"], responses=COMMON_RESPONSES)
log = logging.getLogger("paysaga.api.payments")

WAIT_SETTLED_S_MAX = 30.0
LIST_LIMIT_MAX = 200
LIST_LIMIT_DEFAULT = 50
QUERY_TIMEOUT_S = 5.0
# Temporal refused to start the workflow, so it certainly does not exist and the key is
# released. Any other failure (a timeout, a lost connection) leaves that unknown.
START_REFUSED_STATUSES = frozenset(
    {
        RPCStatusCode.INVALID_ARGUMENT,
        RPCStatusCode.NOT_FOUND,
        RPCStatusCode.PERMISSION_DENIED,
        RPCStatusCode.UNAUTHENTICATED,
        RPCStatusCode.FAILED_PRECONDITION,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.UNIMPLEMENTED,
    }
)


def status_url(payment_id: str) -> str:
    return f"/v1/payments/{payment_id}"


def _from_ledger(
    initiated: dict[str, Any],
    state: str,
    created_at: datetime,
    updated_at: datetime,
    last_payload: dict[str, Any],
) -> PaymentOut:
    """A payment as the ledger records it: its PaymentInitiated, its state, its last event."""
    failed = state in TERMINAL_STATES and state != "settled"
    return PaymentOut(
        id=initiated["payment_id"],
        status=PAYMENT_STATUS_BY_STATE[state],
        status_url=status_url(initiated["payment_id"]),
        payer_account_id=initiated["payer_account_id"],
        payee_account_id=initiated["payee_account_id"],
        amount_minor=initiated["amount_minor"],
        currency=initiated["currency"],
        reference=initiated.get("reference"),
        metadata=initiated.get("metadata") or {},
        created_at=created_at,
        updated_at=updated_at,
        failure_reason=last_payload.get("reason") if failed else None,
    )


def _from_events(events: list[RecordedEvent]) -> PaymentOut:
    state = replay(events[0].stream_id, [e.event_type for e in events])
    return _from_ledger(
        events[0].payload, state, events[0].recorded_at, events[-1].recorded_at, events[-1].payload
    )


def _from_state(state: PaymentState, metadata: dict[str, Any]) -> PaymentOut:
    return PaymentOut(
        id=state.payment_id,
        status=state.status,
        status_url=status_url(state.payment_id),
        payer_account_id=state.payer_account_id,
        payee_account_id=state.payee_account_id,
        amount_minor=state.amount_minor,
        currency=state.currency,
        reference=state.reference,
        metadata=metadata,
        created_at=state.created_at,
        updated_at=state.updated_at,
        failure_reason=state.failure_reason,
        waiting_for=None if state.status in TERMINAL_STATUSES else state.waiting_for,
    )


async def read_payment(store: EventStore, client: Client | None, payment_id: str) -> PaymentOut:
    """The ledger's view once the payment has ended; the workflow's while it runs.

    A payment open in the ledger whose workflow no longer runs (an operator terminated
    it, say) is answered from the ledger, saying so: `workflow_status` names how the
    workflow ended, and `repair_pending` that the sweeper will close the payment.
    """
    events = await store.read_stream(payment_stream(payment_id))
    ledger_view = _from_events(events) if events else None
    if ledger_view is not None and ledger_view.status in TERMINAL_STATUSES:
        return ledger_view
    # Temporal could not say whether the workflow exists: with nothing in the ledger
    # either, that is no proof the payment does not exist.
    live_state_unavailable = False
    if client is not None:
        try:
            state = await asyncio.wait_for(
                client.get_workflow_handle(workflow_id_for(payment_id)).query(
                    PaymentWorkflow.status,
                    reject_condition=QueryRejectCondition.NOT_OPEN,
                    rpc_timeout=timedelta(seconds=QUERY_TIMEOUT_S),
                ),
                QUERY_TIMEOUT_S,
            )
            metadata = ledger_view.metadata if ledger_view else {}
            return _from_state(state, metadata).model_copy(update={"workflow_status": "RUNNING"})
        except WorkflowQueryRejectedError as rejected:
            if ledger_view is not None:
                return _gone(ledger_view, rejected.status.name if rejected.status else "CLOSED")
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND and ledger_view is not None:
                return _gone(ledger_view, "NOT_FOUND")
            live_state_unavailable = error.status != RPCStatusCode.NOT_FOUND
            log.info(
                "live state unavailable, answering from the ledger", extra={"error": str(error)}
            )
        except (TimeoutError, WorkflowFailureError) as error:
            live_state_unavailable = True
            log.info(
                "live state unavailable, answering from the ledger", extra={"error": str(error)}
            )
        except WorkflowQueryFailedError as error:
            # The worker could not answer: seen once when replaying a history to answer
            # failed to decode a local activity's result (temporalio/sdk-python#1881). The
            # ledger still knows the payment; never a 500 for what it can answer.
            live_state_unavailable = True
            log.warning(
                "the payment's status query failed, answering from the ledger",
                extra={"error": str(error)},
            )
    if ledger_view is None and live_state_unavailable:
        # A payment just accepted whose worker is down or slow: never a 404, which would
        # tell its client that the payment does not exist (and invite a second one).
        raise ProblemError(
            503,
            "payment_state_unavailable",
            "the payment's state cannot be read right now; retry shortly",
            headers={"Retry-After": "1"},
        )
    if ledger_view is None:
        raise ProblemError(404, "payment_not_found", f"no payment {payment_id!r}")
    return ledger_view


def _gone(ledger_view: PaymentOut, workflow_status: str) -> PaymentOut:
    """An open payment whose workflow no longer runs: what the ledger knows, and that the
    sweeper will close it."""
    return ledger_view.model_copy(
        update={
            "workflow_status": workflow_status,
            "repair_pending": True,
            "waiting_for": "its workflow no longer runs; the sweeper will close the payment "
            "from the ledger",
        }
    )


def _check_payment_id(payment_id: str) -> None:
    if not re.match(PAYMENT_ID_PATTERN, payment_id):
        raise ProblemError(404, "payment_not_found", f"no payment {payment_id!r}")
    bind_payment(payment_id, workflow_id_for(payment_id))


@router.post(
    "",
    status_code=202,
    response_model=PaymentOut,
)
async def create_payment(
    body: PaymentCreate,
    response: Response,
    store: StoreDep,
    client: TemporalDep,
    settings: SettingsDep,
    key: PaymentsWriteKey,
    idempotency_key: Annotated[str | None, Header()] = None,
    wait: Annotated[
        Literal["settled"] | None,
        Query(
            description="`settled`: answer once the payment ends (at most 30 s).",
        ),
    ] = None,
) -> PaymentOut:
    """Submit a payment: starts its workflow and answers 202 with its id and status URL.

    A payment out of an `external` account creates money: it needs the `ops` scope.
    """
    idem = require_key(idempotency_key)
    keys = IdempotencyStore(store.engine)
    fingerprint = request_hash("POST", "/v1/payments", body.model_dump(mode="json"))
    # Bad input must leave no trace, not even a key: check it before claiming the key.
    await _check_accounts(store, body, key)
    payment_id = derived_id("pay", key.key_id, idem)
    request = PaymentRequest(
        payment_id=payment_id,
        payer_account_id=body.payer_account_id,
        payee_account_id=body.payee_account_id,
        amount_minor=body.amount_minor,
        currency=body.currency,
        reference=body.reference,
        metadata=body.metadata,
        requested_by=f"api-key:{key.key_id}",
        causation_id=request_id_var.get(),
        policy=policy_from_settings(settings),
    )
    claim = await keys.claim(key.key_id, idem, fingerprint, payment_id)
    if claim.replay is not None:
        response.headers[REPLAYED_HEADER] = "true"
        response.headers["Location"] = status_url(claim.resource_id)
        response.status_code = claim.replay.status
        return PaymentOut.model_validate(claim.replay.body)

    bind_payment(payment_id, workflow_id_for(payment_id))
    async with keys.hold(key.key_id, idem, claim) as lease:
        # Past this point the workflow may exist: a failure hands the key to the next
        # retry, which finishes the job (the workflow id is fixed; starting is idempotent).
        lease.may_create()
        out: PaymentOut | None = None
        if wait == "settled":
            out = await _start_and_wait(store, client, request, body, settings.task_queue)
        else:
            try:
                await _start(client, request, settings.task_queue)
            except RPCError as error:
                if error.status in START_REFUSED_STATUSES:
                    await lease.release()
                raise
        log.info(
            "payment started", extra={"amount_minor": body.amount_minor, "currency": body.currency}
        )
        if out is None:
            now = datetime.now(UTC)
            out = PaymentOut(
                id=payment_id,
                status="INITIATED",
                status_url=status_url(payment_id),
                payer_account_id=body.payer_account_id,
                payee_account_id=body.payee_account_id,
                amount_minor=body.amount_minor,
                currency=body.currency,
                reference=body.reference,
                metadata=body.metadata,
                created_at=now,
                updated_at=now,
            )
        await lease.complete(202, out.model_dump(mode="json"))
    response.headers["Location"] = status_url(payment_id)
    return out


async def _start(client: Client, request: PaymentRequest, task_queue: str) -> None:
    # Already started: a retry taking over a request that died after starting it.
    with contextlib.suppress(WorkflowAlreadyStartedError):
        await start_payment(client, request, task_queue=task_queue)


async def _start_and_wait(
    store: EventStore,
    client: Client,
    request: PaymentRequest,
    body: PaymentCreate,
    task_queue: str,
) -> PaymentOut:
    """Start and wait in one call (update-with-start), at most WAIT_SETTLED_S_MAX."""
    try:
        state = await asyncio.wait_for(
            start_payment_and_wait(client, request, task_queue=task_queue), WAIT_SETTLED_S_MAX
        )
    except (TimeoutError, RPCTimeoutOrCancelledError, WorkflowUpdateFailedError):
        # Still running (or the workflow was cancelled): answer with where it stands.
        # The SDK reports its own cancellation by wait_for as an RPC timeout.
        return await read_payment(store, client, request.payment_id)
    except WorkflowAlreadyStartedError:
        # It has already ended: a retry taking over a request that died while it ran.
        return await read_payment(store, client, request.payment_id)
    return _from_state(state, body.metadata)


async def _check_accounts(store: EventStore, body: PaymentCreate, key: ApiKey) -> None:
    """Both accounts must exist and hold the payment's currency: a 422 names each problem.

    A payer of kind `external` can create money, so paying out of one needs `ops` (403).
    """
    terms = await store.account_terms([body.payer_account_id, body.payee_account_id])
    currencies = {account_id: currency for account_id, (currency, _) in terms.items()}
    payer = terms.get(body.payer_account_id)
    if payer is not None and payer[1] == "external" and "ops" not in key.scopes:
        raise ProblemError(
            403,
            "insufficient_scope",
            "a payment out of an external account creates money: it needs the ops scope",
        )
    problems = []
    for field in ("payer_account_id", "payee_account_id"):
        account_id = getattr(body, field)
        currency = currencies.get(account_id)
        if currency is None:
            problems.append(FieldError(field=field, message=f"no account {account_id!r}"))
        elif currency != body.currency:
            problems.append(
                FieldError(
                    field=field,
                    message=f"account {account_id!r} holds {currency}, not {body.currency}",
                )
            )
    if problems:
        raise ProblemError(
            422, "invalid_accounts", "the payment's accounts cannot take it", errors=problems
        )


@router.get("/{payment_id}", response_model=PaymentOut)
async def get_payment(
    payment_id: str, store: StoreDep, client: TemporalDep, key: PaymentsReadKey
) -> PaymentOut:
    """The payment's status, amounts, accounts, timestamps and failure reason."""
    _check_payment_id(payment_id)
    return await read_payment(store, client, payment_id)


@router.get("", response_model=PaymentList)
async def list_payments(
    store: StoreDep,
    key: PaymentsReadKey,
    status: Annotated[PaymentStatus | None, Query()] = None,
    account_id: Annotated[StorableStr | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=LIST_LIMIT_MAX)] = LIST_LIMIT_DEFAULT,
    cursor: Annotated[StorableStr | None, Query(max_length=40)] = None,
) -> PaymentList:
    """Payments, newest first, from the payments read model: eventually consistent,
    `as_of_seq` says how far it has come (`GET /v1/payments/{id}` reads the ledger)."""
    before = decode_cursor(cursor) if cursor else SEQ_MAX
    page = await ReadModels(store.engine).payments(
        before_seq=before, limit=limit + 1, status=status, account_id=account_id
    )
    rows = page.payments
    payments = [_from_read_model(row) for row in rows[:limit]]
    next_cursor = encode_cursor(rows[limit - 1].initiated_seq) if len(rows) > limit else None
    return PaymentList(payments=payments, next_cursor=next_cursor, as_of_seq=page.as_of_seq)


def _from_read_model(row: PaymentRow) -> PaymentOut:
    return PaymentOut(
        id=row.payment_id,
        status=cast(PaymentStatus, row.status),
        status_url=status_url(row.payment_id),
        payer_account_id=row.payer_account_id,
        payee_account_id=row.payee_account_id,
        amount_minor=row.amount_minor,
        currency=row.currency,
        reference=row.reference,
        metadata=row.metadata,
        created_at=row.created_at,
        updated_at=row.updated_at,
        failure_reason=row.failure_reason,
    )


def event_out(event: RecordedEvent) -> EventOut:
    return EventOut(
        global_seq=event.global_seq,
        stream_id=event.stream_id,
        stream_version=event.stream_version,
        event_id=str(event.event_id),
        event_type=event.event_type,
        schema_version=event.schema_version,
        payload=event.payload,
        actor=event.actor,
        correlation_id=event.correlation_id,
        causation_id=event.causation_id,
        recorded_at=event.recorded_at,
        prev_hash=event.prev_hash.hex(),
        hash=event.hash.hex(),
    )


@router.get("/{payment_id}/events", response_model=PaymentEvents)
async def payment_events(
    payment_id: str, request: Request, store: StoreDep, key: PaymentsReadKey
) -> PaymentEvents:
    """The payment's audit trail: its ledger events in order, with their hashes. A
    payment just accepted (202) whose workflow has not recorded it yet has none so far."""
    _check_payment_id(payment_id)
    events = await store.read_stream(payment_stream(payment_id))
    if not events and not await _workflow_exists(request, payment_id):
        raise ProblemError(404, "payment_not_found", f"no payment {payment_id!r}")
    return PaymentEvents(payment_id=payment_id, events=[event_out(e) for e in events])


async def _workflow_exists(request: Request, payment_id: str) -> bool:
    """Whether the payment's workflow was started. Asked only when the ledger has none of
    its events, so that the audit trail never waits for Temporal otherwise; a Temporal
    that cannot answer counts as no."""
    try:
        client = await get_temporal(request)
        await client.get_workflow_handle(workflow_id_for(payment_id)).describe(
            rpc_timeout=timedelta(seconds=QUERY_TIMEOUT_S)
        )
    except (ProblemError, RPCError):
        return False
    return True


async def _update(
    store: EventStore,
    client: Client,
    payment_id: str,
    action: Literal["cancel", "approve", "reject"],
    argument: Any,
    wait_s: float,
) -> ActionAccepted:
    _check_payment_id(payment_id)
    handle = client.get_workflow_handle(workflow_id_for(payment_id))
    try:
        accepted = await execute_update_within(
            handle, action, argument, result_type=UpdateAccepted, wait_s=wait_s
        )
    except (TimeoutError, RPCTimeoutOrCancelledError):
        raise workflow_unresponsive(action, wait_s) from None
    except WorkflowUpdateFailedError as error:
        cause = error.cause
        raise ProblemError(
            409, f"{action}_refused", str(getattr(cause, "message", cause))
        ) from None
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
        # The workflow has ended (or its history is gone): the ledger knows how.
        events = await store.read_stream(payment_stream(payment_id))
        if not events:
            raise ProblemError(404, "payment_not_found", f"no payment {payment_id!r}") from None
        ended = _from_events(events)
        if ended.status not in TERMINAL_STATUSES:
            raise ProblemError(
                409,
                "workflow_not_running",
                f"the payment is {ended.status} but its workflow no longer runs (it was "
                "terminated or timed out); the sweeper closes it from the ledger within "
                "PAYSAGA_SWEEP_INTERVAL_S",
            ) from None
        raise ProblemError(
            409, f"{action}_refused", f"the payment already ended ({ended.status})"
        ) from None
    return ActionAccepted(
        id=payment_id, action=action, status=accepted.status, status_url=status_url(payment_id)
    )


@router.post("/{payment_id}/cancel", status_code=202, response_model=ActionAccepted)
async def cancel_payment(
    payment_id: str,
    store: StoreDep,
    client: TemporalDep,
    key: CancelKey,
    settings: SettingsDep,
    body: CancelIn | None = None,
) -> ActionAccepted:
    """Cancel before settlement: 202 while compensation runs; 409 once settled."""
    reason = (body or CancelIn()).reason
    return await _update(
        store,
        client,
        payment_id,
        "cancel",
        CancelRequest(actor=f"api-key:{key.key_id}", reason=reason),
        settings.api_update_wait_s,
    )


@router.post("/{payment_id}/approve", status_code=202, response_model=ActionAccepted)
async def approve_payment(
    payment_id: str,
    store: StoreDep,
    client: TemporalDep,
    key: OpsKey,
    settings: SettingsDep,
    body: ApproveIn | None = None,
) -> ActionAccepted:
    """Approve a payment waiting for approval (scope `ops`)."""
    note = body.note if body else None
    return await _update(
        store,
        client,
        payment_id,
        "approve",
        ApproveRequest(actor=f"api-key:{key.key_id}", note=note),
        settings.api_update_wait_s,
    )


@router.post("/{payment_id}/reject", status_code=202, response_model=ActionAccepted)
async def reject_payment(
    payment_id: str,
    body: RejectIn,
    store: StoreDep,
    client: TemporalDep,
    key: OpsKey,
    settings: SettingsDep,
) -> ActionAccepted:
    """Reject a payment waiting for approval (scope `ops`); it is compensated."""
    return await _update(
        store,
        client,
        payment_id,
        "reject",
        RejectRequest(actor=f"api-key:{key.key_id}", reason=body.reason),
        settings.api_update_wait_s,
    )
