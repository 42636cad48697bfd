"""`paysaga demo` against a real `paysaga up`, and the Temporal UI checked in a real browser.

One stack for the module, and one short demo on it (`paysaga demo --small --json`). Then:

- the outcome mix, read back through the API: each kind of payment ended as it should,
  and the statement's lies are open discrepancies;
- the Temporal UI in headless Chromium (Playwright's Python package driving
  /usr/bin/chromium; no browser is ever downloaded): the list filtered by
  `PaymentStatus="PENDING_APPROVAL"` shows exactly the waiting payments, a payment's page
  shows its summary, search attributes, current details and history, the schedules page
  lists the reconciliation and sweeper schedules, and every link the demo printed opens;
- a second demo run on the same stack ends the same way; a demo against a stack that is
  down says so, without a traceback.

Screenshots go to `artifacts/screenshots/` (git-ignored). With PAYSAGA_README_SCREENSHOTS=1
the same views are also written to `docs/images/` for the README.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from paysaga.demo import (
    DemoError,
    plan_payments,
    ui_list_url,
    ui_schedules_url,
    ui_workflow_url,
)
from paysaga.embedded_pg import EmbeddedPostgres
from paysaga.settings import Settings
from paysaga.temporal import find_binary
from tests.harness.stack import RunningStack, clean_env, free_port, paysaga, private_stack

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "artifacts" / "screenshots"
README_IMAGES = REPO / "docs" / "images"
README_IMAGE_BYTES_MAX = 300 * 1024
# The demo's thresholds on a stack of its own (as `paysaga demo --up` sets them).
DEMO_STACK_ENV = {
    "PAYSAGA_APPROVAL_THRESHOLD_MINOR": "50000",
    "PAYSAGA_RISK_PAYMENT_LIMIT_MINOR": "500000",
}
DEMO_TIMEOUT_S = 120.0
# The UI is a single-page app over eventually consistent visibility: wait for what it
# shows, never for a fixed time.
UI_TIMEOUT_MS = 20_000
VISIBILITY_TIMEOUT_S = 30.0
VIEWPORT = {"width": 1800, "height": 1000}
# The workflow list's columns: the payment's search attributes beside its id (the UI
# keeps this choice in the browser's local storage).
LIST_COLUMNS = [
    "Status",
    "Workflow ID",
    "PaymentStatus",
    "PaymentAmountMinor",
    "PaymentCurrency",
    "PayerAccountId",
    "PayeeAccountId",
    "DiscrepancyType",
]
# PAYSAGA_README_SCREENSHOTS=1 also writes the views for the README, from the full demo
# (more rows to look at) rather than the short one.
README_SCREENSHOTS = os.environ.get("PAYSAGA_README_SCREENSHOTS") == "1"


# --- the stack and the demo --------------------------------------------------------------
@pytest.fixture(scope="module")
def stack() -> Iterator[RunningStack]:
    # As in test_stack.py: a directory PostgreSQL's OS user can pass through (as root).
    root = Path(tempfile.mkdtemp(prefix="paysaga-demo-"))
    root.chmod(0o711)
    running = RunningStack.new(root / "data", **DEMO_STACK_ENV)
    running.start()
    yield running
    if running.process is not None and running.process.poll() is None:
        running.stop()
    shutil.rmtree(EmbeddedPostgres(running.data_dir / "pg").socket_dir, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


def run_demo_cli(stack: RunningStack) -> dict[str, Any]:
    size = [] if README_SCREENSHOTS else ["--small"]
    result = paysaga("demo", *size, "--json", env=stack.env, timeout_s=DEMO_TIMEOUT_S)
    assert result.returncode == 0, f"{result.stderr}\n{result.stdout}\n{stack.read_output()}"
    outcome: dict[str, Any] = json.loads(result.stdout)
    return outcome


@pytest.fixture(scope="module")
def demo(stack: RunningStack) -> dict[str, Any]:
    return run_demo_cli(stack)


@pytest.fixture(scope="module")
def api(stack: RunningStack) -> Iterator[httpx.Client]:
    created = paysaga(
        "apikey",
        "create",
        "--name",
        "test-demo",
        "--scopes",
        "payments:read,accounts:read,ops",
        env=stack.env,
    )
    assert created.returncode == 0, created.stderr
    headers = {"Authorization": f"Bearer {created.stdout.strip()}"}
    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=10) as client:
        yield client


def payments_of(demo: dict[str, Any], category: str) -> list[dict[str, Any]]:
    return [p for p in demo["payments"] if p["category"] == category]


# --- the outcome mix -----------------------------------------------------------------------
def test_the_demo_ends_every_kind_of_payment_as_it_should(
    demo: dict[str, Any], api: httpx.Client
) -> None:
    assert demo["ok"], demo
    categories = {p["category"] for p in demo["payments"]}
    assert categories == {
        "settled",
        "flaky",
        "processor_declined",
        "risk_declined",
        "insufficient_funds",
        "pending_approval",
        "cancelled",
    }
    read = {
        p["payment_id"]: api.get(f"/v1/payments/{p['payment_id']}").json() for p in demo["payments"]
    }
    expected_reason = {
        "processor_declined": "do not honour",
        "risk_declined": "exceeds the per-payment limit",
        "insufficient_funds": "insufficient_funds",
        "cancelled": "cancelled the order",
    }
    for payment in demo["payments"]:
        state = read[payment["payment_id"]]
        assert state["status"] == payment["expected_status"], (payment, state)
        if payment["category"] in expected_reason:
            assert expected_reason[payment["category"]] in state["failure_reason"], state
    waiting = payments_of(demo, "pending_approval")[0]
    assert waiting["summary"] == "600.00 USD alice → coffee-shop"


def test_a_payment_that_hit_insufficient_funds_moved_no_money(
    demo: dict[str, Any], api: httpx.Client
) -> None:
    failed = payments_of(demo, "insufficient_funds")[0]
    payer = api.get(f"/v1/accounts/{failed['payer_account_id']}").json()["position"]
    # dave is topped up to 20.00 at the start of every run, and only ever tries to pay more.
    assert (payer["posted"], payer["pending"], payer["available"]) == (20_00, 0, 20_00)


def test_the_flaky_payment_settled_on_the_processors_third_attempt(
    demo: dict[str, Any], stack: RunningStack
) -> None:
    flaky = payments_of(demo, "flaky")[0]
    shown = temporal_cli_json(stack, "workflow", "show", "--workflow-id", flaky["workflow_id"])
    events = shown["events"]
    scheduled = {
        e["eventId"]: e["activityTaskScheduledEventAttributes"]["activityType"]["name"]
        for e in events
        if "activityTaskScheduledEventAttributes" in e
    }
    attempts = [
        e["activityTaskStartedEventAttributes"]["attempt"]
        for e in events
        if "activityTaskStartedEventAttributes" in e
        and scheduled[e["activityTaskStartedEventAttributes"]["scheduledEventId"]]
        == "processor.authorize"
    ]
    assert attempts == [3], attempts


def test_the_statements_lies_are_open_discrepancies(
    demo: dict[str, Any], api: httpx.Client
) -> None:
    assert demo["statement"]["file"].endswith(".csv")
    assert not list(Path(demo["statement"]["where"]).parent.glob(".*.part"))
    wanted = {(d["type"], d["subject"]) for d in demo["discrepancies"]}
    assert {t for t, _ in wanted} == {
        "amount_mismatch",
        "duplicate_in_statement",
        "currency_mismatch",
        "missing_in_ledger",
    }
    listed = api.get("/v1/discrepancies", params={"status": "open", "limit": 200}).json()
    open_now = {(d["type"], d["payment_id"] or d["reference"]) for d in listed["discrepancies"]}
    assert wanted <= open_now


# --- the Temporal UI, in a real browser ----------------------------------------------------
def _playwright_or_skip() -> Any:
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: install it with `apt-get install chromium`, and "
            "Playwright's Python package with pip install -e '.[dev]' (the browser tests "
            "never download a browser)"
        )
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("Playwright's Python package is missing: pip install -e '.[dev]'")
    from playwright.sync_api import sync_playwright

    return sync_playwright


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_playwright = _playwright_or_skip()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, demo: dict[str, Any]) -> Iterator[Any]:
    context = browser.new_context(viewport=VIEWPORT, locale="en-US", timezone_id="UTC")
    columns = {
        demo["namespace"]: [{"label": c, "pinned": i < 2} for i, c in enumerate(LIST_COLUMNS)]
    }
    context.add_init_script(
        "window.localStorage.setItem('namespace-workflow-table-columns', "
        f"{json.dumps(json.dumps(columns))});"
    )
    opened = context.new_page()
    opened.set_default_timeout(UI_TIMEOUT_MS)
    yield opened
    context.close()


def snap(page: Any, name: str) -> None:
    """A screenshot for the artifacts folder, and for the README when asked."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    if README_SCREENSHOTS:
        README_IMAGES.mkdir(parents=True, exist_ok=True)
        target = README_IMAGES / f"temporal-ui-{name}.png"
        page.screenshot(path=str(target))
        assert target.stat().st_size < README_IMAGE_BYTES_MAX, (target, target.stat().st_size)


