"""`make bench`: every benchmark in turn, one JSON of every figure, a report with charts.

Runs the scripts of bench/ one after the other, each in a process of its own with the
sizes of the chosen profile (`--size full`, about 10 minutes on this 2-core machine;
`--size small`, about 2), and writes:

* `bench/results/<time>.json`: every figure of every script (each script's own JSON,
  whole), the summary the charts are drawn from, the profile and each script's
  command, the commit, the machine and its load average at the start, before each
  script and at the end;
* `bench/results/<time>/report.md` and its PNG charts (matplotlib, Agg): throughput
  and p99 latency against concurrency; ledger append latency as the events table grows;
  each run's ratio to its floor, measured in the same run;
* with `--publish DIR` (the full profile's default: `docs/bench`), the same report and
  charts copied there, to be committed.

A script that fails is reported as failed, with the end of its output, and the others
still run. This machine is shared: the report's ratios are measured within one run,
side by side, and are what to compare across runs, not the absolute figures.

    make bench                                   # full, published to docs/bench
    make bench BENCH_SIZE=small                  # a quick look, not published
    .venv/bin/python bench/report.py --size small --only ledger,ledger_growth
    .venv/bin/python bench/report.py --script-args 'ledger_growth=--sizes 10000,1000000'
    .venv/bin/python bench/report.py --from bench/results/<time>.json   # redraw only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, on any machine
import matplotlib.pyplot as plt
import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
DOCS = ROOT / "docs" / "bench"
SIZES = ("full", "small")
# A script that runs past this is stopped (with its whole process group) and reported
# as failed; the full profile's scripts take 1 to 6 minutes each.
SCRIPT_S_MAX = {"full": 1_800.0, "small": 600.0}
LOG_TAIL_LINES = 30
CHART_DPI = 100
API_OVER_SAGA_TARGET = 0.9  # issue 7: the API costs at most a tenth of the saga alone

CONCURRENCY_CHART = "concurrency.png"
GROWTH_CHART = "ledger_growth.png"
RATIOS_CHART = "ratios.png"
CHARTS = (CONCURRENCY_CHART, GROWTH_CHART, RATIOS_CHART)


@dataclass(frozen=True)
class Script:
    """One benchmark of the run: its file, and its arguments in each profile (None: not
    run in that profile unless named with --only)."""

    name: str
    file: str
    full: tuple[str, ...] | None
    small: tuple[str, ...] | None
    what: str


SCRIPTS = (
    Script(
        "ledger",
        "ledger.py",
        ("--lifecycles", "1000", "--writers", "1,8"),
        ("--lifecycles", "200", "--writers", "1,8"),
        "lifecycles/s appended straight to the store, uniform and hot payee",
    ),
    Script(
        "ledger_growth",
        "ledger_growth.py",
        (
            "--sizes",
            "10000,100000,1000000,10000000",
            "--lifecycles",
            "250",
            "--generate-budget-s",
            "300",
        ),
        ("--sizes", "10000,100000", "--lifecycles", "100"),
        "append latency against a plain INSERT as the events table grows",
    ),
    Script(
        "e2e_workflow",
        "e2e_workflow.py",
        ("--concurrency", "1,5,10,20,40", "--seconds", "5", "--per-client", "3"),
        ("--concurrency", "1,5,20", "--seconds", "2", "--per-client", "1"),
        "the saga through Temporal against an empty workflow and the 4-activity floor",
    ),
    Script(
        "api",
        "api.py",
        ("--concurrency", "1,5,10,20,40", "--seconds", "5", "--per-client", "3"),
        ("--concurrency", "1,5,20", "--seconds", "2", "--per-client", "1"),
        "payments through the HTTP API of a `paysaga up` stack against the saga alone",
    ),
    Script(
        "replay",
        "replay.py",
        ("--lifecycles", "50000", "--accounts", "2000", "--lag-s", "10", "--as-of-samples", "500"),
        ("--lifecycles", "5000", "--accounts", "500", "--lag-s", "2", "--as-of-samples", "100"),
        "rebuilds against one SQL aggregate, projector lag, as_of",
    ),
    Script(
        "recon",
        "recon.py",
        ("--lines", "200000"),
        ("--lines", "10000"),
        "statement lines against settlements, each phase",
    ),
    Script(
        "recon_stream",
        "recon_stream.py",
        ("--statements", "10"),
        None,
        "upload to DiscrepancyDetected on a `paysaga up` stack",
    ),
    Script(
        "wait_settled",
        "wait_settled.py",
        None,
        None,
        "`?wait=settled` by update-with-start against start-then-result (only with --only)",
    ),
)
SCRIPTS_BY_NAME = {s.name: s for s in SCRIPTS}
# With --only, a script that has no arguments in the profile runs with these.
ONLY_ARGS = {"wait_settled": ("--payments", "80", "--concurrency", "10")}


# --- running ---------------------------------------------------------------------------
def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short=12", "HEAD"), "dirty": bool(status)}


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "disk_free_bytes": shutil.disk_usage(ROOT).free,
    }


def run_script(argv: list[str], log_path: Path, seconds_max: float) -> tuple[int, float]:
    """Run one script, its output both shown and logged; (exit code, seconds). Past
    `seconds_max` its whole process group is stopped and the exit code is -9."""
    started = time.perf_counter()
    env = os.environ | {"COLUMNS": "160", "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its servers go with it if it must be stopped
        )
        stdout = process.stdout
        assert stdout is not None

        def copy() -> None:
            for line in stdout:
                sys.stdout.write(line)
                log.write(line)

        copier = threading.Thread(target=copy, daemon=True)
        copier.start()
        try:
            code = process.wait(timeout=seconds_max)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
            log.write(f"\nstopped after {seconds_max:.0f} s (bench/report.py)\n")
        copier.join(timeout=10)
    return code, round(time.perf_counter() - started, 1)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_all(
    selected: Sequence[Script],
    size: str,
    overrides: dict[str, list[str]],
    run_dir: Path,
    stamp: str,
) -> dict[str, Any]:
    """Every selected script in turn; the run's JSON (every figure, and what it ran on)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    started_at = datetime.now(UTC)
    combined: dict[str, Any] = {
        "benchmark": "report",
        "stamp": stamp,
        "size": size,
        "started_at": started_at.isoformat(),
        "git": git_state(),
        "machine": machine(),
        "load_average": {"start": load_average()},
        "scripts": {},
    }
    for script in selected:
        args = overrides.get(script.name) or list(script_args(script, size))
        out = run_dir / f"{script.name}.json"
        argv = [sys.executable, str(BENCH / script.file), *args, "--out", str(out)]
        shown = " ".join(["bench/" + script.file, *(shlex.quote(a) for a in args)])
        print(f"\n=== {script.name}: {shown}", flush=True)
        load_before = load_average()
        code, seconds = run_script(argv, run_dir / f"{script.name}.log", SCRIPT_S_MAX[size])
        results = json.loads(out.read_text()) if code == 0 and out.exists() else None
        entry: dict[str, Any] = {
            "command": shown,
            "exit_code": code,
            "seconds": seconds,
            "load_average_before": load_before,
            "results": results,
        }
        if results is None:
            entry["log_tail"] = tail(run_dir / f"{script.name}.log")
        combined["scripts"][script.name] = entry
    combined["ended_at"] = datetime.now(UTC).isoformat()
    combined["seconds"] = round((datetime.now(UTC) - started_at).total_seconds(), 1)
    combined["load_average"]["end"] = load_average()
    combined["summary"] = summarize(combined["scripts"])
    return combined


