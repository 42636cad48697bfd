"""The `paysaga` command line.

Output rule: results that scripts capture go to stdout; everything else (progress,
banners, errors) goes to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from paysaga.settings import Settings, get_settings

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")
# Width of `statement show`'s table when stdout is not a terminal.
STATEMENT_TABLE_WIDTH_MAX = 400
# How often `recon run` asks the workflow how far it got.
RECON_POLL_S = 0.25
# Width of `demo`'s tables when stdout is not a terminal: links stay on one line.
DEMO_TABLE_WIDTH = 240

app = typer.Typer(
    name="paysaga",
    help="A payment saga engine: durable Temporal workflows over an append-only ledger.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database migrations (run as the schema owner).", no_args_is_help=True)
apikey_app = typer.Typer(help="API keys: create, list and revoke.", no_args_is_help=True)
temporal_app = typer.Typer(help="Temporal set-up for an external server.", no_args_is_help=True)
ledger_app = typer.Typer(help="Prove the ledger: hash chain, positions, state machines.")
statement_app = typer.Typer(
    help="Bank and processor statements (camt.053, MT940, BAI2, processor CSV).",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")
app.add_typer(apikey_app, name="apikey")
app.add_typer(temporal_app, name="temporal")
app.add_typer(ledger_app, name="ledger", no_args_is_help=True)
app.add_typer(statement_app, name="statement")
processor_app = typer.Typer(
    help="The built-in processor simulator: its settlement reports, and its outages.",
    no_args_is_help=True,
)
app.add_typer(processor_app, name="processor")
recon_app = typer.Typer(
    help="Reconciliation: the ledger against bank and processor statements.",
    no_args_is_help=True,
)
app.add_typer(recon_app, name="recon")
chaos_app = typer.Typer(
    help="Chaos runs: a bank workload under faults against a running stack, and its checker.",
    no_args_is_help=True,
)
app.add_typer(chaos_app, name="chaos")

err = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Report a problem the user can fix, on stderr, and exit non-zero."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as error:
        fail(f"invalid configuration:\n{error}", code=2)


def _service_settings() -> Settings:
    """Settings for a service, which must have a login of the application role's own."""
    from paysaga.db import DatabaseConfigError, service_urls

    settings = _settings()
    try:
        service_urls(settings)
    except DatabaseConfigError as error:
        fail(str(error), code=2)
    return settings


def _owner_url(settings: Settings) -> str:
    from paysaga.db import DatabaseConfigError, owner_url

    try:
        return owner_url(settings)
    except DatabaseConfigError as error:
        fail(str(error), code=2)


def _configure_logging(service: str, settings: Settings) -> None:
    from paysaga.logs import configure_logging

    configure_logging(service, level=settings.log_level, json_lines=settings.log_json)


# --- the stack and its services -----------------------------------------------------------
@app.command()
def up() -> None:
    """Run the whole product in the foreground: PostgreSQL, Temporal, worker, projector, API."""
    from paysaga.logs import configure_logging
    from paysaga.stack import StackError, run_stack

    settings = _settings()
    # The supervisor talks to a person at a terminal: plain text, not JSON.
    configure_logging("supervisor", level="WARNING", json_lines=False)
    try:
        asyncio.run(run_stack(settings, err))
    except StackError as error:
        fail(str(error), code=2)


@app.command()
def worker() -> None:
    """Run the Temporal worker against the configured servers."""
    _service_settings()  # a configuration error is reported here, as for every command
    # The worker is its own program (`python -m worker`, worker.py). The CLI hands this
    # process over to it, same pid and environment, instead of importing it: the two
    # never import each other (tests/test_architecture.py). `-P`: the installed module,
    # never a worker.py that happens to sit in the current directory.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-P", "-m", "worker"])


@app.command()
def api() -> None:
    """Serve the HTTP API (uvicorn) against the configured servers."""
    import uvicorn

    from api.app import create_app

    settings = _service_settings()
    _configure_logging("api", settings)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=10,
    )


@app.command()
def projector() -> None:
    """Keep the read models current: apply the log, below the safe horizon, in batches."""
    import signal

    from ledger.db import to_libpq_url
    from ledger.projections import READ_MODELS
    from ledger.projector import Projector
    from ledger.risk_consumer import risk_consumer
    from paysaga.db import open_store, service_urls

    settings = _service_settings()
    _configure_logging("projector", settings)
    log = logging.getLogger("paysaga.projector")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        urls = service_urls(settings)
        store = await open_store(urls, pool_size=2)
        # The risk consumer runs last in each pass: the alerts it appends are projected
        # into risk_alerts on the next pass. It is no read model, and never replayed.
        projections = [*READ_MODELS.values(), risk_consumer(store, settings.risk_thresholds())]
        runner = Projector(
            store,
            to_libpq_url(urls.app_url),
            projections,
            events_max=settings.projector_batch_events_max,
            poll_s=settings.projector_poll_s,
        )
        try:
            await runner.run(stop)
        finally:
            await store.close()
        log.info("projector stopped")

    asyncio.run(run())


