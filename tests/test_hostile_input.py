"""Hostile input (issue 11, section 4): every attack fails, and changes nothing.

- A stateful schemathesis run follows the API's OpenAPI links against a real `paysaga
  api` and `paysaga worker`: no answer is ever a 5xx, and no rejected request (4xx)
  changes anything a request can change.
- Direct attacks, each refused with the ledger read the same before and after: the
  application role writing the ledger's tables, approving without `ops`, reading
  another key's payment through its Idempotency-Key, minting through an external
  account, and SQL injection through every string a request can carry.
- Statement files: a malformed, a truncated and a huge one (over 1 GB, streamed) are
  refused, by the API and by the inbox, without the process's memory growing.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import hashlib
import io
import os
import subprocess
import time
import tracemalloc
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import hypothesis.errors
import psycopg
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    ensure_resource_availability,
    response_schema_conformance,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from api.idempotency import IdempotencyStore, derived_id, request_hash
from api.keys import create_api_key
from ledger.events import payment_stream
from ledger.store import EventStore
from ledger.verify import check_ledger, verify_chain
from paysaga.settings import Settings
from recon.formats.build import bank_line, build_camt053, statement
from tests.harness.api import CALLERS, Api, make_keys
from tests.harness.hostile import (
    Footprint,
    RssSampler,
    StreamedFile,
    app_connection,
    footprint,
    ledger_print,
    owner_connection,
)
from tests.harness.ledger import Payment, fund, open_account, seal_until_everything_is_sealed
from tests.harness.postgres import IsolatedDatabase
from tests.harness.processes import Services, api_and_worker, service_env, start_api, stop
from tests.harness.saga import wait_for
from tests.harness.stack import free_port
from worker import worker_activities
from workflows.models import workflow_id_for

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
# "Over 1 GB": what the huge statement files weigh.
HUGE_BYTES = 1100 * MiB
# How much a process may grow while it refuses one.
MEMORY_GROWTH_BYTES_MAX = 100 * MiB


# --- statement files ----------------------------------------------------------------------
def _good_csv() -> bytes:
    return (
        b"date,reference,amount,currency,type\n"
        b"2026-01-05,pay-one,12.50,EUR,capture\n"
        b"2026-01-05,pay-two,3.00,EUR,capture\n"
    )


def _camt053() -> bytes:
    lines = [bank_line(1_250, "EUR", date(2026, 1, 5), reference="pay-one")]
    return build_camt053([statement("stmt-1", "DE00123456780000000000", lines)])


def bad_statements() -> list[tuple[str, bytes]]:
    """Files no statement parser may accept: each malformed, or cut short."""
    good = _good_csv()
    camt = _camt053()
    return [
        ("malformed.csv", good.replace(b"12.50", b"12.5x")),
        ("malformed-columns.csv", good + b"2026-01-05,pay-three\n"),
        ("malformed.xml", b"<?xml version='1.0'?><Document><<<</Document>"),
        ("binary.bin", bytes(range(256)) * 64),
        ("truncated.csv", good[:-9]),
        ("truncated.xml", camt[: len(camt) // 2]),
        ("empty.csv", b""),
    ]


@pytest.fixture
def api_process(settings: Settings) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`paysaga api` alone: a statement is refused before anything needs the worker."""
    port = free_port()
    api = start_api(service_env(settings, PAYSAGA_API_PORT=str(port)))
    try:
        yield f"http://127.0.0.1:{port}", api
    finally:
        stop(api)


