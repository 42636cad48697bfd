"""Matching statement lines against the ledger's settlement items, in set-based SQL.

One run (`reconcile`) is one transaction that:

1. brings the items up to the safe horizon (`ledger.settlements`);
2. takes the lines and items to look at: in an incremental run, those after the last
   run's checkpoints, plus everything still unmatched (an unmatched line always has a
   discrepancy; an unmatched item has one, or was still inside the settlement window at
   the last run); in a full run, everything unmatched;
3. the exact pass: reference, amount and currency agree. Repeats of one key on either
   side are paired in order by `row_number()` over the key, never matched twice;
4. the rule pass (`MatchRules`): an amount within tolerance and value dates within a
   window; several lines of one reference that together make one settlement (split);
   one line that is the sum of a day's settlements in its currency (a batched payout);
5. classifies what is left, each line and item once: `duplicate_in_statement` (a line
   naming a settlement another line already matched), `currency_mismatch` and
   `amount_mismatch` (a line naming an unmatched settlement that disagrees: one
   discrepancy, not two missing ones), `missing_in_ledger` (a line naming nothing), and
   `missing_in_statement` (a settlement nobody named, once it is older than the
   settlement window);
6. records the matches, the new discrepancies and the run with its checkpoints.

The primary keys of `recon.matched_lines` and `recon.matched_items` make a second match
of any line or item impossible; a discrepancy's id is derived from what it names, so
the next run finds it again and adds nothing. Runs take a transaction-wide lock, so two
never overlap, and a run whose id already completed returns what it recorded.

Every row-level decision is SQL; Python only sequences the statements.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import psycopg

from ledger.settlements import ITEMS_LOCK, settlement_horizon, sync_settlement_items
from recon.rules import MatchRules
from recon.store import LINES_LOCK

DISCREPANCY_TYPES = (
    "missing_in_ledger",
    "missing_in_statement",
    "amount_mismatch",
    "currency_mismatch",
    "duplicate_in_statement",
    "internal_drift",
)
RULES = ("exact", "tolerance", "split", "batch")
# The phases of a run, in order: what `progress` is told and `RunResult.phase_s` times.
PHASES = ("sync", "exact", "record_exact", "rules", "classify", "record")
RUN_ID_CHARS_MAX = 200
# A run sorts and hashes up to millions of rows in memory rather than on disk; JIT would
# compile each large statement afresh for no gain (see ledger/replay.py). What is left
# after the exact pass (thousands of rows) is looked up by key in tables the pass has
# just read: with the default random_page_cost the planner hashed the whole of
# statement_lines or items instead, three times a run (at a million lines, those three
# statements took 1.76 s, and 0.88 s with lookups).
RUN_SETTINGS = {"work_mem": "256MB", "jit": "off", "random_page_cost": "1.1"}
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")

# --- locks and checkpoints -------------------------------------------------------------------
_LOCK_RUN = "SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0))"
# Exclusive, and released at once: waits for ingests in flight (they hold it shared), so
# every line id at or below the maximum read under it is committed.
_LOCK_LINES = "SELECT pg_advisory_lock(hashtextextended(%(key)s, 0))"
_UNLOCK_LINES = "SELECT pg_advisory_unlock(hashtextextended(%(key)s, 0))"
_LINE_UPTO = "SELECT coalesce(max(line_id), 0) FROM recon.statement_lines"
_ITEM_UPTO = "SELECT coalesce(max(item_id), 0) FROM recon.items"
_RUN_STATUS = "SELECT status FROM recon.runs WHERE run_id = %(run)s FOR UPDATE"
_LAST_RUN = """
SELECT ledger_seq, line_checkpoint, item_checkpoint, young_after FROM recon.runs
 WHERE status = 'completed' ORDER BY completed_seq DESC LIMIT 1
"""
_START_RUN = """
INSERT INTO recon.runs (run_id, kind, status) VALUES (%(run)s, %(kind)s, 'running')
ON CONFLICT (run_id) DO UPDATE SET kind = excluded.kind, status = 'running',
                                   started_at = clock_timestamp()
