"""The operations console at /console, in process over httpx against a real PostgreSQL,
a real Temporal and a worker with every activity: who may log in and how the session is
kept, CSRF on every form, each page with real data, hostile text, and an approval and a
resolution taking the API's own path into the ledger."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from api.app import create_app
from api.console.sessions import SESSION_COOKIE, token_hash
from api.console.web import TemporalLinks, printable
from api.keys import create_api_key, revoke_api_key
from ledger.events import payment_stream
from ledger.store import EventStore, RecordedEvent
from paysaga.reconciliation import start_run
from paysaga.settings import Settings
from tests.harness.api import Api, make_keys, serve
from tests.harness.ledger import as_owner, seal_until_everything_is_sealed
from tests.harness.postgres import IsolatedDatabase
from tests.harness.read_side import project
from tests.harness.saga import Payments, wait_for
from worker import build_worker, worker_activities

TEMPORAL_UI = "http://temporal-ui.test:8233"
# Payments of 50.00 EUR or more wait for an operator.
APPROVAL_THRESHOLD_MINOR = 5_000
_CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')
_NONCE = re.compile(r'name="nonce" value="([A-Za-z0-9_-]{43})"')


@dataclass
class Console:
    app: FastAPI
    api: Api
    store: EventStore
    payments: Payments
    database: IsolatedDatabase
    owner_engine: AsyncEngine
    settings: Settings

    def browser(self, base_url: str = "http://paysaga") -> httpx.AsyncClient:
        """A browser of its own: its own cookie jar."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=base_url)

    async def login(self, browser: httpx.AsyncClient, caller: str = "ops") -> httpx.Response:
        return await login(browser, self.api.keys[caller])

    @asynccontextmanager
    async def logged_in(self, caller: str = "ops") -> AsyncIterator[httpx.AsyncClient]:
        async with self.browser() as browser:
            response = await self.login(browser, caller)
            assert response.status_code == 303, response.text
            yield browser

    async def event_types(self, payment_id: str) -> list[str]:
        return [e.event_type for e in await self.store.read_stream(payment_stream(payment_id))]

    async def status(self, payment_id: str) -> str:
        response = await self.api.get(f"/v1/payments/{payment_id}", caller="treasury")
        return str(response.json()["status"])

    async def waiting_payment(self, amount_minor: int = 7_500, **fields: object) -> str:
        """A payment of alice's to bob, submitted through the API, that waits for an
        operator (in the read model too)."""
        body = {
            "payer_account_id": "alice",
            "payee_account_id": "bob",
            "amount_minor": amount_minor,
            "currency": "EUR",
            **fields,
        }
        response = await self.api.post("/v1/payments", body)
        assert response.status_code == 202, response.text
        payment_id = str(response.json()["id"])

        async def waiting() -> bool:
            return "ApprovalRequested" in await self.event_types(payment_id)

        await wait_for(waiting, what="the approval request")
        await project(self.store, self.database)
        return payment_id


async def login(browser: httpx.AsyncClient, key: str, **headers: str) -> httpx.Response:
    """Log in as a person does: open the form, then post the key with the form's nonce."""
    form = await browser.get("/console/login")
    nonce = _NONCE.search(form.text)
    assert nonce, form.text
    return await browser.post(
        "/console/login", data={"api_key": key, "nonce": nonce.group(1)}, headers=headers
    )


def csrf_of(page: httpx.Response) -> str:
    found = _CSRF.search(page.text)
    assert found, page.text
    return found.group(1)


@pytest.fixture
async def console(
    temporal_client: Client,
    bank: EventStore,
    settings: Settings,
    task_queue: str,
    owner_engine: AsyncEngine,
    database: IsolatedDatabase,
) -> AsyncIterator[Console]:
    """The app with the console, a worker with every activity, alice (5,000.00 EUR) and
    bob, and a key for each kind of caller."""
    settings = settings.model_copy(
        update={
            "recon_settlement_window_s": 0,
            "temporal_ui": TEMPORAL_UI,
            "approval_threshold_minor": APPROVAL_THRESHOLD_MINOR,
        }
    )
    activities = worker_activities(bank, temporal_client, settings)
    async with build_worker(
        temporal_client, settings, task_queue=task_queue, activities=activities
    ):
        keys = await make_keys(owner_engine, settings.api_key_secret.get_secret_value())
        app = create_app(settings, store=bank, temporal_client=temporal_client)
        async with serve(app) as http:
            yield Console(
                app,
                Api(http, keys),
                bank,
                Payments(temporal_client, bank, task_queue),
                database,
                owner_engine,
                settings,
            )