async def test_uploaded_statements_malformed_truncated_or_over_1_gb_are_refused_in_bounded_memory(
    api_process: tuple[str, subprocess.Popen[bytes]],
    database: IsolatedDatabase,
    owner_engine,
    settings: Settings,
) -> None:
    """Each bad file is a 422 naming the problem; a body over the limit is a 413 once
    the limit is crossed (at once, when it declares its length). The API's resident
    memory grows by at most what the limit lets in: the rest of a refused upload is
    read and thrown away, since closing the connection with it unread would reset it
    and the client would never see its 413. Nothing of any of them is ingested."""
    url, process = api_process
    keys = await make_keys(owner_engine, settings.api_key_secret.get_secret_value())
    ops = {"Authorization": f"Bearer {keys['ops']}"}
    before = ledger_print(database)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for name, content in bad_statements():
            refused = await http.post(
                "/v1/statements", files={"file": (name, content, "text/csv")}, headers=ops
            )
            assert refused.status_code == 422, (name, refused.text)
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["code"] == "invalid_statement", (name, refused.text)

        # Over 1 GB, streamed from a generator without a declared length (chunked).
        chunked = StreamedFile("huge.csv", HUGE_BYTES)
        with RssSampler(process.pid) as rss:
            refused = await http.post(
                "/v1/statements",
                content=aiter(chunked),
                headers={**ops, "Content-Type": chunked.content_type},
            )
        assert refused.status_code == 413, refused.text
        assert refused.json()["code"] == "body_too_large"
        assert rss.growth_bytes < MEMORY_GROWTH_BYTES_MAX, rss.growth_bytes
        print(
            f"chunked upload: {chunked.sent_bytes / MiB:.0f} MiB generated, "
            f"API RSS grew {rss.growth_bytes / MiB:.1f} MiB"
        )

        # The same, declaring its length: refused before the app reads any of it.
        declared = StreamedFile("huge-declared.csv", HUGE_BYTES)
        with RssSampler(process.pid) as rss:
            refused = await http.post(
                "/v1/statements",
                content=aiter(declared),
                headers={
                    **ops,
                    "Content-Type": declared.content_type,
                    "Content-Length": str(declared.total_bytes),
                },
            )
        assert refused.status_code == 413, refused.text
        assert rss.growth_bytes < MEMORY_GROWTH_BYTES_MAX, rss.growth_bytes
        print(
            f"declared upload: {declared.sent_bytes / MiB:.0f} MiB generated, "
            f"API RSS grew {rss.growth_bytes / MiB:.1f} MiB"
        )

        # The API still works, and took none of it.
        ok = await http.post(
            "/v1/statements", files={"file": ("good.csv", _good_csv(), "text/csv")}, headers=ops
        )
        assert ok.status_code == 201, ok.text
        after_refusals = ledger_print(database)
        changed = {table for table in before if before[table] != after_refusals[table]}
        assert changed <= {"recon.statement_files", "recon.statements", "recon.statement_lines"}
        assert after_refusals["recon.statement_files"][0] == before["recon.statement_files"][0] + 1

        # Injections in a statement's text (its file name, a line's reference): refused,
        # or stored as sent.
        stored: dict[str, tuple[str, str]] = {}
        for n, value in enumerate(INJECTIONS, 1):
            rows = io.StringIO()
            csv.writer(rows, lineterminator="\n").writerows(
                [
                    ("date", "reference", "amount", "currency", "type"),
                    ("2026-01-06", value, f"{n}.00", "EUR", "capture"),
                ]
            )
            for where, filename, content in (
                ("reference", f"{n}.csv", rows.getvalue().encode()),
                (
                    "filename",
                    value[:255],
                    _good_csv() + f"2026-01-07,name-{n},1.00,EUR,fee\n".encode(),
                ),
            ):
                response = await http.post(
                    "/v1/statements", files={"file": (filename, content, "text/csv")}, headers=ops
                )
                assert response.status_code in (201, 422), (value, response.text)
                if response.status_code == 201:
                    stored[response.json()["file_sha256"]] = (where, value)
    with owner_connection(database) as conn:
        for sha256, (where, value) in stored.items():
            filename, references = conn.execute(
                "SELECT f.filename, array_agg(l.reference) FROM recon.statement_files f "
                "JOIN recon.statements s USING (file_sha256) "
                "JOIN recon.statement_lines l ON l.statement_id = s.statement_id "
                "WHERE f.file_sha256 = %s GROUP BY f.filename",
                (sha256,),
            ).fetchone() or (None, [])
            if where == "reference":
                assert references == [value], (value, references)
            elif not set(value) & {'"', "\\"} and value.isprintable():
                # A client escapes quotes, backslashes and control characters in a
                # multipart file name (HTML5's rule); any other name arrives as sent.
                assert filename == value[:255], (value, filename)
    print(f"statement injections: {len(stored)} of {2 * len(INJECTIONS)} files accepted")


async def test_a_payment_or_a_run_accepted_but_not_yet_recorded_is_never_a_404(
    api_process: tuple[str, subprocess.Popen[bytes]],
    store: EventStore,
    owner_engine: AsyncEngine,
    settings: Settings,
) -> None:
    """With no worker, a payment's workflow and a reconciliation run are started (202)
    and record nothing. The stateful run found their reads answering 404, "no payment",
    which tells a client to submit again: now the audit trail is empty, the run is
    `running`, and a payment whose state nobody can read is a 503 to retry."""
    url, _ = api_process
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await fund(store, "alice", 10_000)
    keys = await make_keys(owner_engine, settings.api_key_secret.get_secret_value())

    def headers(caller: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[caller]}", "Idempotency-Key": str(uuid.uuid4())}

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        accepted = await http.post(
            "/v1/payments", json={**PAYMENT, "amount_minor": 500}, headers=headers("client")
        )
        assert accepted.status_code == 202, accepted.text
        payment_id = accepted.json()["id"]
        trail = await http.get(f"/v1/payments/{payment_id}/events", headers=headers("client"))
        assert trail.status_code == 200, trail.text
        assert trail.json()["events"] == []
        unread = await http.get(f"/v1/payments/{payment_id}", headers=headers("client"))
        assert unread.status_code == 503, unread.text
        assert unread.json()["code"] == "payment_state_unavailable"
        assert unread.headers["Retry-After"] == "1"
        nobody = derived_id("pay", "nobody", "nothing")
        for path in (f"/v1/payments/{nobody}", f"/v1/payments/{nobody}/events"):
            assert (await http.get(path, headers=headers("client"))).status_code == 404

        started = await http.post("/v1/reconciliations", json={}, headers=headers("ops"))
        assert started.status_code == 202, started.text
        run = await http.get(f"/v1/reconciliations/{started.json()['id']}", headers=headers("ops"))
        assert run.status_code == 200, run.text
        assert (run.json()["status"], run.json()["counts"]) == ("running", {})
        unknown = await http.get("/v1/reconciliations/manual-0000", headers=headers("ops"))
        assert unknown.status_code == 404


async def test_the_inbox_refuses_malformed_truncated_and_huge_files_without_reading_them(
    store: EventStore,
    temporal_client: Client,
    settings: Settings,
    database: IsolatedDatabase,
) -> None:
    """The worker's inbox activity, on malformed and truncated files and on sparse files
    over 1 GB (no disk spent): each is moved to refused/ with its reason and reported,
    nothing is ingested, and the huge ones are never read. Issue 11 found one read
    whole: a second huge file of a name refused/ already held was read into memory
    (1.15 GB) to name its copy."""
    inbox = settings.recon_inbox_path
    inbox.mkdir(parents=True)
    bad = bad_statements()
    for name, content in bad:
        (inbox / name).write_bytes(content)
    _sparse(inbox / "huge.csv", HUGE_BYTES)
    ingest_inbox = next(
        activity
        for activity in worker_activities(store, temporal_client, settings)
        if getattr(activity, "__name__", "") == "ingest_inbox"
    )
    before = ledger_print(database)

    tracemalloc.start()
    try:
        first = await ActivityEnvironment().run(ingest_inbox, "hostile-1")
        # A second huge file of the same name: refused/ already holds one.
        _sparse(inbox / "huge.csv", HUGE_BYTES + MiB)
        second = await ActivityEnvironment().run(ingest_inbox, "hostile-2")
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (first.files_ingested, first.files_known, first.lines_new) == (0, 0, 0)
    assert first.files_refused == len(bad) + 1
    assert (second.files_ingested, second.files_refused) == (0, 1)
    assert any(line.startswith("huge.csv: ") and "larger than" in line for line in first.refused)
    assert peak_bytes < MEMORY_GROWTH_BYTES_MAX, f"refusing read {peak_bytes} bytes into memory"
    assert ledger_print(database) == before
    refused = sorted(p.name for p in (inbox / "refused").iterdir() if p.suffix != ".txt")
    assert len(refused) == len(bad) + 2, refused
    assert not [p for p in inbox.iterdir() if p.is_file()]
    assert not (inbox / "done").exists() or not list((inbox / "done").iterdir())
    for name, _ in bad:
        assert (inbox / "refused" / f"{name}.error.txt").read_text().strip()