@app.command()
def sealer() -> None:
    """Seal the ledger into hash-chained blocks, every PAYSAGA_SEAL_INTERVAL_S seconds."""
    import signal

    from ledger.sealer import run_sealer
    from paysaga.db import open_store, service_urls

    settings = _service_settings()
    _configure_logging("sealer", settings)
    log = logging.getLogger("paysaga.sealer")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        store = await open_store(service_urls(settings), pool_size=1)
        log.info("sealer started", extra={"interval_s": settings.seal_interval_s})
        try:
            await run_sealer(store, stop, interval_s=settings.seal_interval_s)
        finally:
            await store.close()
        log.info("sealer stopped")

    asyncio.run(run())


@app.command()
def sweep() -> None:
    """Sweep now: repair open payments whose workflow is gone; print what was repaired.

    The same sweep the schedule runs every PAYSAGA_SWEEP_INTERVAL_S, on the task queue,
    so a worker must be running.
    """
    import uuid
    from datetime import timedelta

    from paysaga.temporal import connect
    from workflows.models import SweepReport, SweepRequest
    from workflows.sweeper import SweeperWorkflow

    settings = _settings()

    async def run() -> SweepReport:
        client = await connect(settings, timeout_s=10)
        report: SweepReport = await client.execute_workflow(
            SweeperWorkflow.run,
            SweepRequest(idle_s=settings.sweep_idle_s),
            id=f"{settings.task_queue}-sweep-now-{uuid.uuid4().hex[:8]}",
            task_queue=settings.task_queue,
            execution_timeout=timedelta(minutes=15),
        )
        return report

    report = asyncio.run(run())
    err.print(f"checked {report.checked} open payment(s), repaired {len(report.repaired)}")
    typer.echo(report.model_dump_json())


@recon_app.command("run")
def recon_run(
    full: Annotated[
        bool, typer.Option("--full", help="Match everything again, not only what is new.")
    ] = False,
) -> None:
    """Run a reconciliation now, with a progress bar; print what it found.

    The run is a ReconciliationWorkflow on the task queue (a worker must be running), as
    the schedules start it: it ingests the inbox, matches, checks the ledger against
    itself and records what it found in the ledger.
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from paysaga.reconciliation import start_run
    from paysaga.temporal import connect
    from workflows.reconciliation_models import ReconciliationProgress, ReconciliationReport

    settings = _settings()

    async def run() -> ReconciliationReport:
        client = await connect(settings, timeout_s=10)
        handle = await start_run(client, settings, kind="manual", full=full)
        result = asyncio.ensure_future(handle.result())
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err
        ) as progress:
            task = progress.add_task(f"reconciliation {handle.id}", total=None)
            while not result.done():
                try:
                    state = await handle.query("progress", result_type=ReconciliationProgress)
                    progress.update(task, description=f"{state.run_id or handle.id}: {state.stage}")
                except Exception:  # the first workflow task may not have run yet
                    pass
                await asyncio.wait([result], timeout=RECON_POLL_S)
        report: ReconciliationReport = result.result()
        return report

    try:
        report = asyncio.run(run())
    except Exception as error:
        fail(f"the reconciliation did not complete: {error}")
    table = Table(title=f"reconciliation {report.run_id} ({report.kind})")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("files ingested from the inbox", str(report.ingested.files_ingested))
    table.add_row("files refused", str(report.ingested.files_refused))
    for name, value in sorted(report.counts.items()):
        table.add_row(name.replace("_", " "), str(value))
    table.add_row("new discrepancies", str(report.discrepancies))
    Console().print(table)
    for refused in report.ingested.refused:
        err.print(f"refused: {refused}")


@app.command()
def demo(
    up: Annotated[
        bool,
        typer.Option(
            "--up",
            help="Start a stack first (`paysaga up`, with an approval threshold of 500.00 "
            "and a risk limit of 5,000.00 unless the environment sets them); it keeps "
            "running after the demo until Ctrl-C.",
        ),
    ] = False,
    keep_up: Annotated[
        bool,
        typer.Option(
            "--keep-up/--no-keep-up", help="With --up: keep the stack running after the demo."
        ),
    ] = True,
    small: Annotated[
        bool, typer.Option("--small", help="One payment of each kind (7), not the full day.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the outcome as JSON on stdout, not tables.")
    ] = False,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="PAYSAGA_API_KEY",
            help="A key with every scope (default: one is created as the schema owner).",
        ),
    ] = None,
    prefix: Annotated[
        str, typer.Option(help="Put before every account id (alice → <prefix>alice).")
    ] = "",
    ui_url: Annotated[
        str | None,
        typer.Option(
            "--ui-url",
            help="The Temporal UI's address (default: the dev server's, on "
            "PAYSAGA_TEMPORAL_UI_PORT).",
        ),
    ] = None,
    reconcile: Annotated[
        bool,
        typer.Option(
            "--reconcile/--no-reconcile",
            help="Drop a statement with discrepancies into the inbox and reconcile it.",
        ),
    ] = True,
) -> None:
    """A day of payments against a running stack: every outcome, a reconciliation, and
    the Temporal UI's addresses to look at them.

    Opens named accounts (reused by a later run) and funds them, then submits payments
    that settle, are declined by the processor or by the risk rules, hit insufficient
    funds, wait for approval, are cancelled while slow, or meet a flaky processor and
    settle anyway. Exits 1 if anything ended otherwise than expected.
    """
    from rich.markup import escape
    from rich.text import Text

    from paysaga.demo import UP_DEFAULTS, DemoError, DemoOptions, render, run_demo, started_stack

    if prefix and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,31}", prefix):
        raise typer.BadParameter(
            "up to 32 letters, digits, _ . : or -, starting with a letter or digit",
            param_hint="--prefix",
        )
    if up:
        for name, value in UP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        get_settings.cache_clear()
    settings = _settings()
    options = DemoOptions(
        size="small" if small else "full",
        api_key=api_key,
        prefix=prefix,
        ui_url=ui_url,
        reconcile=reconcile,
    )

    def say(line: str) -> None:
        err.print(escape(line), highlight=False)

    def go() -> Any:
        try:
            return asyncio.run(run_demo(settings, options, say))
        except DemoError as error:
            fail(escape(str(error)))

    with contextlib.ExitStack() as stack_scope:
        if up:
            try:
                stack = stack_scope.enter_context(started_stack(settings, say))
            except DemoError as error:
                fail(escape(str(error)))
        result = go()
        if as_json:
            typer.echo(json.dumps(result.to_json()))
        else:
            out = Console(width=None if sys.stdout.isatty() else DEMO_TABLE_WIDTH)
            for renderable in render(result):
                # Lines of text (the UI's links) are never folded: a cut URL does not open.
                out.print(renderable, soft_wrap=isinstance(renderable, Text))
        if up and keep_up:
            err.print(
                f"the stack keeps running (API {settings.api_url}, log "
                f"{stack.log_path}); Ctrl-C stops it"
            )
            stack.wait()
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def ping() -> None:
    """Run a diagnostic workflow through the task queue: proves a worker is serving it."""
    import uuid
    from datetime import timedelta

    from paysaga.temporal import connect
    from workflows.diagnostics import PingWorkflow

    settings = _settings()

    async def run() -> str:
        client = await connect(settings, timeout_s=10)
        pong = await client.execute_workflow(
            PingWorkflow.run,
            id=f"ping-{uuid.uuid4()}",
            task_queue=settings.task_queue,
            execution_timeout=timedelta(seconds=30),
        )
        return pong.workflow_id

    typer.echo(asyncio.run(run()))


@app.command()
def status() -> None:
    """Show the services of a running `paysaga up`, their pids and restart counts."""
    state_file = _settings().data_path / "run" / "stack.json"
    if not state_file.exists():
        fail(f"no stack state in {state_file}; is `paysaga up` running?")
    typer.echo(state_file.read_text())


# --- database -----------------------------------------------------------------------------
@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    from paysaga import migrate

    settings = _settings()
    migrate.upgrade(_owner_url(settings), settings.db_app_role, revision)
    err.print(f"database at revision {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()]) -> None:
    """Revert migrations down to REVISION (`base` reverts them all)."""
    from paysaga import migrate

    settings = _settings()
    migrate.downgrade(_owner_url(settings), settings.db_app_role, revision)
    err.print(f"database at revision {revision}")


@db_app.command("current")
def db_current() -> None:
    """Print the database's current revision."""
    from paysaga import migrate

    typer.echo(migrate.current_revision(_owner_url(_settings())) or "base")