def listed_rows(page: Any) -> list[str]:
    """The workflow id of each row the list shows (from the row's links to its run)."""
    rows: list[list[str]] = page.eval_on_selector_all(
        "table tbody tr",
        "rows => rows.map(r => Array.from(r.querySelectorAll(\"a[href*='/workflows/']\"))"
        ".map(a => a.getAttribute('href')))",
    )
    ids: list[str] = []
    for hrefs in rows:
        found = {
            m.group(1) for h in hrefs if (m := re.search(r"/workflows/([^/?]+)/[0-9a-f-]{36}", h))
        }
        assert len(found) <= 1, hrefs
        ids.extend(found)
    return ids


def rows_become(page: Any, url: str, wanted: set[str], *, exactly: bool = True) -> list[str]:
    """Open the list until its rows are `wanted` (or include them, if not `exactly`):
    visibility catches up within moments. Returns the rows' workflow ids."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    deadline = time.monotonic() + VISIBILITY_TIMEOUT_S
    while True:
        page.goto(url)
        page.get_by_role("table").first.wait_for()
        with contextlib.suppress(PlaywrightTimeout):  # not all there yet: reload
            page.wait_for_function(
                "n => document.querySelectorAll('table tbody tr a').length > 0 && "
                "document.querySelectorAll('table tbody tr').length >= n",
                arg=len(wanted),
                timeout=5_000,
            )
        shown = listed_rows(page)
        there = set(shown) == wanted if exactly else wanted <= set(shown)
        if there or time.monotonic() > deadline:
            return shown


def test_the_list_filtered_by_pending_approval_shows_exactly_the_waiting_payments(
    page: Any, demo: dict[str, Any]
) -> None:
    waiting = {p["workflow_id"] for p in payments_of(demo, "pending_approval")}
    assert waiting
    url = demo["links"]["payments waiting for approval"]
    assert url.endswith("/workflows?query=PaymentStatus%3D%22PENDING_APPROVAL%22")
    shown = rows_become(page, url, waiting)
    assert sorted(shown) == sorted(waiting)
    page.get_by_text('PaymentStatus = "PENDING_APPROVAL"').first.wait_for()
    page.get_by_text("60000").first.wait_for()
    snap(page, "pending-approval")


def test_a_payments_page_shows_its_summary_search_attributes_current_details_and_history(
    page: Any, demo: dict[str, Any]
) -> None:
    payment = payments_of(demo, "pending_approval")[0]
    assert payment["ui_url"].endswith(
        f"/workflows/{payment['workflow_id']}/{payment['run_id']}/history"
    )

    page.goto(payment["ui_url"])
    page.get_by_text(payment["workflow_id"]).first.wait_for()
    page.get_by_text("Workflow Execution Started").first.wait_for()
    page.get_by_text("processor.authorize").first.wait_for()
    page.get_by_text("Timer Started").first.wait_for()  # the approval's deadline
    page.get_by_role("heading", name="Event History").first.scroll_into_view_if_needed()
    snap(page, "payment-history")

    page.goto(payment["ui_url"].removesuffix("/history") + "/user-metadata")
    # The UI renders each text of the user metadata (markdown) in a frame of its own.
    for frame, shown in (
        ("user-metadata-summary", "600.00 USD alice → coffee-shop"),
        ("user-metadata-details", "Reference: catering"),
        ("user-metadata-current-details", "Waiting for an operator to approve or reject"),
    ):
        page.frame_locator(f"iframe#{frame}").get_by_text(shown).wait_for()
    snap(page, "payment-summary")

    page.goto(payment["ui_url"].removesuffix("/history") + "/search-attributes")
    attributes = page.locator("main")
    for shown in (
        '"PaymentStatus": "PENDING_APPROVAL"',
        '"PaymentAmountMinor": 60000',
        '"PaymentCurrency": "USD"',
        '"PayerAccountId": "alice"',
        '"PayeeAccountId": "coffee-shop"',
    ):
        attributes.get_by_text(shown).wait_for()
    snap(page, "payment-search-attributes")


def test_the_schedules_page_lists_the_reconciliation_and_sweeper_schedules(
    page: Any, demo: dict[str, Any]
) -> None:
    page.goto(demo["links"]["schedules"])
    for schedule_id in ("recon-continuous", "recon-daily", "payments-sweeper"):
        page.get_by_text(schedule_id, exact=True).first.wait_for()
    snap(page, "schedules")


def test_the_demos_other_links_open_what_they_promise(page: Any, demo: dict[str, Any]) -> None:
    cancelled = {p["workflow_id"] for p in payments_of(demo, "cancelled")}
    assert sorted(rows_become(page, demo["links"]["cancelled payments"], cancelled)) == sorted(
        cancelled
    )

    cases = {f"discrepancy-{d['id']}" for d in demo["discrepancies"]}
    shown = rows_become(page, demo["links"]["open discrepancies"], cases, exactly=False)
    assert cases <= set(shown)
    snap(page, "open-discrepancies")

    page.goto(demo["links"]["the reconciliation run"])
    page.get_by_text(demo["reconciliation_workflow_id"]).first.wait_for()
    page.get_by_text("Workflow Execution Completed").first.wait_for()

    declined = payments_of(demo, "risk_declined")[0]
    page.goto(declined["ui_url"])
    page.get_by_text("Workflow Execution Completed").first.wait_for()


# --- again, and with no stack ----------------------------------------------------------------
def test_a_second_demo_on_the_same_stack_reuses_the_accounts_and_ends_the_same_way(
    stack: RunningStack, demo: dict[str, Any]
) -> None:
    again = run_demo_cli(stack)
    assert again["ok"], again
    assert again["run_tag"] != demo["run_tag"]
    assert set(again["accounts"].values()) == {"reused"}
    first_ids = {p["payment_id"] for p in demo["payments"]}
    assert not first_ids & {p["payment_id"] for p in again["payments"]}
    assert [p["status"] for p in again["payments"]] == [p["status"] for p in demo["payments"]]


def test_the_demo_against_a_stack_that_is_down_says_so() -> None:
    env = clean_env(
        PAYSAGA_DATA_DIR=tempfile.mkdtemp(prefix="paysaga-nostack-"),
        PAYSAGA_API_PORT=str(free_port()),
        PAYSAGA_TEMPORAL_PORT=str(free_port()),
        PAYSAGA_TEMPORAL_UI_PORT=str(free_port()),
    )
    try:
        result = paysaga("demo", "--small", env=env)
    finally:
        shutil.rmtree(env["PAYSAGA_DATA_DIR"], ignore_errors=True)
    assert result.returncode == 1
    assert "cannot reach the API" in result.stderr
    assert "paysaga demo --up" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


def test_demo_up_starts_a_stack_runs_the_demo_on_it_and_stops_it() -> None:
    """`paysaga demo --up`, for someone with nothing running: it starts the stack with
    the demo's thresholds, runs the demo there, and (with --no-keep-up) stops it all."""
    with private_stack() as unstarted:
        result = paysaga(
            "demo",
            "--up",
            "--no-keep-up",
            "--small",
            "--no-reconcile",
            "--json",
            env=unstarted.env,
            timeout_s=DEMO_TIMEOUT_S,
        )
        log = unstarted.data_dir / "logs" / "demo-up.log"
        assert result.returncode == 0, f"{result.stderr}\n{log.read_text() if log.exists() else ''}"
        outcome = json.loads(result.stdout)
        assert outcome["ok"], outcome
        assert {p["category"] for p in outcome["payments"]} >= {"settled", "pending_approval"}
        # Stopped: nothing answers on the stack's ports any more.
        for port in (unstarted.api_port, unstarted.temporal_port, unstarted.ui_port):
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{port}/", timeout=2)