def _sparse(path: Path, size_bytes: int) -> None:
    """A file of `size_bytes` that takes no disk: a hole, then one byte."""
    with path.open("wb") as file:
        file.seek(size_bytes - 1)
        file.write(b"\n")
    assert os.stat(path).st_blocks * 512 < MiB


# --- direct attacks: the application role against the ledger's tables --------------------
# A column of each table, for an UPDATE that would change nothing visible if it ran.
LEDGER_TABLE_COLUMNS = {
    "events": "actor",
    "streams": "state",
    "positions": "credits_posted",
    "accounts": "overdraft_limit_minor",
    "ledger_blocks": "hash",
    "ledger_horizon_marks": "head_seq",
    "ledger_transitions": "to_state",
    "ledger_event_types": "event_type",
    "api_keys": "scopes",
    "recon.seal_verifications": "block_no",
}


def _ledger_attacks() -> list[str]:
    attacks = []
    for table, column in LEDGER_TABLE_COLUMNS.items():
        attacks += [
            f"UPDATE {table} SET {column} = {column}",
            f"DELETE FROM {table}",
            f"TRUNCATE {table}",
            f"TRUNCATE {table} RESTART IDENTITY CASCADE",
        ]
    return [
        *attacks,
        "TRUNCATE events, streams, positions, accounts, ledger_blocks CASCADE",
        "UPDATE events SET payload = '{}' WHERE global_seq = (SELECT max(global_seq) FROM events)",
        "WITH gone AS (DELETE FROM events RETURNING 1) SELECT count(*) FROM gone",
        "UPDATE positions SET credits_posted = credits_posted + 1000000 WHERE stripe = 0",
        "DELETE FROM positions WHERE account_id = 'alice'",
        "UPDATE streams SET state = 'settled', version = version + 1",
        "ALTER TABLE events DISABLE TRIGGER USER",
        "ALTER TABLE events DISABLE TRIGGER ALL",
        "DROP TRIGGER IF EXISTS events_no_truncate ON events",
        "DROP TABLE events CASCADE",
        "ALTER TABLE events RENAME TO events_old",
        "SET session_replication_role = replica",
        "SELECT setval('events_global_seq', 1)",
        "ALTER SEQUENCE events_global_seq RESTART WITH 1",
    ]


async def test_the_application_role_can_update_delete_or_truncate_nothing_in_the_ledger(
    bank: EventStore, database: IsolatedDatabase
) -> None:
    """Each statement fails, as the login the services hold, and the ledger (every table
    of it, row for row) reads the same afterwards; then the chain and the seal verify."""
    await Payment(bank, "alice", "bob", 1_000).settle_fully()
    await seal_until_everything_is_sealed(bank)
    before = ledger_print(database)
    assert before["events"][0] > 0 and before["ledger_blocks"][0] > 0
    refused: dict[str, str] = {}
    with app_connection(database) as conn:
        for attack in _ledger_attacks():
            try:
                conn.execute(attack)
            except psycopg.Error as error:
                refused[attack] = error.sqlstate or "?"
            else:
                refused[attack] = "ran"
        # An exclusive lock on the log would stop every append: refused too.
        conn.autocommit = False
        for mode in ("EXCLUSIVE", "ACCESS EXCLUSIVE"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"LOCK TABLE events IN {mode} MODE")
            conn.rollback()
    # 42501: no privilege. The triggers (PS100) stand behind it, for the owner.
    assert set(refused.values()) <= {"42501", "PS100"}, {
        attack: state for attack, state in refused.items() if state not in {"42501", "PS100"}
    }
    assert ledger_print(database) == before
    for report in (await verify_chain(bank.engine), await check_ledger(bank.engine)):
        assert report.ok, report.lines()


# --- direct attacks through the API -------------------------------------------------------
PAYMENT: dict[str, Any] = {
    "payer_account_id": "alice",
    "payee_account_id": "bob",
    "currency": "EUR",
}


@pytest.fixture
async def funded(api: Api, store: EventStore, settings: Settings) -> Api:
    """alice (a customer, with three approvals' worth of money) and bob (a merchant)."""
    await api.open_account("alice")
    await api.open_account("bob", kind="merchant")
    await fund(store, "alice", 3 * settings.approval_threshold_minor)
    return api


async def _status(api: Api, payment_id: str) -> str:
    return str((await api.get(f"/v1/payments/{payment_id}")).json()["status"])


async def _accepted_updates(client: Client, payment_id: str) -> int:
    history = await client.get_workflow_handle(workflow_id_for(payment_id)).fetch_history()
    return sum(
        1
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    )


