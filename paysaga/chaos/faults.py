"""The faults a chaos run injects while the load runs (the "nemesis").

Against a stack started by `paysaga up`, whose supervisor restarts any service that
exits and keeps their pids in `<data dir>/run/stack.json`:

- `kill-worker`: `kill -9` of a worker, back after a random delay (a restart hold, see
  paysaga/supervisor.py) while the other worker carries on;
- `kill-api`: `kill -9` of the API; the supervisor restarts it;
- `kill-projector`: `kill -9` of the projector while it has events to apply (a read
  model lags);
- `pg-restart-fast`: SIGINT to the postmaster, PostgreSQL's fast shutdown, then a restart;
- `pg-restart-immediate`: SIGQUIT to the postmaster, an immediate shutdown (crash
  recovery at the restart);
- `temporal-restart`: SIGKILL or SIGTERM of the Temporal dev server (it persists to
  SQLite);
- `processor-error`, `processor-hang`: the processor simulator fails every call
  (retryably), or answers none, for a few seconds (an outage window in PostgreSQL);
- `terminate`, `cancel`: `temporal workflow terminate` or `cancel` of a running payment;
- `reset`: `temporal workflow reset` of a running or closed payment, to its first or
  last workflow task or to a random completed one.

A process or server fault is `ok` once the service runs again under a new pid and the
API's `/readyz` answers 200. Faults run in four lanes at once (processes, servers, the
processor, operators), one fault at a time in each: a lane first injects each of its
kinds once, at random moments spread over the run, then random kinds at random
intervals until the run's window closes. Each kind asked for is injected at least
once: one that the end of the load overtook is injected right after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from activities.processor import FaultMode, open_fault_window
from paysaga.chaos.history import FAULT_KINDS, HistoryWriter
from paysaga.chaos.workload import Registry, wait_ready
from paysaga.temporal import find_binary

LANES: dict[str, tuple[str, ...]] = {
    "processes": ("kill-worker", "kill-api", "kill-projector"),
    "servers": ("pg-restart-fast", "pg-restart-immediate", "temporal-restart"),
    "processor": ("processor-error", "processor-hang"),
    "operators": ("terminate", "cancel", "reset"),
}
assert sorted(k for kinds in LANES.values() for k in kinds) == sorted(FAULT_KINDS)

RECOVERY_TIMEOUT_S = 90.0
PID_POLL_S = 0.1
WORKER_DOWN_S = (1.0, 5.0)
PROCESSOR_WINDOW_S: dict[str, tuple[float, float]] = {
    "processor-error": (2.0, 6.0),
    # Past the authorization's heartbeat timeout (PAYSAGA_PROCESSOR_HEARTBEAT_S, 5 s) at
    # times, so that Temporal gives up on a hung call and retries it.
    "processor-hang": (3.0, 8.0),
}
DATABASE_RETRY_S = 60.0
PROJECTOR_BUSY_WAIT_S = 5.0
PROJECTOR_BUSY_POLL_S = 0.02
OPERATOR_TARGET_WAIT_S = 15.0
OPERATOR_TRIES_MAX = 5
CLI_TIMEOUT_S = 30.0
LIST_LIMIT = 500
PAYMENT_WORKFLOW_PREFIX = "payment-"
RESET_POINTS = ("FirstWorkflowTask", "LastWorkflowTask", "event-id")
OUTPUT_CHARS_MAX = 300
LIST_ERRORS_KEPT = 3


@dataclass
class FaultOutcome:
    target: str
    detail: dict[str, Any] = field(default_factory=dict)
    ok: bool = True


@dataclass(frozen=True)
class FaultTargets:
    """Where the stack under test lives."""

    data_dir: Path
    api_url: str
    temporal_address: str
    temporal_namespace: str
    run_tag: str


class Nemesis:
    """Injects the requested faults, in lanes, within [window_start_t, window_end_t]
    (seconds since the run started), and records each in the history."""

    def __init__(
        self,
        targets: FaultTargets,
        history: HistoryWriter,
        registry: Registry,
        *,
        kinds: list[str],
        seed: int,
        window_start_t: float,
        window_end_t: float,
        interval_s: float,
        owner_engine: Callable[[], AsyncEngine] | None,
        on_fault: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {', '.join(sorted(unknown))}")
        self.targets = targets
        self.history = history
        self.registry = registry
        self.kinds = kinds
        self.seed = seed
        self.window = (window_start_t, window_end_t)
        self.interval_s = interval_s
        self._owner_engine_factory = owner_engine
        self._owner_engine: AsyncEngine | None = None
        self._on_fault = on_fault
        # The last few failed listings of payments, which a fault that found none names.
        self.list_errors: deque[str] = deque(maxlen=LIST_ERRORS_KEPT)
        self._http = httpx.AsyncClient(base_url=targets.api_url, timeout=5.0)
        self._faults: dict[str, Callable[[random.Random], Awaitable[FaultOutcome]]] = {
            "kill-worker": self._kill_worker,
            "kill-api": self._kill_api,
            "kill-projector": self._kill_projector,
            "pg-restart-fast": lambda rng: self._restart_server("postgres", signal.SIGINT),
            "pg-restart-immediate": lambda rng: self._restart_server("postgres", signal.SIGQUIT),
            "temporal-restart": lambda rng: self._restart_server(
                "temporal", rng.choice((signal.SIGKILL, signal.SIGTERM))
            ),
            "processor-error": lambda rng: self._processor_window(rng, "error"),
            "processor-hang": lambda rng: self._processor_window(rng, "hang"),
            "terminate": lambda rng: self._operator(rng, "terminate"),
            "cancel": lambda rng: self._operator(rng, "cancel"),
            "reset": self._reset,
        }

    async def close(self) -> None:
        await self._http.aclose()
        if self._owner_engine is not None:
            await self._owner_engine.dispose()

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set or the window closes; a fault under way is finished."""
        lanes = []
        for name, lane_kinds in LANES.items():
            chosen = [k for k in lane_kinds if k in self.kinds]
            if chosen:
                lanes.append(asyncio.create_task(self._lane(name, chosen, stop)))
        await asyncio.gather(*lanes)

    async def _lane(self, name: str, kinds: list[str], stop: asyncio.Event) -> None:
        rng = random.Random(f"{self.seed}-nemesis-{name}")
        start_t, end_t = self.window
        first = list(kinds)
        rng.shuffle(first)
        # Each kind once first, at random moments in even slices of the window.
        slice_s = max(end_t - start_t, 0.0) / len(first)
        queue = [
            (start_t + (i + rng.uniform(0.0, 0.5)) * slice_s, kind) for i, kind in enumerate(first)
        ]
        while True:
            first_pass = bool(queue)
            if queue:
                at_t, kind = queue.pop(0)
            else:
                at_t = self.history.t() + rng.expovariate(1.0 / self.interval_s)
                kind = rng.choice(kinds)
                if stop.is_set() or at_t > end_t:
                    return
            wait_s = at_t - self.history.t()
            if wait_s > 0 and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=wait_s)
            # Every kind asked for is injected once, even if the load stopped first (the
            # run's payments are still settling then); later ones only while it runs.
            if stop.is_set() and not first_pass:
                return
            await self.inject(kind, rng)

    async def inject(self, kind: str, rng: random.Random) -> dict[str, Any]:
        """Inject one fault now, wait for the system to come back, record it."""
        t = self.history.t()
        try:
            outcome = await self._faults[kind](rng)
        except Exception as error:  # a fault that could not be applied is recorded, not raised
            outcome = FaultOutcome("?", {"error": f"{type(error).__name__}: {error}"}, ok=False)
        record = self.history.write(
            "fault", t=t, kind=kind, target=outcome.target, detail=outcome.detail, ok=outcome.ok
        )
        if self._on_fault is not None:
            self._on_fault(record)
        return record

    # --- processes and servers --------------------------------------------------------------
    def _services(self) -> dict[str, dict[str, Any]]:
        state = json.loads((self.targets.data_dir / "run" / "stack.json").read_text())
        services: dict[str, dict[str, Any]] = state["services"]
        return services

    def _pid(self, service: str) -> int | None:
        entry = self._services().get(service)
        pid = entry.get("pid") if entry else None
        return int(pid) if pid else None

    async def _wait_new_pid(self, service: str, old: int, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError):
                pid = self._pid(service)
                if pid is not None and pid != old:
                    return pid
            await asyncio.sleep(PID_POLL_S)
        return None

    async def _kill_and_recover(
        self, service: str, sig: signal.Signals, detail: dict[str, Any], back_within_s: float
    ) -> FaultOutcome:
        pid = self._pid(service)
        if pid is None:
            raise ProcessLookupError(f"{service} is not running")
        started = time.monotonic()
        os.kill(pid, sig)
        new_pid = await self._wait_new_pid(service, pid, back_within_s)
        ready_s = await wait_ready(self._http, RECOVERY_TIMEOUT_S) if new_pid else None
        detail = {
            **detail,
            "signal": sig.name,
            "pid": pid,
            "new_pid": new_pid,
            "restarted_after_s": round(time.monotonic() - started, 3) if new_pid else None,
            "ready_after_s": round(time.monotonic() - started, 3) if ready_s is not None else None,
        }
        if new_pid is None:
            detail["error"] = f"{service} did not come back within {back_within_s:.0f} s"
        elif ready_s is None:
            detail["error"] = f"/readyz did not answer 200 within {RECOVERY_TIMEOUT_S:.0f} s"
        return FaultOutcome(service, detail, ok=new_pid is not None and ready_s is not None)

    async def _kill_worker(self, rng: random.Random) -> FaultOutcome:
        workers = sorted(n for n in self._services() if n == "worker" or n.startswith("worker-"))
        if not workers:
            return FaultOutcome("worker", {"error": "no worker in the stack"}, ok=False)
        target = rng.choice(workers)
        down_s = round(rng.uniform(*WORKER_DOWN_S), 3)
        # The supervisor waits out the hold before it restarts the worker.
        holds = self.targets.data_dir / "run" / "restart-holds"
        holds.mkdir(mode=0o700, exist_ok=True)
        hold = holds / target
        hold.write_text(f"{time.time() + down_s:.3f}")
        try:
            return await self._kill_and_recover(
                target,
                signal.SIGKILL,
                {"down_s": down_s, "workers": workers},
                back_within_s=down_s + RECOVERY_TIMEOUT_S,
            )
        except ProcessLookupError:
            hold.unlink(missing_ok=True)
            raise

    async def _kill_api(self, rng: random.Random) -> FaultOutcome:
        return await self._kill_and_recover("api", signal.SIGKILL, {}, RECOVERY_TIMEOUT_S)

    async def _kill_projector(self, rng: random.Random) -> FaultOutcome:
        """Kill the projector while a read model trails the ledger: it has a batch to
        apply, or is applying one."""
        lag = 0
        deadline = time.monotonic() + PROJECTOR_BUSY_WAIT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                ready = (await self._http.get("/readyz")).json()
                models = ready.get("read_models") or {}
                lag = max((int(m.get("events", 0)) for m in models.values()), default=0)
                if lag > 0:
                    break
            await asyncio.sleep(PROJECTOR_BUSY_POLL_S)
        return await self._kill_and_recover(
            "projector", signal.SIGKILL, {"lag_events": lag}, RECOVERY_TIMEOUT_S
        )

    async def _restart_server(self, service: str, sig: signal.Signals) -> FaultOutcome:
        if service not in self._services():
            return FaultOutcome(
                service, {"error": f"{service} is not supervised by this stack"}, ok=False
            )
        return await self._kill_and_recover(service, sig, {}, RECOVERY_TIMEOUT_S)

    # --- the processor ----------------------------------------------------------------------
    def _engine(self) -> AsyncEngine:
        if self._owner_engine is None:
            if self._owner_engine_factory is None:
                raise RuntimeError("processor faults need the schema owner's database login")
            self._owner_engine = self._owner_engine_factory()
        return self._owner_engine

    async def _with_database(self, call: Callable[[AsyncEngine], Awaitable[Any]]) -> Any:
        """Run `call`, retrying while the database is away (a server fault in another
        lane may be restarting it)."""
        deadline = time.monotonic() + DATABASE_RETRY_S
        while True:
            try:
                return await call(self._engine())
            except (DBAPIError, OSError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _processor_window(self, rng: random.Random, mode: FaultMode) -> FaultOutcome:
        kind = f"processor-{mode}"
        window_s = round(rng.uniform(*PROCESSOR_WINDOW_S[kind]), 3)
        window = await self._with_database(
            lambda engine: open_fault_window(
                engine, mode, window_s, reason=f"chaos run {self.targets.run_tag}"
            )
        )
        await asyncio.sleep(max((window.ends_at - window.starts_at).total_seconds(), 0.0))

        async def hits(engine: AsyncEngine) -> int:
            async with engine.connect() as conn:
                found = await conn.execute(
                    text(
                        "SELECT count(*) FROM processor_calls WHERE outcome = :outcome "
                        "AND called_at >= :starts AND called_at < :ends"
                    ),
                    {
                        "outcome": f"fault_{mode}",
                        "starts": window.starts_at,
                        "ends": window.ends_at,
                    },
                )
                return int(found.scalar_one())

        calls = await self._with_database(hits)
        return FaultOutcome(
            "processor",
            {**window.to_json(), "window_s": window_s, "calls_hit": calls},
            ok=True,
        )

    # --- operators, through Temporal's CLI --------------------------------------------------
    async def _temporal(self, *args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            find_binary("temporal"),
            *args,
            "--address",
            self.targets.temporal_address,
            "--namespace",
            self.targets.temporal_namespace,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            return -1, "", f"temporal {args[0]} {args[1]} timed out"
        assert process.returncode is not None
        return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    async def _payments(self, running: bool) -> list[str]:
        """Workflow ids of this run's payments, running or closed, as Temporal lists them.
        A listing that fails is noted in `self.list_errors` (the fault's outcome names it)."""
        state = '="Running"' if running else '!="Running"'
        code, out, err = await self._temporal(
            "workflow",
            "list",
            "--query",
            f'WorkflowType="PaymentWorkflow" AND ExecutionStatus{state}',
            "--limit",
            str(LIST_LIMIT),
            "--output",
            "json",
        )
        if code != 0:
            self.list_errors.append(f"temporal workflow list: {err.strip()[:OUTPUT_CHARS_MAX]}")
            return []
        try:
            listed = json.loads(out or "[]")
        except ValueError:
            self.list_errors.append("temporal workflow list: output is not JSON")
            return []
        ids = []
        for execution in listed if isinstance(listed, list) else []:
            workflow_id = str(execution.get("execution", {}).get("workflowId", ""))
            if workflow_id.removeprefix(PAYMENT_WORKFLOW_PREFIX) in self.registry:
                ids.append(workflow_id)
        return sorted(set(ids))

    async def _pick(self, rng: random.Random, running: bool) -> str | None:
        deadline = time.monotonic() + OPERATOR_TARGET_WAIT_S
        while True:
            ids = await self._payments(running)
            if ids:
                return rng.choice(ids)
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.5)

    async def _operator(
        self, rng: random.Random, action: Literal["terminate", "cancel"]
    ) -> FaultOutcome:
        failures: list[str] = []
        for _ in range(OPERATOR_TRIES_MAX):
            workflow_id = await self._pick(rng, running=True)
            if workflow_id is None:
                return FaultOutcome(
                    "payment",
                    {
                        "error": "no running payment to act on",
                        "tries": failures,
                        "list_errors": list(self.list_errors),
                    },
                    False,
                )
            args = ["workflow", action, "--workflow-id", workflow_id]
            if action == "terminate":
                args += ["--reason", f"chaos run {self.targets.run_tag}: an operator terminated it"]
            code, out, err = await self._temporal(*args)
            if code == 0:
                return FaultOutcome(
                    workflow_id,
                    {
                        "payment_id": workflow_id.removeprefix(PAYMENT_WORKFLOW_PREFIX),
                        "output": out.strip()[:OUTPUT_CHARS_MAX],
                        "earlier_tries": failures,
                    },
                )
            # It ended between the listing and the action: pick another.
            failures.append(f"{workflow_id}: {err.strip()[:OUTPUT_CHARS_MAX]}")
        return FaultOutcome("payment", {"error": "every try failed", "tries": failures}, False)

    async def _reset(self, rng: random.Random) -> FaultOutcome:
        failures: list[str] = []
        for _ in range(OPERATOR_TRIES_MAX):
            running = rng.random() < 0.5
            workflow_id = await self._pick(rng, running=running)
            if workflow_id is None:
                running = not running
                workflow_id = await self._pick(rng, running=running)
            if workflow_id is None:
                return FaultOutcome(
                    "payment",
                    {"error": "no payment to reset", "list_errors": list(self.list_errors)},
                    False,
                )
            point = rng.choice(RESET_POINTS)
            args = ["workflow", "reset", "--workflow-id", workflow_id]
            event_id: int | None = None
            if point == "event-id":
                event_id = await self._random_completed_task(rng, workflow_id)
                if event_id is None:
                    point = "FirstWorkflowTask"
            if event_id is not None:
                args += ["--event-id", str(event_id)]
            else:
                args += ["--type", point]
            args += ["--reason", f"chaos run {self.targets.run_tag}: an operator reset it"]
            code, out, err = await self._temporal(*args)
            detail = {
                "payment_id": workflow_id.removeprefix(PAYMENT_WORKFLOW_PREFIX),
                "state": "running" if running else "closed",
                "point": point,
                "event_id": event_id,
            }
            if code == 0:
                return FaultOutcome(
                    workflow_id,
                    {**detail, "output": out.strip()[:OUTPUT_CHARS_MAX], "earlier_tries": failures},
                )
            failures.append(f"{workflow_id} {point}: {err.strip()[:OUTPUT_CHARS_MAX]}")
        return FaultOutcome("payment", {"error": "every try failed", "tries": failures}, False)

    async def _random_completed_task(self, rng: random.Random, workflow_id: str) -> int | None:
        """A random WorkflowTaskCompleted event of the workflow's latest run."""
        code, out, _ = await self._temporal(
            "workflow", "show", "--workflow-id", workflow_id, "--output", "json"
        )
        if code != 0:
            return None
        try:
            events = json.loads(out).get("events", [])
        except (ValueError, AttributeError):
            return None
        completed = [
            int(e["eventId"])
            for e in events
            if e.get("eventType") in ("EVENT_TYPE_WORKFLOW_TASK_COMPLETED", "WorkflowTaskCompleted")
        ]
        return rng.choice(completed) if completed else None