async def _sessions(console: Console) -> list[tuple[str, bool]]:
    async with console.owner_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT key_id, ended_at IS NULL AS live FROM console_sessions")
        )
        return [(row.key_id, row.live) for row in rows]


# --- login, cookie, logout, revocation ------------------------------------------------------
async def test_a_wrong_key_or_a_key_without_ops_is_refused_and_gets_no_session(
    console: Console,
) -> None:
    async with console.browser() as browser:
        wrong = await login(browser, "psk_000000000000_" + "x" * 43)
        assert wrong.status_code == 401
        assert "unknown or revoked" in wrong.text
        no_ops = await login(browser, console.api.keys["client"])
        assert no_ops.status_code == 403
        assert "lacks the ops scope" in no_ops.text
        garbage = await login(browser, "<script>" + "x" * 5000)
        assert garbage.status_code == 401
        assert SESSION_COOKIE not in browser.cookies
        # Without a session, every page leads to the login form, and nothing is shown.
        page = await browser.get("/console/approvals")
        assert page.status_code == 303
        assert page.headers["location"] == "/console/login"
    assert await _sessions(console) == []


async def test_a_login_keeps_an_httponly_strict_cookie_for_console_paths_only(
    console: Console,
) -> None:
    async with console.browser() as browser:
        response = await console.login(browser)
        assert response.status_code == 303
        assert response.headers["location"] == "/console/"
        cookie = next(
            c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)
        )
        flags = {part.strip().lower() for part in cookie.split(";")}
        assert {"httponly", "samesite=strict", "path=/console"} <= flags
        assert "secure" not in flags  # plain HTTP on a developer's machine
        # The key is nowhere in the cookie, the redirect or the page.
        key = console.api.keys["ops"]
        assert key not in cookie and key not in response.headers["location"]
        home = await browser.get("/console/")
        assert home.status_code == 200 and key not in home.text
        assert "payments waiting for approval" in home.text
    # Only the token's hash is stored.
    token = cookie.split(";")[0].split("=", 1)[1]
    async with console.owner_engine.connect() as conn:
        stored = (await conn.execute(text("SELECT token_hash FROM console_sessions"))).scalar_one()
    assert bytes(stored) == token_hash(token) and token.encode() not in bytes(stored)

    # Behind TLS the cookie is Secure too.
    async with console.browser("https://paysaga") as tls:
        secure = await console.login(tls)
        cookie = next(c for c in secure.headers.get_list("set-cookie") if SESSION_COOKIE in c)
        assert "secure" in {part.strip().lower() for part in cookie.split(";")}


async def test_keys_never_travel_in_urls_and_get_changes_nothing(console: Console) -> None:
    async with console.browser() as browser:
        page = await browser.get("/console/login", params={"api_key": console.api.keys["ops"]})
        assert page.status_code == 200
        assert console.api.keys["ops"] not in page.text
        assert SESSION_COOKIE not in browser.cookies
        approve = await browser.get("/console/payments/pay-000000000000/approve")
        assert approve.status_code == 404  # no GET changes anything
    assert await _sessions(console) == []


async def test_the_login_form_refuses_a_post_without_its_nonce_or_from_another_site(
    console: Console,
) -> None:
    key = console.api.keys["ops"]
    async with console.browser() as browser:
        forged = await browser.post("/console/login", data={"api_key": key, "nonce": "x" * 43})
        assert forged.status_code == 403
        cross_site = await login(browser, key, origin="https://evil.example")
        assert cross_site.status_code == 403
        assert SESSION_COOKIE not in browser.cookies
    assert await _sessions(console) == []


async def test_logout_ends_the_session_on_the_server(console: Console) -> None:
    async with console.logged_in() as browser:
        home = await browser.get("/console/")
        cookie = browser.cookies[SESSION_COOKIE]
        refused = await browser.post("/console/logout", data={"csrf": "0" * 64})
        assert refused.status_code == 403
        assert (await browser.get("/console/")).status_code == 200  # still logged in
        out = await browser.post("/console/logout", data={"csrf": csrf_of(home)})
        assert out.status_code == 303
        assert out.headers["location"] == "/console/login?done=logged_out"
    # The old cookie, replayed, no longer opens anything.
    async with console.browser() as replay:
        replay.cookies.set(SESSION_COOKIE, cookie, path="/console")
        again = await replay.get("/console/")
        assert again.status_code == 303
    assert await _sessions(console) == [(_key_id(console.api.keys["ops"]), False)]