def script_args(script: Script, size: str) -> tuple[str, ...]:
    args = script.full if size == "full" else script.small
    if args is None:
        args = ONLY_ARGS.get(script.name, ())
    return args


# --- the summary the charts and the tables are drawn from -------------------------------
def results_of(scripts: dict[str, Any], name: str) -> dict[str, Any] | None:
    entry = scripts.get(name)
    return None if entry is None else entry.get("results")


def summarize(scripts: dict[str, Any]) -> dict[str, Any]:
    """The figures of the charts, each series as points, from whichever scripts ran."""
    concurrency: dict[str, list[dict[str, float]]] = {}
    ratios: dict[str, list[dict[str, float]]] = {}
    e2e = results_of(scripts, "e2e_workflow")
    if e2e is not None:
        for level in e2e.get("sweep", []):
            c = level["concurrency"]
            for key, label in (
                ("empty", "empty workflow"),
                ("floor", "floor: 4 no-op activities"),
                ("saga", "saga"),
            ):
                run = level[key]
                concurrency.setdefault(label, []).append(
                    {"concurrency": c, "per_s": run["per_s"], "p99_ms": run["p99_ms"]}
                )
            for key, label in (
                ("saga_over_empty", "saga / empty workflow"),
                ("saga_over_floor", "saga / 4-activity floor"),
            ):
                ratios.setdefault(label, []).append({"x": c, "ratio": level[key]})
    api = results_of(scripts, "api")
    if api is not None:
        for level in api.get("sweep", []):
            c = level["concurrency"]
            for key, label in (
                ("saga_only", "saga alone (paysaga up)"),
                ("api_settled", "API ?wait=settled (paysaga up)"),
            ):
                run = level[key]
                concurrency.setdefault(label, []).append(
                    {"concurrency": c, "per_s": run["per_s"], "p99_ms": run["p99_ms"]}
                )
            ratios.setdefault("API / saga alone", []).append(
                {"x": c, "ratio": level["api_over_saga_only"]}
            )
    growth_points: list[dict[str, float]] = []
    growth = results_of(scripts, "ledger_growth")
    if growth is not None:
        for stage in growth["stages"]:
            growth_points.append(
                {
                    "events": stage["events"],
                    "append_p50_ms": stage["append"]["p50_ms"],
                    "append_p99_ms": stage["append"]["p99_ms"],
                    "insert_p50_ms": stage["insert_floor"]["p50_ms"],
                    "insert_p99_ms": stage["insert_floor"]["p99_ms"],
                }
            )
            for key, label in (
                ("append_over_insert_p50", "ledger append / INSERT, p50"),
                ("append_over_insert_p99", "ledger append / INSERT, p99"),
            ):
                ratios.setdefault(label, []).append({"x": stage["events"], "ratio": stage[key]})
    return {
        "concurrency": concurrency,
        "ledger_growth": growth_points,
        "ledger_growth_skipped": [] if growth is None else growth.get("skipped", []),
        "ratios": ratios,
    }


