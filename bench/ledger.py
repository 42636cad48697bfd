"""Ledger throughput: full payment lifecycles appended straight to the store.

Each lifecycle is four appends, each its own transaction, as the saga makes them:
PaymentInitiated, PaymentAuthorized, FundsReserved, PaymentSettled, with the hash
chain and the positions kept. Runs 1, 8 and 32 concurrent writers, with payments
spread over many accounts (uniform) and with every payment paying one account (hot
payee), and prints lifecycles/s, events/s and p50/p99 append latency. Figures go to
bench/results/ledger-<time>.json.

    .venv/bin/python bench/ledger.py                      # embedded PostgreSQL 18, durable
    .venv/bin/python bench/ledger.py --lifecycles 500     # quicker
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/ledger.py

Each scenario gets a fresh, migrated database. Compare ratios within one run: this
machine is shared, and absolute figures drift between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ledger.db import to_libpq_url, with_database  # noqa: E402
from ledger.events import (  # noqa: E402
    AccountOpened,
    DomainEvent,
    FundsReserved,
    PaymentAuthorized,
    PaymentInitiated,
    PaymentSettled,
    Posting,
    event_id_for,
    payment_stream,
)
from ledger.store import NewEvent  # noqa: E402
from paysaga import migrate  # noqa: E402
from paysaga.db import DatabaseUrls, open_store, passfile_path, provision_app_login  # noqa: E402
from paysaga.embedded_pg import EmbeddedPostgres, stop_server  # noqa: E402

APP_ROLE = "paysaga_app"
console = Console(stderr=True)


@dataclass
class Result:
    scenario: str
    writers: int
    lifecycles: int
    seconds: float
    lifecycles_per_s: float
    events_per_s: float
    append_p50_ms: float
    append_p99_ms: float
    append_max_ms: float
    # CPU spent per lifecycle, by this process and by the PostgreSQL server: on a shared,
    # noisy machine these move much less between runs than wall-clock throughput.
    client_cpu_ms_per_lifecycle: float
    server_cpu_ms_per_lifecycle: float | None


def lifecycle_events(
    payment_id: str, payer: str, payee: str, amount_minor: int, expires_at: datetime
) -> list[DomainEvent]:
    """A settled payment's four events, as the saga appends them."""
    return [
        PaymentInitiated(
            payment_id=payment_id,
            payer_account_id=payer,
            payee_account_id=payee,
            amount_minor=amount_minor,
            currency="EUR",
        ),
        PaymentAuthorized(payment_id=payment_id, authorization_id=payment_id, processor="b"),
        FundsReserved(
            payment_id=payment_id,
            payer_account_id=payer,
            payee_account_id=payee,
            amount_minor=amount_minor,
            currency="EUR",
            expires_at=expires_at,
        ),
        PaymentSettled(
            payment_id=payment_id,
            currency="EUR",
            postings=[
                Posting(account_id=payer, side="debit", amount_minor=amount_minor),
                Posting(account_id=payee, side="credit", amount_minor=amount_minor),
            ],
        ),
    ]


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


