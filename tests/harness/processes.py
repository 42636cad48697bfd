"""The real `paysaga api` and `paysaga worker` processes, against the test's servers."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from paysaga.settings import Settings
from tests.harness.stack import clean_env, free_port

READY_TIMEOUT_S = 30.0


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """What `paysaga up` gives a service: the application role's login, never the owner's."""
    assert settings.database_app_url is not None
    return clean_env(
        DATABASE_APP_URL=settings.database_app_url,
        TEMPORAL_ADDRESS=settings.temporal_target,
        TEMPORAL_NAMESPACE=settings.temporal_namespace,
        PAYSAGA_TASK_QUEUE=settings.task_queue,
        PAYSAGA_API_KEY_SECRET=settings.api_key_secret.get_secret_value(),
        PAYSAGA_WORKER_SHUTDOWN_GRACE_S="1",
        PAYSAGA_LOG_LEVEL="WARNING",
        **extra,
    )


def start_api(env: dict[str, str], stdout: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """`paysaga api`, on the address `env` gives it, once it answers /readyz with 200."""
    api = subprocess.Popen([sys.executable, "-m", "paysaga", "api"], env=env, stdout=stdout)
    url = f"http://127.0.0.1:{env['PAYSAGA_API_PORT']}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if api.poll() is not None:
            raise AssertionError(f"paysaga api exited with {api.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return api
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop(api)
            raise AssertionError("paysaga api was not ready in time")
        time.sleep(0.2)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Services:
    url: str
    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    def kill_api(self) -> None:
        """SIGKILL: no shutdown, no cleanup, whatever the API was doing."""
        self.api.send_signal(signal.SIGKILL)
        self.api.wait()

    def restart_api(self) -> None:
        """A new `paysaga api` on the same address, once it is ready."""
        self.api = start_api(self.env)


@contextmanager
def api_and_worker(
    settings: Settings, *, output_dir: Path | None = None, **extra_env: str
) -> Iterator[Services]:
    """Both services on the test's servers; with `output_dir`, each one's standard output
    goes to `api.out` and `worker.out` there (the test's own otherwise)."""
    port = free_port()
    env = service_env(settings, PAYSAGA_API_PORT=str(port), **extra_env)
    with ExitStack() as files:
        outputs: dict[str, IO[bytes] | None] = {"api": None, "worker": None}
        if output_dir is not None:
            for name in outputs:
                outputs[name] = files.enter_context(open(output_dir / f"{name}.out", "wb"))
        with _running(env, outputs["api"], outputs["worker"], port) as services:
            yield services


@contextmanager
def _running(
    env: dict[str, str], api_out: IO[bytes] | None, worker_out: IO[bytes] | None, port: int
) -> Iterator[Services]:
    worker = subprocess.Popen(
        [sys.executable, "-m", "paysaga", "worker"], env=env, stdout=worker_out
    )
    services: Services | None = None
    try:
        services = Services(f"http://127.0.0.1:{port}", start_api(env, api_out), worker, env)
        yield services
    finally:
        for process in (services.api if services else None, worker):
            if process is not None and process.poll() is None:
                process.terminate()
        for process in (services.api if services else None, worker):
            if process is not None:
                stop(process)