# --- charts ------------------------------------------------------------------------------
def human(count: float) -> str:
    """10000 -> 10k, 10000000 -> 10M: tick labels for counts of events."""
    for divisor, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if count >= divisor:
            return f"{count / divisor:g}{suffix}"
    return f"{count:g}"


def _log_ticks(axes: Any, ticks: list[float], label: Callable[[float], str]) -> None:
    """Ticks exactly at the measured points, on a log axis."""
    axes.set_xscale("log")
    if ticks:
        axes.set_xticks(ticks, [label(t) for t in ticks])
    axes.minorticks_off()


def _no_data(axes: Any) -> None:
    axes.text(0.5, 0.5, "not run", ha="center", va="center", transform=axes.transAxes)


def _concurrency_chart(summary: dict[str, Any], path: Path) -> None:
    series = summary["concurrency"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, points in series.items():
        xs = [p["concurrency"] for p in points]
        style = "--" if "paysaga up" in label else "-"
        left.plot(xs, [p["per_s"] for p in points], style, marker="o", label=label)
        right.plot(xs, [p["p99_ms"] for p in points], style, marker="o", label=label)
    left.set(title="throughput", xlabel="concurrent clients", ylabel="workflows per second")
    right.set(title="p99 latency, start to end", xlabel="concurrent clients", ylabel="ms")
    ticks = sorted({p["concurrency"] for points in series.values() for p in points})
    for axes in (left, right):
        _log_ticks(axes, ticks, lambda t: f"{t:g}")
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        if not series:
            _no_data(axes)
    if series:
        left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=CHART_DPI)
    plt.close(fig)