def _key_id(key: str) -> str:
    return key.split("_")[1]


async def test_revoking_the_key_ends_its_console_session_at_once(console: Console) -> None:
    key_id, key = await create_api_key(
        console.owner_engine,
        console.settings.api_key_secret.get_secret_value(),
        name="night shift",
        scopes=frozenset({"ops"}),
    )
    async with console.browser() as browser:
        assert (await login(browser, key)).status_code == 303
        assert (await browser.get("/console/accounts")).status_code == 200
        await revoke_api_key(console.owner_engine, key_id)
        assert (await browser.get("/console/accounts")).status_code == 303
        assert (await login(browser, key)).status_code == 401


async def test_a_session_ends_when_idle_too_long_or_at_its_absolute_bound(
    console: Console,
) -> None:
    for column, moved in (
        (
            "last_seen_at",
            f"clock_timestamp() - interval '{console.settings.console_session_idle_s + 1} seconds'",
        ),
        ("expires_at", "created_at + interval '1 microsecond'"),
    ):
        async with console.logged_in() as browser:
            assert (await browser.get("/console/")).status_code == 200
            token = browser.cookies[SESSION_COOKIE]
            async with console.owner_engine.begin() as conn:
                await conn.execute(
                    text(f"UPDATE console_sessions SET {column} = {moved} WHERE token_hash = :h"),
                    {"h": token_hash(token)},
                )
            assert (await browser.get("/console/")).status_code == 303, column


# --- CSRF -----------------------------------------------------------------------------------
async def test_every_form_refuses_a_missing_or_wrong_csrf_token_and_changes_nothing(
    console: Console,
) -> None:
    payment_id = await console.waiting_payment()
    async with console.logged_in() as browser:
        page = await browser.get("/console/approvals")
        csrf = csrf_of(page)
        attempts = [
            ("/console/payments/{p}/approve", {}, {}),
            ("/console/payments/{p}/approve", {"csrf": "0" * 64}, {}),
            ("/console/payments/{p}/approve", {"csrf": csrf}, {"origin": "https://evil.example"}),
            ("/console/payments/{p}/approve", {"csrf": csrf}, {"sec-fetch-site": "cross-site"}),
            ("/console/payments/{p}/reject", {"reason": "no invoice"}, {}),
            ("/console/payments/{p}/reject", {"reason": "x", "csrf": _one_digit_off(csrf)}, {}),
            (f"/console/discrepancies/{uuid.uuid4()}/resolve", {"resolution": "accepted"}, {}),
            ("/console/logout", {}, {}),
        ]
        for path, form, headers in attempts:
            response = await browser.post(path.format(p=payment_id), data=form, headers=headers)
            assert response.status_code == 403, (path, form, headers, response.text)
        # Another person's session token does not pass either.
        async with console.logged_in() as other:
            theirs = csrf_of(await other.get("/console/approvals"))
            assert theirs != csrf
            stolen = await browser.post(
                f"/console/payments/{payment_id}/approve", data={"csrf": theirs}
            )
            assert stolen.status_code == 403
        # And no session at all is refused before anything else.
        async with console.browser() as anonymous:
            nobody = await anonymous.post(
                f"/console/payments/{payment_id}/approve", data={"csrf": csrf}
            )
            assert nobody.status_code == 403
    assert await console.status(payment_id) == "PENDING_APPROVAL"
    assert "PaymentApproved" not in await console.event_types(payment_id)
    assert "PaymentRejected" not in await console.event_types(payment_id)


def _one_digit_off(token: str) -> str:
    return token[:-1] + ("1" if token[-1] == "0" else "0")