"""
_FINISH_RUN = """
UPDATE recon.runs
   SET status = 'completed', finished_at = clock_timestamp(),
       completed_seq = nextval('recon.run_completions'), ledger_seq = %(ledger_seq)s,
       line_checkpoint = %(line_upto)s, item_checkpoint = %(item_upto)s,
       young_after = %(young_after)s, as_of = %(now)s, counts = %(counts)s
 WHERE run_id = %(run)s
"""
_STORED_RUN = """
SELECT kind, ledger_seq, line_checkpoint, item_checkpoint, counts FROM recon.runs
 WHERE run_id = %(run)s
"""

# --- what a run looks at, and the exact pass ---------------------------------------------------
# Lines after the checkpoint, and older lines still unmatched (each has a discrepancy).
_CANDIDATE_LINES = """
SELECT l.line_id, l.reference, l.amount_minor, l.currency
  FROM recon.statement_lines l
 WHERE l.line_id > %(line_after)s AND l.line_id <= %(line_upto)s
   AND NOT EXISTS (SELECT FROM recon.matched_lines m WHERE m.line_id = l.line_id)
UNION ALL
SELECT l.line_id, l.reference, l.amount_minor, l.currency
  FROM (SELECT DISTINCT d.line_id FROM recon.discrepancies d
         WHERE d.line_id IS NOT NULL AND d.line_id <= %(line_after)s) AS d
  JOIN recon.statement_lines l ON l.line_id = d.line_id
 WHERE NOT EXISTS (SELECT FROM recon.matched_lines m WHERE m.line_id = l.line_id)
"""
# Items after the checkpoint, older items still inside the settlement window at the last
# run, and older items still unmatched with a discrepancy.
_CANDIDATE_ITEMS = """
SELECT i.item_id, i.reference, i.amount_minor, i.currency
  FROM recon.items i
 WHERE i.item_id > %(item_after)s AND i.item_id <= %(item_upto)s
   AND NOT EXISTS (SELECT FROM recon.matched_items m WHERE m.item_id = i.item_id)
UNION ALL
SELECT i.item_id, i.reference, i.amount_minor, i.currency
  FROM recon.items i
 WHERE i.settled_at >= %(young_after_last)s AND i.item_id <= %(item_after)s
   AND NOT EXISTS (SELECT FROM recon.matched_items m WHERE m.item_id = i.item_id)
UNION ALL
SELECT i.item_id, i.reference, i.amount_minor, i.currency
  FROM (SELECT DISTINCT d.item_id FROM recon.discrepancies d
         WHERE d.item_id IS NOT NULL AND d.item_id <= %(item_after)s) AS d
  JOIN recon.items i ON i.item_id = d.item_id
 WHERE i.settled_at < %(young_after_last)s
   AND NOT EXISTS (SELECT FROM recon.matched_items m WHERE m.item_id = i.item_id)
"""
# The candidates, in one statement with the exact pass: the n-th line and the n-th item
# of one (reference, amount, currency) pair up; a line or item with no partner comes out
# alone (a full join), to go on to the rule pass. A line with no reference has none.
# Only ids and keys go through the sorts and the join: the few left over fetch the rest.
_EXACT = f"""
CREATE TEMP TABLE recon_exact ON COMMIT DROP AS
WITH l AS (
    SELECT c.line_id, c.reference, c.amount_minor, c.currency,
           row_number() OVER (PARTITION BY c.reference, c.amount_minor, c.currency
                              ORDER BY c.line_id) AS n
      FROM ({_CANDIDATE_LINES}) AS c
), i AS (
    SELECT c.item_id, c.reference, c.amount_minor, c.currency,
           row_number() OVER (PARTITION BY c.reference, c.amount_minor, c.currency
                              ORDER BY c.item_id) AS n
      FROM ({_CANDIDATE_ITEMS}) AS c
)
SELECT l.line_id, i.item_id
  FROM l FULL JOIN i
    ON i.reference = l.reference AND i.amount_minor = l.amount_minor
   AND i.currency = l.currency AND i.n = l.n
"""
# A 1:1 match is named by its line.
_EXACT_LINES = """
INSERT INTO recon.matched_lines (line_id, match_id, run_id, rule)
SELECT line_id, line_id, %(run)s, 'exact' FROM recon_exact
 WHERE line_id IS NOT NULL AND item_id IS NOT NULL
