-- Revision 0010: reconciliation. External statements, the ledger's settlements as items
-- to match, the matches, and every difference found, in schema `recon`.
--
-- Statements and their lines are facts received from outside; items are derived from
-- the ledger (one per PaymentSettled, `ledger/settlements.py`); matches and
-- discrepancies are what `recon/matching.py` concluded. The services add rows and
-- update a discrepancy's status or a run's; nothing here is ever deleted by them.
CREATE SCHEMA recon;

-- One row per file received, by the SHA-256 of its bytes: the same bytes again are
-- recognised and add nothing.
CREATE TABLE recon.statement_files (
    file_sha256     text PRIMARY KEY CHECK (file_sha256 ~ '^[0-9a-f]{64}$'),
    format          text NOT NULL CHECK (length(format) BETWEEN 1 AND 40),
    filename        text CHECK (length(filename) BETWEEN 1 AND 255),
    source          text NOT NULL CHECK (source IN ('upload', 'inbox', 'simulator')),
    received_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    statements      integer NOT NULL CHECK (statements >= 0),
    lines           integer NOT NULL CHECK (lines >= 0),
    -- What this file added: a statement already ingested from another file is skipped.
    statements_new  integer NOT NULL CHECK (statements_new BETWEEN 0 AND statements),
    lines_new       integer NOT NULL CHECK (lines_new BETWEEN 0 AND lines)
);

-- One row per statement, by the statement's own id (camt Stmt/Id, MT940 :20:/:28C:, ...):
-- a statement that arrives again in another file is skipped, and one that arrives with
-- other content under a known id is refused (`recon/store.py`).
CREATE TABLE recon.statements (
    statement_id  text PRIMARY KEY CHECK (length(statement_id) BETWEEN 1 AND 200),
    file_sha256   text NOT NULL REFERENCES recon.statement_files (file_sha256),
    account       text NOT NULL CHECK (length(account) BETWEEN 1 AND 200),
    currency      text CHECK (currency ~ '^[A-Z]{3}$'),
    lines         integer NOT NULL CHECK (lines >= 0)
);
CREATE INDEX ON recon.statements (file_sha256);

-- Statement lines, normalised: a signed amount in minor units (credit > 0), loaded with
-- COPY. line_id is the order of arrival, which incremental runs checkpoint.
--
-- statement_id names a row of recon.statements, written in the same transaction by the
-- one writer of lines (recon/store.py), and no role but the owner may delete either.
-- It is no foreign key: checking one per row tripled the time of a million-line COPY
-- (6.3 s against 17.1 s).
CREATE TABLE recon.statement_lines (
    line_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    statement_id    text NOT NULL,
    line_no         integer NOT NULL CHECK (line_no >= 1),
    amount_minor    bigint NOT NULL,
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    value_date      date NOT NULL,
    booking_date    date,
    reference       text CHECK (length(reference) BETWEEN 1 AND 200),
    end_to_end_id   text CHECK (length(end_to_end_id) BETWEEN 1 AND 200),
    bank_reference  text CHECK (length(bank_reference) BETWEEN 1 AND 200),
    kind            text NOT NULL CHECK (kind IN ('capture', 'refund', 'fee', 'credit', 'debit')),
    description     text CHECK (length(description) <= 1000),
    UNIQUE (statement_id, line_no)
);

-- The ledger's side: one item per settlement to match, derived from the events below
-- the safe horizon (`ledger/settlements.py`), idempotently (global_seq, kind).
CREATE TABLE recon.items (
    item_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    global_seq    bigint NOT NULL CHECK (global_seq >= 1),
    kind          text NOT NULL CHECK (kind IN ('capture', 'refund', 'fee')),
    payment_id    text NOT NULL CHECK (length(payment_id) BETWEEN 1 AND 200),
    -- What a statement names it by: the payment id.
    reference     text NOT NULL CHECK (length(reference) BETWEEN 1 AND 200),
    amount_minor  bigint NOT NULL,
    currency      text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- The UTC date of the settlement: what a statement's value date is compared with.
    value_date    date NOT NULL,
    settled_at    timestamptz NOT NULL,
    UNIQUE (global_seq, kind)
);
CREATE INDEX ON recon.items (reference);
-- Items still inside the settlement window at the last run are looked at again.
CREATE INDEX ON recon.items (settled_at);