# --- API keys -----------------------------------------------------------------------------
def _with_owner_engine(call: Callable[[AsyncEngine, Settings], Awaitable[T]]) -> T:
    """Run an async call with an owner engine, and explain an unreachable database."""
    from sqlalchemy.exc import OperationalError

    from paysaga.db import create_owner_engine

    settings = _settings()
    url = _owner_url(settings)

    async def run() -> T:
        engine = create_owner_engine(url)
        try:
            return await call(engine, settings)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except OperationalError as error:
        fail(
            f"cannot reach the database ({error.orig}); is `paysaga up` running, "
            "or DATABASE_URL set?"
        )


@apikey_app.command("create")
def apikey_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for.")],
    scopes: Annotated[
        str, typer.Option(help="Comma-separated: payments:write, payments:read, ...")
    ],
) -> None:
    """Create a key and print it once, alone on stdout. Only its hash is stored."""
    from api.keys import ApiKeyError, create_api_key, parse_scopes

    try:
        scope_set = parse_scopes(scopes)
    except ApiKeyError as error:
        raise typer.BadParameter(str(error), param_hint="--scopes") from None

    async def create(engine: AsyncEngine, settings: Settings) -> tuple[str, str]:
        return await create_api_key(
            engine,
            settings.api_key_secret.get_secret_value(),
            name=name,
            scopes=scope_set,
        )

    try:
        key_id, key = _with_owner_engine(create)
    except ApiKeyError as error:
        fail(str(error))
    err.print(f"created API key {key_id} ({name}) with scopes {', '.join(sorted(scope_set))}")
    err.print("it is shown once; store it now")
    typer.echo(key)


@apikey_app.command("revoke")
def apikey_revoke(key_id: Annotated[str, typer.Argument(help="The id shown at creation.")]) -> None:
    """Disable a key for good."""
    from api.keys import ApiKeyError, revoke_api_key

    try:
        revoked = _with_owner_engine(lambda engine, _settings: revoke_api_key(engine, key_id))
    except ApiKeyError as error:
        fail(str(error))
    err.print(f"revoked API key {revoked.key_id} ({revoked.name}) at {revoked.revoked_at}")