# --- the pages, with real data --------------------------------------------------------------
async def test_an_approval_and_a_rejection_from_the_console_reach_the_ledger_as_the_key(
    console: Console,
) -> None:
    approve_me = await console.waiting_payment(7_500)
    reject_me = await console.waiting_payment(8_000)
    async with console.logged_in() as browser:
        page = await browser.get("/console/approvals")
        assert page.status_code == 200
        assert approve_me in page.text and reject_me in page.text
        assert "75.00 EUR" in page.text and "80.00 EUR" in page.text
        assert f'{TEMPORAL_UI}/namespaces/default/workflows/payment-{approve_me}"' in page.text
        csrf = csrf_of(page)

        no_reason = await browser.post(
            f"/console/payments/{reject_me}/reject", data={"csrf": csrf, "reason": ""}
        )
        assert no_reason.status_code == 422
        approved = await browser.post(
            f"/console/payments/{approve_me}/approve", data={"csrf": csrf, "note": "checked"}
        )
        assert approved.status_code == 303, approved.text
        assert approved.headers["location"].startswith("/console/approvals?done=approved")
        rejected = await browser.post(
            f"/console/payments/{reject_me}/reject", data={"csrf": csrf, "reason": "no invoice"}
        )
        assert rejected.status_code == 303, rejected.text

        async def ended() -> bool:
            return (await console.status(approve_me), await console.status(reject_me)) == (
                "SETTLED",
                "REJECTED",
            )

        await wait_for(ended, what="settlement and rejection")
        # Approving again is the API's own 409, as a page.
        twice = await browser.post(f"/console/payments/{approve_me}/approve", data={"csrf": csrf})
        assert twice.status_code == 409
        assert "approve refused" in twice.text.lower()

    ops_actor = f"api-key:{_key_id(console.api.keys['ops'])}"
    approval = await _event(console, approve_me, "PaymentApproved")
    assert (approval.payload["approved_by"], approval.payload["note"]) == (ops_actor, "checked")
    rejection = await _event(console, reject_me, "PaymentRejected")
    assert rejection.payload["reason"] == "no invoice"
    assert rejection.payload["rejected_by"] == ops_actor


async def _event(console: Console, payment_id: str, event_type: str) -> RecordedEvent:
    events = await console.store.read_stream(payment_stream(payment_id))
    return next(e for e in events if e.event_type == event_type)


async def test_accounts_statements_and_a_payments_audit_trail_render_verified(
    console: Console,
) -> None:
    payment_id = await console.waiting_payment(6_000, reference="INV-2026-11")
    approved = await console.api.post(
        f"/v1/payments/{payment_id}/approve", caller="ops", idempotency_key=None
    )
    assert approved.status_code == 202

    async def settled() -> bool:
        return await console.status(payment_id) == "SETTLED"

    await wait_for(settled, what="settlement")
    await project(console.store, console.database)
    await seal_until_everything_is_sealed(console.store)
    async with console.logged_in() as browser:
        accounts = await browser.get("/console/accounts")
        assert accounts.status_code == 200
        # alice: 5,000.00 funded, 60.00 paid to bob.
        assert "4940.00 EUR" in accounts.text and "60.00 EUR" in accounts.text
        assert "unlimited" in accounts.text  # the external funding account

        statement = await browser.get("/console/accounts/alice")
        assert statement.status_code == 200
        assert "PaymentSettled" in statement.text and "FundsReserved" in statement.text
        assert "5000.00 EUR" in statement.text and "4940.00 EUR" in statement.text
        assert payment_id in statement.text
        paged = await browser.get("/console/accounts/alice", params={"cursor": "not-a-cursor"})
        assert paged.status_code == 400
        unknown = await browser.get("/console/accounts/nobody")
        assert unknown.status_code == 404

        audit = await browser.get(f"/console/payments/{payment_id}")
        assert audit.status_code == 200
        assert "every hash verifies" in audit.text
        types = ["PaymentInitiated", "ApprovalRequested", "PaymentApproved", "PaymentSettled"]
        assert all(t in audit.text for t in types)
        assert audit.text.count("✓ hash and link") == len(await console.event_types(payment_id))
        assert "Every event of this payment is sealed." in audit.text
        assert "✓ recomputed" in audit.text and "✓ chained" in audit.text
        assert f"/workflows/payment-{payment_id}/" in audit.text  # the run's history

        listed = await browser.get("/console/payments", params={"status": "SETTLED"})
        assert listed.status_code == 200 and payment_id in listed.text
        found = await browser.get("/console/payments", params={"id": payment_id})
        assert found.headers["location"] == f"/console/payments/{payment_id}"
        assert (
            await browser.get("/console/payments", params={"status": "NOPE"})
        ).status_code == 400
        assert (await browser.get("/console/payments/pay-nothing0000")).status_code == 404


async def test_the_accounts_list_pages_by_id_with_each_position_as_the_ledger_holds_it(
    console: Console,
) -> None:
    first = await console.store.list_accounts(after_id=None, limit=2)
    rest = await console.store.list_accounts(after_id=first[-1].account_id, limit=500)
    listed = [a.account_id for a in first + rest]
    assert listed == sorted(listed) == ["alice", "bob", "fees", "world-eur"]
    for account in first + rest:
        assert account == await console.store.get_account(account.account_id)
    with pytest.raises(ValueError, match="limit"):
        await console.store.list_accounts(after_id=None, limit=501)
    async with console.logged_in() as browser:
        bad = await browser.get("/console/accounts", params={"after": "<script>"})
        assert bad.status_code == 400


async def test_a_tampered_event_is_marked_on_its_audit_trail(console: Console) -> None:
    payment_id = await console.waiting_payment(5_500)
    await seal_until_everything_is_sealed(console.store)
    events = await console.store.read_stream(payment_stream(payment_id))
    as_owner(
        console.database,
        (
            "UPDATE events SET payload = jsonb_set(payload, '{amount_minor}', '1') "
            "WHERE global_seq = %s",
            (events[0].global_seq,),
        ),
    )
    async with console.logged_in() as browser:
        audit = await browser.get(f"/console/payments/{payment_id}")
    assert audit.status_code == 200
    assert "verification failed" in audit.text
    assert "it was changed" in audit.text
    assert audit.text.count("✓ hash and link") == len(events) - 1
    # Repair what the bank fixture checks at the end: put the payload back.
    as_owner(
        console.database,
        (
            "UPDATE events SET payload = %s::jsonb WHERE global_seq = %s",
            (_json(events[0].payload), events[0].global_seq),
        ),
    )


def _json(value: object) -> str:
    import json

    return json.dumps(value)


async def test_runs_and_open_discrepancies_show_and_resolve_through_the_workflow(
    console: Console,
) -> None:
    day = datetime.now(UTC).date()
    statement = _processor_csv([(day, "ghost-payment", 777, "EUR")])
    uploaded = await console.api.http.post(
        "/v1/statements",
        files={"file": ("ghost.csv", statement, "text/csv")},
        headers=console.api.headers("ops"),
    )
    assert uploaded.status_code == 201, uploaded.text
    handle = await start_run(console.payments.client, console.settings, kind="manual")
    report = await handle.result()
    assert report.discrepancies >= 1

    async with console.logged_in() as browser:
        page = await browser.get("/console/reconciliation")
        assert page.status_code == 200
        assert "ghost-payment" in page.text and "7.77 EUR" in page.text
        run_id = handle.id.removeprefix("recon-run-")
        assert run_id in page.text
        assert f"{TEMPORAL_UI}/namespaces/default/workflows/{handle.id}" in page.text
        ids = re.findall(r'data-discrepancy-id="([0-9a-f-]{36})"', page.text)
        assert ids
        assert f"/workflows/discrepancy-{ids[0]}" in page.text

        run = await browser.get(f"/console/reconciliation/runs/{run_id}")
        assert run.status_code == 200 and "ghost-payment" in run.text
        chart = await browser.get(f"/console/reconciliation/runs/{run_id}/report")
        assert chart.status_code == 200 and "data:image/png;base64," in chart.text
        assert "script-src" not in chart.headers["content-security-policy"]
        assert "default-src 'none'" in chart.headers["content-security-policy"]

        csrf = csrf_of(page)
        no_note = await browser.post(
            f"/console/discrepancies/{ids[0]}/resolve",
            data={"csrf": csrf, "resolution": "written_off", "note": ""},
        )
        assert no_note.status_code == 422
        not_ours = await browser.post(
            f"/console/discrepancies/{ids[0]}/resolve",
            data={"csrf": csrf, "resolution": "posted_capture", "note": "x"},
        )
        assert not_ours.status_code == 422
        nul = await browser.post(
            f"/console/discrepancies/{ids[0]}/resolve",
            data={"csrf": csrf, "resolution": "written_off", "note": "a\x00b"},
        )
        assert nul.status_code == 422 and "U+0000" in nul.text
        # The JSON API refuses it too (it used to hang: the workflow's append failed).
        api_nul = await console.api.post(
            f"/v1/discrepancies/{ids[0]}/resolve",
            {"resolution": "written_off", "note": "a\x00b"},
            caller="ops",
            idempotency_key=None,
        )
        assert api_nul.status_code == 422, api_nul.text
        resolved = await browser.post(
            f"/console/discrepancies/{ids[0]}/resolve",
            data={"csrf": csrf, "resolution": "written_off", "note": "a test line"},
        )
        assert resolved.status_code == 303, resolved.text
        again = await browser.post(
            f"/console/discrepancies/{ids[0]}/resolve",
            data={"csrf": csrf, "resolution": "written_off", "note": "again"},
        )
        assert again.status_code == 409
        after = await browser.get("/console/reconciliation")
        assert ids[0] not in after.text

    listed = await console.api.get("/v1/discrepancies", caller="ops", params={"status": "resolved"})
    resolved_row = next(d for d in listed.json()["discrepancies"] if d["id"] == ids[0])
    assert resolved_row["resolution"] == "written_off"
    assert resolved_row["resolved_by"] == f"api-key:{_key_id(console.api.keys['ops'])}"