"""
_EXACT_ITEMS = """
INSERT INTO recon.matched_items (item_id, match_id)
SELECT item_id, line_id FROM recon_exact WHERE line_id IS NOT NULL AND item_id IS NOT NULL
"""
_REST_LINES = """
CREATE TEMP TABLE recon_rest_lines ON COMMIT DROP AS
SELECT l.line_id, l.reference, l.amount_minor, l.currency, l.value_date
  FROM recon_exact e JOIN recon.statement_lines l ON l.line_id = e.line_id
 WHERE e.item_id IS NULL
"""
_REST_ITEMS = """
CREATE TEMP TABLE recon_rest_items ON COMMIT DROP AS
SELECT i.item_id, i.reference, i.payment_id, i.amount_minor, i.currency, i.value_date,
       i.settled_at
  FROM recon_exact e JOIN recon.items i ON i.item_id = e.item_id
 WHERE e.line_id IS NULL
"""

# --- the rule pass ---------------------------------------------------------------------------
# Each rule fills recon_rule_edges with (match_id, line_id, item_id): every line and item
# of each match it makes, none of them in two matches.
_RULE_EDGES = """
CREATE TEMP TABLE recon_rule_edges (match_id bigint, line_id bigint, item_id bigint)
ON COMMIT DROP
"""
# Same reference and currency, amounts within the tolerance, value dates within the
# window; each line takes its closest item, each item its closest line.
_TOLERANCE = """
INSERT INTO recon_rule_edges (match_id, line_id, item_id)
WITH c AS (
    SELECT l.line_id, i.item_id, abs(l.amount_minor - i.amount_minor) AS diff
      FROM recon_rest_lines l
      JOIN recon_rest_items i
        ON i.reference = l.reference AND i.currency = l.currency
       AND (i.amount_minor > 0) = (l.amount_minor > 0)
       AND abs(l.amount_minor - i.amount_minor) <= %(tolerance)s
       AND abs(l.value_date - i.value_date) <= %(days)s
), per_line AS (
    SELECT DISTINCT ON (line_id) line_id, item_id, diff FROM c ORDER BY line_id, diff, item_id
)
SELECT DISTINCT ON (item_id) line_id, line_id, item_id
  FROM per_line ORDER BY item_id, diff, line_id
"""
# Every unmatched line of one reference and currency (two or more), together exactly one
# unmatched item's amount, all within the date window of it.
_SPLIT = """
INSERT INTO recon_rule_edges (match_id, line_id, item_id)
WITH g AS (
    SELECT reference, currency, sum(amount_minor) AS total, min(line_id) AS first_line,
           min(value_date) AS first_date, max(value_date) AS last_date
      FROM recon_rest_lines
     WHERE reference IS NOT NULL
     GROUP BY reference, currency
    HAVING count(*) >= 2
), m AS (
    SELECT DISTINCT ON (g.reference, g.currency) g.reference, g.currency, g.first_line,
           i.item_id
      FROM g
      JOIN recon_rest_items i
        ON i.reference = g.reference AND i.currency = g.currency AND i.amount_minor = g.total
       AND g.last_date - i.value_date <= %(days)s AND i.value_date - g.first_date <= %(days)s
     ORDER BY g.reference, g.currency, i.item_id
)
SELECT m.first_line, l.line_id, m.item_id
  FROM m JOIN recon_rest_lines l ON l.reference = m.reference AND l.currency = m.currency
"""
# One credit that is exactly the sum of one day's unmatched items in its currency, paid
# on that day or up to the window after it; a line that names a settlement is no payout.
# Each line takes the closest day, each day its first line.
_BATCH = """
INSERT INTO recon_rule_edges (match_id, line_id, item_id)
WITH g AS (
    SELECT currency, value_date, sum(amount_minor) AS total
      FROM recon_rest_items WHERE amount_minor > 0
     GROUP BY currency, value_date
), c AS (
    SELECT DISTINCT ON (l.line_id) l.line_id, g.currency, g.value_date
      FROM recon_rest_lines l
      JOIN g ON g.currency = l.currency AND g.total = l.amount_minor
            AND l.value_date - g.value_date BETWEEN 0 AND %(days)s
     WHERE l.amount_minor > 0
       AND NOT EXISTS (SELECT FROM recon.items n WHERE n.reference = l.reference)
     ORDER BY l.line_id, l.value_date - g.value_date, g.value_date DESC
), p AS (
    SELECT DISTINCT ON (currency, value_date) line_id, currency, value_date
      FROM c ORDER BY currency, value_date, line_id
)
SELECT p.line_id, p.line_id, i.item_id
  FROM p JOIN recon_rest_items i ON i.currency = p.currency AND i.value_date = p.value_date
 WHERE i.amount_minor > 0
