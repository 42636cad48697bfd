"""The record of a chaos run: what it asked for, what it saw, and what it did to the system.

A run writes a directory (RUN_DIR) that the checker reads afterwards:

- `run.json`: the run's `RunInfo` (seed, times, API, accounts, faults asked for, bounds).
- `history.jsonl`: one JSON object per line, appended as each thing is done, so a run
  that dies still leaves every finished record. Each has `type` and `t`, the seconds
  since the run started when the thing *began* (a request's first send, a fault's
  injection), and `t_end`, when it was done; lines are in order of `t_end`. Types:

  - `submit`: a payment the client tried to create, written once the client is done
    with it: `key` (the Idempotency-Key), `payer`, `payee`, `amount_minor`, `currency`,
    `simulate` (str or null), `approval` ("approve", "reject" or null: what the
    operator will answer if it waits for approval), `cancel_at_s` (seconds after the
    acknowledgement the client cancels it, or null), `beyond_balance` (the client chose
    an amount beyond the payer's available balance as it had just read it), `attempts`
    (HTTP sends, retries included), `duplicates` (deliberate re-sends), `acked` (some
    answer was 2xx with a payment id), `payment_id`, `final_status_code`, `error`;
    `payment_ids` when two answers for the same key named different payments; `purpose`
    ("funding" for the payments that fund the customers, else "load").
  - `op`: an action on an existing payment: `op` ("approve", "reject", "cancel"),
    `payment_id`, `status_code` (null if no answer), `attempts`, `code` and `detail`
    (the problem's, on a refusal).
  - `read`: an observation: `what` ("balance": the ledger's position, strongly
    consistent; "entries": a statement page; "balance_as_of": a historical balance),
    `account_id`, `posted`, `pending`, `available` (with the overdraft limit, as the API
    answers it), `overdraft_limit`, `as_of_seq`, `as_of` (the instant asked for, or
    null), `entries_min_running_balance` (for entries: the lowest
    `credits_posted - debits_posted - debits_pending` after any entry on the page, the
    balance that must stay at or above minus the overdraft limit; null otherwise). For
    an entries page, posted/pending/available are those after its last entry (0 for an
    empty page).
  - `fault`: a fault injected: `kind` (one of FAULT_KINDS), `target`, `detail`, `ok`
    (the fault was applied and, for a process or server, the system came back).

- `summary.json`: the driver's counts (operations, retries, faults per kind, payments
  per status as the API reported them at the end).
- `check.json`: the checker's verdict (paysaga/chaos/checker.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RUN_FILE = "run.json"
HISTORY_FILE = "history.jsonl"
SUMMARY_FILE = "summary.json"
CHECK_FILE = "check.json"

RecordType = Literal["submit", "op", "read", "fault"]
RECORD_TYPES: tuple[RecordType, ...] = ("submit", "op", "read", "fault")
FAULT_KINDS: tuple[str, ...] = (
    "kill-worker",
    "kill-api",
    "kill-projector",
    "pg-restart-fast",
    "pg-restart-immediate",
    "temporal-restart",
    "processor-error",
    "processor-hang",
    "terminate",
    "cancel",
    "reset",
)
READ_KINDS = ("balance", "entries", "balance_as_of")
OP_KINDS = ("approve", "reject", "cancel")


def rfc3339(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


class RunAccounts(BaseModel):
    model_config = ConfigDict(extra="allow")

    customers: list[str]
    merchant: str
    fees: str
    external: str


class RunInfo(BaseModel):
    """`run.json`: what the run was asked to do, and on what."""

    model_config = ConfigDict(extra="allow")

    seed: int
    started_at: str
    ended_at: str | None = None
    api_url: str
    currency: str = "USD"
    accounts: RunAccounts
    faults_requested: list[str] = Field(default_factory=list)
    duration_s: float
    ops_max: int
    data_dir: str | None = None


class HistoryWriter:
    """Appends records to `history.jsonl`, one line each, flushed as written; keeps them
    in memory too, for the run's summary."""

    def __init__(self, run_dir: Path, started_monotonic: float | None = None) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self._started = time.monotonic() if started_monotonic is None else started_monotonic
        self._file = open(run_dir / HISTORY_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self.records: list[dict[str, Any]] = []

    def t(self) -> float:
        """Seconds since the run started."""
        return round(time.monotonic() - self._started, 4)

    def write(self, record_type: RecordType, *, t: float, **fields: Any) -> dict[str, Any]:
        record = {"type": record_type, "t": t, "t_end": self.t(), **fields}
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        self.records.append(record)
        return record

    def close(self) -> None:
        self._file.close()


def write_json(path: Path, value: Any) -> None:
    """Write a JSON file whole (through a temporary file, so a reader never sees half)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_run_info(run_dir: Path, info: RunInfo) -> None:
    write_json(run_dir / RUN_FILE, info.model_dump(mode="json"))


def read_records(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The records of a history, in file order. A last line cut short (the run died while
    writing it) is left out; a malformed line anywhere else is an error."""
    records: list[dict[str, Any]] = []
    raw = [line for line in lines if line.strip()]
    for index, line in enumerate(raw):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if index == len(raw) - 1:
                break
            raise ValueError(f"history line {index + 1} is not JSON: {line[:80]!r}") from None
        if not isinstance(record, dict) or record.get("type") not in RECORD_TYPES:
            raise ValueError(f"history line {index + 1} is not a record: {line[:80]!r}")
        if not isinstance(record.get("t"), int | float):
            raise ValueError(f"history line {index + 1} has no time `t`")
        records.append(record)
    return records


def load_history(run_dir: Path) -> tuple[RunInfo, list[dict[str, Any]]]:
    """The run's `run.json` and every record of its `history.jsonl`, in file order."""
    info = RunInfo.model_validate_json((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    path = run_dir / HISTORY_FILE
    if not path.exists():
        return info, []
    with open(path, encoding="utf-8") as lines:
        return info, read_records(lines)


def load_summary(run_dir: Path) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    return value
