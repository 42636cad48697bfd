"""Drive a real `paysaga up` process from a test: start, wait, inspect, stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import psutil

from paysaga.embedded_pg import EmbeddedPostgres
from paysaga.settings import Settings

STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**overrides: str) -> dict[str, str]:
    """The test process's environment minus any paysaga configuration, plus overrides."""
    env = {k: v for k, v in os.environ.items() if k not in Settings.env_names()}
    env.update(overrides)
    return env


def paysaga(
    *args: str, env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paysaga", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@dataclass
class RunningStack:
    """A `paysaga up` child process and the ports it was given."""

    data_dir: Path
    env: dict[str, str]
    api_port: int
    temporal_port: int
    ui_port: int
    process: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)
    _drain: threading.Thread | None = None

    @classmethod
    def new(cls, data_dir: Path, **env: str) -> RunningStack:
        api, temporal, ui = free_port(), free_port(), free_port()
        full_env = clean_env(
            PAYSAGA_DATA_DIR=str(data_dir),
            PAYSAGA_API_PORT=str(api),
            PAYSAGA_TEMPORAL_PORT=str(temporal),
            PAYSAGA_TEMPORAL_UI_PORT=str(ui),
            PAYSAGA_WORKER_SHUTDOWN_GRACE_S="5",
            **env,
        )
        return cls(data_dir, full_env, api, temporal, ui)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> float:
        """Start and wait until /readyz answers 200. Returns the seconds it took."""
        started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "paysaga", "up"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # `paysaga up` writes its services' output to its console: were the pipe to us
        # left full, that write would block its event loop, and it would restart
        # nothing any more. So it is read as it comes, into `output`.
        self._drain = threading.Thread(
            target=self._collect, args=(self.process.stdout,), name="stack-output", daemon=True
        )
        self._drain.start()
        self.wait_ready()
        return time.monotonic() - started

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> httpx.Response:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"paysaga up exited early:\n{self.read_output()}")
            try:
                response = httpx.get(f"{self.api_url}/readyz", timeout=2)
                if response.status_code == 200:
                    return response
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"not ready in {timeout_s} s:\n{self.read_output()}")
            time.sleep(0.2)

    def state(self) -> dict[str, dict[str, int]]:
        return dict(json.loads((self.data_dir / "run" / "stack.json").read_text())["services"])

    def pid(self, service: str) -> int:
        return int(self.state()[service]["pid"])

    def wait_new_pid(self, service: str, old: int, timeout_s: float = 15.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid = self.state()[service]["pid"]
            if pid and pid != old:
                return int(pid)
            time.sleep(0.1)
        raise AssertionError(f"{service} did not come back within {timeout_s} s")

    def process_tree(self) -> list[psutil.Process]:
        assert self.process is not None
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        return self.process.returncode

    def _collect(self, stdout: IO[str]) -> None:
        for line in stdout:
            self.output.append(line)

    def read_output(self) -> str:
        """Everything the stack printed so far (all of it, once it has exited)."""
        assert self.process is not None
        if self.process.poll() is not None and self._drain is not None:
            self._drain.join(timeout=10)
        return "".join(self.output)


def wait_all_gone(processes: list[psutil.Process], timeout_s: float = 15.0) -> list[psutil.Process]:
    """Processes still alive (zombies count as gone) after the timeout."""
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@contextlib.contextmanager
def private_stack(**env: str) -> Iterator[RunningStack]:
    """A stack (not started) with a data directory of its own, killed and removed after.

    Not pytest's tmp_path: it is private to us, and PostgreSQL's OS user (when we are
    root) must pass through. This directory is ours to open; the data directory inside
    is deep enough that the socket needs the fallback directory under /tmp.
    """
    root = Path(tempfile.mkdtemp(prefix="paysaga-stack-"))
    root.chmod(0o711)
    running = RunningStack.new(root / f"data-{'d' * 60}", **env)
    try:
        yield running
    finally:
        if running.process is not None and running.process.poll() is None:
            running.stop(signal.SIGKILL)
        shutil.rmtree(EmbeddedPostgres(running.data_dir / "pg").socket_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