async def test_approving_without_the_ops_scope_is_403_and_the_payment_still_waits(
    funded: Api, settings: Settings, database: IsolatedDatabase, temporal_client: Client
) -> None:
    big = {**PAYMENT, "amount_minor": settings.approval_threshold_minor}
    payment_id = (await funded.post("/v1/payments", big)).json()["id"]
    await wait_for(lambda: _is(funded, payment_id, "PENDING_APPROVAL"), what="the approval wait")
    before = ledger_print(database)
    path = f"/v1/payments/{payment_id}"
    attempts = [
        (f"{path}/approve", {"Authorization": f"Bearer {funded.keys['client']}"}, {}),
        (f"{path}/reject", {"Authorization": f"Bearer {funded.keys['client']}"}, {"reason": "x"}),
        (f"{path}/approve", {"Authorization": f"Bearer {funded.keys['reader']}"}, {}),
        (f"{path}/approve", {"Authorization": f"Bearer {funded.keys['accounts']}"}, {}),
        # Claims of a scope the key does not hold, in the body or in headers.
        (
            f"{path}/approve",
            {
                "Authorization": f"Bearer {funded.keys['client']}",
                "X-Scopes": "ops",
                "X-Api-Key-Scopes": "ops",
                "X-Forwarded-User": "ops",
            },
            {},
        ),
    ]
    for url, headers, body in attempts:
        response = await funded.http.post(url, json=body, headers=headers)
        assert response.status_code == 403, (url, response.text)
        assert response.json()["code"] == "insufficient_scope"
    with_scopes_in_body = await funded.http.post(
        f"{path}/approve",
        json={"note": "trust me", "scopes": ["ops"]},
        headers=funded.headers("client"),
    )
    assert with_scopes_in_body.status_code in (403, 422), with_scopes_in_body.text
    unauthenticated = [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer ps_nobody_0000"},
        {"Authorization": f"Basic {funded.keys['ops']}"},
        {"Authorization": f"Bearer {funded.keys['ops']}x"},
        {"Authorization": f"Bearer {funded.keys['ops'][:-1]}"},
    ]
    for headers in unauthenticated:
        response = await funded.http.post(f"{path}/approve", json={}, headers=headers)
        assert response.status_code == 401, (headers, response.text)

    assert ledger_print(database) == before
    assert await _status(funded, payment_id) == "PENDING_APPROVAL"
    assert await _accepted_updates(temporal_client, payment_id) == 0
    # The payment could be approved all along: by a key that holds `ops`.
    approved = await funded.post(f"{path}/approve", caller="ops", idempotency_key=None)
    assert approved.status_code == 202, approved.text
    await wait_for(lambda: _is(funded, payment_id, "SETTLED"), what="the settlement")


async def _is(api: Api, payment_id: str, status: str) -> bool:
    return await _status(api, payment_id) == status


TENANT_SCOPES = frozenset({"payments:write", "payments:read", "accounts:read"})


async def test_another_keys_idempotency_key_reveals_none_of_its_payment(
    funded: Api, owner_engine: AsyncEngine, settings: Settings, database: IsolatedDatabase
) -> None:
    """Key A replays key B's Idempotency-Keys: same body, another body, one still in
    flight. Each is a payment of A's own, never B's answer, and never a 409 or 422 that
    would tell A that B used the key; B's payment is left exactly as it was."""
    secret = settings.api_key_secret.get_secret_value()
    a_id, a_key = await create_api_key(owner_engine, secret, name="a", scopes=TENANT_SCOPES)
    b_id, b_key = await create_api_key(owner_engine, secret, name="b", scopes=TENANT_SCOPES)

    async def pay(key: str, idempotency_key: str, amount_minor: int) -> httpx.Response:
        return await funded.http.post(
            "/v1/payments",
            params={"wait": "settled"},
            json={**PAYMENT, "amount_minor": amount_minor, "reference": f"by {key[:8]}"},
            headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idempotency_key},
        )

    same, other, in_flight = (f"order-{uuid.uuid4()}" for _ in range(3))
    theirs = await pay(b_key, same, 700)
    assert theirs.status_code == 202 and theirs.json()["status"] == "SETTLED", theirs.text
    assert (await pay(b_key, other, 800)).json()["status"] == "SETTLED"
    # B's third request is still in flight (its lease runs for an hour).
    await IdempotencyStore(funded_engine(funded)).claim(
        b_id,
        in_flight,
        request_hash("POST", "/v1/payments", {}),
        derived_id("pay", b_id, in_flight),
    )
    b_stream = payment_stream(theirs.json()["id"])
    b_before = await _stream_print(database, b_stream)

    for idempotency_key, amount_minor in ((same, 700), (other, 9), (in_flight, 10)):
        mine = await pay(a_key, idempotency_key, amount_minor)
        assert mine.status_code == 202, (idempotency_key, mine.text)
        assert "Idempotent-Replayed" not in mine.headers
        body = mine.json()
        assert body["id"] == derived_id("pay", a_id, idempotency_key)
        assert body["id"] != derived_id("pay", b_id, idempotency_key)
        assert (body["amount_minor"], body["reference"]) == (amount_minor, f"by {a_key[:8]}")
        # A's replay answers with A's payment; so does reading it.
        again = await pay(a_key, idempotency_key, amount_minor)
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert again.json()["id"] == body["id"]
        read = await funded.http.get(
            f"/v1/payments/{body['id']}", headers={"Authorization": f"Bearer {a_key}"}
        )
        assert read.status_code == 200
        assert (read.json()["id"], read.json()["amount_minor"]) == (body["id"], amount_minor)
        assert read.json()["reference"] == f"by {a_key[:8]}"
    # Nothing was ever created under the id B's in-flight request will create.
    unseen = await funded.http.get(
        f"/v1/payments/{derived_id('pay', b_id, in_flight)}",
        headers={"Authorization": f"Bearer {a_key}"},
    )
    assert unseen.status_code == 404
    assert await _stream_print(database, b_stream) == b_before


def funded_engine(api: Api) -> AsyncEngine:
    store: EventStore = api.http._transport.app.state.store  # type: ignore[attr-defined]
    return store.engine


