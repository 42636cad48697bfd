"""`paysaga chaos run`: the bank workload under faults, against a running `paysaga up`.

1. An API key with every scope (unless one is given), the run's accounts, funding.
2. The load (paysaga/chaos/workload.py) and the faults (paysaga/chaos/faults.py) run
   together, until the duration is over or the operations are spent.
3. The clients finish their requests; the operators' actions still scheduled finish
   (bounded); the stack must answer `/readyz` again.
4. Every acknowledged payment's status is read until it ends (bounded), and
   `summary.json` counts operations, retries, faults and payments per status.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from paysaga.chaos.faults import FaultTargets, Nemesis
from paysaga.chaos.history import (
    FAULT_KINDS,
    SUMMARY_FILE,
    HistoryWriter,
    RunInfo,
    now_rfc3339,
    rfc3339,
    write_json,
    write_run_info,
)
from paysaga.chaos.workload import (
    ApiClient,
    ChaosSetupError,
    HttpStats,
    OpsBudget,
    Registry,
    Workload,
    WorkloadConfig,
    wait_ready,
)
from paysaga.settings import Settings
from workflows.models import TERMINAL_STATUSES

ALL_SCOPES = frozenset(
    {"payments:write", "payments:read", "accounts:write", "accounts:read", "ops"}
)
READY_TIMEOUT_S = 60.0
WARMUP_S_MAX = 2.0
# No fault starts in the last part of the run: the last ones have time to play out.
FAULT_TAIL_SHARE = 0.1
# A name that always means this machine (RFC 6761, 6.3); any other host must be a
# loopback address written out.
LOOPBACK_NAMES = frozenset({"localhost"})


@dataclass
class ChaosOptions:
    duration_s: float = 60.0
    ops_max: int = 100_000
    seed: int | None = None
    faults: list[str] = field(default_factory=lambda: list(FAULT_KINDS))
    customers: int = 8
    clients: int = 8
    readers: int = 2
    run_dir: Path | None = None
    api_key: str | None = None
    fault_interval_s: float = 10.0
    drain_timeout_s: float = 60.0
    settle_timeout_s: float = 60.0


@dataclass
class ChaosResult:
    run_dir: Path
    summary: dict[str, Any]


async def create_chaos_api_key(settings: Settings, name: str) -> str:
    """A key with every scope, stored as `paysaga apikey create` stores it (schema owner)."""
    from api.keys import create_api_key
    from paysaga.db import create_owner_engine, owner_url

    engine = create_owner_engine(owner_url(settings))
    try:
        _, key = await create_api_key(
            engine, settings.api_key_secret.get_secret_value(), name=name, scopes=ALL_SCOPES
        )
    finally:
        await engine.dispose()
    return key


def _owner_engine_factory(settings: Settings) -> Callable[[], Any] | None:
    from paysaga.db import DatabaseConfigError, create_owner_engine, owner_url

    try:
        url = owner_url(settings)
    except DatabaseConfigError:
        return None
    return lambda: create_owner_engine(url)


def is_loopback(host: str | None) -> bool:
    """Whether `host` names this machine: a loopback address (127.0.0.0/8, ::1) or
    `localhost`. Nothing is resolved: any other name is not loopback."""
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_loopback(settings: Settings) -> None:
    """Refuse a stack that is not on this machine, before anything is connected to: a
    chaos run floods the API and acts on Temporal's workflows, so it sends its traffic
    to a loopback address only."""
    targets = (
        ("the API", "PAYSAGA_API_HOST", settings.api_url),
        ("Temporal", "TEMPORAL_ADDRESS", f"//{settings.temporal_target}"),
    )
    for what, variable, address in targets:
        try:
            host = urlsplit(address).hostname
        except ValueError:
            host = None
        if not is_loopback(host):
            raise ChaosSetupError(
                f"{what} is at {address.removeprefix('//')}, whose host {host or '?'} is "
                f"not a loopback address ({variable}): a chaos run sends traffic to this "
                "machine only (127.0.0.1)"
            )


async def run_chaos(
    settings: Settings, options: ChaosOptions, say: Callable[[str], None]
) -> ChaosResult:
    """Run the workload under faults against the stack `settings` describe (on this
    machine only: see `require_loopback`)."""
    require_loopback(settings)
    seed = options.seed if options.seed is not None else random.SystemRandom().getrandbits(32)
    # Not from the seed: two runs with one seed against one stack need accounts of their own.
    tag = f"chaos-{secrets.token_hex(3)}"
    started_at = datetime.now(UTC)
    run_dir = options.run_dir or (
        settings.data_path / "chaos" / f"{started_at:%Y%m%dT%H%M%SZ}-{tag}"
    )
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    say(f"chaos run {tag}: seed {seed}, recording into {run_dir}")

    api_key = options.api_key or await create_chaos_api_key(settings, f"chaos {tag}")
    history = HistoryWriter(run_dir)
    stats = HttpStats()
    api = ApiClient(settings.api_url, api_key, stats=stats)
    registry = Registry()
    config = WorkloadConfig(
        customers=options.customers,
        clients=options.clients,
        readers=options.readers,
        approval_threshold_minor=settings.approval_threshold_minor,
        fees_account_id=settings.fees_account_id,
    )
    workload = Workload(
        api, history, config, seed=seed, run_tag=tag, registry=registry, run_started=started_at
    )
    nemesis: Nemesis | None = None
    try:
        if await wait_ready(api.http, READY_TIMEOUT_S) is None:
            raise ChaosSetupError(f"{settings.api_url}/readyz did not answer 200: is the stack up?")
        accounts = await workload.setup()
        info = RunInfo(
            seed=seed,
            started_at=rfc3339(started_at),
            api_url=settings.api_url,
            currency=config.currency,
            accounts=accounts,
            faults_requested=list(options.faults),
            duration_s=options.duration_s,
            ops_max=options.ops_max,
            data_dir=str(settings.data_path),
            run_tag=tag,
            clients=options.clients,
            readers=options.readers,
            approval_threshold_minor=config.approval_threshold_minor,
            funding_minor=config.funding_minor,
        )
        write_run_info(run_dir, info)
        say(
            f"{len(accounts.customers)} customers funded with {config.funding_minor} minor units "
            f"each; load for {options.duration_s:.0f} s or {options.ops_max} submissions, "
            f"faults: {', '.join(options.faults) or 'none'}"
        )

        load_t = history.t()
        warmup_s = min(WARMUP_S_MAX, options.duration_s * 0.1)
        nemesis = Nemesis(
            FaultTargets(
                data_dir=settings.data_path,
                api_url=settings.api_url,
                temporal_address=settings.temporal_target,
                temporal_namespace=settings.temporal_namespace,
                run_tag=tag,
            ),
            history,
            registry,
            kinds=list(options.faults),
            seed=seed,
            window_start_t=load_t + warmup_s,
            window_end_t=load_t + options.duration_s * (1 - FAULT_TAIL_SHARE),
            interval_s=options.fault_interval_s,
            owner_engine=_owner_engine_factory(settings),
            on_fault=lambda r: say(
                f"fault {r['kind']} on {r['target']}: {'ok' if r['ok'] else 'FAILED'} "
                f"(t={r['t']:.1f}-{r['t_end']:.1f} s)"
                + ("" if r["ok"] else f" {r['detail'].get('error', '')}")
            ),
        )
        stop = asyncio.Event()
        budget = OpsBudget(options.ops_max, stop)
        load = asyncio.create_task(workload.run(stop, budget))
        faults = asyncio.create_task(nemesis.run(stop))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=options.duration_s)
        stop.set()
        say(f"load stopped at t={history.t():.1f} s after {budget.used} submissions")
        await load
        await faults
        cut_short = await workload.drain(options.drain_timeout_s)
        ready_s = await wait_ready(api.http, READY_TIMEOUT_S)
        say(
            "waiting for the payments to end"
            + ("" if ready_s is not None else " (the stack is NOT ready)")
        )
        statuses = await workload.final_statuses(options.settle_timeout_s)
        ended_at = now_rfc3339()
        info = info.model_copy(update={"ended_at": ended_at})
        write_run_info(run_dir, info)
        summary = summarize(
            info,
            history.records,
            stats,
            statuses,
            elapsed_s=history.t(),
            run_dir=run_dir,
            drain_cut_short=cut_short,
            ready_at_end=ready_s is not None,
        )
        write_json(run_dir / SUMMARY_FILE, summary)
        return ChaosResult(run_dir, summary)
    finally:
        history.close()
        await api.close()
        if nemesis is not None:
            await nemesis.close()


def summarize(
    info: RunInfo,
    records: list[dict[str, Any]],
    stats: HttpStats,
    statuses: dict[str, str | None],
    *,
    elapsed_s: float,
    run_dir: Path,
    drain_cut_short: int,
    ready_at_end: bool,
) -> dict[str, Any]:
    """The run in counts: operations, HTTP retries, faults per kind, payments per status."""
    submits = [r for r in records if r["type"] == "submit"]
    load = [r for r in submits if r.get("purpose") != "funding"]
    ops = [r for r in records if r["type"] == "op"]
    reads = [r for r in records if r["type"] == "read"]
    faults = [r for r in records if r["type"] == "fault"]
    actions: dict[str, Counter[str]] = {}
    for op in ops:
        actions.setdefault(op["op"], Counter())[str(op["status_code"])] += 1
    per_kind: dict[str, dict[str, int]] = {}
    for fault in faults:
        entry = per_kind.setdefault(fault["kind"], {"injected": 0, "ok": 0})
        entry["injected"] += 1
        entry["ok"] += int(bool(fault["ok"]))
    payments = Counter(status or "UNKNOWN" for status in statuses.values())

    return {
        "run_dir": str(run_dir),
        "seed": info.seed,
        "run_tag": getattr(info, "run_tag", None),
        "started_at": info.started_at,
        "ended_at": info.ended_at,
        "duration_s": info.duration_s,
        "elapsed_s": round(elapsed_s, 3),
        "operations": {
            "submissions": len(submits),
            "load_submissions": len(load),
            "funding_submissions": len(submits) - len(load),
            "acked": sum(1 for r in submits if r["acked"]),
            "not_acked": sum(1 for r in submits if not r["acked"]),
            "duplicates_sent": sum(r["duplicates"] for r in submits),
            "keys_with_two_payments": sum(1 for r in submits if r.get("payment_ids")),
            "simulate": dict(Counter(r["simulate"] or "none" for r in load)),
            "awaiting_approval": dict(Counter(r["approval"] for r in load if r["approval"])),
            "cancels_planned": sum(1 for r in load if r["cancel_at_s"] is not None),
            "beyond_balance": sum(1 for r in load if r.get("beyond_balance")),
            "actions": {op: dict(codes) for op, codes in sorted(actions.items())},
            "actions_cut_short": drain_cut_short,
            "reads": dict(Counter(r["what"] for r in reads)),
        },
        "http": {
            "requests": stats.requests,
            "attempts": stats.attempts,
            "retries": stats.retries,
            "gave_up": stats.gave_up,
            "status_codes": dict(sorted(stats.status_codes.items())),
            "retried_because": dict(stats.errors.most_common()),
        },
        "faults": {
            "injected": len(faults),
            "failed": sum(1 for f in faults if not f["ok"]),
            "per_kind": {k: per_kind[k] for k in FAULT_KINDS if k in per_kind},
        },
        "payments": {
            "acknowledged": len(statuses),
            "per_status": dict(payments.most_common()),
            "still_open": sum(1 for s in statuses.values() if s not in TERMINAL_STATUSES),
        },
        "ready_at_end": ready_at_end,
    }
