"""`make bench`'s report: the run's JSON, the Markdown and its charts.

One tiny real run (bench/report.py running bench/ledger_growth.py at two small sizes on
its own embedded PostgreSQL) and the report of a whole run made of synthetic figures,
shaped by the benchmarks' own dataclasses. No figure's value is asserted: only that
every figure is there and every chart is a real image.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from bench import report
from bench.common import Run
from bench.ledger import Result
from bench.ledger_growth import Latency, Stage
from bench.recon import Figures
from bench.replay import Aggregate, Lag, ModelLag, Replay, Target

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHART_BYTES_MAX = 300_000
TINY_RUN_S_MAX = 120


def assert_a_real_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height >= 200, (path.name, width, height)
    assert len(data) < CHART_BYTES_MAX, f"{path.name} is {len(data):,} bytes"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0, f"{path.name} is blank"


def charts_of(markdown: str) -> list[str]:
    return [name for name in report.CHARTS if f"]({name})" in markdown]


@pytest.mark.slow
def test_a_tiny_real_run_writes_every_figure_a_report_and_its_charts(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "report.py"),
            "--size",
            "small",
            "--only",
            "ledger_growth",
            "--script-args",
            "ledger_growth=--sizes 1000,3000 --lifecycles 5",
            "--results-dir",
            str(tmp_path),
            "--no-publish",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TINY_RUN_S_MAX,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    [results_json] = tmp_path.glob("*.json")
    run = json.loads(results_json.read_text())
    assert {
        "benchmark",
        "stamp",
        "size",
        "started_at",
        "ended_at",
        "seconds",
        "git",
        "machine",
        "load_average",
        "scripts",
        "summary",
    } <= set(run)
    assert len(run["load_average"]["start"]) == 3 and len(run["load_average"]["end"]) == 3
    growth = run["scripts"]["ledger_growth"]
    assert growth["exit_code"] == 0
    assert "bench/ledger_growth.py --sizes 1000,3000" in growth["command"]
    stages = growth["results"]["stages"]
    assert all(s["events"] >= size for s, size in zip(stages, (1000, 3000), strict=True))
    for stage in stages:
        assert stage["append"]["samples"] == 20 and stage["insert_floor"]["samples"] == 20
        assert stage["append_over_insert_p50"] > 0
    assert len(run["summary"]["ledger_growth"]) == 2
    assert [p["x"] for p in run["summary"]["ratios"]["ledger append / INSERT, p50"]] == [
        s["events"] for s in stages
    ]

    out_dir = tmp_path / run["stamp"]
    markdown = (out_dir / "report.md").read_text()
    assert "## Ledger append latency as the events table grows" in markdown
    assert "Machine load" in markdown and "_Not run this time._" in markdown
    assert charts_of(markdown) == list(report.CHARTS)
    for name in report.CHARTS:
        assert_a_real_png(out_dir / name)


def synthetic_run() -> dict[str, Any]:
    """A whole run's JSON, every script's figures made up but shaped by its dataclasses."""

    def run(name: str, concurrency: int, per_s: float) -> dict[str, Any]:
        return asdict(Run(name, 100, concurrency, 10.0, per_s, 50.0 * concurrency, 90.0, 20.0))

    sweep = [
        {
            "concurrency": c,
            "empty": run("empty workflow", c, 30.0),
            "floor": run("floor (4 regular no-op activities)", c, 12.0),
            "saga": run("saga", c, 10.0),
            "saga_over_empty": 0.33,
            "saga_over_floor": 0.83,
        }
        for c in (1, 5, 20)
    ]
    api_sweep = [
        {
            "concurrency": c,
            "saga_only": run("saga only (Temporal client)", c, 9.0),
            "api_settled": run("API ?wait=settled (submit-to-settled)", c, 8.5),
            "api_over_saga_only": 0.94,
        }
        for c in (1, 5, 20)
    ]
    latency = Latency(samples=1000, p50_ms=2.0, p99_ms=9.0, max_ms=20.0, mean_ms=2.5)
    floor = Latency(samples=1000, p50_ms=0.8, p99_ms=6.0, max_ms=15.0, mean_ms=1.0)
    stages = [
        asdict(Stage(n, n, 1.0, float(n), 0.5, 0.1, 600 * n, latency, floor, 2.5, 1.5))
        for n in (10_000, 100_000, 1_000_000)
    ]
    lifecycles = asdict(Result("uniform", 8, 1000, 2.0, 500.0, 2000.0, 3.0, 9.0, 20.0, 0.6, 1.8))
    model = ModelLag("every read model", 30.0, 55.0, 110.0)
    lag = Lag(1000, 8, 10.0, 10_000, 990.0, 2.0, 8.0, 1.0, 5.0, model, [model], 0.4, 0.6, 20.0)
    recon = Figures(
        items=10_000,
        lines=10_000,
        generate_s=1.0,
        load_items_s=0.5,
        ingest_s=0.4,
        reconcile_s=0.6,
        end_to_end_s=1.0,
        lines_per_s=10_000,
        phase_s={"exact": 0.3, "classify": 0.1},
        server_cpu_s=0.8,
        matched={},
        discrepancies={},
        expected_discrepancies={},
        expected_matches={},
        incremental_lines=1000,
        incremental_s=0.2,
        incremental_considered=[1000, 1000],
        incremental_phase_s={},
        correct=True,
    )
    results: dict[str, dict[str, Any] | None] = {
        "ledger": {"results": [lifecycles]},
        "ledger_growth": {
            "stages": stages,
            "skipped": [{"events": 10_000_000, "reason": "the generation budget"}],
            "append_p50_largest_over_smallest": 1.0,
            "append_p99_largest_over_smallest": 1.0,
            "ratio_p50_largest_over_smallest": 1.0,
        },
        "e2e_workflow": {"sweep": sweep},
        "api": {
            "sweep": api_sweep,
            "runs": [run("floor (4 regular no-op activities)", 20, 12.0), run("API 202", 20, 40.0)],
            "settled_per_s_after_202": 8.0,
            "submit_to_202_ms": {"p50": 20.0, "p99": 60.0},
        },
        "replay": {
            "config": {"lifecycles": 5000, "accounts": 500},
            "replay": [asdict(Replay("balances", 20_000, 1, 0.2, 100_000, 1.5, 0.1))],
            "aggregate": asdict(Aggregate(500, 0.13, [0.13, 0.14], True, True, 0)),
            "lag": asdict(lag),
            "targets": [asdict(Target("replay balances, events/s", 100_000, ">= 100000", True))],
        },
        "recon": {"figures": asdict(recon)},
        "recon_stream": None,  # failed
    }
    scripts = {
        name: {
            "command": f"bench/{name}.py",
            "exit_code": 0 if figures is not None else 1,
            "seconds": 10.0,
            "load_average_before": [1.0, 1.0, 1.0],
            "results": figures,
            **({"log_tail": "Traceback: the stack did not start"} if figures is None else {}),
        }
        for name, figures in results.items()
    }
    return {
        "benchmark": "report",
        "stamp": "2026-01-01T000000Z",
        "size": "full",
        "started_at": "2026-01-01T00:00:00+00:00",
        "seconds": 600.0,
        "git": {"commit": "abc", "dirty": False},
        "machine": {"cpus": 2, "memory_bytes": 2**34, "python": "3.11"},
        "load_average": {"start": [1.0, 1.0, 1.0], "end": [2.0, 1.5, 1.0]},
        "scripts": scripts,
        "summary": report.summarize(scripts),
    }


def test_the_report_of_a_whole_run_has_every_section_chart_and_ratio(tmp_path: Path) -> None:
    run = synthetic_run()
    written = report.write_report(run, tmp_path)

    assert {p.name for p in written} == {"report.md", *report.CHARTS}
    markdown = (tmp_path / "report.md").read_text()
    for heading in (
        "## Throughput and p99 latency against concurrency",
        "## Each run against its floor, in the same run",
        "## Ledger append latency as the events table grows",
        "## Ledger throughput",
        "## Replay and the read side",
        "## Reconciliation",
        "## Reproduce",
    ):
        assert heading in markdown
    for ratio in (
        "saga / empty workflow",
        "saga / 4-activity floor",
        "API / saga alone",
        "ledger append / INSERT, p50",
    ):
        assert set(run["summary"]["ratios"]) >= {ratio} and f"| {ratio} |" in markdown
    assert "**Not reached: 10,000,000 events** (the generation budget)" in markdown
    assert "_Failed (exit code 1)" in markdown and "the stack did not start" in markdown
    assert charts_of(markdown) == list(report.CHARTS)
    for name in report.CHARTS:
        assert_a_real_png(tmp_path / name)