def _growth_chart(summary: dict[str, Any], path: Path) -> None:
    points = summary["ledger_growth"]
    xs = [p["events"] for p in points]
    fig, axes = plt.subplots(figsize=(8, 4.2))
    for key, label, style in (
        ("append_p50_ms", "ledger append p50", "-"),
        ("append_p99_ms", "ledger append p99", "-"),
        ("insert_p50_ms", "plain INSERT p50", "--"),
        ("insert_p99_ms", "plain INSERT p99", "--"),
    ):
        axes.plot(xs, [p[key] for p in points], style, marker="o", label=label)
    _log_ticks(axes, xs, human)
    axes.set_ylim(bottom=0)
    axes.set(
        title="append latency as the events table grows (one writer)",
        xlabel="events in the table",
        ylabel="ms",
    )
    axes.grid(alpha=0.3)
    if points:
        axes.legend(fontsize=8)
    else:
        _no_data(axes)
    fig.tight_layout()
    fig.savefig(path, dpi=CHART_DPI)
    plt.close(fig)


def _ratios_chart(summary: dict[str, Any], path: Path) -> None:
    ratios = summary["ratios"]
    panels: list[tuple[str, str, list[str], bool]] = [
        (
            "the saga against its floors",
            "concurrent clients",
            ["saga / empty workflow", "saga / 4-activity floor"],
            False,
        ),
        ("the API against the saga alone", "concurrent clients", ["API / saga alone"], False),
        (
            "the ledger against a plain INSERT",
            "events in the table",
            ["ledger append / INSERT, p50", "ledger append / INSERT, p99"],
            True,
        ),
    ]
    fig, axes_row = plt.subplots(1, 3, figsize=(14, 4.2))
    for axes, (title, xlabel, labels, of_sizes) in zip(axes_row, panels, strict=True):
        shown = [label for label in labels if ratios.get(label)]
        for label in shown:
            points = ratios[label]
            axes.plot(
                [p["x"] for p in points], [p["ratio"] for p in points], marker="o", label=label
            )
        ticks = sorted({p["x"] for label in shown for p in ratios[label]})
        _log_ticks(axes, ticks, human if of_sizes else (lambda t: f"{t:g}"))
        axes.axhline(1.0, color="grey", linewidth=0.8)
        if "API / saga alone" in shown:
            axes.axhline(API_OVER_SAGA_TARGET, color="red", linestyle=":", linewidth=0.8)
        axes.set(title=title, xlabel=xlabel, ylabel="ratio (same run)")
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        if shown:
            axes.legend(fontsize=8)
        else:
            _no_data(axes)
    fig.tight_layout()
    fig.savefig(path, dpi=CHART_DPI)
    plt.close(fig)


# --- the report ----------------------------------------------------------------------------
def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _status(scripts: dict[str, Any], name: str) -> str | None:
    """None when the script ran and wrote its figures; else what to say instead."""
    entry = scripts.get(name)
    if entry is None:
        return "_Not run this time._"
    if entry.get("results") is None:
        return (
            f"_Failed (exit code {entry['exit_code']}); the end of its output:_\n\n"
            f"```\n{entry.get('log_tail', '')}\n```"
        )
    return None