def server_cpu_s(server_pid: int | None) -> float | None:
    """CPU seconds used so far by a local PostgreSQL server and all its backends."""
    if server_pid is None:
        return None
    root = psutil.Process(server_pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass  # a backend that exited meanwhile
    return total


async def run_scenario(
    urls: DatabaseUrls,
    *,
    scenario: str,
    writers: int,
    lifecycles: int,
    accounts: int,
    server_pid: int | None,
) -> Result:
    store = await open_store(urls, pool_size=writers)
    payers = [f"payer-{i}" for i in range(accounts)]
    payees = [f"payee-{i}" for i in range(accounts)] if scenario == "uniform" else ["hot-payee"]
    await store.open_account(
        AccountOpened(
            account_id="world", currency="EUR", kind="external", overdraft_limit_minor=None
        ),
        actor="bench",
    )
    for account in [*payers, *payees]:
        kind = "customer" if account.startswith("payer") else "merchant"
        await store.open_account(
            AccountOpened(account_id=account, currency="EUR", kind=kind), actor="bench"
        )
    expires_at = datetime.now(UTC) + timedelta(hours=1)

    async def lifecycle(payer: str, payee: str, amount: int, latencies: list[float]) -> None:
        payment_id = uuid.uuid4().hex
        stream = payment_stream(payment_id)
        correlation = f"payment-{payment_id}"
        events = lifecycle_events(payment_id, payer, payee, amount, expires_at)
        for step, event in enumerate(events):
            started = time.perf_counter()
            await store.append(
                NewEvent(stream, event, event_id_for(correlation, str(step)), "bench", correlation)
            )
            latencies.append((time.perf_counter() - started) * 1000)

    # Fund every payer from the external account (not timed).
    funding: list[float] = []
    for payer in payers:
        await lifecycle("world", payer, 10**12, funding)

    next_index = 0
    latencies: list[float] = []

    async def writer() -> None:
        nonlocal next_index
        while next_index < lifecycles:
            index = next_index
            next_index += 1
            await lifecycle(
                payers[index % len(payers)], payees[index % len(payees)], 100, latencies
            )

    server_before = server_cpu_s(server_pid)
    client_before = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    seconds = time.perf_counter() - started
    client_cpu_s = time.process_time() - client_before
    server_after = server_cpu_s(server_pid)
    await store.close()
    server_cpu_ms = None
    if server_before is not None and server_after is not None:
        server_cpu_ms = round(1000 * (server_after - server_before) / lifecycles, 3)
    latencies.sort()
    return Result(
        scenario=scenario,
        writers=writers,
        lifecycles=lifecycles,
        seconds=round(seconds, 3),
        lifecycles_per_s=round(lifecycles / seconds, 1),
        events_per_s=round(4 * lifecycles / seconds, 1),
        append_p50_ms=round(percentile(latencies, 0.50), 2),
        append_p99_ms=round(percentile(latencies, 0.99), 2),
        append_max_ms=round(latencies[-1], 2),
        client_cpu_ms_per_lifecycle=round(1000 * client_cpu_s / lifecycles, 3),
        server_cpu_ms_per_lifecycle=server_cpu_ms,
    )


def fresh_database(admin_url: str, owner_url: str, name: str, app_login_url: str) -> DatabaseUrls:
    owner = with_database(owner_url, "x").username
    with psycopg.connect(to_libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(owner or "postgres")
            )
        )
    owner_db = with_database(owner_url, name).render_as_string(hide_password=False)
    migrate.upgrade(owner_db, APP_ROLE)
    app_url = with_database(app_login_url, name).render_as_string(hide_password=False)
    return DatabaseUrls(owner_url=owner_db, app_url=app_url, app_role=APP_ROLE)


@dataclass(frozen=True)
class BenchPostgres:
    """A fresh, migrated database for one benchmark."""

    urls: DatabaseUrls
    admin_url: str
    server: str
    pid: int | None
    workdir: Path


