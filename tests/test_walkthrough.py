"""The README's walkthrough, run as written against a real `paysaga up`.

Every shell block between the walkthrough's markers is run, in order, in one bash
shell (`set -euo pipefail`), so a command that no longer works fails this test. Only
the addresses are moved (the stack under test has ports of its own), and the first
block, `make up` / `make test`, is checked against the Makefile rather than run: the
stack under test is started with the very command `make up` runs, and `make test` is
what runs this.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness.stack import RunningStack, private_stack

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BEGIN, END = "<!-- walkthrough:begin -->", "<!-- walkthrough:end -->"
SHELL_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
# The walkthrough's addresses, as a new user's `make up` serves them.
API_LINE = "API=http://127.0.0.1:8000"
UI_LINE = "UI=http://127.0.0.1:8233"
WALKTHROUGH_TIMEOUT_S = 240
DIGEST = re.compile(r"^\+ DIGEST=\d+:[0-9a-f]{64}$")


def walkthrough_blocks() -> list[str]:
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "the walkthrough's markers"
    section = text[text.index(BEGIN) : text.index(END)]
    return SHELL_BLOCK.findall(section)


@pytest.fixture(scope="module")
def stack() -> Iterator[RunningStack]:
    with private_stack() as running:
        running.start()
        yield running


def test_the_walkthrough_has_eleven_steps_and_starts_with_the_two_commands() -> None:
    blocks = walkthrough_blocks()
    section = README.read_text().split(BEGIN)[1].split(END)[0]
    steps = re.findall(r"^\*\*(\d+)\. ", section, re.MULTILINE)
    assert steps == [str(n) for n in range(1, 12)]
    assert len(blocks) == 11, "one shell block per step"
    assert blocks[0].split("\n")[:2] == ["make up", "make test"]
    # The two commands are the Makefile's: `make up` runs `paysaga up` (what the stack
    # under test runs), `make test` runs pytest (what runs this).
    for target, command in (("up", "/paysaga up"), ("test", "/pytest")):
        dry = subprocess.run(
            ["make", "-n", "--no-print-directory", "-C", str(REPO), target],
            capture_output=True,
            text=True,
            check=True,
        )
        assert command in dry.stdout.splitlines()[-1], dry.stdout


@pytest.mark.timeout(WALKTHROUGH_TIMEOUT_S + 60)
def test_every_command_of_the_walkthrough_works_on_a_real_stack(
    stack: RunningStack, tmp_path: Path
) -> None:
    blocks = walkthrough_blocks()[1:]
    script = "\n".join(blocks)
    for line, moved in (
        (API_LINE, f"API={stack.api_url}"),
        (UI_LINE, f"UI=http://127.0.0.1:{stack.ui_port}"),
    ):
        assert script.count(line) == 1, f"the walkthrough sets {line.split('=')[0]} once"
        script = script.replace(line, moved)
    # Run where a new user would: a directory with `.venv` (here, this interpreter's).
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "walkthrough.sh").write_text("set -euo pipefail\n" + script)
    env = {**stack.env, "PATH": os.environ["PATH"]}
    # The trace (set -x) goes to stderr: where it stopped is its last line.
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    returncode: int | str
    with stdout.open("w") as out_file, stderr.open("w") as err_file:
        try:
            returncode = subprocess.run(
                ["bash", "-x", "walkthrough.sh"],
                cwd=tmp_path,
                env=env,
                stdout=out_file,
                stderr=err_file,
                timeout=WALKTHROUGH_TIMEOUT_S,
            ).returncode
        except subprocess.TimeoutExpired:
            returncode = f"still running after {WALKTHROUGH_TIMEOUT_S} s"
    done = subprocess.CompletedProcess([], 0, stdout.read_text(), stderr.read_text())
    assert returncode == 0, f"{returncode}; stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    out = done.stdout.splitlines()
    answers = [json.loads(line) for line in out if line.startswith("{")]

    # Step 4: the payment settled. Step 5: its links open the Temporal UI.
    assert "SETTLED" in out
    links = [line for line in out if line.startswith(f"http://127.0.0.1:{stack.ui_port}/")]
    assert len(links) == 2
    for link in links:
        assert httpx.get(link, timeout=10).status_code == 200
    # Steps 6 and 7: one payment cancelled, one approved (then settled, by the loops).
    actions = [a["action"] for a in answers if "action" in a]
    assert actions == ["cancel", "approve"]
    # Step 8: alice's balance before the top-up, and now.
    balances = [a for a in answers if a.get("account_id") == "alice" and "posted" in a]
    assert [(b["posted"], b["as_of"] is None) for b in balances] == [
        (89_400, False),
        (1_589_400, True),
    ]
    # Step 9: the report with one amount changed was reconciled into that discrepancy,
    # and its HTML report was written.
    counts = next(a for a in answers if "discrepancies" in a and "items_added" in a)
    assert counts["discrepancies"]["amount_mismatch"] == 1
    open_cases = next(a for a in answers if isinstance(a.get("discrepancies"), list))
    assert [case["type"] for case in open_cases["discrepancies"]] == ["amount_mismatch"]
    assert "<html" in (tmp_path / "recon-report.html").read_text().lower()
    # Steps 10 and 11: replayed, verified and checked, the digest printed and verified.
    assert "statement: swapped in at global_seq" in done.stderr
    assert "ledger check: OK" in done.stdout
    assert done.stdout.count("ledger verify: OK") == 2
    assert any(DIGEST.match(line) for line in done.stderr.splitlines() if "DIGEST=" in line)
