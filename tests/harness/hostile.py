"""Tools for hostile-input tests: fingerprints of what a request may change, a multipart
body streamed from a generator, and a sampler of a process's memory."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import psycopg

from ledger.db import to_libpq_url
from tests.harness.postgres import IsolatedDatabase

# Every table that holds the ledger, or anything the ledger or the API trusts: an
# attack "changed nothing" when every one of these reads the same afterwards.
LEDGER_TABLES = (
    "events",
    "streams",
    "accounts",
    "positions",
    "ledger_blocks",
    "ledger_horizon_marks",
    "ledger_transitions",
    "ledger_event_types",
    "api_keys",
    "idempotency_keys",
    "processor_authorizations",
    "processor_captures",
    "recon.statement_files",
    "recon.statements",
    "recon.statement_lines",
    "recon.seal_verifications",
)


def owner_connection(database: IsolatedDatabase) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(to_libpq_url(database.urls.owner_url), autocommit=True)


def app_connection(database: IsolatedDatabase) -> psycopg.Connection[tuple[Any, ...]]:
    """A raw session as the application role, as a compromised service would hold."""
    return psycopg.connect(to_libpq_url(database.urls.app_url), autocommit=True)


def ledger_print(database: IsolatedDatabase) -> dict[str, tuple[int, str]]:
    """Each ledger table's row count and a digest of all its rows, read as the owner."""
    prints: dict[str, tuple[int, str]] = {}
    with owner_connection(database) as conn:
        for table in LEDGER_TABLES:
            row = conn.execute(
                f"SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') "
                f"FROM {table} AS t"
            ).fetchone()
            assert row is not None
            prints[table] = (int(row[0]), str(row[1]))
    return prints


@dataclass(frozen=True)
class Footprint:
    """What a request could create or change synchronously, read as the owner.

    Payments already accepted keep moving in the background (their workflows append
    events, the statement stream reconciles), so a rejected request is judged by what
    only a request makes: accounts, idempotency keys, statement files, payment streams
    nobody was told about (a 202 names its payment), API keys.
    """

    accounts: str
    idempotency_keys: str
    statement_files: str
    unannounced_payment_streams: frozenset[str]
    api_keys: str


def footprint(conn: psycopg.Connection[tuple[Any, ...]], announced_payments: set[str]) -> Footprint:
    def digest(query: str) -> str:
        row = conn.execute(query).fetchone()
        return str(row[0]) if row is not None else ""

    streams = {
        str(row[0]).removeprefix("payment-")
        for row in conn.execute("SELECT stream_id FROM streams WHERE stream_id LIKE 'payment-%'")
    }
    return Footprint(
        accounts=digest(
            "SELECT count(*) || ':' || coalesce(md5(string_agg(account_id || kind || "
            "coalesce(overdraft_limit_minor::text, '-') || metadata::text, ',' "
            "ORDER BY account_id)), '') FROM accounts"
        ),
        # Not `locked_until`: a lease renews in the background while its request runs.
        idempotency_keys=digest(
            "SELECT count(*) || ':' || coalesce(md5(string_agg(api_key_id || '/' || "
            "idempotency_key || '/' || state || '/' || coalesce(resource_id, '') || '/' || "
            "coalesce(response_status::text, ''), ',' ORDER BY api_key_id, idempotency_key)), "
            "'') FROM idempotency_keys"
        ),
        statement_files=digest("SELECT count(*) FROM recon.statement_files"),
        unannounced_payment_streams=frozenset(streams - announced_payments),
        api_keys=digest("SELECT count(*) || ':' || count(revoked_at) FROM api_keys"),
    )


# --- a multipart upload streamed from a generator ------------------------------------------
BOUNDARY = "hostile-boundary-7d1f0c"
CHUNK_BYTES = 1024 * 1024


@dataclass
class StreamedFile:
    """A multipart/form-data body of one `file` part of `size_bytes`, generated lazily:
    the test never holds more than one chunk. `sent_bytes` counts what was handed to
    the client so far."""

    filename: str
    size_bytes: int
    line: bytes = b"2026-01-01,ref-0000000001,1.00,EUR,capture\n"
    sent_bytes: int = field(default=0, init=False)

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={BOUNDARY}"

    def _head(self) -> bytes:
        return (
            f"--{BOUNDARY}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{self.filename}"\r\n'
            "Content-Type: text/csv\r\n\r\n"
            "date,reference,amount,currency,type\n"
        ).encode()

    def _tail(self) -> bytes:
        return f"\r\n--{BOUNDARY}--\r\n".encode()

    @property
    def total_bytes(self) -> int:
        """The whole body's length: what a client declaring it sends as Content-Length."""
        return len(self._head()) + self.size_bytes + len(self._tail())

    def __iter__(self) -> Iterator[bytes]:
        yield self._count(self._head())
        chunk = self.line * (CHUNK_BYTES // len(self.line))
        remaining = self.size_bytes
        while remaining > 0:
            piece = chunk[:remaining]
            remaining -= len(piece)
            yield self._count(piece)
        yield self._count(self._tail())

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self:
            yield piece

    def _count(self, piece: bytes) -> bytes:
        self.sent_bytes += len(piece)
        return piece


# --- memory --------------------------------------------------------------------------------
class RssSampler:
    """The peak resident memory of a process, sampled every `interval_s` in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.baseline_bytes = self.process.memory_info().rss
        self.peak_bytes = self.baseline_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.process.memory_info().rss
            except psutil.Error:
                return
            self.peak_bytes = max(self.peak_bytes, rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes
