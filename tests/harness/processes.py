"""The real `paysaga api` and `paysaga worker` processes, against the test's servers."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from paysaga.settings import Settings
from tests.harness.stack import clean_env, free_port

READY_TIMEOUT_S = 30.0


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = clean_env(
        DATABASE_URL=str(settings.database_url),
        TEMPORAL_ADDRESS=settings.temporal_target,
        TEMPORAL_NAMESPACE=settings.temporal_namespace,
        PAYSAGA_TASK_QUEUE=settings.task_queue,
        PAYSAGA_API_KEY_SECRET=settings.api_key_secret.get_secret_value(),
        PAYSAGA_WORKER_SHUTDOWN_GRACE_S="1",
        PAYSAGA_LOG_LEVEL="WARNING",
        **extra,
    )
    if settings.database_app_url:
        env["DATABASE_APP_URL"] = settings.database_app_url
    return env


@dataclass
class Services:
    url: str
    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]


@contextmanager
def api_and_worker(settings: Settings) -> Iterator[Services]:
    port = free_port()
    env = service_env(settings, PAYSAGA_API_PORT=str(port))
    worker = subprocess.Popen([sys.executable, "-m", "paysaga", "worker"], env=env)
    api = subprocess.Popen([sys.executable, "-m", "paysaga", "api"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if api.poll() is not None:
                raise AssertionError(f"paysaga api exited with {api.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("paysaga api was not ready in time")
            time.sleep(0.2)
        yield Services(url, api, worker)
    finally:
        for process in (api, worker):
            process.terminate()
        for process in (api, worker):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
