"""Console sessions, kept on the server (table `console_sessions`, migration 0015).

- **Login** takes an API key in a POSTed form (never a URL) and opens a session only
  for a live key that holds `ops`. The session is a random 256-bit token in a cookie
  (HttpOnly, SameSite=Strict, Path=/console; Secure over HTTPS and always in
  production); the server stores only its SHA-256, so the table cannot be replayed.
- **Every request** looks the session up in one statement that also checks that its
  key is still live and holds `ops`, that it has not ended, and that it is within both
  bounds (idle and absolute), and moves its `last_seen_at`. Revoking the key ends the
  console access at the next request, whatever the API's key cache holds.
- **CSRF.** Each state-changing form carries a synchronizer token derived from the
  session's token (HMAC-SHA256), compared in constant time; the login form, before any
  session exists, carries a nonce that must match a short-lived cookie (double submit).
  Both also refuse a request whose `Origin` (or `Sec-Fetch-Site`) shows another site.
- **Secure behind TLS.** The cookie is Secure when the request arrived over HTTPS, as
  uvicorn sees it: a TLS-terminating proxy's `X-Forwarded-Proto` counts only from the
  addresses in uvicorn's `FORWARDED_ALLOW_IPS` (127.0.0.1 by default). With
  `PAYSAGA_ENV=production` it is Secure always.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from fastapi import Request, Response
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.keys import ApiKey, authenticate
from paysaga.settings import Settings

SESSION_COOKIE = "paysaga_console"
LOGIN_COOKIE = "paysaga_console_login"
COOKIE_PATH = "/console"
TOKEN_BYTES = 32
# token_urlsafe(32): 43 characters of the URL-safe alphabet. Anything else is no session.
_TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{43}$")
# Live sessions one key may hold: a login past this ends that key's oldest ones.
SESSIONS_PER_KEY_MAX = 20
# How long a login form stays usable.
LOGIN_NONCE_MAX_AGE_S = 600
# Sessions over for this long are deleted, at most this many per login.
PURGE_AFTER_S = 86_400
PURGE_BATCH_MAX = 100
# An API key as typed into the login form, at most.
KEY_CHARS_MAX = 200
_CSRF_CONTEXT = b"paysaga-console-csrf-v1"


@dataclass(frozen=True)
class ConsoleSession:
    key: ApiKey
    token: str  # the cookie's value, held for this request only
    expires_at: datetime

    @property
    def csrf_token(self) -> str:
        return csrf_token_for(self.token)

    @property
    def actor(self) -> str:
        return f"api-key:{self.key.key_id}"


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def csrf_token_for(token: str) -> str:
    """The synchronizer token of the session whose cookie holds `token`."""
    return hmac.new(token.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def csrf_matches(session: ConsoleSession, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(
        presented.encode(), session.csrf_token.encode()
    )


def nonce_matches(cookie: str | None, presented: str | None) -> bool:
    """The login form's nonce is the one its cookie holds (both present, equal)."""
    if not cookie or not presented or not _TOKEN_PATTERN.match(cookie):
        return False
    return hmac.compare_digest(cookie.encode(), presented.encode())


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site: an `Origin`
    other than this server's, or `Sec-Fetch-Site` cross-site. Clients that send
    neither (not browsers) are left to the CSRF token."""
    origin = request.headers.get("origin")
    if origin is not None:
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin != own:
            return False
    fetch_site = request.headers.get("sec-fetch-site")
    return fetch_site in (None, "same-origin", "none")


def cookie_secure(request: Request, settings: Settings) -> bool:
    return request.url.scheme == "https" or settings.env == "production"


def set_cookie(
    response: Response,
    request: Request,
    settings: Settings,
    name: str,
    value: str,
    max_age_s: int,
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age_s,
        path=COOKIE_PATH,
        secure=cookie_secure(request, settings),
        httponly=True,
        samesite="strict",
    )


def clear_cookie(response: Response, request: Request, settings: Settings, name: str) -> None:
    response.delete_cookie(
        name,
        path=COOKIE_PATH,
        secure=cookie_secure(request, settings),
        httponly=True,
        samesite="strict",
    )


def new_nonce() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


async def check_key(engine: AsyncEngine, settings: Settings, presented: str) -> ApiKey | None:
    """The live key `presented` is (no cache: a revoked key never logs in), or None."""
    presented = presented.strip()
    if not presented or len(presented) > KEY_CHARS_MAX:
        return None
    async with engine.connect() as conn:
        return await authenticate(conn, settings.api_key_secret.get_secret_value(), presented)


_PURGE = text(
    "DELETE FROM console_sessions WHERE token_hash IN ("
    "SELECT token_hash FROM console_sessions "
    "WHERE expires_at < clock_timestamp() - make_interval(secs => :after_s) "
    "ORDER BY expires_at LIMIT :batch)"
)
_OPEN = text(
    "INSERT INTO console_sessions (token_hash, key_id, expires_at) "
    "VALUES (:hash, :key_id, clock_timestamp() + make_interval(secs => :max_s)) "
    "RETURNING expires_at"
)
_END_OLDEST = text(
    "UPDATE console_sessions SET ended_at = clock_timestamp() "
    "WHERE key_id = :key_id AND ended_at IS NULL AND token_hash NOT IN ("
    "SELECT token_hash FROM console_sessions WHERE key_id = :key_id AND ended_at IS NULL "
    "ORDER BY created_at DESC LIMIT :keep)"
)
# The session, if its key is live and holds ops and it is within both bounds; seen now.
_FIND = text(
    "UPDATE console_sessions s SET last_seen_at = clock_timestamp() "
    "FROM api_keys k "
    "WHERE s.token_hash = :hash AND k.key_id = s.key_id "
    "AND k.revoked_at IS NULL AND 'ops' = ANY (k.scopes) "
    "AND s.ended_at IS NULL AND s.expires_at > clock_timestamp() "
    "AND s.last_seen_at > clock_timestamp() - make_interval(secs => :idle_s) "
    "RETURNING k.key_id, k.name, k.scopes, k.created_at, s.expires_at"
)
_END = text(
    "UPDATE console_sessions SET ended_at = coalesce(ended_at, clock_timestamp()) "
    "WHERE token_hash = :hash"
)


async def open_session(
    engine: AsyncEngine, key: ApiKey, settings: Settings
) -> tuple[str, datetime]:
    """A new session for `key` (which must hold `ops`): its token and absolute expiry."""
    assert "ops" in key.scopes, "only an ops key opens a console session"
    token = secrets.token_urlsafe(TOKEN_BYTES)
    async with engine.connect() as conn:
        await conn.execute(_PURGE, {"after_s": PURGE_AFTER_S, "batch": PURGE_BATCH_MAX})
        expires_at: datetime = (
            await conn.execute(
                _OPEN,
                {
                    "hash": token_hash(token),
                    "key_id": key.key_id,
                    "max_s": settings.console_session_max_s,
                },
            )
        ).scalar_one()
        await conn.execute(_END_OLDEST, {"key_id": key.key_id, "keep": SESSIONS_PER_KEY_MAX})
        await conn.commit()
    return token, expires_at


async def find_session(
    engine: AsyncEngine, settings: Settings, token: str | None
) -> ConsoleSession | None:
    """The live session whose cookie holds `token`, or None."""
    if token is None or not _TOKEN_PATTERN.match(token):
        return None
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                _FIND, {"hash": token_hash(token), "idle_s": settings.console_session_idle_s}
            )
        ).one_or_none()
        await conn.commit()
    if row is None:
        return None
    key = ApiKey(row.key_id, row.name, frozenset(row.scopes), row.created_at, None)
    return ConsoleSession(key=key, token=token, expires_at=row.expires_at)


async def end_session(engine: AsyncEngine, token: str | None) -> None:
    """End the session (logout); ending one that is over or unknown changes nothing."""
    if token is None or not _TOKEN_PATTERN.match(token):
        return
    async with engine.connect() as conn:
        await conn.execute(_END, {"hash": token_hash(token)})
        await conn.commit()