def temporal_cli_json(stack: RunningStack, *args: str) -> dict[str, Any]:
    """`temporal <args> --output json` against the stack's server."""
    done = subprocess.run(
        [
            find_binary("temporal"),
            *args,
            "--address",
            f"127.0.0.1:{stack.temporal_port}",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    shown: dict[str, Any] = json.loads(done.stdout)
    return shown


# --- without a stack -------------------------------------------------------------------------
def test_the_demo_refuses_thresholds_under_which_its_kinds_of_payment_blur() -> None:
    with pytest.raises(DemoError, match="PAYSAGA_APPROVAL_THRESHOLD_MINOR"):
        plan_payments("small", Settings(approval_threshold_minor=100_00))
    with pytest.raises(DemoError, match="PAYSAGA_RISK_PAYMENT_LIMIT_MINOR"):
        plan_payments("small", Settings(risk_payment_limit_minor=1_000_00))
    # The stack's defaults (10,000.00 and 10,000,000,000.00): amounts follow them.
    plan = {p.category: p for p in plan_payments("full", Settings())}
    assert plan["pending_approval"].amount_minor == Settings().approval_threshold_minor
    assert plan["risk_declined"].amount_minor > Settings().risk_payment_limit_minor


def test_the_temporal_ui_links_take_the_forms_the_ui_serves() -> None:
    ui = "http://127.0.0.1:8233"
    assert ui_list_url(ui, "default", 'PaymentStatus="PENDING_APPROVAL"') == (
        f"{ui}/namespaces/default/workflows?query=PaymentStatus%3D%22PENDING_APPROVAL%22"
    )
    assert ui_workflow_url(ui, "default", "payment-pay_x", "01a2-b3") == (
        f"{ui}/namespaces/default/workflows/payment-pay_x/01a2-b3/history"
    )
    assert ui_schedules_url(ui, "default") == f"{ui}/namespaces/default/schedules"