async def _stream_print(database: IsolatedDatabase, stream_id: str) -> list[tuple[object, ...]]:
    with owner_connection(database) as conn:
        return [
            tuple(row)
            for row in conn.execute(
                "SELECT global_seq, event_type, hash FROM events WHERE stream_id = %s "
                "ORDER BY global_seq",
                (stream_id,),
            )
        ]


async def test_minting_through_an_external_account_without_ops_is_refused_and_changes_nothing(
    api: Api, database: IsolatedDatabase, temporal_client: Client, task_queue: str
) -> None:
    await api.open_account("world", kind="external", overdraft_limit_minor=None, caller="treasury")
    await api.open_account("mallory")
    funding_key = str(uuid.uuid4())
    funding = {
        "payer_account_id": "world",
        "payee_account_id": "mallory",
        "amount_minor": 100,
        "currency": "EUR",
    }
    funded = await api.post(
        "/v1/payments",
        funding,
        caller="treasury",
        idempotency_key=funding_key,
        params={"wait": "settled"},
    )
    assert funded.json()["status"] == "SETTLED", funded.text
    before = ledger_print(database)
    workflows_before = await _workflows(temporal_client, task_queue)

    external = {"currency": "EUR", "kind": "external", "overdraft_limit_minor": None}
    refusals = [
        ("/v1/accounts", external, None),
        ("/v1/accounts", {**external, "id": "world-2"}, None),
        ("/v1/accounts", {**external, "overdraft_limit_minor": 10}, None),
        ("/v1/accounts", {**external, "overdraft_limit_minor": 0}, None),
        ("/v1/payments", {**funding, "amount_minor": 10**12}, None),
        ("/v1/payments", {**funding, "amount_minor": 10**12}, {"wait": "settled"}),
        ("/v1/payments", {**funding, "currency": "USD"}, None),
        ("/v1/payments", {**funding, "metadata": {"simulate": "flaky"}}, None),
        # Treasury's own request, replayed by a client key: no replay, no payment.
        ("/v1/payments", funding, {"wait": "settled"}),
    ]
    for path, body, params in refusals:
        for key in ("client", "accounts", "reader"):
            response = await api.http.post(
                path,
                json=body,
                params=params,
                headers=api.headers(key, **{"Idempotency-Key": funding_key}),
            )
            assert response.status_code == 403, (key, path, body, response.text)
            assert response.json()["code"] == "insufficient_scope"
    # Other spellings of the kind are not a way around the check: they are not kinds.
    for kind in ("External", "EXTERNAL", "external ", "settlement\u0000external"):
        response = await api.post("/v1/accounts", {**external, "kind": kind})
        assert response.status_code == 422, (kind, response.text)
    # An unlimited overdraft is for external accounts only.
    unlimited = await api.post(
        "/v1/accounts", {"currency": "EUR", "kind": "customer", "overdraft_limit_minor": None}
    )
    assert unlimited.status_code == 422, unlimited.text

    assert ledger_print(database) == before
    assert await _workflows(temporal_client, task_queue) == workflows_before
    mallory = (await api.get("/v1/accounts/mallory")).json()["position"]
    assert (mallory["posted"], mallory["pending"]) == (100, 0)


async def _workflows(client: Client, task_queue: str) -> int:
    return len([wf async for wf in client.list_workflows(f'TaskQueue="{task_queue}"')])


# --- SQL injection through every string a request can carry -------------------------------
INJECTIONS = [
    "'; DROP TABLE events; --",
    "' OR '1'='1",
    '" OR ""="',
    "1; DELETE FROM events WHERE true; --",
    "x' UNION SELECT key_hash::text FROM api_keys --",
    "alice' --",
    "%s %(payment_id)s {0} $1 :name",
    "$$; TRUNCATE events; $$",
    "\\'; SELECT pg_sleep(5); --",
    "a\u0000b",
    "r\u00e9f \u2713 \U0001d518 \u202edesrever",
    "../../../../etc/passwd",
    "<script>alert(1)</script>",
    "x" * 10_000,
]


def _storable(value: str, length_max: int) -> bool:
    return "\u0000" not in value and len(value) <= length_max


def _header_safe(value: str) -> bool:
    return value.isascii() and value.isprintable() and len(value) < 8_000


