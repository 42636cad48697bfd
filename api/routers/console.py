"""The operations console: server-rendered pages at /console, for API keys with `ops`.

Each page calls the same functions as the JSON API's routes (accounts, payments,
reconciliation), so an approval or a resolution clicked here takes exactly the path a
`POST /v1/...` takes: the same validation, the same Workflow Update, the same actor
(`api-key:<key id>`) recorded in the ledger. What the console adds is the session
(api/console/sessions.py), the CSRF checks, and HTML (api/console/web.py).

GET never changes anything but the session's own `last_seen_at`. Every POST needs a
live session, a same-origin request and the session's CSRF token, checked in that
order before anything else happens: a refusal is a 403 that changed nothing.
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime, timedelta
from typing import Any, NoReturn, cast, get_args
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from temporalio.client import Client
from temporalio.service import RPCError

from api.console import sessions
from api.console.sessions import ConsoleSession
from api.console.web import (
    PREFIX,
    STATIC,
    TemporalLinks,
    printable,
    render,
    security_headers,
)
from api.deps import get_temporal
from api.models import ApproveIn, RejectIn, unstorable_path
from api.problems import ProblemError
from api.routers import accounts as accounts_api
from api.routers import payments as payments_api
from api.routers import reconciliation as recon_api
from ledger.events import ACCOUNT_ID_PATTERN, PAYMENT_ID_PATTERN, payment_stream, recon_stream
from ledger.store import EventStore
from ledger.verify import audit_stream
from paysaga.reconciliation import discrepancy_workflow_id
from paysaga.settings import Settings
from recon import cases
from workflows.models import PaymentStatus, workflow_id_for

log = logging.getLogger("paysaga.console")
router = APIRouter(prefix=PREFIX, include_in_schema=False)

PAGE_ROWS = 50
CURSOR_CHARS_MAX = 120
FORM_FIELDS_MAX = 10
DESCRIBE_TIMEOUT_S = 3.0
PAYMENT_STATUSES: tuple[str, ...] = get_args(PaymentStatus)
# What a redirect after a POST may announce: a code, never free text from the request.
NOTICES = {
    "approved": "Approved: the payment goes on to reserve and settle.",
    "rejected": "Rejected: the payment is compensated.",
    "resolved": "Resolved: the discrepancy's workflow recorded it in the ledger.",
    "logged_out": "You are logged out.",
}


class ConsoleError(Exception):
    """A page that says what went wrong, with its status."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


class LoginRequired(Exception):
    """No live session: to the login page (and forget the cookie)."""


def install(app: FastAPI) -> None:
    """Serve the console: its routes, its error pages and its security headers."""
    app.include_router(router)
    app.add_exception_handler(ConsoleError, _console_error)  # type: ignore[arg-type]
    app.add_exception_handler(LoginRequired, _login_required)  # type: ignore[arg-type]
    app.middleware("http")(security_headers)


async def _console_error(request: Request, error: ConsoleError) -> Response:
    return render(
        "error.html",
        status_code=error.status,
        title=error.title,
        detail=error.detail,
        session=None,
        csrf=None,
    )


async def _login_required(request: Request, error: LoginRequired) -> Response:
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    if sessions.SESSION_COOKIE in request.cookies:
        sessions.clear_cookie(response, request, _settings(request), sessions.SESSION_COOKIE)
    return response


# --- plumbing -------------------------------------------------------------------------------
def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _store(request: Request) -> EventStore:
    store: EventStore = request.app.state.store
    return store


def _links(request: Request) -> TemporalLinks:
    settings = _settings(request)
    return TemporalLinks(settings.temporal_ui_url, settings.temporal_namespace)


async def _session(request: Request) -> ConsoleSession:
    """The live session of this request, or to the login page."""
    found = await sessions.find_session(
        _store(request).engine, _settings(request), request.cookies.get(sessions.SESSION_COOKIE)
    )
    if found is None:
        raise LoginRequired()
    request.state.api_key_id = found.key.key_id
    return found


