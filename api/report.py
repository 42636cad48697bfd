"""The reconciliation report: one HTML page per run, for people, with a chart of matched
lines against each discrepancy type, per day.

The chart is drawn by matplotlib (its object API, not pyplot, so that concurrent
requests never share a figure) and embedded in the page as a PNG; the page is a Jinja2
template with autoescaping, since statement references are external text.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ledger.events import DISCREPANCY_TYPES

TEMPLATES = Path(__file__).resolve().parent / "templates"
# Days drawn at most (the newest); the table below the chart lists every discrepancy.
CHART_DAYS_MAX = 62
CHART_SIZE_IN = (9.0, 3.6)
CHART_DPI = 100
MATCHED = "matched"
# One colour per series, colour-blind safe (Okabe-Ito), matched first.
COLOURS = {
    MATCHED: "#009E73",
    "missing_in_ledger": "#D55E00",
    "missing_in_statement": "#E69F00",
    "amount_mismatch": "#CC79A7",
    "currency_mismatch": "#56B4E9",
    "duplicate_in_statement": "#0072B2",
    "internal_drift": "#000000",
}

_environment = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass(frozen=True)
class DayCount:
    day: date
    series: str  # MATCHED or a discrepancy type
    count: int


@dataclass(frozen=True)
class ReportDiscrepancy:
    discrepancy_id: str
    discrepancy_type: str
    status: str
    payment_id: str | None
    reference: str | None
    statement: str  # the statement's side, formatted ("12.50 EUR"), or "-"
    ledger: str  # the ledger's side, formatted, or "-"
    summary: str
    detected_at: datetime
    resolution: str | None


@dataclass(frozen=True)
class ReportRun:
    run_id: str
    kind: str
    status: str
    started_at: datetime | None
    completed_at: datetime | None
    counts: dict[str, int]


def chart_png(days: Sequence[DayCount]) -> bytes:
    """A stacked bar per day: matched lines, then each discrepancy type found that day."""
    series = (MATCHED, *DISCREPANCY_TYPES)
    all_days = sorted({d.day for d in days})[-CHART_DAYS_MAX:]
    counts = {(d.day, d.series): d.count for d in days}
    figure = Figure(figsize=CHART_SIZE_IN, dpi=CHART_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = list(range(len(all_days)))
    bottoms = [0] * len(all_days)
    for name in series:
        heights = [counts.get((day, name), 0) for day in all_days]
        if not any(heights):
            continue
        label = name.replace("_", " ")
        axes.bar(positions, heights, bottom=bottoms, color=COLOURS[name], label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    axes.set_xticks(positions, [day.isoformat() for day in all_days], rotation=45, ha="right")
    axes.set_ylabel("statement lines and settlements")
    axes.set_title("Matched against each discrepancy type, per value date")
    if all_days:
        axes.legend(loc="upper left", fontsize="small", frameon=False)
    else:
        axes.text(0.5, 0.5, "nothing to show yet", ha="center", va="center")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def render_report(
    run: ReportRun, days: Sequence[DayCount], discrepancies: Sequence[ReportDiscrepancy]
) -> str:
    """The whole page: the run, its counts, the chart and every discrepancy it found."""
    chart = base64.b64encode(chart_png(days)).decode("ascii")
    return _environment.get_template("reconciliation_report.html").render(
        run=run,
        chart=chart,
        discrepancies=discrepancies,
        types=DISCREPANCY_TYPES,
    )