async def test_sql_injection_through_every_string_field_is_refused_or_stored_verbatim(
    funded: Api, store: EventStore, database: IsolatedDatabase
) -> None:
    """Every string field of every route, every query parameter, path segment and
    header, with each injection: a 4xx, or the value stored and read back exactly as
    sent; never a 5xx; and the log afterwards holds every event it held before."""
    http, treasury = funded.http, funded.headers("treasury")
    settled = (await funded.pay("alice", "bob", 100)).json()["id"]
    before = ledger_print(database)
    last_seq = await _last_seq(database)
    answers: list[tuple[str, int]] = []
    created_payments: dict[str, tuple[str, dict[str, str], str | None]] = {}

    async def send(method: str, url: str, **kwargs: Any) -> httpx.Response:
        headers = {**treasury, "Idempotency-Key": str(uuid.uuid4()), **kwargs.pop("headers", {})}
        response = await http.request(method, url, headers=headers, **kwargs)
        answers.append((f"{method} {url} {kwargs}"[:300], response.status_code))
        return response

    for value in INJECTIONS:
        quoted = urllib.parse.quote(value, safe="")
        # Identifiers, codes and enumerations: refused.
        for name in ("id", "currency", "kind"):
            opening: dict[str, Any] = {"currency": "EUR", "kind": "customer", name: value}
            assert (await send("POST", "/v1/accounts", json=opening)).status_code == 422
        for name in ("payer_account_id", "payee_account_id", "currency"):
            body = {**PAYMENT, "amount_minor": 1, name: value}
            assert (await send("POST", "/v1/payments", json=body)).status_code == 422
        payment: dict[str, Any] = {**PAYMENT, "amount_minor": 1}
        wait = await send("POST", "/v1/payments", json=payment, params={"wait": value})
        assert wait.status_code == 422

        # Free text: stored verbatim, or refused when it cannot be stored or is too long.
        for metadata in ({value: "v"}, {"k": value}):
            opened = await send(
                "POST",
                "/v1/accounts",
                json={"currency": "EUR", "kind": "customer", "metadata": metadata},
            )
            if _storable(value, 4_000):
                assert opened.status_code == 201, opened.text
                read = await send("GET", f"/v1/accounts/{opened.json()['id']}")
                assert opened.json()["metadata"] == read.json()["metadata"] == metadata
            else:
                assert opened.status_code == 422, opened.text
        for reference, metadata in ((value, {}), (None, {value: "v"}), (None, {"k": value})):
            body = {**payment, "reference": reference, "metadata": metadata}
            accepted = await send("POST", "/v1/payments", json=body)
            if _storable(value, 200 if reference else 4_000):
                assert accepted.status_code == 202, accepted.text
                created_payments[accepted.json()["id"]] = (value, metadata, reference)
            else:
                assert accepted.status_code == 422, accepted.text
        if _header_safe(value):
            keyed = await send(
                "POST", "/v1/payments", json=payment, headers={"Idempotency-Key": value}
            )
            assert keyed.status_code == (202 if " " not in value else 400), keyed.text
            if keyed.status_code == 202:
                replayed = await send(
                    "POST", "/v1/payments", json=payment, headers={"Idempotency-Key": value}
                )
                assert replayed.headers.get("Idempotent-Replayed") == "true"
                assert replayed.json()["id"] == keyed.json()["id"]
            for authorization in (f"Bearer {value}", value):
                response = await http.get("/v1/payments", headers={"Authorization": authorization})
                assert response.status_code == 401
            echoed = await send("GET", "/v1/payments", headers={"X-Request-Id": value})
            assert echoed.status_code == 200
            assert echoed.headers["X-Request-Id"] != value or value.isalnum()

        # Actions on a settled payment, with the value in the body or as the id.
        for action, body in (
            ("cancel", {"reason": value}),
            ("approve", {"note": value}),
            ("reject", {"reason": value}),
        ):
            on_settled = await send("POST", f"/v1/payments/{settled}/{action}", json=body)
            assert on_settled.status_code in (409, 422), on_settled.text
            as_id = await send("POST", f"/v1/payments/{quoted}/{action}", json={"reason": "x"})
            assert 400 <= as_id.status_code < 500

        # Reads: path segments and query parameters.
        for url in (
            f"/v1/accounts/{quoted}",
            f"/v1/accounts/{quoted}/entries",
            f"/v1/accounts/{quoted}/balance",
            f"/v1/payments/{quoted}",
            f"/v1/payments/{quoted}/events",
            f"/v1/reconciliations/{quoted}",
            f"/v1/reconciliations/{quoted}/report",
        ):
            assert 400 <= (await send("GET", url)).status_code < 500
        for url, parameters in (
            ("/v1/accounts/alice/entries", ("cursor", "limit")),
            ("/v1/accounts/alice/balance", ("as_of",)),
            ("/v1/payments", ("status", "account_id", "cursor", "limit")),
            ("/v1/events", ("after_seq", "limit")),
            ("/v1/risk/alerts", ("account_id", "rule", "cursor", "limit")),
            ("/v1/discrepancies", ("status", "run_id", "cursor", "limit")),
        ):
            for parameter in parameters:
                response = await send("GET", url, params={parameter: value})
                assert response.status_code < 500
                if response.status_code == 200 and parameter == "account_id":
                    # A filter that matches no account: an empty page, never every row.
                    assert response.json()["payments"] == []
        # Reconciliation's bodies.
        assert (await send("POST", "/v1/reconciliations", json={"full": value})).status_code == 422
        for body in (
            {"resolution": value, "note": "x"},
            {"resolution": "accepted", "note": value},
        ):
            resolve = await send("POST", f"/v1/discrepancies/{uuid.uuid4()}/resolve", json=body)
            assert 400 <= resolve.status_code < 500
        assert (
            400
            <= (await send("POST", f"/v1/discrepancies/{quoted}/resolve", json=body)).status_code
            < 500
        )

    assert not [(request, status) for request, status in answers if status >= 500]
    # What was accepted was stored, and reads back, exactly as sent.
    for payment_id, (value, metadata, reference) in created_payments.items():
        await wait_for(functools.partial(_ended, funded, payment_id), what=payment_id)
        read = (await send("GET", f"/v1/payments/{payment_id}")).json()
        assert (read["reference"], read["metadata"]) == (reference, metadata), value
        trail = (await send("GET", f"/v1/payments/{payment_id}/events")).json()["events"]
        initiated = trail[0]["payload"]
        assert (initiated.get("reference"), initiated.get("metadata") or {}) == (
            reference,
            metadata,
        )
    # The log is whole: every event it held is still there, unchanged, and it verifies.
    assert await _events_up_to(database, last_seq) == before["events"]
    for report in (await verify_chain(store.engine), await check_ledger(store.engine)):
        assert report.ok, report.lines()
    print(f"injection: {len(answers)} requests, {len(created_payments)} payments stored verbatim")


async def _ended(api: Api, payment_id: str) -> bool:
    return await _status(api, payment_id) in {
        "SETTLED",
        "DECLINED",
        "FAILED",
        "CANCELLED",
        "REJECTED",
    }


async def _last_seq(database: IsolatedDatabase) -> int:
    with owner_connection(database) as conn:
        row = conn.execute("SELECT coalesce(max(global_seq), 0) FROM events").fetchone()
    assert row is not None
    return int(row[0])