async def _form(request: Request) -> dict[str, str]:
    """The form's text fields (files are refused), at most FORM_FIELDS_MAX of them."""
    try:
        form = await request.form(max_files=0, max_fields=FORM_FIELDS_MAX)
    except Exception:  # starlette reports a malformed or oversized form in several ways
        raise ConsoleError(400, "Bad form", "the form could not be read") from None
    fields: dict[str, str] = {}
    for name, value in form.items():
        if isinstance(value, UploadFile):
            raise ConsoleError(400, "Bad form", "this form takes no files")
        fields[name] = value
    # The API's rule for every string: what PostgreSQL cannot store (NUL, lone
    # surrogates) is refused here, before it could reach a workflow or the ledger.
    unstorable = unstorable_path(fields)
    if unstorable is not None:
        where, character = unstorable
        raise ConsoleError(
            422, "Invalid input", f"{where} contains {character}, which cannot be stored"
        )
    return fields


async def _checked_post(request: Request) -> tuple[ConsoleSession, dict[str, str]]:
    """A state-changing request's session and form, once the session is live, the
    request comes from this site and it carries the session's CSRF token: else 403."""
    found = await sessions.find_session(
        _store(request).engine, _settings(request), request.cookies.get(sessions.SESSION_COOKIE)
    )
    if found is None:
        raise ConsoleError(403, "Not logged in", "there is no live console session; log in again")
    request.state.api_key_id = found.key.key_id
    if not sessions.same_origin(request):
        raise ConsoleError(403, "Refused", "this form was sent from another site")
    form = await _form(request)
    if not sessions.csrf_matches(found, form.get("csrf")):
        raise ConsoleError(
            403, "Refused", "the form's CSRF token is missing or wrong; reload the page"
        )
    return found, form


def _refuse(problem: ProblemError) -> NoReturn:
    """The API's problem as a page: the same status and the same words."""
    raise ConsoleError(problem.status, problem.code.replace("_", " ").capitalize(), problem.detail)


def _invalid(error: ValidationError) -> NoReturn:
    messages = "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'form'}: {e['msg']}" for e in error.errors()
    )
    raise ConsoleError(422, "Invalid input", messages)


