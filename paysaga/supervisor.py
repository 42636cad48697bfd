"""A small process supervisor: start services as children, restart them when they crash.

Guarantees, in order of importance:

- **No orphans.** Every child gets PR_SET_PDEATHSIG, so even a `kill -9` of the
  supervisor takes its children down. On a clean stop, children are stopped in the
  reverse order of their start, each with its own signal and a bounded wait, then
  killed with their whole process group.
- **Healing.** A child that exits while the supervisor is running is restarted after
  a backoff that doubles from RESTART_BACKOFF_S_MIN to RESTART_BACKOFF_S_MAX, and
  resets once the child has stayed up for RESTART_BACKOFF_RESET_S. Every restart is
  logged.
- **Held restarts.** A restart waits while a hold is in place: a file named after the
  service in `restart_holds_dir`, holding the Unix time until which to wait (at most
  RESTART_HOLD_S_MAX from now). The chaos tool uses it to keep a killed worker down
  for a while (`paysaga chaos run`); the directory lives in the private run directory.
- **Visibility.** Each child's output goes to its own log file, and optionally to the
  console with a `name |` prefix. The current pids are kept in a state file.
- **Privacy.** Children start with umask 077, and log files are 0600: what a service
  writes (Temporal's SQLite file, a log line with a payment in it) is readable by its
  own user alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("paysaga.supervisor")

RESTART_BACKOFF_S_MIN = 0.25
RESTART_BACKOFF_S_MAX = 10.0
RESTART_BACKOFF_RESET_S = 30.0
RESTART_HOLD_S_MAX = 300.0
OUTPUT_LINE_BYTES_MAX = 64 * 1024
CHILD_UMASK = 0o077
LOG_FILE_MODE = 0o600
_PR_SET_PDEATHSIG = 1


def _child_setup(sig: int) -> Callable[[], None]:
    """A pre-exec hook: deliver `sig` to the child when the supervisor dies, however it
    dies, and make every file the child creates private to its user."""

    def hook() -> None:
        os.umask(CHILD_UMASK)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return hook


def _open_log(path: Path) -> io.BufferedWriter:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_FILE_MODE)
    # A log made by an older version may be world-readable.
    os.fchmod(fd, LOG_FILE_MODE)
    return os.fdopen(fd, "ab")


_CONSOLE_SKIPPED_KEYS = frozenset({"ts", "level", "service", "logger", "msg", "color_message"})


def _readable(line: bytes) -> str:
    """A JSON log line as `level message key=value ...`; any other line as it is."""
    text = line.decode(errors="replace").rstrip()
    try:
        entry = json.loads(text)
    except ValueError:
        return text
    if not isinstance(entry, dict) or "msg" not in entry:
        return text
    extras = " ".join(f"{k}={v}" for k, v in entry.items() if k not in _CONSOLE_SKIPPED_KEYS)
    return f"{entry.get('level', ''):<7} {entry['msg']} {extras}".rstrip()


@dataclass
class ServiceSpec:
    """How to run one service."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    log_file: Path | None = None
    echo: bool = True
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout_s: float = 30.0
    process_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Running:
    spec: ServiceSpec
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    task: asyncio.Task[None] | None = None
    spawned: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    """Runs services as children of this process and keeps them running until `stop()`."""

    def __init__(
        self,
        *,
        console: Callable[[str], None],
        state_file: Path | None = None,
        restart_holds_dir: Path | None = None,
    ) -> None:
        self._console = console
        self._state_file = state_file
        self._restart_holds_dir = restart_holds_dir
        self._services: dict[str, _Running] = {}
        self._stopping = False

    # --- public -------------------------------------------------------------------------
    async def start(self, spec: ServiceSpec) -> int:
        """Start a service and keep it running. Returns the first process's pid."""
        if spec.name in self._services:
            raise ValueError(f"service {spec.name!r} is already supervised")
        running = _Running(spec)
        self._services[spec.name] = running
        running.task = asyncio.create_task(self._keep_running(running), name=f"sup-{spec.name}")
        await running.spawned.wait()
        if running.process is None:
            # The first spawn failed (binary missing, permission denied): that is a bug in
            # the set-up, not a crash to heal by retrying.
            assert running.task.done()
            running.task.result()
        assert running.process is not None
        return running.process.pid

    def pid(self, name: str) -> int | None:
        running = self._services.get(name)
        if running is None or running.process is None or running.process.returncode is not None:
            return None
        return running.process.pid

    def restarts(self, name: str) -> int:
        return self._services[name].restarts

    async def stop(self) -> None:
        """Stop every service, in the reverse order of start."""
        self._stopping = True
        for running in reversed(list(self._services.values())):
            await self._stop_one(running)
        self._write_state()

    # --- internals ----------------------------------------------------------------------
    async def _spawn(self, running: _Running) -> asyncio.subprocess.Process:
        spec = running.spec
        kwargs = dict(spec.process_kwargs)
        process = await asyncio.create_subprocess_exec(
            *spec.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=spec.env,
            # Own process group: a Ctrl-C in the terminal reaches only the supervisor,
            # which then stops the services in order.
            process_group=0,
            preexec_fn=_child_setup(spec.stop_signal),
            limit=OUTPUT_LINE_BYTES_MAX,
            **kwargs,
        )
        running.process = process
        running.started_at = time.monotonic()
        self._write_state()
        return process

    async def _pump_output(self, running: _Running, process: asyncio.subprocess.Process) -> None:
        spec = running.spec
        assert process.stdout is not None
        # Appending a line to a local log file is fast enough to do inline.
        sink = _open_log(spec.log_file) if spec.log_file else None
        try:
            while True:
                try:
                    line = await process.stdout.readline()
                except ValueError:  # a line longer than the limit: keep what fits
                    line = await process.stdout.read(OUTPUT_LINE_BYTES_MAX)
                if not line:
                    return
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                if spec.echo:
                    self._console(f"{spec.name} | {_readable(line)}")
        finally:
            if sink is not None:
                sink.close()

    async def _keep_running(self, running: _Running) -> None:
        spec = running.spec
        backoff_s = RESTART_BACKOFF_S_MIN
        try:
            while not self._stopping:
                process = await self._spawn(running)
                running.spawned.set()
                pump = asyncio.create_task(self._pump_output(running, process))
                code = await process.wait()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(pump, 2.0)
                if self._stopping:
                    return
                uptime_s = time.monotonic() - running.started_at
                if uptime_s >= RESTART_BACKOFF_RESET_S:
                    backoff_s = RESTART_BACKOFF_S_MIN
                running.restarts += 1
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
                message = (
                    f"{spec.name} exited with {how} after {uptime_s:.1f} s; "
                    f"restart #{running.restarts} in {backoff_s:.2f} s"
                )
                log.warning(message)
                await asyncio.sleep(backoff_s)
                await self._wait_restart_hold(spec.name)
                backoff_s = min(backoff_s * 2, RESTART_BACKOFF_S_MAX)
        finally:
            running.spawned.set()

    async def _wait_restart_hold(self, name: str) -> None:
        """Wait out a hold on restarting `name`, if one is in place; then lift it."""
        if self._restart_holds_dir is None:
            return
        hold = self._restart_holds_dir / name
        try:
            until = float(hold.read_text().strip())
        except (OSError, ValueError):
            return
        hold.unlink(missing_ok=True)
        wait_s = min(until - time.time(), RESTART_HOLD_S_MAX)
        if wait_s > 0:
            log.warning("restart of %s held for %.1f s", name, wait_s)
            await asyncio.sleep(wait_s)

    async def _stop_one(self, running: _Running) -> None:
        process = running.process
        spec = running.spec
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(spec.stop_signal)
            try:
                await asyncio.wait_for(process.wait(), spec.stop_timeout_s)
            except TimeoutError:
                log.warning("%s did not stop in %.0f s; killing it", spec.name, spec.stop_timeout_s)
            # Whatever the service left behind in its group goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                await process.wait()
        if running.task is not None:
            running.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running.task

    def _write_state(self) -> None:
        if self._state_file is None:
            return
        state = {
            "supervisor_pid": os.getpid(),
            "services": {
                name: {"pid": self.pid(name), "restarts": running.restarts}
                for name, running in self._services.items()
            },
        }
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self._state_file)