async def _events_up_to(database: IsolatedDatabase, last_seq: int) -> tuple[int, str]:
    """The events table's print (as `ledger_print` makes it) as of `last_seq`."""
    with owner_connection(database) as conn:
        row = conn.execute(
            "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') "
            "FROM events AS t WHERE global_seq <= %s",
            (last_seq,),
        ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


# --- schemathesis, stateful -----------------------------------------------------------------
# Bounds of the run: at most this many scenarios, each of at most this many calls, in
# suites of SUITE_SCENARIOS, and no suite started past the deadline.
STATEFUL_SCENARIOS = 160
STATEFUL_STEPS_MAX = 10
SUITE_SCENARIOS = 20
STATEFUL_DEADLINE_S = 35.0
STATEFUL_REQUEST_TIMEOUT_S = 45.0
# Seeded accounts: a funded payer and a merchant in each of two currencies.
SEEDED = {"alice": "EUR", "bob": "EUR", "hiro": "JPY", "shop-jp": "JPY"}
SEED_FUNDS_MINOR = 10**12
UPDATE_ACTIONS = ("cancel", "approve", "reject")
STEERED_CURRENCIES = ("EUR", "JPY", "USD")


@dataclass
class StatefulRun:
    """What the run has seen, and the footprint taken before each call."""

    url: str
    api_key: str
    conn: psycopg.Connection[tuple[Any, ...]]
    approval_threshold_minor: int
    accounts: dict[str, str] = field(default_factory=lambda: dict(SEEDED))
    announced_payments: set[str] = field(default_factory=set)
    accepted_updates: Counter[tuple[str, str]] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)
    rejected_checked: int = 0
    scenarios: int = 0
    suites_cut_short: int = 0
    # Every 5xx and every change made by a rejected request, even if hypothesis, failing
    # to replay it against a server whose state moved on, reports only "flaky".
    violations: list[str] = field(default_factory=list)
    before: dict[str, Footprint] = field(default_factory=dict)

    def footprint(self) -> Footprint:
        return footprint(self.conn, self.announced_payments)

    def counterparty(self, currency: str, not_this: str) -> str:
        """A known account in `currency` other than `not_this`, opened if there is none."""
        for account_id, held in self.accounts.items():
            if held == currency and account_id != not_this:
                return account_id
        account_id = f"counterparty-{currency.lower()}"
        opened = httpx.post(
            f"{self.url}/v1/accounts",
            json={"id": account_id, "currency": currency, "kind": "merchant"},
            headers={"Authorization": f"Bearer {self.api_key}", "Idempotency-Key": account_id},
            timeout=STATEFUL_REQUEST_TIMEOUT_S,
        )
        assert opened.status_code in (200, 201), opened.text
        self.accounts[account_id] = currency
        return account_id


def _roll(case: Any, sides: int, salt: str = "") -> int:
    """A die cast from the case's id: the same case, the same steering."""
    return int(hashlib.sha256(f"{salt}{case.id}".encode()).hexdigest(), 16) % sides


def _steered(case: Any) -> bool:
    """Three cases in four are steered towards requests that can succeed, so that the
    run goes deep (accounts opened, sagas run, actions on them); the fourth is sent as
    schemathesis generated it."""
    return _roll(case, 4) != 0


def _steer_account(case: Any) -> None:
    body = case.body
    if isinstance(body, dict) and _steered(case):
        if body.get("currency") not in STEERED_CURRENCIES:
            body["currency"] = STEERED_CURRENCIES[_roll(case, len(STEERED_CURRENCIES), "cur")]
        if body.get("kind") not in ("customer", "merchant", "settlement", "fees", "external"):
            body["kind"] = "customer"


def _steer_payment(run: StatefulRun, case: Any) -> None:
    """Payments between known accounts of one currency, so that sagas run (settle,
    decline, wait for approval). No `?wait=settled` on a payment that waits for an
    approval or for the simulator's timeout."""
    body = case.body
    if not isinstance(body, dict):
        return
    if _steered(case):
        payer = body.get("payer_account_id")
        if payer not in run.accounts:
            payer = "alice" if body.get("currency") != "JPY" else "hiro"
        currency = run.accounts[payer]
        payee = str(body.get("payee_account_id"))
        if run.accounts.get(payee) != currency or payee == payer:
            payee = run.counterparty(currency, payer)
        body.update(payer_account_id=payer, payee_account_id=payee, currency=currency)
        if _roll(case, 3, "approval") == 0:
            # One in three waits for an approval, for the actions on it to act on.
            body["amount_minor"] = run.approval_threshold_minor + _roll(case, 1000, "amount")
    amount = body.get("amount_minor")
    slow = not isinstance(amount, int) or amount >= run.approval_threshold_minor
    if slow or "simulate" in (body.get("metadata") or {}):
        case.query.pop("wait", None)