def _section_concurrency(scripts: dict[str, Any]) -> list[str]:
    out = ["## Throughput and p99 latency against concurrency", ""]
    out += [
        "Workflows per second and p99 start-to-end latency at each number of concurrent "
        "clients. Solid lines: `bench/e2e_workflow.py` (the saga, an empty workflow and "
        "the 4-activity floor, each with its own worker in the bench process, on a "
        "Temporal dev server with its SQLite file and the embedded PostgreSQL). Dashed: "
        "`bench/api.py` against a whole `paysaga up` stack (the saga started straight on "
        "Temporal, and the same payments through `POST /v1/payments?wait=settled`). "
        "Each run lasts a few seconds and until each client has made a few payments (the "
        "`--seconds` and `--per-client` of the command), so a run counts a few dozen "
        "to a few hundred: its p99 is close to its slowest payment.",
        "",
        f"![throughput and p99 against concurrency]({CONCURRENCY_CHART})",
        "",
    ]
    for name in ("e2e_workflow", "api"):
        status = _status(scripts, name)
        if status is not None:
            out += [f"`bench/{name}.py`: {status}", ""]
    rows: list[list[object]] = []
    e2e = results_of(scripts, "e2e_workflow")
    if e2e is not None:
        for level in e2e["sweep"]:
            for key in ("empty", "floor", "saga"):
                run = level[key]
                rows.append(_run_row("e2e_workflow", run))
    api = results_of(scripts, "api")
    if api is not None:
        for level in api["sweep"]:
            for key in ("saga_only", "api_settled"):
                rows.append(_run_row("api", level[key]))
        for run in api["runs"]:
            if run["name"].startswith(("floor", "API 202")):
                rows.append(_run_row("api", run))
    if rows:
        out += [
            md_table(
                ("script", "run", "clients", "done", "per s", "p50 ms", "p99 ms", "CPU ms"),
                rows,
            ),
            "",
        ]
    if api is not None:
        out += [
            f"After `202 Accepted`, {api['settled_per_s_after_202']:.2f} payments/s ended "
            f"(submit-to-202 p50 {api['submit_to_202_ms']['p50']:.0f} ms, p99 "
            f"{api['submit_to_202_ms']['p99']:.0f} ms).",
            "",
        ]
    return out


def _run_row(script: str, run: dict[str, Any]) -> list[object]:
    return [
        script,
        run["name"],
        run["concurrency"],
        run["payments"],
        _fmt(run["per_s"]),
        _fmt(run["p50_ms"], 0),
        _fmt(run["p99_ms"], 0),
        _fmt(run.get("process_cpu_ms"), 1),
    ]