"""
_RULE_MATCHES = """
SELECT count(DISTINCT line_id), count(DISTINCT item_id) FROM recon_rule_edges GROUP BY match_id
"""
_RULE_LINES = """
INSERT INTO recon.matched_lines (line_id, match_id, run_id, rule)
SELECT DISTINCT line_id, match_id, %(run)s, %(rule)s FROM recon_rule_edges
"""
_RULE_ITEMS = """
INSERT INTO recon.matched_items (item_id, match_id)
SELECT DISTINCT item_id, match_id FROM recon_rule_edges
"""
_RULE_DONE = (
    "DELETE FROM recon_rest_lines r USING recon_rule_edges e WHERE e.line_id = r.line_id",
    "DELETE FROM recon_rest_items r USING recon_rule_edges e WHERE e.item_id = r.item_id",
    "TRUNCATE recon_rule_edges",
)

# --- classification --------------------------------------------------------------------------
# Each unmatched line once: a duplicate if a line already matched the settlement it
# names (same direction of money), a mismatch if it names an unmatched settlement, and
# missing in the ledger if it names none. Then each unmatched settlement that no
# mismatch named, once it is past the settlement window.
_CLASSIFY = """
CREATE TEMP TABLE recon_found ON COMMIT DROP AS
WITH named AS (
    -- The settlement each line names: one already matched first (then it is a repeat).
    SELECT DISTINCT ON (c.line_id) c.line_id, c.item_id, c.matched
      FROM (SELECT l.line_id, i.item_id,
                   EXISTS (SELECT FROM recon.matched_items m
                            WHERE m.item_id = i.item_id) AS matched
              FROM recon_rest_lines l
              JOIN recon.items i ON i.reference = l.reference
                                AND (i.amount_minor > 0) = (l.amount_minor > 0)) AS c
     ORDER BY c.line_id, c.matched DESC, c.item_id
), lines AS (
    SELECT CASE WHEN n.item_id IS NULL THEN 'missing_in_ledger'
                WHEN n.matched THEN 'duplicate_in_statement'
                WHEN i.currency <> l.currency THEN 'currency_mismatch'
                ELSE 'amount_mismatch' END AS type,
           l.line_id, n.item_id
      FROM recon_rest_lines l LEFT JOIN named n ON n.line_id = l.line_id
      LEFT JOIN recon.items i ON i.item_id = n.item_id
)
SELECT type, line_id, item_id FROM lines
UNION ALL
SELECT 'missing_in_statement', NULL, i.item_id
  FROM recon_rest_items i
 WHERE i.settled_at < %(young_after)s
   AND NOT EXISTS (SELECT FROM lines WHERE lines.item_id = i.item_id)
"""
# Only problems not recorded before are looked up and written: an open discrepancy is
# classified again by every run until it is matched or resolved. Its id is derived from
# the ledger's identity and the problem (migration 0016 says why).
_RECORD = """
INSERT INTO recon.discrepancies (
    discrepancy_id, problem_key, type, line_id, item_id, payment_id, reference, amount_minor,
    expected_amount_minor, currency, expected_currency, run_id, detected_at, details)
SELECT md5(inst.ledger_id::text || ':' || f.problem_key)::uuid, f.problem_key, f.type,
       f.line_id, f.item_id, i.payment_id,
       coalesce(l.reference, i.reference), l.amount_minor, i.amount_minor, l.currency,
       i.currency, %(run)s, %(now)s,
       jsonb_strip_nulls(jsonb_build_object(
           'statement_id', l.statement_id, 'line_no', l.line_no, 'kind', l.kind,
           'value_date', l.value_date, 'expected_value_date', i.value_date,
           'settled_at', i.settled_at, 'global_seq', i.global_seq))
  FROM (SELECT f.*, f.type || ':line=' || coalesce(f.line_id::text, '-')
                    || ':item=' || coalesce(f.item_id::text, '-') AS problem_key
          FROM recon_found f) AS f
 CROSS JOIN recon.installation inst
  LEFT JOIN recon.statement_lines l ON l.line_id = f.line_id
  LEFT JOIN recon.items i ON i.item_id = f.item_id
 WHERE NOT EXISTS (SELECT FROM recon.discrepancies d WHERE d.problem_key = f.problem_key)
 ORDER BY f.line_id NULLS LAST, f.item_id
