"""The stack a bank run attacks: `paysaga up` with two workers, a fee, and a sweeper
quick enough that a terminated payment is repaired within seconds."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from paysaga.embedded_pg import EmbeddedPostgres
from tests.harness.stack import RunningStack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[RunningStack]:
    # PostgreSQL's OS user (when we are root) must pass through the parent directory.
    root = Path(tempfile.mkdtemp(prefix="paysaga-bank-"))
    root.chmod(0o711)
    running = RunningStack.new(
        root / "data",
        PAYSAGA_WORKERS="2",
        PAYSAGA_FEE_BPS="100",
        PAYSAGA_FEES_ACCOUNT_ID="fees",
        PAYSAGA_SWEEP_INTERVAL_S="5",
        PAYSAGA_SWEEP_IDLE_S="2",
    )
    yield running
    if running.process is not None and running.process.poll() is None:
        running.stop(signal.SIGKILL)
    # The services' logs outlive the stack, beside the run (pytest keeps its last runs).
    shutil.copytree(running.data_dir / "logs", tmp_path / "logs", dirs_exist_ok=True)
    shutil.rmtree(EmbeddedPostgres(running.data_dir / "pg").socket_dir, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
