"""Before and after, in one run: a bench script from a base revision against this tree.

This machine is shared and noisy, so a change to a hot path is judged by ratios
measured side by side, never against figures from another day. This runs the same
bench script from a base revision (checked out once, with its own virtualenv, under
the system's temp directory) and from this working tree, alternating rounds (base
first, then head first, and so on, so drift falls on both), then prints the median of
each metric on each side and their ratio. Figures go to
bench/results/compare-<script>-<time>.json.

    .venv/bin/python bench/compare.py --base c85d23e -- ledger.py --writers 8 --lifecycles 1500
    .venv/bin/python bench/compare.py --base c85d23e --rounds 3 --metric 'per_s|ratio' \\
        -- e2e_workflow.py --payments 300

Metrics are the numeric leaves of the script's JSON (`--out`), named by their path;
list items are named by their `scenario`, `writers`, `name`, `concurrency` and `events`
fields.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_METRICS = r"per_s|ratio|cpu_ms"
_LABEL_FIELDS = ("scenario", "writers", "name", "concurrency", "events")


def base_checkout(revision: str) -> Path:
    """A worktree of `revision` with its own virtualenv, made once and reused."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=12", revision],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    where = Path(tempfile.gettempdir()) / f"paysaga-base-{commit}"
    if not (where / ".git").exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), commit],
            check=True,
        )
    python = where / ".venv" / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(where / ".venv")], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-e", f"{where}[dev]"], check=True
        )
    return where


def flatten(value: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON document, by path."""
    if isinstance(value, bool):
        return {}
    if isinstance(value, int | float):
        return {prefix: float(value)}
    leaves: dict[str, float] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            leaves.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            label = str(index)
            if isinstance(item, dict):
                named = [f"{k}={item[k]}" for k in _LABEL_FIELDS if k in item]
                label = ",".join(named) or label
            leaves.update(flatten(item, f"{prefix}[{label}]"))
    return leaves


def run_once(checkout: Path, script: str, args: list[str], out: Path) -> dict[str, float]:
    python = checkout / ".venv" / "bin" / "python"
    subprocess.run(
        [str(python), str(checkout / "bench" / script), *args, "--out", str(out)],
        check=True,
        cwd=checkout,
    )
    return flatten(json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--metric", default=DEFAULT_METRICS, help="a regex over metric paths")
    parser.add_argument("script", help="a script in bench/, e.g. ledger.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    options = parser.parse_args()
    args = [a for a in options.args if a != "--"]
    base = base_checkout(options.base)
    wanted = re.compile(options.metric)
    runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="paysaga-compare-") as scratch:
        for round_no in range(options.rounds):
            order = ("base", "head") if round_no % 2 == 0 else ("head", "base")
            for side in order:
                checkout = base if side == "base" else ROOT
                print(f"round {round_no + 1}/{options.rounds}: {side}", file=sys.stderr)
                out = Path(scratch) / f"{side}-{round_no}.json"
                runs[side].append(run_once(checkout, options.script, args, out))

    metrics = sorted(
        {m for run in runs["base"] for m in run if wanted.search(m)}
        & {m for run in runs["head"] for m in run}
    )
    table = []
    print(
        f"\n{options.script} {' '.join(args)}: base {options.base} vs this tree, "
        f"median of {options.rounds} alternating rounds"
    )
    print(f"{'metric':<60} {'base':>12} {'head':>12} {'head/base':>10}")
    for metric in metrics:
        base_median = statistics.median(run[metric] for run in runs["base"])
        head_median = statistics.median(run[metric] for run in runs["head"])
        ratio = head_median / base_median if base_median else float("nan")
        table.append(
            {
                "metric": metric,
                "base": base_median,
                "head": head_median,
                "ratio": round(ratio, 3),
                "base_runs": [run[metric] for run in runs["base"]],
                "head_runs": [run[metric] for run in runs["head"]],
            }
        )
        print(f"{metric:<60} {base_median:>12.2f} {head_median:>12.2f} {ratio:>10.3f}")
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    result = ROOT / "bench" / "results" / f"compare-{Path(options.script).stem}-{stamp}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(
        json.dumps(
            {
                "script": options.script,
                "args": args,
                "base": options.base,
                "rounds": options.rounds,
                "metrics": table,
            },
            indent=2,
        )
    )
    print(f"wrote {result}", file=sys.stderr)


if __name__ == "__main__":
    main()