@apikey_app.command("list")
def apikey_list() -> None:
    """List keys (ids, names, scopes; never the keys themselves) as JSON lines."""
    from api.keys import list_api_keys

    for key in _with_owner_engine(lambda engine, _settings: list_api_keys(engine)):
        typer.echo(
            json.dumps(
                {
                    "key_id": key.key_id,
                    "name": key.name,
                    "scopes": sorted(key.scopes),
                    "created_at": key.created_at.isoformat(),
                    "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
                }
            )
        )


# --- statements ---------------------------------------------------------------------------
@statement_app.command("show")
def statement_show(
    file: Annotated[Path, typer.Argument(help="A camt.053, MT940, BAI2 or processor CSV file.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the normalised lines as JSON.")
    ] = False,
) -> None:
    """Parse a statement file and print its normalised lines, without ingesting it.

    Touches no database. A file that cannot be read exits non-zero with the parser's
    error, which names the line or the XML element.
    """
    from rich.markup import escape
    from rich.table import Table

    from ledger.money import format_amount
    from recon.formats import FILE_BYTES_MAX, StatementError, parse_statement

    try:
        size = file.stat().st_size
        if size > FILE_BYTES_MAX:
            fail(escape(f"{file}: {size} bytes; statements are limited to {FILE_BYTES_MAX}"))
        content = file.read_bytes()
    except OSError as error:
        fail(escape(f"cannot read {file}: {error.strerror or error}"))
    try:
        parsed = parse_statement(content, file.name)
    except StatementError as error:
        fail(escape(f"{file}: {error}"))
    if as_json:
        typer.echo(json.dumps(parsed.as_json()))
        return
    count = sum(len(statement.lines) for statement in parsed.statements)
    err.print(
        escape(
            f"{file.name}: {parsed.format}, {len(parsed.statements)} statement(s), "
            f"{count} line(s), sha256 {parsed.sha256}"
        ),
        highlight=False,
    )
    table = Table(show_lines=False, header_style="bold")
    for column in ("statement", "account", "#", "value date", "booked", "amount", "kind"):
        table.add_column(column, justify="right" if column in ("#", "amount") else "left")
    for column in ("reference", "end-to-end id", "bank reference"):
        table.add_column(column)
    for statement, line in parsed.lines():
        table.add_row(
            *(
                escape(value or "")
                for value in (
                    statement.statement_id,
                    statement.account,
                    str(line.line_no),
                    line.value_date.isoformat(),
                    line.booking_date.isoformat() if line.booking_date else "",
                    format_amount(line.amount_minor, line.currency),
                    line.kind,
                    line.reference,
                    line.end_to_end_id,
                    line.bank_reference,
                )
            )
        )
    # A table piped to a file keeps every column whole instead of folding to 80 columns.
    out = Console(width=None if sys.stdout.isatty() else STATEMENT_TABLE_WIDTH_MAX)
    out.print(table)


# --- the processor simulator --------------------------------------------------------------
def _report_instant(raw: str, option: str) -> Any:
    """A date (midnight UTC) or an RFC 3339 time with its offset."""
    from datetime import UTC, date, datetime

    try:
        if len(raw) == 10:
            return datetime.combine(date.fromisoformat(raw), datetime.min.time(), tzinfo=UTC)
        instant = datetime.fromisoformat(raw)
    except ValueError:
        fail(f"{option} {raw!r}: expected a date (2026-11-24) or an RFC 3339 time", code=2)
    if instant.tzinfo is None:
        fail(f"{option} {raw!r}: give the time's offset (Z or +01:00)", code=2)
    return instant


@processor_app.command("report")
def processor_report(
    start: Annotated[
        str, typer.Option("--from", help="Window start, included: a date (UTC) or RFC 3339.")
    ],
    end: Annotated[
        str, typer.Option("--to", help="Window end, excluded: a date (UTC) or RFC 3339.")
    ],
    inject: Annotated[
        str,
        typer.Option(
            help="Discrepancies to inject, as counts of lines: "
            "missing=1,extra=1,wrong_amount=1,wrong_currency=1,duplicate=1,late=1"
        ),
    ] = "",
    seed: Annotated[int, typer.Option(help="Which lines the injections pick.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Write the CSV here (default: stdout).")] = None,
    ingest: Annotated[
        bool,
        typer.Option(
            "--ingest",
            help="Also ingest it for reconciliation (as the simulator's statement), and "
            "start matching it at once if a worker is running.",
        ),
    ] = False,
) -> None:
    """The simulator's settlement report for [--from, --to), in the processor's CSV.

    The manifest (the window, and every payment an injection touched) goes to stderr
    as JSON.
    """
    from activities.settlement_report import build_settlement_report, parse_injections

    window = (_report_instant(start, "--from"), _report_instant(end, "--to"))
    try:
        counts = parse_injections(inject)
    except ValueError as error:
        fail(f"--inject: {error}", code=2)

    async def build(engine: AsyncEngine, settings: Settings) -> Any:
        report = await build_settlement_report(engine, *window, inject=counts, seed=seed)
        if ingest:
            await _ingest_report(settings, report.content, f"processor-{start}-{end}.csv")
        return report

    try:
        report = _with_owner_engine(build)
    except ValueError as error:
        fail(str(error), code=2)
    if out is None:
        sys.stdout.buffer.write(report.content)
        sys.stdout.flush()
    else:
        out.write_bytes(report.content)
    err.print_json(json.dumps(report.manifest()))


