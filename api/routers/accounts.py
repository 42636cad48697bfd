"""Accounts: open one (an AccountOpened event), read one with its position, and read its
statement and balances (current or at an instant) from the read models."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from api.cursors import decode_cursor, encode_cursor
from api.deps import AccountsReadKey, AccountsWriteKey, StoreDep
from api.idempotency import REPLAYED_HEADER, IdempotencyStore, derived_id, request_hash, require_key
from api.models import (
    AccountCreate,
    AccountOut,
    BalanceOut,
    EntryOut,
    EntryPage,
    MovementOut,
    PositionOut,
    RunningBalanceOut,
)
from api.problems import COMMON_RESPONSES, FieldError, ProblemError
from ledger import errors
from ledger.events import ACCOUNT_ID_PATTERN, AccountOpened, event_id_for
from ledger.read_models import Balance, ReadModels, StatementEntry
from ledger.store import Account, EventStore
from paysaga.logs import request_id_var

router = APIRouter(prefix="/v1/accounts", tags=["accounts"], responses=COMMON_RESPONSES)


def account_out(account: Account) -> AccountOut:
    position = account.position
    return AccountOut(
        id=account.account_id,
        currency=account.currency,
        kind=account.kind,
        overdraft_limit_minor=account.overdraft_limit_minor,
        metadata=account.metadata,
        created_at=account.opened_at,
        position=PositionOut(
            debits_pending=position.debits_pending,
            debits_posted=position.debits_posted,
            credits_pending=position.credits_pending,
            credits_posted=position.credits_posted,
            posted=position.posted_minor,
            pending=position.pending_minor,
            available=position.available_minor,
            as_of_seq=position.last_seq,
        ),
    )


async def load_account(store: EventStore, account_id: str) -> Account:
    account = await store.get_account(account_id)
    if account is None:
        raise ProblemError(404, "account_not_found", f"no account {account_id!r}")
    return account


@router.post(
    "",
    status_code=201,
    response_model=AccountOut,
)
async def open_account(
    body: AccountCreate,
    response: Response,
    store: StoreDep,
    key: AccountsWriteKey,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> AccountOut:
    """Open an account. Needs an Idempotency-Key; the account id is generated if not given.

    An `external` account (a funding source, unlimited) can create money: opening one
    needs the `ops` scope.
    """
    idem = require_key(idempotency_key)
    if body.kind == "external" and "ops" not in key.scopes:
        raise ProblemError(
            403,
            "insufficient_scope",
            "an external account can create money: opening one needs the ops scope",
        )
    keys = IdempotencyStore(store.engine)
    fingerprint = request_hash("POST", "/v1/accounts", body.model_dump(mode="json"))
    claim = await keys.lookup(key.key_id, idem, fingerprint)
    if claim is None:
        account_id = body.id or derived_id("acct", key.key_id, idem)
        if await store.get_account(account_id) is not None:
            raise ProblemError(409, "account_exists", f"an account {account_id!r} already exists")
        claim = await keys.claim(key.key_id, idem, fingerprint, account_id)
    if claim.replay is not None:
        response.headers[REPLAYED_HEADER] = "true"
        response.status_code = claim.replay.status
        return AccountOut.model_validate(claim.replay.body)
    async with keys.hold(key.key_id, idem, claim) as lease:
        # The append may commit even if its answer is lost; a retry appends the same
        # event id again, which the ledger answers with the event already there.
        lease.may_create()
        try:
            await store.open_account(
                AccountOpened(
                    account_id=claim.resource_id,
                    currency=body.currency,
                    kind=body.kind,
                    overdraft_limit_minor=body.overdraft_limit_minor,
                    metadata=body.metadata,
                ),
                actor=f"api-key:{key.key_id}",
                event_id=event_id_for(f"api-key:{key.key_id}", f"open-account/{idem}"),
                correlation_id=request_id_var.get(),
            )
        except (errors.AccountExists, errors.IdempotencyConflict):
            await lease.release()
            raise ProblemError(
                409, "account_exists", f"an account {claim.resource_id!r} already exists"
            ) from None
        out = account_out(await load_account(store, claim.resource_id))
        await lease.complete(201, out.model_dump(mode="json"))
    response.headers["Location"] = f"/v1/accounts/{out.id}"
    return out


@router.get("/{account_id}", response_model=AccountOut)
async def get_account(account_id: str, store: StoreDep, key: AccountsReadKey) -> AccountOut:
    """The account and its position, read straight from the ledger (strongly consistent)."""
    if not _valid_account_id(account_id):
        raise ProblemError(404, "account_not_found", f"no account {account_id!r}")
    return account_out(await load_account(store, account_id))


def _valid_account_id(account_id: str) -> bool:
    return re.match(ACCOUNT_ID_PATTERN, account_id) is not None


def _check_account_id(account_id: str) -> None:
    if not _valid_account_id(account_id):
        raise ProblemError(404, "account_not_found", f"no account {account_id!r}")


ENTRIES_LIMIT_MAX = 200
ENTRIES_LIMIT_DEFAULT = 50
ENTRIES_CURSOR_TAG = "e:"
# RFC 3339's date-time: a full date and time, and an offset (Z or ±hh:mm), nothing less.
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$", re.ASCII
)


def _parse_instant(as_of: str) -> datetime:
    """An RFC 3339 date-time with its offset; a naive time or anything else is a 422."""
    instant = None
    if _RFC3339.match(as_of):
        try:
            instant = datetime.fromisoformat(as_of.upper())
        except ValueError:
            instant = None
    if instant is None or instant.tzinfo is None:
        raise ProblemError(
            422,
            "validation_failed",
            "as_of must be an RFC 3339 date-time with an offset, such as "
            "2024-05-01T12:00:00Z or 2024-05-01T14:00:00+02:00 (encode + as %2B)",
            errors=[FieldError(field="as_of", message="not an RFC 3339 date-time with offset")],
        )
    return instant


def _entry_out(entry: StatementEntry) -> EntryOut:
    return EntryOut(
        global_seq=entry.global_seq,
        recorded_at=entry.recorded_at,
        event_type=entry.event_type,
        payment_id=entry.payment_id,
        movement=MovementOut(
            debits_pending=entry.debits_pending_delta,
            debits_posted=entry.debits_posted_delta,
            credits_pending=entry.credits_pending_delta,
            credits_posted=entry.credits_posted_delta,
        ),
        balance_after=RunningBalanceOut(
            debits_pending=entry.debits_pending,
            debits_posted=entry.debits_posted,
            credits_pending=entry.credits_pending,
            credits_posted=entry.credits_posted,
            posted=entry.credits_posted - entry.debits_posted,
            pending=entry.credits_pending - entry.debits_pending,
        ),
    )


@router.get("/{account_id}/entries", response_model=EntryPage)
async def list_entries(
    account_id: str,
    store: StoreDep,
    key: AccountsReadKey,
    limit: Annotated[int, Query(ge=1, le=ENTRIES_LIMIT_MAX)] = ENTRIES_LIMIT_DEFAULT,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
) -> EntryPage:
    """The account's statement: every posting and hold movement in ledger order, with the
    balance after each. From a read model: `as_of_seq` says how far it has come."""
    _check_account_id(account_id)
    after_seq = decode_cursor(cursor, ENTRIES_CURSOR_TAG) if cursor else 0
    page = await ReadModels(store.engine).entries(account_id, after_seq=after_seq, limit=limit + 1)
    if not page.account_known:
        raise ProblemError(404, "account_not_found", f"no account {account_id!r}")
    shown = page.entries[:limit]
    more = len(page.entries) > limit
    return EntryPage(
        account_id=account_id,
        entries=[_entry_out(entry) for entry in shown],
        next_cursor=encode_cursor(shown[-1].global_seq, ENTRIES_CURSOR_TAG) if more else None,
        as_of_seq=page.as_of_seq,
    )


def _balance_out(balance: Balance, as_of: datetime | None, as_of_seq: int) -> BalanceOut:
    return BalanceOut(
        account_id=balance.account_id,
        currency=balance.currency,
        debits_pending=balance.debits_pending,
        debits_posted=balance.debits_posted,
        credits_pending=balance.credits_pending,
        credits_posted=balance.credits_posted,
        posted=balance.posted_minor,
        pending=balance.pending_minor,
        available=balance.available_minor,
        as_of=as_of,
        last_seq=balance.last_seq,
        as_of_seq=as_of_seq,
    )


@router.get("/{account_id}/balance", response_model=BalanceOut)
async def get_balance(
    account_id: str,
    store: StoreDep,
    key: AccountsReadKey,
    as_of: Annotated[
        str | None,
        Query(
            max_length=40,
            description="An RFC 3339 date-time with offset: the balance at that instant "
            "(every movement recorded at or before it). Without it, the current balance.",
        ),
    ] = None,
) -> BalanceOut:
    """The account's balance from the read models: posted, pending and available, now or
    at an instant. Eventually consistent: `as_of_seq` says how far the model has come
    (`GET /v1/accounts/{id}` is the strongly consistent read)."""
    _check_account_id(account_id)
    instant = _parse_instant(as_of) if as_of is not None else None
    read_models = ReadModels(store.engine)
    if instant is None:
        read = await read_models.balance(account_id)
    else:
        read = await read_models.balance_as_of(account_id, instant)
    if read.balance is None:
        raise ProblemError(404, "account_not_found", f"no account {account_id!r}")
    return _balance_out(read.balance, instant, read.as_of_seq)
