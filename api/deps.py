"""Dependencies, named with `Annotated`: the store, Temporal, and the caller's API key."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Header, Request
from temporalio.client import Client

from api.keys import ApiKey, authenticate, hash_key
from api.problems import ProblemError
from ledger.store import EventStore
from paysaga.settings import Settings

TEMPORAL_CONNECT_TIMEOUT_S = 5.0


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> EventStore:
    store: EventStore = request.app.state.store
    return store


async def get_temporal(request: Request) -> Client:
    try:
        client: Client = await request.app.state.temporal.get(timeout_s=TEMPORAL_CONNECT_TIMEOUT_S)
    except RuntimeError:
        raise ProblemError(
            503, "temporal_unavailable", "Temporal cannot be reached; try again shortly"
        ) from None
    return client


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[EventStore, Depends(get_store)]
TemporalDep = Annotated[Client, Depends(get_temporal)]

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


async def get_api_key(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> ApiKey:
    """The caller's live API key, from `Authorization: Bearer <key>`."""
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ProblemError(
            401, "unauthenticated", "send Authorization: Bearer <api key>", headers=_UNAUTHORIZED
        )
    key = await _verified(request, store, settings, presented.strip())
    if key is None:
        # Never echo what was presented: it may be a real key with a typo.
        raise ProblemError(
            401, "invalid_api_key", "the API key is unknown or revoked", headers=_UNAUTHORIZED
        )
    request.state.api_key_id = key.key_id
    return key


API_KEY_CACHE_ENTRIES_MAX = 1024


async def _verified(
    request: Request, store: EventStore, settings: Settings, presented: str
) -> ApiKey | None:
    """The key `presented` stands for, remembered for `api_key_cache_s` seconds."""
    secret = settings.api_key_secret.get_secret_value()
    # Keyed by the key's HMAC: the cache holds no key material.
    fingerprint = hash_key(secret, presented)
    cache: dict[bytes, tuple[float, ApiKey]] = request.app.state.api_key_cache
    now = time.monotonic()
    cached = cache.get(fingerprint)
    if cached is not None and cached[0] > now:
        return cached[1]
    async with store.engine.connect() as conn:
        key = await authenticate(conn, secret, presented)
    if key is not None and settings.api_key_cache_s > 0:
        if len(cache) >= API_KEY_CACHE_ENTRIES_MAX:
            cache.clear()
        cache[fingerprint] = (now + settings.api_key_cache_s, key)
    return key


def require(*scopes: str) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency: an API key holding at least one of `scopes`."""

    async def check(key: Annotated[ApiKey, Depends(get_api_key)]) -> ApiKey:
        if not key.scopes & set(scopes):
            raise ProblemError(
                403,
                "insufficient_scope",
                f"this API key lacks the scope for this route: {' or '.join(scopes)}",
            )
        return key

    return check


PaymentsWriteKey = Annotated[ApiKey, Depends(require("payments:write"))]
PaymentsReadKey = Annotated[ApiKey, Depends(require("payments:read"))]
AccountsWriteKey = Annotated[ApiKey, Depends(require("accounts:write"))]
AccountsReadKey = Annotated[ApiKey, Depends(require("accounts:read"))]
OpsKey = Annotated[ApiKey, Depends(require("ops"))]
CancelKey = Annotated[ApiKey, Depends(require("payments:write", "ops"))]
FeedKey = Annotated[ApiKey, Depends(require("payments:read", "ops"))]