ON CONFLICT DO NOTHING
RETURNING discrepancy_id
"""
_DISCREPANCIES_OF_RUN = """
SELECT discrepancy_id::text, type, line_id, item_id, payment_id, reference, amount_minor,
       expected_amount_minor, currency, expected_currency, details
  FROM recon.discrepancies WHERE run_id = %(run)s AND type <> 'internal_drift'
 ORDER BY line_id NULLS LAST, item_id, discrepancy_id
"""
# Open discrepancies whose line or item this run matched: what they reported is settled.
_NOW_MATCHED = """
SELECT d.discrepancy_id::text
  FROM recon.discrepancies d
 WHERE d.status = 'open'
   -- Found by an earlier run: a duplicate names the item its first line matched.
   AND d.run_id <> %(run)s
   AND (EXISTS (SELECT FROM recon.matched_lines m
                 WHERE m.line_id = d.line_id AND m.run_id = %(run)s)
        OR (d.type <> 'duplicate_in_statement'
            AND EXISTS (SELECT FROM recon.matched_items mi
                          JOIN recon.matched_lines m ON m.line_id = mi.match_id
                         WHERE mi.item_id = d.item_id AND m.run_id = %(run)s)))
 ORDER BY d.discrepancy_id
"""


class _Phases:
    """Times each phase of a run, and tells `progress` as each one starts."""

    def __init__(self, progress: Callable[[str], None] | None) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._started = time.perf_counter()

    def start(self, phase: str) -> None:
        self.stop()
        self._current, self._started = phase, time.perf_counter()
        if self.progress is not None:
            self.progress(phase)

    def stop(self) -> None:
        if self._current is not None:
            elapsed = time.perf_counter() - self._started
            self.seconds[self._current] = round(elapsed, 4)
            self._current = None


class RunRefused(ValueError):
    """A run that cannot be started as asked (a bad run id, a naive `now`)."""


@dataclass(frozen=True)
class Discrepancy:
    """One problem found. Amounts and currencies: the statement's side, then the ledger's
    (`expected_*`); None where that side has nothing."""

    discrepancy_id: str
    type: str
    line_id: int | None
    item_id: int | None
    payment_id: str | None
    reference: str | None
    amount_minor: int | None
    expected_amount_minor: int | None
    currency: str | None
    expected_currency: str | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RuleCount:
    matches: int = 0
    lines: int = 0
    items: int = 0


@dataclass(frozen=True)
class RunResult:
    """What one run did. `discrepancies` are the ones this run found first (each is
    reported by exactly one run); `now_matched` are open discrepancies whose line or
    item this run matched after all (a late line, a capture posted since)."""

    run_id: str
    kind: str
    ledger_seq: int
    line_checkpoint: int
    item_checkpoint: int
    lines_considered: int
    items_considered: int
    items_added: int
    matched: dict[str, RuleCount]
    discrepancy_counts: dict[str, int]
    discrepancies: tuple[Discrepancy, ...]
    now_matched: tuple[str, ...]
    phase_s: dict[str, float] = field(default_factory=dict)  # seconds spent in each phase
    replayed: bool = False  # the run had completed before: this is what it recorded

    @property
    def lines_matched(self) -> int:
        return sum(c.lines for c in self.matched.values())

    @property
    def items_matched(self) -> int:
        return sum(c.items for c in self.matched.values())

    def counts(self) -> dict[str, Any]:
        """The run's figures as JSON-ready data (what `recon.runs.counts` holds)."""
        return {
            "lines_considered": self.lines_considered,
            "items_considered": self.items_considered,
            "items_added": self.items_added,
            "matched": {rule: vars(count) for rule, count in self.matched.items()},
            "discrepancies": dict(self.discrepancy_counts),
            "phase_s": dict(self.phase_s),
        }