async def _ingest_report(settings: Settings, content: bytes, filename: str) -> None:
    """Ingest the simulator's report as a statement, and tell the statement stream."""
    import psycopg

    from ledger.db import to_libpq_url
    from paysaga.reconciliation import statement_arrived
    from paysaga.temporal import connect
    from recon.formats import parse_statement
    from recon.store import ingest
    from workflows.reconciliation_models import StatementArrived

    parsed = parse_statement(content, filename)
    conn = await psycopg.AsyncConnection.connect(
        to_libpq_url(_owner_url(settings)), autocommit=True
    )
    try:
        result = await ingest(conn, parsed, source="simulator", filename=filename)
    finally:
        await conn.close()
    if result.duplicate:
        err.print("ingested before: nothing new")
        return
    err.print(f"ingested {result.lines_new} line(s) for reconciliation")
    try:
        client = await connect(settings, timeout_s=5)
        await statement_arrived(
            client, settings, StatementArrived(source="simulator", file_sha256=result.file_sha256)
        )
    except Exception as error:  # no Temporal: the next scheduled run matches it
        err.print(f"matching starts at the next scheduled run ({error})")


@processor_app.command("fault")
def processor_fault(
    mode: Annotated[
        str,
        typer.Option(help="error: every call fails (retryably); hang: no call answers."),
    ] = "error",
    for_s: Annotated[
        float, typer.Option("--for-s", help="How long the outage lasts, from now (seconds).")
    ] = 10.0,
    clear: Annotated[
        bool, typer.Option("--clear", help="End every open outage now instead.")
    ] = False,
) -> None:
    """Take the processor simulator down for a while: an outage window every processor call
    honours (authorize, capture, fence, void). Runs as the schema owner; the services
    may only read the windows. Prints the window(s) as JSON."""
    from activities.processor import FAULT_MODES, close_fault_windows, open_fault_window

    if clear:
        ended = _with_owner_engine(lambda engine, _settings: close_fault_windows(engine))
        err.print(f"ended {len(ended)} open outage window(s)")
        for window in ended:
            typer.echo(json.dumps(window.to_json()))
        return
    if mode not in FAULT_MODES:
        raise typer.BadParameter(f"choose one of {', '.join(FAULT_MODES)}", param_hint="--mode")

    async def open_window(engine: AsyncEngine, _settings: Settings) -> Any:
        return await open_fault_window(engine, mode, for_s, reason="paysaga processor fault")

    try:
        window = _with_owner_engine(open_window)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--for-s") from None
    err.print(f"the processor is down ({mode}) until {window.ends_at.isoformat()}")
    typer.echo(json.dumps(window.to_json()))


# --- Temporal -----------------------------------------------------------------------------
@temporal_app.command("register")
def temporal_register() -> None:
    """Register paysaga's search attributes on the configured Temporal namespace."""
    from paysaga.temporal import connect, ensure_search_attributes

    settings = _settings()

    async def run() -> list[str]:
        client = await connect(settings, timeout_s=30)
        return await ensure_search_attributes(client, settings.temporal_namespace)

    added = asyncio.run(run())
    err.print(f"registered: {', '.join(added)}" if added else "all search attributes present")


# --- ledger -------------------------------------------------------------------------------
# Below this many events, a progress bar would only flicker.
PROGRESS_EVENTS_MIN = 20_000


def _ledger_reader_url(settings: Settings) -> str:
    """Who reads the ledger for an administrative check: the application role, or the
    owner when that is the only login this process was given."""
    from paysaga.db import DatabaseConfigError, service_urls

    if settings.database_url is not None and settings.database_app_url is None:
        return settings.database_url
    try:
        return service_urls(settings).app_url
    except DatabaseConfigError as error:
        fail(str(error), code=2)