def _cursor(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    if len(raw) > CURSOR_CHARS_MAX or not raw.isascii():
        raise ConsoleError(400, "Bad cursor", "the cursor is not one this console gave out")
    return raw


async def _temporal(request: Request) -> Client:
    try:
        return await get_temporal(request)
    except ProblemError as problem:
        _refuse(problem)


async def _run_id(client: Client | None, workflow_id: str) -> str | None:
    """The workflow's latest run id, if Temporal answers in time (for a history link)."""
    if client is None:
        return None
    try:
        described = await client.get_workflow_handle(workflow_id).describe(
            rpc_timeout=timedelta(seconds=DESCRIBE_TIMEOUT_S)
        )
    except RPCError:
        return None
    return described.run_id


def _page(request: Request, template: str, session: ConsoleSession, **context: Any) -> Response:
    notice = request.query_params.get("done")
    return render(
        template,
        session=session,
        csrf=session.csrf_token,
        links=_links(request),
        notice=NOTICES.get(notice or ""),
        **context,
    )


# --- static ---------------------------------------------------------------------------------
@router.get("/static/console.css")
async def stylesheet() -> FileResponse:
    return FileResponse(STATIC / "console.css", media_type="text/css")


# --- login and logout -----------------------------------------------------------------------
@router.get("/login")
async def login_page(request: Request) -> Response:
    """The login form, with a fresh nonce in a short-lived cookie (login CSRF)."""
    settings = _settings(request)
    current = await sessions.find_session(
        _store(request).engine, settings, request.cookies.get(sessions.SESSION_COOKIE)
    )
    if current is not None:
        return RedirectResponse(f"{PREFIX}/", status_code=303)
    return _login_form(request, settings, notice=NOTICES.get(request.query_params.get("done", "")))


def _login_form(
    request: Request,
    settings: Settings,
    *,
    status_code: int = 200,
    error: str | None = None,
    notice: str | None = None,
) -> Response:
    nonce = sessions.new_nonce()
    response = render(
        "login.html",
        status_code=status_code,
        nonce=nonce,
        error=error,
        notice=notice,
        session=None,
        csrf=None,
    )
    sessions.set_cookie(
        response, request, settings, sessions.LOGIN_COOKIE, nonce, sessions.LOGIN_NONCE_MAX_AGE_S
    )
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    """Open a session for a live key with `ops`; nothing is set for any other."""
    settings = _settings(request)
    if not sessions.same_origin(request):
        return _login_form(
            request, settings, status_code=403, error="Refused: another site sent this form."
        )
    form = await _form(request)
    if not sessions.nonce_matches(request.cookies.get(sessions.LOGIN_COOKIE), form.get("nonce")):
        return _login_form(
            request,
            settings,
            status_code=403,
            error="This login form has expired or was not sent by this console; try again.",
        )
    store = _store(request)
    key = await sessions.check_key(store.engine, settings, form.get("api_key", ""))
    if key is None:
        return _login_form(
            request, settings, status_code=401, error="That API key is unknown or revoked."
        )
    if "ops" not in key.scopes:
        return _login_form(
            request,
            settings,
            status_code=403,
            error="That API key lacks the ops scope, which the console needs.",
        )
    token, _ = await sessions.open_session(store.engine, key, settings)
    request.state.api_key_id = key.key_id
    log.info("console login", extra={"api_key_id": key.key_id})
    response = RedirectResponse(f"{PREFIX}/", status_code=303)
    sessions.set_cookie(
        response, request, settings, sessions.SESSION_COOKIE, token, settings.console_session_max_s
    )
    sessions.clear_cookie(response, request, settings, sessions.LOGIN_COOKIE)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    session, _ = await _checked_post(request)
    await sessions.end_session(_store(request).engine, session.token)
    response = RedirectResponse(f"{PREFIX}/login?done=logged_out", status_code=303)
    sessions.clear_cookie(response, request, _settings(request), sessions.SESSION_COOKIE)
    return response


# --- overview -------------------------------------------------------------------------------
@router.get("")
async def root() -> Response:
    return RedirectResponse(f"{PREFIX}/", status_code=307)


@router.get("/")
async def home(request: Request) -> Response:
    session = await _session(request)
    settings = _settings(request)
    waiting = await payments_api.list_payments(
        _store(request),
        session.key,
        status="PENDING_APPROVAL",
        account_id=None,
        limit=PAGE_ROWS,
        cursor=None,
    )
    async with recon_api._recon_db(settings) as conn:
        open_by_type = await cases.open_counts(
            conn, overdue_after_s=settings.recon_discrepancy_alert_age_s
        )
        seal = await cases.latest_seal_verification(conn)
    return _page(
        request,
        "home.html",
        session,
        waiting=len(waiting.payments),
        waiting_more=waiting.next_cursor is not None,
        open_by_type=sorted(open_by_type.items()),
        open_total=sum(open_count for open_count, _ in open_by_type.values()),
        seal=seal,
    )


# --- accounts -------------------------------------------------------------------------------
@router.get("/accounts")
async def accounts_page(request: Request) -> Response:
    session = await _session(request)
    after = request.query_params.get("after") or None
    if after is not None and re.match(ACCOUNT_ID_PATTERN, after) is None:
        raise ConsoleError(400, "Bad cursor", "the cursor is not one this console gave out")
    found = await _store(request).list_accounts(after_id=after, limit=PAGE_ROWS + 1)
    shown = found[:PAGE_ROWS]
    return _page(
        request,
        "accounts.html",
        session,
        accounts=[accounts_api.account_out(a) for a in shown],
        next_after=shown[-1].account_id if len(found) > PAGE_ROWS else None,
    )


@router.get("/accounts/{account_id}")
async def account_page(request: Request, account_id: str) -> Response:
    """The account's position (from the ledger) and its statement with running balances
    (from the statement read model), a page at a time."""
    session = await _session(request)
    store = _store(request)
    cursor = _cursor(request.query_params.get("cursor"))
    try:
        account = await accounts_api.get_account(account_id, store, session.key)
        page = await accounts_api.list_entries(
            account_id, store, session.key, limit=PAGE_ROWS, cursor=cursor
        )
    except ProblemError as problem:
        _refuse(problem)
    return _page(
        request, "account.html", session, account=account, page=page, request_cursor=cursor
    )


# --- payments -------------------------------------------------------------------------------
@router.get("/payments")
async def payments_page(request: Request) -> Response:
    session = await _session(request)
    wanted = request.query_params.get("id")
    if wanted:
        return RedirectResponse(f"{PREFIX}/payments/{_path_part(wanted.strip())}", status_code=303)
    status = request.query_params.get("status") or None
    if status is not None and status not in PAYMENT_STATUSES:
        raise ConsoleError(400, "Bad status", f"no payment status {status!r}")
    try:
        page = await payments_api.list_payments(
            _store(request),
            session.key,
            status=cast(PaymentStatus | None, status),
            account_id=None,
            limit=PAGE_ROWS,
            cursor=_cursor(request.query_params.get("cursor")),
        )
    except ProblemError as problem:
        _refuse(problem)
    return _page(
        request, "payments.html", session, page=page, status=status, statuses=PAYMENT_STATUSES
    )


def _path_part(value: str) -> str:
    return quote(value[:CURSOR_CHARS_MAX], safe="")


@router.get("/payments/{payment_id}")
async def payment_page(request: Request, payment_id: str) -> Response:
    """The payment, its audit trail with every hash verified, and its seal."""
    session = await _session(request)
    store = _store(request)
    settings = _settings(request)
    if re.match(PAYMENT_ID_PATTERN, payment_id) is None:
        raise ConsoleError(404, "Not found", f"no payment {payment_id!r}")
    client: Client | None
    try:
        client = await get_temporal(request)
    except ProblemError:
        client = None  # the ledger's view is shown; the live state and run id are not
    try:
        payment = await payments_api.read_payment(store, client, payment_id)
    except ProblemError as problem:
        _refuse(problem)
    audit = await audit_stream(store.engine, payment_stream(payment_id))
    async with recon_api._recon_db(settings) as conn:
        seal = await cases.latest_seal_verification(conn)
    workflow_id = workflow_id_for(payment_id)
    return _page(
        request,
        "payment.html",
        session,
        payment=payment,
        audit=audit,
        seal=seal,
        workflow_id=workflow_id,
        run_id=await _run_id(client, workflow_id),
    )


@router.get("/approvals")
async def approvals_page(request: Request) -> Response:
    """Payments waiting for an operator, from the payments read model, each with its
    approve and reject forms."""
    session = await _session(request)
    try:
        page = await payments_api.list_payments(
            _store(request),
            session.key,
            status="PENDING_APPROVAL",
            account_id=None,
            limit=PAGE_ROWS,
            cursor=_cursor(request.query_params.get("cursor")),
        )
    except ProblemError as problem:
        _refuse(problem)
    return _page(request, "approvals.html", session, page=page)


@router.post("/payments/{payment_id}/approve")
async def approve(request: Request, payment_id: str) -> Response:
    session, form = await _checked_post(request)
    try:
        body = ApproveIn(note=form.get("note") or None)
    except ValidationError as error:
        _invalid(error)
    client = await _temporal(request)
    try:
        await payments_api.approve_payment(
            payment_id, _store(request), client, session.key, _settings(request), body
        )
    except ProblemError as problem:
        _refuse(problem)
    log.info("console approval", extra={"payment_id": payment_id})
    return RedirectResponse(
        f"{PREFIX}/approvals?done=approved&payment={_path_part(payment_id)}", status_code=303
    )


@router.post("/payments/{payment_id}/reject")
async def reject(request: Request, payment_id: str) -> Response:
    session, form = await _checked_post(request)
    try:
        body = RejectIn(reason=form.get("reason", ""))
    except ValidationError as error:
        _invalid(error)
    client = await _temporal(request)
    try:
        await payments_api.reject_payment(
            payment_id, body, _store(request), client, session.key, _settings(request)
        )
    except ProblemError as problem:
        _refuse(problem)
    log.info("console rejection", extra={"payment_id": payment_id})
    return RedirectResponse(
        f"{PREFIX}/approvals?done=rejected&payment={_path_part(payment_id)}", status_code=303
    )


# --- reconciliation -------------------------------------------------------------------------
def _run_cursor(raw: str | None) -> tuple[datetime, str] | None:
    if not raw:
        return None
    at, _, run_id = raw.partition("|")
    try:
        instant: datetime | None = datetime.fromisoformat(at)
    except ValueError:
        instant = None
    if instant is None or instant.tzinfo is None or not re.match(recon_api.RUN_ID_PATTERN, run_id):
        raise ConsoleError(400, "Bad cursor", "the cursor is not one this console gave out")
    return instant, run_id


def _run_workflow_ids(store_openings: dict[str, Any], run_ids: list[str]) -> dict[str, str]:
    """Each run's workflow id, as its ledger stream recorded it (the correlation id)."""
    found = {}
    for run_id in run_ids:
        opening = store_openings.get(recon_stream(run_id))
        if opening is not None and opening.correlation_id:
            found[run_id] = opening.correlation_id
    return found


@router.get("/reconciliation")
async def reconciliation_page(request: Request) -> Response:
    """Recent runs, and the open discrepancies with a resolve form each."""
    session = await _session(request)
    settings = _settings(request)
    before = _run_cursor(_cursor(request.query_params.get("runs")))
    async with recon_api._recon_db(settings) as conn:
        runs = await cases.list_runs(conn, before=before, limit=PAGE_ROWS + 1)
    shown_runs = runs[:PAGE_ROWS]
    try:
        open_page = await recon_api.list_discrepancies(
            settings,
            session.key,
            status="open",
            run_id=None,
            limit=PAGE_ROWS,
            cursor=_cursor(request.query_params.get("cursor")),
        )
    except ProblemError as problem:
        _refuse(problem)
    openings = await _store(request).stream_openings([recon_stream(r.run_id) for r in shown_runs])
    return _page(
        request,
        "reconciliation.html",
        session,
        runs=shown_runs,
        runs_next=(
            f"{shown_runs[-1].started_at.isoformat()}|{shown_runs[-1].run_id}"
            if len(runs) > PAGE_ROWS
            else None
        ),
        run_workflows=_run_workflow_ids(openings, [r.run_id for r in shown_runs]),
        discrepancies=open_page,
        resolutions=RESOLUTIONS,
        discrepancy_workflow_id=discrepancy_workflow_id,
    )


RESOLUTIONS = (
    "accepted",
    "corrected_at_source",
    "written_off",
    "duplicate_ignored",
    "false_positive",
)


@router.get("/reconciliation/runs/{run_id}")
async def run_page(request: Request, run_id: str) -> Response:
    session = await _session(request)
    settings = _settings(request)
    if not re.match(recon_api.RUN_ID_PATTERN, run_id):
        raise ConsoleError(404, "Not found", f"no reconciliation run {run_id!r}")
    try:
        run = await recon_api.get_reconciliation(request, settings, session.key, run_id)
    except ProblemError as problem:
        _refuse(problem)
    openings = await _store(request).stream_openings([recon_stream(run_id)])
    return _page(
        request,
        "run.html",
        session,
        run=run,
        workflow_id=_run_workflow_ids(openings, [run_id]).get(run_id),
        resolutions=RESOLUTIONS,
    )


@router.get("/reconciliation/runs/{run_id}/report")
async def run_report(request: Request, run_id: str) -> Response:
    """The API's report page, unchanged; its CSP allows its own inline style and chart."""
    session = await _session(request)
    if not re.match(recon_api.RUN_ID_PATTERN, run_id):
        raise ConsoleError(404, "Not found", f"no reconciliation run {run_id!r}")
    try:
        page = await recon_api.reconciliation_report(_settings(request), session.key, run_id)
    except ProblemError as problem:
        _refuse(problem)
    page.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page


@router.post("/discrepancies/{discrepancy_id}/resolve")
async def resolve(request: Request, discrepancy_id: str) -> Response:
    session, form = await _checked_post(request)
    try:
        target = uuid.UUID(discrepancy_id)
    except ValueError:
        raise ConsoleError(
            404, "Not found", f"no discrepancy {printable(discrepancy_id, 80)!r}"
        ) from None
    try:
        body = recon_api.ResolveIn.model_validate(
            {"resolution": form.get("resolution", ""), "note": form.get("note", "")}
        )
    except ValidationError as error:
        _invalid(error)
    client = await _temporal(request)
    try:
        await recon_api.resolve_discrepancy(_settings(request), client, session.key, target, body)
    except ProblemError as problem:
        _refuse(problem)
    log.info("console resolution", extra={"discrepancy_id": str(target)})
    back = form.get("back")
    target_page = back if back in ("run", "reconciliation") else "reconciliation"
    if target_page == "run" and re.match(recon_api.RUN_ID_PATTERN, form.get("run_id", "")):
        return RedirectResponse(
            f"{PREFIX}/reconciliation/runs/{form['run_id']}?done=resolved", status_code=303
        )
    return RedirectResponse(f"{PREFIX}/reconciliation?done=resolved", status_code=303)


# Last, so that every route above matches first.
@router.get("/{rest:path}")
async def not_found(rest: str) -> Response:
    raise ConsoleError(404, "Not found", f"there is no console page at {'/console/' + rest!r}")
