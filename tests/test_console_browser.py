"""The operations console in a real browser: headless Chromium (Debian's, never a
downloaded one) driven by Playwright against real `paysaga api`, `worker`, `projector`
and `sealer` processes. An operator logs in through the form, opens the approvals page,
clicks Approve on a payment waiting for approval, and the payment settles.

Screenshots go to artifacts/screenshots/ (git-ignored). With
PAYSAGA_UPDATE_DOC_IMAGES=1 the test also rewrites the README's docs/images/console-*.png.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from api.keys import create_api_key
from ledger.events import payment_stream
from ledger.store import EventStore
from paysaga.settings import Settings
from tests.harness.ledger import fund, open_account, seal_until_everything_is_sealed
from tests.harness.processes import Services, api_and_worker, stop

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
DOC_IMAGES = ROOT / "docs" / "images"
TEMPORAL_UI = "http://127.0.0.1:8233"
# Payments of 50.00 EUR or more wait for an operator.
APPROVAL_THRESHOLD_MINOR = 5_000
SETTLE_TIMEOUT_S = 30.0
PAGE_TIMEOUT_MS = 15_000

pytestmark = pytest.mark.slow


def _chromium_or_skip() -> None:
    if not CHROMIUM.exists():
        pytest.skip("needs Chromium: apt-get install chromium")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        pytest.skip(
            "needs Playwright's Python package: pip install -e '.[dev]' (never playwright install)"
        )


@dataclass
class Stack:
    services: Services
    store: EventStore
    keys: dict[str, str]

    @property
    def url(self) -> str:
        return self.services.url

    def call(self, method: str, path: str, caller: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[caller]}", **kwargs.pop("headers", {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=35, **kwargs)

    def pay(self, amount_minor: int, reference: str, *, wait: bool = False) -> str:
        response = self.call(
            "POST",
            "/v1/payments",
            "client",
            json={
                "payer_account_id": "alice",
                "payee_account_id": "coffee-shop",
                "amount_minor": amount_minor,
                "currency": "EUR",
                "reference": reference,
            },
            headers={"Idempotency-Key": str(uuid.uuid4())},
            params={"wait": "settled"} if wait else None,
        )
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def status(self, payment_id: str) -> str:
        return str(self.call("GET", f"/v1/payments/{payment_id}", "client").json()["status"])

    def wait_until(self, check: Any, what: str, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(0.2)


@contextmanager
def read_side(services: Services) -> Iterator[None]:
    """`paysaga projector` and `paysaga sealer`, as `paysaga up` runs them."""
    processes = [
        subprocess.Popen([sys.executable, "-m", "paysaga", name], env=services.env)
        for name in ("projector", "sealer")
    ]
    try:
        yield
    finally:
        for process in processes:
            stop(process)


@pytest.fixture
async def stack(
    settings: Settings, store: EventStore, owner_engine: AsyncEngine
) -> AsyncIterator[Stack]:
    _chromium_or_skip()
    secret = settings.api_key_secret.get_secret_value()
    keys = {}
    for name, scopes in (
        ("client", {"payments:write", "payments:read", "accounts:write", "accounts:read"}),
        ("operations desk", {"ops"}),
    ):
        _, keys[name] = await create_api_key(
            owner_engine, secret, name=name, scopes=frozenset(scopes)
        )
    with (
        api_and_worker(
            settings,
            PAYSAGA_APPROVAL_THRESHOLD_MINOR=str(APPROVAL_THRESHOLD_MINOR),
            PAYSAGA_TEMPORAL_UI=TEMPORAL_UI,
            PAYSAGA_PROJECTOR_POLL_S="0.2",
            PAYSAGA_SEAL_INTERVAL_S="0.5",
        ) as services,
        read_side(services),
    ):
        stack = Stack(services, store, keys)
        await open_account(store, "alice")
        await open_account(store, "coffee-shop", kind="merchant")
        await fund(store, "alice", 250_000)
        yield stack


async def _shot(page: Any, name: str, *, doc: bool = False) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"console-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    if doc and os.environ.get("PAYSAGA_UPDATE_DOC_IMAGES") == "1":
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOC_IMAGES / path.name)


async def test_an_operator_logs_in_and_approves_a_waiting_payment_which_then_settles(
    stack: Stack,
) -> None:
    from playwright.async_api import async_playwright, expect

    stack.pay(1_250, "flat white ×3", wait=True)
    waiting = stack.pay(7_500, "INV-1042 catering")
    other = stack.pay(12_000, "INV-1043 espresso machine service")

    def listed() -> bool:
        page = stack.call("GET", "/v1/payments", "client", params={"status": "PENDING_APPROVAL"})
        return {waiting, other} <= {p["id"] for p in page.json()["payments"]}

    stack.wait_until(listed, "both payments in the read model, waiting for approval")

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"]
        )
        try:
            context = await browser.new_context(viewport={"width": 1360, "height": 560})
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            page = await context.new_page()

            await page.goto(f"{stack.url}/console/approvals")
            await expect(page).to_have_url(f"{stack.url}/console/login")
            await page.fill("#api_key", stack.keys["operations desk"])
            await _shot(page, "login")
            await page.click("button[type=submit]")
            await expect(page).to_have_url(f"{stack.url}/console/")
            cookies = await context.cookies()
            session = next(c for c in cookies if c["name"] == "paysaga_console")
            assert session["httpOnly"] and session["sameSite"] == "Strict"
            assert session["path"] == "/console"
            await _shot(page, "home")

            await page.click("nav >> text=Approvals")
            row = page.locator(f'tr[data-payment-id="{waiting}"]')
            await expect(row).to_contain_text("75.00 EUR")
            await expect(page.locator(f'tr[data-payment-id="{other}"]')).to_contain_text(
                "120.00 EUR"
            )
            await row.locator("input[name=note]").fill("invoice checked")
            await _shot(page, "approvals", doc=True)
            await row.locator("button.approve").click()
            await expect(page.locator(".notice")).to_contain_text("Approved")
            await expect(page).to_have_url(
                f"{stack.url}/console/approvals?done=approved&payment={waiting}"
            )

            stack.wait_until(
                lambda: stack.status(waiting) == "SETTLED", "the approved payment to settle"
            )
            assert stack.status(other) == "PENDING_APPROVAL"
            events = await stack.store.read_stream(payment_stream(waiting))
            approval = next(e for e in events if e.event_type == "PaymentApproved")
            ops_key_id = stack.keys["operations desk"].split("_")[1]
            assert approval.payload["approved_by"] == f"api-key:{ops_key_id}"
            assert approval.payload["note"] == "invoice checked"

            await seal_until_everything_is_sealed(stack.store)
            await page.goto(f"{stack.url}/console/payments/{waiting}")
            await expect(page.locator("h1")).to_contain_text("SETTLED")
            await expect(page.locator(".verdict")).to_contain_text("every hash verifies")
            await expect(page.locator("table.audit tr.verified")).to_have_count(len(events))
            await _shot(page, "audit", doc=True)

            await page.click("text=alice")
            await expect(page.locator("h2").first).to_contain_text("Statement")
            await _shot(page, "statement")

            await page.click("text=Log out")
            await expect(page).to_have_url(f"{stack.url}/console/login?done=logged_out")
            await page.goto(f"{stack.url}/console/approvals")
            await expect(page).to_have_url(f"{stack.url}/console/login")
        finally:
            await browser.close()