def _run_ledger_report(name: str, digest: str | None = None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from ledger.db import create_reader_engine
    from ledger.verify import Digest, Report, check_ledger, count_events, verify_chain

    settings = _settings()
    url = _ledger_reader_url(settings)
    root: Digest | None = None
    if digest is not None:
        try:
            root = Digest.parse(digest)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--digest") from None

    async def run(engine: AsyncEngine, progress: Callable[[int], None] | None) -> Report:
        if name == "verify":
            return await verify_chain(engine, progress, digest=root)
        return await check_ledger(engine, progress)

    async def go() -> Report:
        engine = create_reader_engine(url, pool_size=1, pool_overflow_max=0)
        try:
            total = await count_events(engine)
            if total < PROGRESS_EVENTS_MIN:
                return await run(engine, None)
            columns = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            with Progress(*columns, console=err, transient=True) as bar:
                task = bar.add_task(f"ledger {name}", total=total)
                return await run(engine, lambda n: bar.advance(task, n))
        finally:
            await engine.dispose()

    report = _on_ledger_database(go)
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(1)


def _on_ledger_database(call: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a ledger command, and explain an unreachable database."""
    from sqlalchemy.exc import OperationalError

    try:
        return asyncio.run(call())
    except OperationalError as error:
        fail(f"cannot reach the database ({error.orig}); is `paysaga up` running?")


@ledger_app.command("verify")
def ledger_verify(
    digest: Annotated[
        str | None,
        typer.Option(
            help="A digest printed earlier by `ledger digest` (<global_seq>:<hash>): prove "
            "the log still extends it.",
        ),
    ] = None,
) -> None:
    """Walk the hash chains and the sealed blocks; name any event changed, removed or added."""
    _run_ledger_report("verify", digest)


@ledger_app.command("check")
def ledger_check() -> None:
    """Fold every event: positions, zero-sum, state machines, and every read model."""
    _run_ledger_report("check")


@ledger_app.command("digest")
def ledger_digest() -> None:
    """Print the latest sealed block as <global_seq>:<hash>: a root to keep elsewhere."""
    from ledger.db import create_reader_engine
    from ledger.verify import Digest, latest_digest

    url = _ledger_reader_url(_settings())

    async def go() -> Digest | None:
        engine = create_reader_engine(url, pool_size=1, pool_overflow_max=0)
        try:
            return await latest_digest(engine)
        finally:
            await engine.dispose()

    digest = _on_ledger_database(go)
    if digest is None:
        fail("nothing is sealed yet: is the sealer running (`paysaga up`, `paysaga sealer`)?")
    err.print(f"the ledger is sealed up to global_seq {digest.last_seq}")
    typer.echo(str(digest))


@ledger_app.command("seal")
def ledger_seal() -> None:
    """Seal now, up to the safe horizon, instead of waiting for the sealer."""
    from ledger.sealer import seal_all
    from ledger.store import Block
    from paysaga.db import open_store, service_urls

    settings = _service_settings()

    async def go() -> list[Block]:
        store = await open_store(service_urls(settings), pool_size=1)
        try:
            return await seal_all(store)
        finally:
            await store.close()

    blocks = _on_ledger_database(go)
    for block in blocks:
        err.print(
            f"sealed block {block.block_no}: global_seq {block.first_seq} to {block.last_seq}, "
            f"{block.event_count} events"
        )
    if not blocks:
        err.print("nothing new to seal below the safe horizon")


@app.command()
def replay(
    projection: Annotated[
        str,
        typer.Argument(help="A read model (balances, statement, payments, risk_alerts) or all."),
    ],
    until: Annotated[
        str | None,
        typer.Option(
            help="Stop at this point of the log: a global_seq, or an RFC 3339 instant, "
            "which stands for every event before the first one recorded after it (no later "
            "than the safe horizon). Needs --into.",
        ),
    ] = None,
    into: Annotated[
        str | None,
        typer.Option(
            help="Build into this schema (created if need be) for an investigation, "
            "instead of rebuilding the live read model.",
        ),
    ] = None,
    restart: Annotated[
        bool, typer.Option(help="Start again from event 1 instead of resuming.")
    ] = False,
) -> None:
    """Rebuild read models from event 1 without downtime, or materialise them at a point.

    Without --into, each model is built in the schema projection_shadow while the live
    one keeps serving, caught up with it, and swapped in in one transaction. An
    interrupted replay resumes where it stopped. Runs as the schema owner.
    """
    from ledger.projections import READ_MODELS

    if projection == "all":
        chosen = list(READ_MODELS.values())
    elif projection in READ_MODELS:
        chosen = [READ_MODELS[projection]]
    else:
        raise typer.BadParameter(
            f"no read model {projection!r}; choose one of {', '.join(READ_MODELS)} or all",
            param_hint="PROJECTION",
        )
    if until is not None and into is None:
        raise typer.BadParameter("--until needs --into <schema>", param_hint="--until")
    url = _owner_url(_settings())
    _on_ledger_database(lambda: _replay(url, chosen, until, into, restart))


def replay_progress(console: Console, get_time: Callable[[], float] | None = None) -> Progress:
    """The bar `paysaga replay` shows, a line per read model: the events applied of those
    planned, events/s (`advance_replay` keeps it) and the time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} events/s"),
        TimeRemainingColumn(),
        console=console,
        get_time=get_time,
    )


def advance_replay(bar: Progress, task: TaskID, events: int) -> None:
    """A batch of `events` applied: move the bar on, and show the speed."""
    bar.advance(task, events)
    speed = next(t.speed for t in bar.tasks if t.id == task)
    bar.update(task, rate=f"{speed:,.0f}" if speed else "-")