async def _scalar(conn: psycopg.AsyncConnection[Any], query: str, params: Any = None) -> Any:
    cursor = await conn.execute(query, params)
    row = await cursor.fetchone()
    return None if row is None else row[0]


async def _line_upto(conn: psycopg.AsyncConnection[Any]) -> int:
    await conn.execute(_LOCK_LINES, {"key": LINES_LOCK})
    try:
        return int(await _scalar(conn, _LINE_UPTO))
    finally:
        await conn.execute(_UNLOCK_LINES, {"key": LINES_LOCK})


async def _created(conn: psycopg.AsyncConnection[Any], table: str, query: str, params: Any) -> int:
    """(Re)create one of the run's temporary tables; its row count."""
    await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{table}")
    cursor = await conn.execute(query, params)
    await conn.execute(f"ANALYZE pg_temp.{table}")
    return max(cursor.rowcount, 0)


def _discrepancy(row: Sequence[Any]) -> Discrepancy:
    return Discrepancy(
        discrepancy_id=str(row[0]),
        type=str(row[1]),
        line_id=row[2],
        item_id=row[3],
        payment_id=row[4],
        reference=row[5],
        amount_minor=row[6],
        expected_amount_minor=row[7],
        currency=row[8],
        expected_currency=row[9],
        details=dict(row[10] or {}),
    )


async def _recorded(
    conn: psycopg.AsyncConnection[Any], run_id: str
) -> tuple[tuple[Discrepancy, ...], tuple[str, ...]]:
    cursor = await conn.execute(_DISCREPANCIES_OF_RUN, {"run": run_id})
    found = tuple(_discrepancy(row) for row in await cursor.fetchall())
    cursor = await conn.execute(_NOW_MATCHED, {"run": run_id})
    now_matched = tuple(str(row[0]) for row in await cursor.fetchall())
    return found, now_matched


async def _stored_result(conn: psycopg.AsyncConnection[Any], run_id: str) -> RunResult:
    cursor = await conn.execute(_STORED_RUN, {"run": run_id})
    row = await cursor.fetchone()
    assert row is not None
    kind, ledger_seq, line_checkpoint, item_checkpoint, counts = row
    found, now_matched = await _recorded(conn, run_id)
    return RunResult(
        run_id=run_id,
        kind=str(kind),
        ledger_seq=int(ledger_seq),
        line_checkpoint=int(line_checkpoint),
        item_checkpoint=int(item_checkpoint),
        lines_considered=int(counts["lines_considered"]),
        items_considered=int(counts["items_considered"]),
        items_added=int(counts["items_added"]),
        matched={rule: RuleCount(**c) for rule, c in counts["matched"].items()},
        discrepancy_counts={t: int(n) for t, n in counts["discrepancies"].items()},
        discrepancies=found,
        now_matched=now_matched,
        phase_s={p: float(s) for p, s in counts.get("phase_s", {}).items()},
        replayed=True,
    )


async def _rule(
    conn: psycopg.AsyncConnection[Any], rule: str, query: str, params: dict[str, Any]
) -> RuleCount:
    """Run one rule of the rule pass and record its matches."""
    await conn.execute(query, params)
    cursor = await conn.execute(_RULE_MATCHES)
    made = await cursor.fetchall()
    if not made:
        await conn.execute("TRUNCATE recon_rule_edges")
        return RuleCount()
    await conn.execute(_RULE_LINES, params | {"rule": rule})
    for query in (_RULE_ITEMS, *_RULE_DONE):
        await conn.execute(query)
    return RuleCount(
        matches=len(made), lines=sum(int(r[0]) for r in made), items=sum(int(r[1]) for r in made)
    )