def _hostile_machine(base: type[Any], run: StatefulRun) -> type[Any]:
    """The schema's state machine, calling as a key with every scope, checking that no
    answer is a 5xx and that no rejected request changed anything."""

    def unchanged_after_rejection(ctx: Any, response: Any, case: Any) -> bool | None:
        before = run.before.pop(case.id, None)
        if before is None or not 400 <= response.status_code < 500:
            return None
        after = run.footprint()
        run.rejected_checked += 1
        if after != before:
            changed = {
                name: (getattr(before, name), getattr(after, name))
                for name in before.__dataclass_fields__
                if getattr(before, name) != getattr(after, name)
            }
            violation = (
                f"{case.operation.label} answered {response.status_code} and changed {changed}: "
                f"{case.as_curl_command()}"
            )
            run.violations.append(violation)
            raise AssertionError(violation)
        return None

    class HostileMachine(base):  # type: ignore[misc]
        def setup(self) -> None:
            run.scenarios += 1

        def before_call(self, case: Any) -> None:
            case.headers = case.headers or {}
            case.headers["Authorization"] = f"Bearer {run.api_key}"
            generated = [name for name in case.headers if name.lower() == "idempotency-key"]
            if not generated or _steered(case):
                for name in generated:
                    del case.headers[name]
                case.headers["Idempotency-Key"] = str(uuid.uuid4())
            if case.operation.label == "POST /v1/payments":
                _steer_payment(run, case)
            elif case.operation.label == "POST /v1/accounts":
                _steer_account(case)
            run.before[case.id] = run.footprint()

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"timeout": STATEFUL_REQUEST_TIMEOUT_S}

        def after_call(self, response: Any, case: Any) -> None:
            super().after_call(response, case)
            label = case.operation.label
            run.statuses[response.status_code] += 1
            run.operations[f"{label} {response.status_code // 100}xx"] += 1
            if response.status_code >= 500:
                run.violations.append(f"{response.status_code}: {case.as_curl_command()}")
            if not 200 <= response.status_code < 300:
                return
            try:
                body = response.json()
            except ValueError:  # the report is a page
                return
            if label == "POST /v1/payments":
                run.announced_payments.add(body["id"])
            elif label == "POST /v1/accounts":
                run.accounts[body["id"]] = body["currency"]
            elif label.startswith("POST /v1/payments/{payment_id}/"):
                action = label.rsplit("/", 1)[1]
                run.accepted_updates[(case.path_parameters["payment_id"], action)] += 1

        def validate_response(
            self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            case.validate_response(
                response,
                checks=[
                    not_a_server_error,
                    response_schema_conformance,
                    ensure_resource_availability,
                    unchanged_after_rejection,
                ],
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )

    return HostileMachine


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    with api_and_worker(settings) as running:
        yield running


async def test_a_stateful_run_gets_no_5xx_and_no_rejected_request_changes_anything(
    services: Services,
    store: EventStore,
    owner_engine: AsyncEngine,
    settings: Settings,
    database: IsolatedDatabase,
    temporal_client: Client,
) -> None:
    """Schemathesis follows the API's OpenAPI links (a created account into a payment, a
    payment into its status, cancel, approve and reject, a run into its report) as a key
    with every scope. After every 4xx, what a request can change reads the same as
    before it; at the end, every cancel, approve or reject the workflows accepted is one
    the API answered 202: no refused one took effect later."""
    _, treasury = await create_api_key(
        owner_engine,
        settings.api_key_secret.get_secret_value(),
        name="stateful",
        scopes=frozenset(CALLERS["treasury"]),
    )
    for account_id, currency in SEEDED.items():
        kind = "merchant" if account_id in ("bob", "shop-jp") else "customer"
        await open_account(store, account_id, currency=currency, kind=kind)
    await fund(store, "alice", SEED_FUNDS_MINOR)
    await fund(store, "hiro", SEED_FUNDS_MINOR, currency="JPY")

    schema = schemathesis.openapi.from_url(f"{services.url}/openapi.json")
    with owner_connection(database) as conn:
        run = StatefulRun(services.url, treasury, conn, settings.approval_threshold_minor)
        machine = _hostile_machine(schema.as_state_machine(), run)
        started = time.monotonic()
        await asyncio.to_thread(_run_suites, machine, run, started + STATEFUL_DEADLINE_S)
        elapsed_s = time.monotonic() - started
    print(
        f"stateful: {run.scenarios} scenarios, {sum(run.statuses.values())} calls in "
        f"{elapsed_s:.1f} s ({run.suites_cut_short} suites cut short by a server that moved "
        f"on), statuses {dict(sorted(run.statuses.items()))}, {run.rejected_checked} "
        f"rejections checked, {len(run.announced_payments)} payments, "
        f"{sum(run.accepted_updates.values())} updates accepted"
    )
    for operation, count in sorted(run.operations.items()):
        print(f"  {operation}: {count}")
    assert not run.violations, "\n".join(run.violations)
    # The run went deep: payments were made, and actions on them were tried.
    assert len(run.announced_payments) >= 5, run.operations
    assert run.rejected_checked >= 20, run.operations
    assert any(label.startswith("POST /v1/payments/{payment_id}/") for label in run.operations)

    # No refused cancel, approve or reject reached a workflow.
    for payment_id in run.announced_payments:
        accepted = await _updates_by_name(temporal_client, payment_id)
        for action in UPDATE_ACTIONS:
            assert accepted[action] == run.accepted_updates[(payment_id, action)], (
                payment_id,
                action,
                accepted,
            )


def _run_suites(machine: type[Any], run: StatefulRun, deadline: float) -> None:
    """Suites of scenarios, each with its own seed, until the budget or the deadline.

    The server's state carries over from one scenario to the next (an id taken, a
    payment settled), so hypothesis may find that a scenario it replays no longer draws
    what it drew; as schemathesis's own runner does, that ends the suite and the next
    one goes on. Violations are recorded as they happen, so none is lost that way.
    """
    suite = 0
    while run.scenarios < STATEFUL_SCENARIOS and time.monotonic() < deadline:
        try:
            hypothesis.seed(suite)(machine).run(
                settings=hypothesis.settings(
                    max_examples=min(SUITE_SCENARIOS, STATEFUL_SCENARIOS - run.scenarios),
                    stateful_step_count=STATEFUL_STEPS_MAX,
                    deadline=None,
                    database=None,
                    phases=[hypothesis.Phase.generate],
                    suppress_health_check=list(hypothesis.HealthCheck),
                )
            )
        except hypothesis.errors.Flaky:
            run.suites_cut_short += 1
        suite += 1


async def _updates_by_name(client: Client, payment_id: str) -> Counter[str]:
    history = await client.get_workflow_handle(workflow_id_for(payment_id)).fetch_history()
    return Counter(
        event.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    )