async def _replay(
    url: str, chosen: list[Any], until: str | None, into: str | None, restart: bool
) -> None:
    from datetime import datetime

    import psycopg

    from ledger.db import to_libpq_url
    from ledger.replay import (
        ReplayError,
        check_schema_name,
        materialise,
        plan_materialise,
        plan_rebuild,
        rebuild,
        safe_seq,
        seq_at,
    )

    try:
        if into is not None:
            check_schema_name(into)
    except ReplayError as error:
        fail(str(error), code=2)
    try:
        conn = await psycopg.AsyncConnection.connect(to_libpq_url(url), autocommit=True)
    except psycopg.OperationalError as error:
        fail(f"cannot reach the database ({error}); is `paysaga up` running?")
    try:
        until_seq: int | None = None
        if into is not None:
            if until is None:
                until_seq = await safe_seq(conn)
            elif until.isdigit():
                until_seq = int(until)
            else:
                try:
                    instant = datetime.fromisoformat(until.replace("Z", "+00:00"))
                except ValueError:
                    fail(f"--until {until!r} is neither a global_seq nor an RFC 3339 instant", 2)
                if instant.tzinfo is None:
                    fail(f"--until {until!r} needs a UTC offset (e.g. Z or +01:00)", 2)
                until_seq = await seq_at(conn, instant)
        with replay_progress(err) as bar:
            for projection in chosen:
                if into is None:
                    plan = await plan_rebuild(conn, projection, restart=restart)
                else:
                    assert until_seq is not None
                    plan = await plan_materialise(
                        conn, projection, into, until_seq, restart=restart
                    )
                task = bar.add_task(projection.name, total=max(plan.events, 1), rate="-")

                def advance(batch: Any, task: TaskID = task) -> None:
                    advance_replay(bar, task, batch.events)

                if into is None:
                    reached = await rebuild(conn, projection, on_batch=advance)
                    where = f"swapped in at global_seq {reached}"
                else:
                    assert until_seq is not None
                    reached = await materialise(conn, projection, into, until_seq, on_batch=advance)
                    where = f"built in {into} up to global_seq {reached}"
                bar.update(task, completed=max(plan.events, 1))
                err.print(f"{projection.name}: {where}")
    except ReplayError as error:
        fail(str(error))
    finally:
        await conn.close()


# --- chaos: the driver (`paysaga chaos run`) ----------------------------------------------
@chaos_app.command("run")
def chaos_run(
    duration_s: Annotated[
        float, typer.Option("--duration-s", min=1, help="How long the load runs.")
    ] = 60.0,
    ops: Annotated[
        int, typer.Option("--ops", min=1, help="At most this many payment submissions.")
    ] = 100_000,
    seed: Annotated[
        int | None, typer.Option(help="Seeds every random choice (default: a random seed).")
    ] = None,
    faults: Annotated[
        str,
        typer.Option(
            help="Comma-separated fault kinds, `all` or `none`: kill-worker, kill-api, "
            "kill-projector, pg-restart-fast, pg-restart-immediate, temporal-restart, "
            "processor-error, processor-hang, terminate, cancel, reset."
        ),
    ] = "all",
    customers: Annotated[int, typer.Option(min=2, max=100, help="Customer accounts.")] = 8,
    clients: Annotated[
        int, typer.Option(min=1, max=100, help="Concurrent clients submitting payments.")
    ] = 8,
    readers: Annotated[int, typer.Option(min=0, max=100, help="Concurrent readers.")] = 2,
    fault_interval_s: Annotated[
        float,
        typer.Option(
            "--fault-interval-s",
            min=0.1,
            help="Mean pause between faults in each lane, once each kind has run once.",
        ),
    ] = 10.0,
    out: Annotated[
        Path | None,
        typer.Option(help="The run directory (default: <data dir>/chaos/<time>-<run>)."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="PAYSAGA_CHAOS_API_KEY",
            help="A key with every scope (default: one is created as the schema owner).",
        ),
    ] = None,
    settle_timeout_s: Annotated[
        float,
        typer.Option(
            "--settle-timeout-s", min=0, help="How long to wait for payments to end, at the end."
        ),
    ] = 60.0,
    drain_timeout_s: Annotated[
        float,
        typer.Option(
            "--drain-timeout-s",
            min=0,
            help="How long the operators' actions still scheduled (approvals, cancels) may "
            "go on after the load stops.",
        ),
    ] = 60.0,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Run the checker on the run at the end.")
    ] = True,
    quiesce_timeout_s: Annotated[
        float,
        typer.Option("--quiesce-timeout-s", min=0, help="The checker's wait for quiescence."),
    ] = 300.0,
) -> None:
    """Run the bank workload under faults against a running `paysaga up`, record it, and
    check it.

    Needs the stack's configuration (the same PAYSAGA_DATA_DIR and ports): it reads the
    services' pids from the data directory, logs in as the schema owner for the
    processor's outages (and the API key), and sends traffic to the API and to Temporal
    on this machine only: it exits 1, having connected to nothing, if either's host is
    not a loopback address. Prints the run directory on stdout; exits 1 if the checker
    finds the run invalid.
    """
    from paysaga.chaos.driver import ChaosOptions, require_loopback, run_chaos
    from paysaga.chaos.history import CHECK_FILE, FAULT_KINDS, write_json
    from paysaga.chaos.workload import ChaosSetupError

    settings = _settings()
    chosen = [k.strip() for k in faults.split(",") if k.strip()]
    if chosen == ["all"]:
        chosen = list(FAULT_KINDS)
    elif chosen == ["none"]:
        chosen = []
    unknown = sorted(set(chosen) - set(FAULT_KINDS))
    if unknown:
        raise typer.BadParameter(
            f"unknown fault kind(s) {', '.join(unknown)}; choose from {', '.join(FAULT_KINDS)}",
            param_hint="--faults",
        )
    try:
        require_loopback(settings)
    except ChaosSetupError as error:
        fail(str(error))
    options = ChaosOptions(
        duration_s=duration_s,
        ops_max=ops,
        seed=seed,
        faults=chosen,
        customers=customers,
        clients=clients,
        readers=readers,
        run_dir=out,
        api_key=api_key,
        fault_interval_s=fault_interval_s,
        settle_timeout_s=settle_timeout_s,
        drain_timeout_s=drain_timeout_s,
    )
    logging.basicConfig(level=logging.WARNING)
    try:
        result = asyncio.run(run_chaos(settings, options, lambda line: err.print(line)))
    except ChaosSetupError as error:
        fail(str(error))
    err.print(_chaos_summary_table(result.summary))
    typer.echo(str(result.run_dir))
    if not check:
        return
    import importlib

    try:
        checker = importlib.import_module("paysaga.chaos.checker")
    except ImportError:
        fail("the checker (paysaga.chaos.checker) is not installed; rerun with --no-check")
    report = asyncio.run(
        checker.check_run(result.run_dir, settings, quiesce_timeout_s=quiesce_timeout_s)
    )
    write_json(result.run_dir / CHECK_FILE, report.to_json())
    err.print(report.render())
    if not report.valid:
        raise typer.Exit(1)


