"""The supervisor heals crashed services, logs restarts and never leaves orphans."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from paysaga.supervisor import ServiceSpec, Supervisor

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(300)"]


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


async def _wait_for_new_pid(sup: Supervisor, name: str, old: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid = sup.pid(name)
        if pid is not None and pid != old:
            return pid
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} was not restarted within {timeout_s} s")


async def _wait_for_lines(lines: list[str], line: str, count: int) -> None:
    for _ in range(200):
        if lines.count(line) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{line!r} seen {lines.count(line)} times, expected {count}")


async def test_a_killed_service_is_restarted_and_the_restart_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines: list[str] = []
    sup = Supervisor(console=lines.append, state_file=tmp_path / "state.json")
    first = await sup.start(ServiceSpec("sleeper", SLEEPER, log_file=tmp_path / "sleeper.log"))
    try:
        await _wait_for_lines(lines, "sleeper | up", 1)
        with caplog.at_level(logging.WARNING, logger="paysaga.supervisor"):
            os.kill(first, signal.SIGKILL)
            second = await _wait_for_new_pid(sup, "sleeper", first)
        await _wait_for_lines(lines, "sleeper | up", 2)
        assert sup.restarts("sleeper") == 1
        assert any("sleeper exited with signal SIGKILL" in r.message for r in caplog.records)
        state = json.loads((tmp_path / "state.json").read_text())
        assert state["services"]["sleeper"] == {"pid": second, "restarts": 1}
    finally:
        await sup.stop()
    assert _gone(second)
    assert (tmp_path / "sleeper.log").read_text().count("up") == 2


async def test_a_restart_waits_out_a_hold_on_the_service(tmp_path: Path) -> None:
    """The chaos run keeps a killed worker down for a while: a hold file, read (and
    lifted) when the restart is due."""
    holds = tmp_path / "holds"
    holds.mkdir()
    sup = Supervisor(console=lambda _: None, restart_holds_dir=holds)
    first = await sup.start(ServiceSpec("sleeper", SLEEPER))
    try:
        (holds / "sleeper").write_text(f"{time.time() + 1.5:.3f}")
        killed_at = time.monotonic()
        os.kill(first, signal.SIGKILL)
        await _wait_for_new_pid(sup, "sleeper", first)
        assert time.monotonic() - killed_at >= 1.5
        assert not (holds / "sleeper").exists()
        # Lifted: the next crash restarts at once (after the backoff alone).
        second = sup.pid("sleeper")
        assert second is not None
        killed_at = time.monotonic()
        os.kill(second, signal.SIGKILL)
        await _wait_for_new_pid(sup, "sleeper", second)
        assert time.monotonic() - killed_at < 1.5
    finally:
        await sup.stop()


async def test_restarts_back_off_when_a_service_keeps_crashing(tmp_path: Path) -> None:
    sup = Supervisor(console=lambda _: None)
    await sup.start(ServiceSpec("crasher", [sys.executable, "-c", "raise SystemExit(3)"]))
    await asyncio.sleep(2.0)
    await sup.stop()
    # Backoff 0.25, 0.5, 1.0, ... s: about 3 restarts in 2 s, never a tight loop.
    assert 2 <= sup.restarts("crasher") <= 5


async def test_stop_takes_down_the_whole_process_group(tmp_path: Path) -> None:
    sup = Supervisor(console=lambda _: None)
    script = "sleep 300 & echo $!; wait"
    pid = await sup.start(ServiceSpec("shell", ["sh", "-c", script], stop_timeout_s=1.0))
    await asyncio.sleep(0.3)
    children = psutil.Process(pid).children(recursive=True)
    assert children, "the shell should have started a background sleep"
    await sup.stop()
    assert _gone(pid)
    assert all(_gone(child.pid) for child in children)


def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    """Even `kill -9` of the supervisor leaves no orphan: children get PDEATHSIG."""
    program = textwrap.dedent(
        f"""
        import asyncio, sys
        from paysaga.supervisor import ServiceSpec, Supervisor

        async def main():
            sup = Supervisor(console=lambda _: None)
            pid = await sup.start(ServiceSpec("sleeper", {SLEEPER!r}))
            print(pid, flush=True)
            await asyncio.sleep(300)

        asyncio.run(main())
        """
    )
    supervisor = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, text=True
    )
    try:
        assert supervisor.stdout is not None
        child = int(supervisor.stdout.readline())
        assert psutil.pid_exists(child)
        supervisor.kill()
        supervisor.wait()
        assert _gone(child), "the child outlived its supervisor"
    finally:
        supervisor.kill()
