"""The API in process (ASGI), with real API keys for each kind of caller."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from api.keys import create_api_key

# Who may call what: one key per kind of caller. Only `treasury` may create money
# (open an external account, pay out of one): that takes `ops` as well.
CALLERS: dict[str, frozenset[str]] = {
    "client": frozenset({"payments:write", "payments:read", "accounts:write", "accounts:read"}),
    "reader": frozenset({"payments:read", "accounts:read"}),
    "ops": frozenset({"ops", "payments:read"}),
    "accounts": frozenset({"accounts:write", "accounts:read"}),
    "treasury": frozenset(
        {"payments:write", "payments:read", "accounts:write", "accounts:read", "ops"}
    ),
}


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://paysaga") as http:
            yield http


async def make_keys(owner_engine: AsyncEngine, secret: str) -> dict[str, str]:
    keys = {}
    for name, scopes in CALLERS.items():
        _, keys[name] = await create_api_key(owner_engine, secret, name=name, scopes=scopes)
    return keys


@dataclass
class Api:
    http: httpx.AsyncClient
    keys: dict[str, str]

    def headers(self, caller: str = "client", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[caller]}", **extra}

    async def post(
        self,
        path: str,
        json: Any = None,
        *,
        caller: str = "client",
        idempotency_key: str | None = "auto",
        **kwargs: Any,
    ) -> httpx.Response:
        headers = self.headers(caller)
        if idempotency_key == "auto":
            idempotency_key = str(uuid.uuid4())
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return await self.http.post(path, json=json, headers=headers, **kwargs)

    async def get(self, path: str, *, caller: str = "client", **kwargs: Any) -> httpx.Response:
        return await self.http.get(path, headers=self.headers(caller), **kwargs)

    async def open_account(
        self,
        account_id: str,
        currency: str = "EUR",
        kind: str = "customer",
        *,
        caller: str = "client",
        **extra: Any,
    ) -> httpx.Response:
        body = {"id": account_id, "currency": currency, "kind": kind, **extra}
        response = await self.post("/v1/accounts", body, caller=caller)
        assert response.status_code == 201, response.text
        return response

    async def pay(
        self, payer: str, payee: str, amount_minor: int, *, caller: str = "client", **extra: Any
    ) -> httpx.Response:
        body = {
            "payer_account_id": payer,
            "payee_account_id": payee,
            "amount_minor": amount_minor,
            "currency": extra.pop("currency", "EUR"),
            **extra,
        }
        return await self.post("/v1/payments", body, caller=caller, params={"wait": "settled"})