@contextlib.contextmanager
def bench_postgres(
    prefix: str, name: str, *, data_root: str | None = "/tmp", keep_data: bool = False
) -> Iterator[BenchPostgres]:
    """A migrated database `name` on DATABASE_URL's server, or else on an embedded
    cluster of its own (durable defaults), stopped and removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=data_root))
    process = None
    external = os.environ.get("DATABASE_URL")
    try:
        if external:
            passfile = passfile_path(workdir / "secrets", APP_ROLE)
            app_login_url = provision_app_login(external, APP_ROLE, passfile)
            urls = fresh_database(external, external, name, app_login_url)
            admin_url, server = external, "external"
        else:
            pg = EmbeddedPostgres(workdir / "pg", app_role=APP_ROLE)
            process = pg.start(log_path=workdir / "postgres.log")
            pg.bootstrap()
            migrate.upgrade(pg.owner_url(), APP_ROLE)
            urls = DatabaseUrls(owner_url=pg.owner_url(), app_url=pg.app_url(), app_role=APP_ROLE)
            admin_url, server = pg.superuser_url(), "embedded (durable defaults)"
        yield BenchPostgres(
            urls, admin_url, server, process.pid if process is not None else None, workdir
        )
    finally:
        if process is not None:
            stop_server(process)
        if keep_data:
            print(f"data kept in {workdir} (the server is stopped)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lifecycles", type=int, default=3000)
    parser.add_argument("--writers", default="1,8,32")
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    writer_counts = [int(w) for w in args.writers.split(",")]

    process = None
    workdir = Path(tempfile.mkdtemp(prefix="paysaga-bench-"))
    external = os.environ.get("DATABASE_URL")
    if external:
        admin_url = owner_url = external
        # The store logs in as the application role, as the services do.
        passfile = passfile_path(workdir / "secrets", APP_ROLE)
        app_login_url = provision_app_login(external, APP_ROLE, passfile)
        server = "external"
    else:
        pg = EmbeddedPostgres(workdir / "pg", app_role=APP_ROLE)
        process = pg.start(log_path=workdir / "postgres.log")
        pg.bootstrap()
        admin_url, owner_url, app_login_url = pg.superuser_url(), pg.owner_url(), pg.app_url()
        server = "embedded (durable defaults)"
    with psycopg.connect(to_libpq_url(admin_url)) as conn:
        version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    console.print(f"PostgreSQL {version}, {server}; {args.lifecycles} lifecycles per run")

    results: list[Result] = []
    try:
        for writers in writer_counts:
            for scenario in ("uniform", "hot-payee"):
                name = f"bench_{scenario.replace('-', '_')}"
                urls = fresh_database(admin_url, owner_url, name, app_login_url)
                result = await run_scenario(
                    urls,
                    scenario=scenario,
                    writers=writers,
                    lifecycles=args.lifecycles,
                    accounts=args.accounts,
                    server_pid=process.pid if process is not None else None,
                )
                console.print(
                    f"{scenario:>9} × {writers:>2} writers: {result.lifecycles_per_s:8.1f} "
                    f"lifecycles/s, p50 {result.append_p50_ms} ms, p99 {result.append_p99_ms} ms, "
                    f"CPU/lifecycle: client {result.client_cpu_ms_per_lifecycle} ms, "
                    f"server {result.server_cpu_ms_per_lifecycle} ms"
                )
                results.append(result)
    finally:
        if process is not None:
            stop_server(process)
        # The cluster (and, with DATABASE_URL, the passfile): ~100 MB a run under /tmp.
        shutil.rmtree(workdir, ignore_errors=True)

    table = Table(title=f"ledger: lifecycles appended straight to the store (PostgreSQL {version})")
    for column in (
        "scenario",
        "writers",
        "lifecycles/s",
        "events/s",
        "p50 ms",
        "p99 ms",
        "hot/uniform",
        "client CPU ms",
        "server CPU ms",
    ):
        table.add_column(column, justify="right")
    ratios: dict[int, float] = {}
    for r in results:
        uniform = next(u for u in results if u.writers == r.writers and u.scenario == "uniform")
        ratio = r.lifecycles_per_s / uniform.lifecycles_per_s
        if r.scenario == "hot-payee":
            ratios[r.writers] = round(ratio, 3)
        table.add_row(
            r.scenario,
            str(r.writers),
            f"{r.lifecycles_per_s:.1f}",
            f"{r.events_per_s:.1f}",
            f"{r.append_p50_ms:.2f}",
            f"{r.append_p99_ms:.2f}",
            f"{ratio:.2f}" if r.scenario == "hot-payee" else "",
            f"{r.client_cpu_ms_per_lifecycle:.2f}",
            f"{r.server_cpu_ms_per_lifecycle:.2f}" if r.server_cpu_ms_per_lifecycle else "-",
        )
    Console(width=160).print(table)

    out = args.out or ROOT / "bench" / "results" / f"ledger-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "ledger",
                "postgres_version": version,
                "postgres": server,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "results": [asdict(r) for r in results],
                "hot_over_uniform": ratios,
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    # uvloop (installed with uvicorn[standard]) is what the services run on too; it
    # takes a third off the client's CPU per append.
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