-- Runs: each one's checkpoints, so that the next incremental run looks only at lines
-- and items after them, plus whatever is still unmatched.
CREATE SEQUENCE recon.run_completions AS bigint;
CREATE TABLE recon.runs (
    run_id           text PRIMARY KEY CHECK (length(run_id) BETWEEN 1 AND 200),
    kind             text NOT NULL CHECK (kind IN ('incremental', 'full')),
    status           text NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    started_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at      timestamptz,
    -- The order runs completed in: the last one's checkpoints are where the next starts.
    completed_seq    bigint UNIQUE,
    -- Items hold every settlement up to this global_seq (below the safe horizon).
    ledger_seq       bigint CHECK (ledger_seq >= 0),
    -- Every line and item up to these ids was matched or classified by this run...
    line_checkpoint  bigint CHECK (line_checkpoint >= 0),
    item_checkpoint  bigint CHECK (item_checkpoint >= 0),
    -- ... except items settled at or after this instant, still inside the settlement
    -- window: the next run looks at them again.
    young_after      timestamptz,
    -- The instant the run judged ages by (the caller's clock).
    as_of            timestamptz,
    counts           jsonb,
    CONSTRAINT runs_completed_has_checkpoints CHECK (
        (status = 'completed') = (completed_seq IS NOT NULL)
        AND (status <> 'completed' OR (
            finished_at IS NOT NULL AND ledger_seq IS NOT NULL AND line_checkpoint IS NOT NULL
            AND item_checkpoint IS NOT NULL AND young_after IS NOT NULL AND as_of IS NOT NULL
            AND counts IS NOT NULL)))
);

-- Matches. A match holds one or more lines and one or more items (one line for a
-- batched payout, one item for a split capture), and is named by its smallest line id.
-- The primary keys are the "never twice" guarantee: no line and no item is ever in two
-- matches, whatever runs at the same time. What made the match (the run, the rule; the
-- exact pass's rule is 'exact', the rule pass's the others) is kept on its lines, not in
-- a table of its own: a million exact matches are then two million rows written, not
-- three (measured: 1.9 s of a run's 9.8 s went to that third table). For the same
-- reason neither table has foreign keys: a key is checked row by row, at about 13 us a
-- check (measured on discrepancies) against about 1.5 us to write the row itself.
-- recon/matching.py takes every id it writes from the tables themselves, and the
-- application role deletes nothing.
CREATE TABLE recon.matched_lines (
    line_id   bigint PRIMARY KEY,
    match_id  bigint NOT NULL,
    run_id    text NOT NULL,
    rule      text NOT NULL CHECK (rule IN ('exact', 'tolerance', 'split', 'batch'))
);
CREATE TABLE recon.matched_items (
    item_id   bigint PRIMARY KEY,
    match_id  bigint NOT NULL
);

-- Every difference found, once: the id is derived from the problem (its type and what
-- it names), so a run that finds it again adds nothing.
CREATE TABLE recon.discrepancies (
    discrepancy_id         uuid PRIMARY KEY,
    -- '<type>:line=<id>:item=<id>' for what matching finds; internal checks name theirs.
    problem_key            text NOT NULL UNIQUE CHECK (length(problem_key) BETWEEN 1 AND 400),
    type                   text NOT NULL CHECK (type IN (
                               'missing_in_ledger', 'missing_in_statement', 'amount_mismatch',
                               'currency_mismatch', 'duplicate_in_statement', 'internal_drift')),
    line_id                bigint REFERENCES recon.statement_lines (line_id),
    item_id                bigint REFERENCES recon.items (item_id),
    payment_id             text CHECK (length(payment_id) BETWEEN 1 AND 200),
    reference              text CHECK (length(reference) BETWEEN 1 AND 200),
    -- The statement's side and the ledger's.
    amount_minor           bigint,
    expected_amount_minor  bigint,
    currency               text CHECK (currency ~ '^[A-Z]{3}$'),
    expected_currency      text CHECK (expected_currency ~ '^[A-Z]{3}$'),
    run_id                 text NOT NULL REFERENCES recon.runs (run_id),
    detected_at            timestamptz NOT NULL,
    status                 text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    resolution_code        text CHECK (length(resolution_code) BETWEEN 1 AND 100),
    resolution_note        text CHECK (length(resolution_note) <= 2000),
    resolved_by            text CHECK (length(resolved_by) BETWEEN 1 AND 200),
    resolved_at            timestamptz,
    details                jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object'),
    CONSTRAINT discrepancies_id_from_problem CHECK (discrepancy_id = md5(problem_key)::uuid),
    CONSTRAINT discrepancies_resolution CHECK (
        (status = 'resolved') = (resolved_at IS NOT NULL AND resolution_code IS NOT NULL)),
    -- What each type names: a line, an item, or both.
    CONSTRAINT discrepancies_subject CHECK (CASE type
        WHEN 'missing_in_ledger' THEN line_id IS NOT NULL AND item_id IS NULL
        WHEN 'missing_in_statement' THEN item_id IS NOT NULL AND line_id IS NULL
        WHEN 'amount_mismatch' THEN line_id IS NOT NULL AND item_id IS NOT NULL
        WHEN 'currency_mismatch' THEN line_id IS NOT NULL AND item_id IS NOT NULL
        WHEN 'duplicate_in_statement' THEN line_id IS NOT NULL
        ELSE line_id IS NULL AND item_id IS NULL END)
);
CREATE INDEX ON recon.discrepancies (line_id) WHERE line_id IS NOT NULL;
CREATE INDEX ON recon.discrepancies (item_id) WHERE item_id IS NOT NULL;
CREATE INDEX ON recon.discrepancies (run_id);
CREATE INDEX ON recon.discrepancies (status, detected_at);