def _processor_csv(lines: list[tuple[date, str, int, str]]) -> bytes:
    rows = ["date,reference,amount,currency,type"]
    rows += [
        f"{d.isoformat()},{ref},{amount / 100:.2f},{cur},capture" for d, ref, amount, cur in lines
    ]
    return ("\n".join(rows) + "\n").encode()


# --- hostile text and headers ---------------------------------------------------------------
async def test_hostile_references_and_metadata_render_as_text(console: Console) -> None:
    hostile = '<script>alert("x")</script>\x01\x7f'
    payment_id = await console.waiting_payment(
        5_100,
        reference=hostile,
        metadata={"note": hostile, "huge": "A" * 3_500, "<img src=x>": "onerror"},
    )
    async with console.logged_in() as browser:
        for path in ("/console/approvals", f"/console/payments/{payment_id}", "/console/payments"):
            page = await browser.get(path)
            assert page.status_code == 200, path
            assert "<script>alert" not in page.text and "<img src=x>" not in page.text
            assert "\x01" not in page.text and "\x7f" not in page.text
        detail = await browser.get(f"/console/payments/{payment_id}")
        assert "&lt;script&gt;alert" in detail.text
        assert "\\x01" in detail.text
        assert "more characters)" in detail.text  # the 3,500 As are cut
        assert len(detail.text) < 40_000
        for path in (
            "/console/accounts/%00%3Cscript%3Ealert(1)",
            "/console/accounts/%00%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        ):
            nasty = await browser.get(path)
            assert nasty.status_code == 404, path
            assert nasty.headers["content-type"].startswith("text/html"), path
            assert "<script>" not in nasty.text and "\x00" not in nasty.text
            assert "\\x00&lt;script&gt;" in nasty.text


async def test_console_pages_carry_the_security_headers(console: Console) -> None:
    async with console.logged_in() as browser:
        for path in ("/console/login", "/console/", "/console/accounts", "/console/nothing-here"):
            response = await browser.get(path)
            headers = response.headers
            assert "default-src 'self'" in headers["content-security-policy"], path
            assert "script-src 'none'" in headers["content-security-policy"], path
            assert "frame-ancestors 'none'" in headers["content-security-policy"], path
            assert headers["x-frame-options"] == "DENY", path
            assert headers["cache-control"] == "no-store", path
            assert headers["x-content-type-options"] == "nosniff", path
        css = await browser.get("/console/static/console.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    # The JSON API is untouched by them.
    assert "content-security-policy" not in (await console.api.get("/healthz")).headers


def test_temporal_links_take_the_ui_forms_and_escape_ids() -> None:
    links = TemporalLinks("http://127.0.0.1:8233/", "default")
    assert links.workflow("payment-pay-1") == (
        "http://127.0.0.1:8233/namespaces/default/workflows/payment-pay-1"
    )
    assert links.workflow("payment-pay-1", "0f1e-run") == (
        "http://127.0.0.1:8233/namespaces/default/workflows/payment-pay-1/0f1e-run/history"
    )
    assert links.workflow("a/b?c") == "http://127.0.0.1:8233/namespaces/default/workflows/a%2Fb%3Fc"
    assert links.workflows('PaymentStatus="PENDING_APPROVAL"') == (
        "http://127.0.0.1:8233/namespaces/default/workflows"
        "?query=PaymentStatus%3D%22PENDING_APPROVAL%22"
    )
    assert TemporalLinks(None, "default").workflow("x") is None


def test_printable_spells_out_control_characters_and_bounds_length() -> None:
    assert printable("a\x00b\x1bc") == "a\\x00b\\x1bc"
    assert printable("x" * 10, 4) == "xxxx… (6 more characters)"
    assert printable("tab\tand\nnewline") == "tab\tand\nnewline"