def _section_growth(scripts: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    out = ["## Ledger append latency as the events table grows", ""]
    out += [
        "`bench/ledger_growth.py`: the events table is grown in stages by generating "
        "payment lifecycles inside PostgreSQL (as the schema owner, ids spread over the "
        "key space like real ones), then, with one writer, full lifecycles are appended "
        "through `EventStore.append` (the ledger's checks, the stream lock, positions "
        "and hash chain; each append its own transaction), each append followed by a plain "
        "one-row INSERT into a table with nothing but a key: the floor.",
        "",
    ]
    status = _status(scripts, "ledger_growth")
    if status is not None:
        return [*out, status, ""]
    growth = results_of(scripts, "ledger_growth")
    assert growth is not None
    out += [f"![append latency against the events table's size]({GROWTH_CHART})", ""]
    rows = []
    for s in growth["stages"]:
        rows.append(
            [
                f"{s['events']:,}",
                f"{s['events_table_bytes'] / 1e6:,.0f}",
                f"{s['generate_s']:.1f}",
                _fmt(s["append"]["p50_ms"]),
                _fmt(s["append"]["p99_ms"]),
                _fmt(s["insert_floor"]["p50_ms"]),
                _fmt(s["insert_floor"]["p99_ms"]),
                _fmt(s["append_over_insert_p50"]),
                _fmt(s["append_over_insert_p99"]),
            ]
        )
    out += [
        md_table(
            (
                "events",
                "table MB",
                "generated in s",
                "append p50 ms",
                "append p99 ms",
                "INSERT p50 ms",
                "INSERT p99 ms",
                "append/INSERT p50",
                "append/INSERT p99",
            ),
            rows,
        ),
        "",
        f"Largest size over smallest: append p50 × "
        f"{growth['append_p50_largest_over_smallest']:.2f}, p99 × "
        f"{growth['append_p99_largest_over_smallest']:.2f}; the append/INSERT ratio (p50) × "
        f"{growth['ratio_p50_largest_over_smallest']:.2f}. "
        f"{growth['stages'][0]['append']['samples']:,} appends and as many INSERTs at "
        "each size.",
        "",
    ]
    for skipped in summary["ledger_growth_skipped"]:
        out += [f"**Not reached: {skipped['events']:,} events** ({skipped['reason']}).", ""]
    return out


def _section_ratios(summary: dict[str, Any]) -> list[str]:
    out = ["## Each run against its floor, in the same run", ""]
    out += [
        "Each ratio divides two figures measured back to back in one run, so that the "
        "machine's load falls on both: the saga's throughput over an empty workflow's "
        "and over the 4-activity floor's; the API's settled payments per second over the "
        "saga started straight on Temporal on the same stack (target ≥ "
        f"{API_OVER_SAGA_TARGET}); the ledger append's latency over a plain INSERT's "
        "(here higher means slower).",
        "",
        f"![ratios to the floors]({RATIOS_CHART})",
        "",
    ]
    rows = [
        [label, f"{p['x']:,}", _fmt(p["ratio"])]
        for label, points in summary["ratios"].items()
        for p in points
    ]
    if rows:
        out += [md_table(("ratio", "at (clients, or events)", "value"), rows), ""]
    return out


def _section_ledger(scripts: dict[str, Any]) -> list[str]:
    out = ["## Ledger throughput", ""]
    status = _status(scripts, "ledger")
    if status is not None:
        return [*out, status, ""]
    ledger = results_of(scripts, "ledger")
    assert ledger is not None
    out += [
        "`bench/ledger.py`: full lifecycles (four appends) straight to the store, payments "
        "spread over many payees (uniform) or all to one (hot payee).",
        "",
    ]
    rows = [
        [
            r["scenario"],
            r["writers"],
            r["lifecycles"],
            _fmt(r["lifecycles_per_s"], 1),
            _fmt(r["events_per_s"], 1),
            _fmt(r["append_p50_ms"]),
            _fmt(r["append_p99_ms"]),
            _fmt(r["client_cpu_ms_per_lifecycle"]),
            _fmt(r["server_cpu_ms_per_lifecycle"]),
        ]
        for r in ledger["results"]
    ]
    out += [
        md_table(
            (
                "scenario",
                "writers",
                "lifecycles",
                "lifecycles/s",
                "events/s",
                "append p50 ms",
                "append p99 ms",
                "client CPU ms",
                "server CPU ms",
            ),
            rows,
        ),
        "",
    ]
    return out


def _section_replay(scripts: dict[str, Any]) -> list[str]:
    out = ["## Replay and the read side", ""]
    status = _status(scripts, "replay")
    if status is not None:
        return [*out, status, ""]
    replay = results_of(scripts, "replay")
    assert replay is not None
    config = replay["config"]
    out += [
        f"`bench/replay.py`: {config['lifecycles']:,} lifecycles over "
        f"{config['accounts']:,} accounts, generated with COPY.",
        "",
    ]
    rows: list[list[object]] = [
        [
            f"rebuild {r['projection']}",
            f"{r['events']:,}",
            _fmt(r["seconds"]),
            f"{r['events_per_s']:,}",
            _fmt(r["over_aggregate"]),
        ]
        for r in replay["replay"]
    ]
    rows.append(["one SQL aggregate", "", _fmt(replay["aggregate"]["seconds"]), "", "1.00"])
    out += [md_table(("what", "events", "seconds", "events/s", "/ aggregate"), rows), ""]
    lag = replay.get("lag")
    if lag is not None:
        m = lag["all_models"]
        out += [
            f"Projector lag at {lag['achieved_events_per_s']:.0f} events/s: p50 "
            f"{m['p50_ms']:.1f} ms, p99 {m['p99_ms']:.1f} ms, max {m['max_ms']:.1f} ms.",
            "",
        ]
    targets = [
        [t["figure"], f"{t['value']:,}", t["target"], "yes" if t["met"] else "**no**"]
        for t in replay["targets"]
    ]
    out += [md_table(("figure", "value", "target", "met"), targets), ""]
    return out


def _section_recon(scripts: dict[str, Any]) -> list[str]:
    out = ["## Reconciliation", ""]
    status = _status(scripts, "recon")
    recon = results_of(scripts, "recon")
    if status is not None:
        out += [f"`bench/recon.py`: {status}", ""]
    elif recon is not None:
        f = recon["figures"]
        out += [
            f"`bench/recon.py`: {f['lines']:,} statement lines against {f['items']:,} "
            "settlement items, 1% of them discrepancies. Every injected discrepancy found "
            f"exactly once: {'yes' if f['correct'] else '**no**'}.",
            "",
        ]
        rows: list[list[object]] = [["ingest (checks, COPY)", _fmt(f["ingest_s"])]]
        rows += [[f"reconcile: {phase}", _fmt(s)] for phase, s in f["phase_s"].items()]
        rows += [
            ["**end to end**", f"**{_fmt(f['end_to_end_s'])}**"],
            ["lines/s", f"{f['lines_per_s']:,}"],
            [f"next run, {f['incremental_lines']:,} new lines", _fmt(f["incremental_s"])],
        ]
        out += [md_table(("phase", "seconds"), rows), ""]
    stream_status = _status(scripts, "recon_stream")
    stream = results_of(scripts, "recon_stream")
    if stream_status is not None:
        out += [f"`bench/recon_stream.py`: {stream_status}", ""]
    elif stream is not None:
        up, seen = stream["upload_ms"], stream["upload_to_discrepancy_detected_ms"]
        out += [
            f"`bench/recon_stream.py`, {stream['statements']} statements on a `paysaga up` "
            f"stack: the upload answers in p50 {up['p50']:.0f} ms, p99 {up['p99']:.0f} ms; "
            f"its discrepancy is in the ledger's feed p50 {seen['p50']:.0f} ms, p99 "
            f"{seen['p99']:.0f} ms after the upload was sent.",
            "",
        ]
    return out


def _section_others(scripts: dict[str, Any]) -> list[str]:
    wait = results_of(scripts, "wait_settled")
    if wait is None:
        return []
    rows = [
        [name, _fmt(wait[name]["per_s"]), wait[name]["p50_ms_by_round"]]
        for name in ("update_with_start", "start_then_result")
    ]
    return [
        "## `?wait=settled`",
        "",
        md_table(("how", "payments/s", "p50 ms by round"), rows),
        "",
    ]


def render_markdown(combined: dict[str, Any]) -> str:
    scripts, summary = combined["scripts"], combined["summary"]
    m, load = combined["machine"], combined["load_average"]
    git = combined["git"]
    commands = [
        [f"`{name}`", f"`{entry['command']}`", f"{entry['seconds']:.0f}", entry["exit_code"]]
        for name, entry in scripts.items()
    ]
    loads = ", ".join(
        f"{name} {entry['load_average_before'][0]:.1f}" for name, entry in scripts.items()
    )
    lines = [
        f"# Benchmark report: {combined['started_at'][:16].replace('T', ' ')} UTC",
        "",
        f"Profile `{combined['size']}`, commit `{git['commit']}`"
        + (" (with uncommitted changes)" if git["dirty"] else "")
        + f"; {m['cpus']} cores, {m['memory_bytes'] / 2**30:.0f} GiB, Python {m['python']}; "
        f"{combined['seconds'] / 60:.1f} minutes in all.",
        "",
        f"**Machine load** (1-minute load average): {load['start'][0]:.2f} at the start, "
        f"{load['end'][0]:.2f} at the end; before each script: {loads} (the run's own "
        "processes included). The machine is shared with other work, so absolute "
        "figures drift between runs: compare the ratios, which are measured within one "
        "run.",
        "",
        md_table(("script", "command", "seconds", "exit code"), commands),
        "",
    ]
    lines += _section_concurrency(scripts)
    lines += _section_ratios(summary)
    lines += _section_growth(scripts, summary)
    lines += _section_ledger(scripts)
    lines += _section_replay(scripts)
    lines += _section_recon(scripts)
    lines += _section_others(scripts)
    lines += [
        "## Reproduce",
        "",
        "```sh",
        "make bench                     # this report: about 10 minutes",
        "make bench BENCH_SIZE=small    # a quick look: about 2 minutes",
        "```",
        "",
        f"Every figure of this run is in `bench/results/{combined['stamp']}.json` (not "
        "committed: `bench/results/` is git-ignored); each script also runs alone with "
        "the command in the table at the top.",
        "",
    ]
    return "\n".join(lines)


def write_report(combined: dict[str, Any], out_dir: Path) -> list[Path]:
    """report.md and its charts in `out_dir`; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = combined["summary"]
    drawers: list[tuple[str, Callable[[dict[str, Any], Path], None]]] = [
        (CONCURRENCY_CHART, _concurrency_chart),
        (GROWTH_CHART, _growth_chart),
        (RATIOS_CHART, _ratios_chart),
    ]
    written = []
    for name, draw in drawers:
        draw(summary, out_dir / name)
        written.append(out_dir / name)
    report = out_dir / "report.md"
    report.write_text(render_markdown(combined))
    written.append(report)
    return written


def publish(paths: list[Path], where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy2(path, where / path.name)


# --- the command ---------------------------------------------------------------------------
def parse_overrides(values: list[str]) -> dict[str, list[str]]:
    overrides = {}
    for value in values:
        name, _, args = value.partition("=")
        if name not in SCRIPTS_BY_NAME:
            raise SystemExit(f"--script-args: no script named {name!r}")
        overrides[name] = shlex.split(args)
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--small", action="store_true", help="the same as --size small")
    parser.add_argument(
        "--only", default=None, help="comma-separated: " + ",".join(SCRIPTS_BY_NAME)
    )
    parser.add_argument(
        "--script-args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="run script NAME with ARGS instead of the profile's",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    publishing = parser.add_mutually_exclusive_group()
    publishing.add_argument("--publish", type=Path, default=None, help="copy the report here")
    publishing.add_argument("--no-publish", action="store_true")
    parser.add_argument("--from", dest="from_json", type=Path, default=None)
    args = parser.parse_args(argv)
    size = "small" if args.small else args.size

    if args.from_json is not None:
        combined = json.loads(args.from_json.read_text())
        combined["summary"] = summarize(combined["scripts"])
        out_dir = args.from_json.with_suffix("")
    else:
        if args.only:
            names = args.only.split(",")
            unknown = [n for n in names if n not in SCRIPTS_BY_NAME]
            if unknown:
                parser.error(f"--only: no script named {', '.join(unknown)}")
            selected = [SCRIPTS_BY_NAME[n] for n in names]
        else:
            selected = [s for s in SCRIPTS if (s.full if size == "full" else s.small)]
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
        out_dir = args.results_dir / stamp
        combined = run_all(selected, size, parse_overrides(args.script_args), out_dir, stamp)
        json_path = args.results_dir / f"{stamp}.json"
        json_path.write_text(json.dumps(combined, indent=2))
        print(f"\nwrote {json_path}")
    written = write_report(combined, out_dir)
    print(f"wrote {out_dir / 'report.md'} and its charts")
    # Only a whole full run, as `make bench` makes it, replaces the committed report.
    standard = size == "full" and not (args.only or args.script_args or args.from_json)
    where = args.publish or (DOCS if standard and not args.no_publish else None)
    if where is not None:
        publish(written, where)
        print(f"published to {where}")
    failed = [n for n, e in combined["scripts"].items() if e.get("results") is None]
    if failed:
        print(f"failed: {', '.join(failed)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