async def reconcile(
    conn: psycopg.AsyncConnection[Any],
    run_id: str,
    *,
    rules: MatchRules,
    full: bool = False,
    now: datetime,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Match, classify and record, as one transaction; what the run did.

    `conn` must be in autocommit mode (the safe horizon is read outside the run's
    transaction). `now` is the instant ages are judged by (the settlement window), and
    the time recorded on matches and discrepancies. A run id that already completed
    changes nothing and returns what that run recorded, so a retried activity is safe.
    `progress`, if given, is called with each phase's name (`PHASES`) as it starts.
    """
    if not _RUN_ID.match(run_id) or len(run_id) > RUN_ID_CHARS_MAX:
        raise RunRefused(f"a run id is 1 to {RUN_ID_CHARS_MAX} letters, digits and ._:-")
    if now.tzinfo is None or now.utcoffset() is None:
        raise RunRefused("`now` must carry its time zone")
    if not conn.autocommit:
        raise RunRefused("reconcile needs a connection in autocommit mode")
    phases = _Phases(progress)
    phases.start("sync")
    horizon = await settlement_horizon(conn)
    young_after = now - timedelta(seconds=rules.settlement_window_s)
    async with conn.transaction():
        await conn.execute(_LOCK_RUN, {"key": ITEMS_LOCK})
        status = await _scalar(conn, _RUN_STATUS, {"run": run_id})
        if status == "completed":
            return await _stored_result(conn, run_id)
        for name, value in RUN_SETTINGS.items():
            await conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        await conn.execute(_START_RUN, {"run": run_id, "kind": "full" if full else "incremental"})

        cursor = await conn.execute(_LAST_RUN)
        last = await cursor.fetchone()
        ledger_after, line_after, item_after, young_after_last = (
            (int(last[0]), int(last[1]), int(last[2]), last[3])
            if last is not None
            else (0, 0, 0, young_after)
        )
        sync = await sync_settlement_items(conn, after=ledger_after, upto=horizon)
        line_upto = await _line_upto(conn)
        item_upto = int(await _scalar(conn, _ITEM_UPTO))
        if full:
            line_after = item_after = 0
        params: dict[str, Any] = {
            "run": run_id,
            "now": now,
            "line_after": line_after,
            "line_upto": line_upto,
            "item_after": item_after,
            "item_upto": item_upto,
            "young_after_last": young_after_last,
            "young_after": young_after,
            "tolerance": rules.amount_tolerance_minor,
            "days": rules.date_window_days,
        }
        phases.start("exact")
        await _created(conn, "recon_exact", _EXACT, params)
        phases.start("record_exact")
        cursor = await conn.execute(_EXACT_LINES, params)
        exact = max(cursor.rowcount, 0)
        await conn.execute(_EXACT_ITEMS, params)
        rest_lines = await _created(conn, "recon_rest_lines", _REST_LINES, params)
        rest_items = await _created(conn, "recon_rest_items", _REST_ITEMS, params)
        lines, items = exact + rest_lines, exact + rest_items

        matched = {"exact": RuleCount(exact, exact, exact)}
        phases.start("rules")
        await conn.execute("DROP TABLE IF EXISTS pg_temp.recon_rule_edges")
        await conn.execute(_RULE_EDGES)
        chosen = (
            ("tolerance", _TOLERANCE, rules.amount_tolerance_minor > 0),
            ("split", _SPLIT, rules.split_lines),
            ("batch", _BATCH, rules.batch_payouts),
        )
        for rule, query, enabled in chosen:
            matched[rule] = await _rule(conn, rule, query, params) if enabled else RuleCount()

        phases.start("classify")
        await _created(conn, "recon_found", _CLASSIFY, params)
        phases.start("record")
        cursor = await conn.execute(_RECORD, params)
        new_ids = {str(row[0]) for row in await cursor.fetchall()}
        found, now_matched = await _recorded(conn, run_id)
        assert {d.discrepancy_id for d in found} == new_ids, "a run records its own finds"
        counts = {t: 0 for t in DISCREPANCY_TYPES}
        for d in found:
            counts[d.type] += 1
        result = RunResult(
            run_id=run_id,
            kind="full" if full else "incremental",
            ledger_seq=sync.upto,
            line_checkpoint=line_upto,
            item_checkpoint=item_upto,
            lines_considered=lines,
            items_considered=items,
            items_added=sync.items_new,
            matched=matched,
            discrepancy_counts=counts,
            discrepancies=found,
            now_matched=now_matched,
            phase_s=dict(phases.seconds),
        )
        await conn.execute(
            _FINISH_RUN,
            params
            | {
                "ledger_seq": sync.upto,
                "counts": json.dumps(result.counts()),
            },
        )
    # The commit (its WAL flush) belongs to the record phase.
    phases.stop()
    return replace(result, phase_s=dict(phases.seconds))
