"""Accounts: open one (an AccountOpened event), read one with its position."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Response

from api.deps import AccountsReadKey, AccountsWriteKey, StoreDep
from api.idempotency import REPLAYED_HEADER, IdempotencyStore, derived_id, request_hash, require_key
from api.models import AccountCreate, AccountOut, PositionOut
from api.problems import COMMON_RESPONSES, ProblemError
from ledger import errors
from ledger.events import ACCOUNT_ID_PATTERN, AccountOpened, event_id_for
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