def _chaos_summary_table(summary: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"chaos run {summary['run_tag']} (seed {summary['seed']})")
    table.add_column("what")
    table.add_column("count", justify="right")
    operations = summary["operations"]
    rows = [
        ("submissions (load + funding)", operations["submissions"]),
        ("acknowledged", operations["acked"]),
        ("not acknowledged", operations["not_acked"]),
        ("deliberate duplicates", operations["duplicates_sent"]),
        ("keys answered with two payments", operations["keys_with_two_payments"]),
    ]
    rows += [
        (f"action {op} -> {codes}", sum(codes.values()))
        for op, codes in operations["actions"].items()
    ]
    rows += [(f"reads: {what}", n) for what, n in operations["reads"].items()]
    http = summary["http"]
    rows += [("HTTP requests", http["requests"]), ("HTTP retries", http["retries"])]
    rows += [("requests given up", http["gave_up"])]
    for kind, counts in summary["faults"]["per_kind"].items():
        rows.append((f"fault {kind} (ok/injected)", f"{counts['ok']}/{counts['injected']}"))
    for status, n in summary["payments"]["per_status"].items():
        rows.append((f"payments {status}", n))
    rows.append(("payments still open", summary["payments"]["still_open"]))
    for what, value in rows:
        table.add_row(what, str(value))
    return table


# --- chaos: the checker (`paysaga chaos check`) -------------------------------------------
# The checker's table on stdout when it is not a terminal (a log, a CI job).
CHAOS_CHECK_WIDTH = 200


@chaos_app.command("check")
def chaos_check(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="The run directory `paysaga chaos run` printed.", exists=True, file_okay=False
        ),
    ],
    quiesce_timeout_s: Annotated[
        float,
        typer.Option(
            "--quiesce-timeout-s",
            min=0,
            help="How long to wait for the system to quiesce (0: neither wait nor sweep).",
        ),
    ] = 300.0,
    close_bound_s: Annotated[
        float,
        typer.Option(
            "--close-bound-s",
            min=1,
            help="Every payment ends within this many seconds of its PaymentInitiated.",
        ),
    ] = 300.0,
    historical_samples: Annotated[
        int,
        typer.Option(
            "--historical-samples",
            min=0,
            max=1_000,
            help="Historical balances read at random instants, per account of the run.",
        ),
    ] = 20,
    reconcile: Annotated[
        bool,
        typer.Option(
            "--reconcile/--no-reconcile",
            help="Reconcile the processor's settlement report for the run (a worker must run).",
        ),
    ] = True,
) -> None:
    """Judge a chaos run, as Jepsen's bank checker does: wait for the system to quiesce
    (including a sweep), then check every invariant (conservation, no overdraft, every
    payment closes, no duplicates, state machines, no hold leaks, positions, seal and
    chains, read models and historical balances, the processor, decisions,
    reconciliation).

    Prints `valid?` and, per invariant, the count of violations and the first one; writes
    RUN_DIR/check.json. Exits 0 if the run is valid, 1 if not.
    """
    from paysaga.chaos.checker import CheckError, check_run
    from paysaga.chaos.history import CHECK_FILE, write_json
    from paysaga.db import DatabaseConfigError

    settings = _settings()
    logging.basicConfig(level=logging.WARNING)
    try:
        report = _on_ledger_database(
            lambda: check_run(
                run_dir,
                settings,
                quiesce_timeout_s=quiesce_timeout_s,
                close_bound_s=close_bound_s,
                historical_samples=historical_samples,
                reconcile=reconcile,
                say=lambda line: err.print(line, highlight=False),
            )
        )
    except (CheckError, DatabaseConfigError) as error:
        fail(str(error), code=2)
    write_json(run_dir / CHECK_FILE, report.to_json())
    out = Console() if sys.stdout.isatty() else Console(width=CHAOS_CHECK_WIDTH)
    out.print(report.render())
    if not report.valid:
        raise typer.Exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point.

    It ends with `os._exit`: a process that used a Temporal client can abort at
    interpreter exit (sdk-python issue 300, exit code 134), which would turn a
    successful command into a failure.
    """
    code = 0
    try:
        app(args=list(argv) if argv is not None else None, prog_name="paysaga")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
