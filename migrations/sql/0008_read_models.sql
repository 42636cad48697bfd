-- Revision 0008: the read side. Every table here is derived from the event log and can
-- be rebuilt from it at any time (`paysaga replay`); none of them is a source of truth.
--
-- Schema `projection` holds the live read models the API serves. `paysaga replay`
-- builds a fresh copy of a read model in `projection_shadow` (tables made LIKE the live
-- ones), catches it up to the live one, and moves it into `projection` in one
-- transaction. Index and constraint names here are the ones PostgreSQL generates, so a
-- rebuilt table (CREATE TABLE ... LIKE ... INCLUDING ALL) carries the same names.
CREATE SCHEMA projection;
CREATE SCHEMA projection_shadow;

-- Each read model's checkpoint: every event at or below last_seq has been applied to
-- its tables, in the transaction that moved this row. A projector holds the row's lock
-- for the span of a batch, so two projectors never apply the same batch.
CREATE TABLE projection.checkpoints (
    projection      text PRIMARY KEY,
    last_seq        bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    events_applied  bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE projection_shadow.checkpoints (LIKE projection.checkpoints INCLUDING ALL);
INSERT INTO projection.checkpoints (projection)
VALUES ('balances'), ('statement'), ('payments'), ('risk_alerts'), ('risk_consumer');

-- Balances: each account's position, as of the checkpoint.
CREATE TABLE projection.balances (
    account_id             text PRIMARY KEY,
    currency               text NOT NULL,
    kind                   text NOT NULL,
    overdraft_limit_minor  bigint,
    debits_pending         bigint NOT NULL DEFAULT 0,
    debits_posted          bigint NOT NULL DEFAULT 0,
    credits_pending        bigint NOT NULL DEFAULT 0,
    credits_posted         bigint NOT NULL DEFAULT 0,
    opened_seq             bigint NOT NULL,
    last_seq               bigint NOT NULL
);

-- The statement: one row per (account, money event), with what the event moved and the
-- position after it, twice over:
--   * in the ledger's order (global_seq): the running balance of the statement, which
--     only ever grows at its end;
--   * in time order (recorded_at, global_seq), the at_* columns: what `balance?as_of=`
--     reads with one backward index seek. Two events of one account can be recorded in
--     the other order than their global_seq (credits to different stripes of a merchant
--     commit concurrently), so a late event may land before rows already here; the
--     projector then recomputes the at_* columns of the few rows after it.
CREATE TABLE projection.entries (
    account_id               text NOT NULL,
    global_seq               bigint NOT NULL,
    recorded_at              timestamptz NOT NULL,
    event_type               text NOT NULL,
    payment_id               text NOT NULL,
    debits_pending_delta     bigint NOT NULL,
    debits_posted_delta      bigint NOT NULL,
    credits_pending_delta    bigint NOT NULL,
    credits_posted_delta     bigint NOT NULL,
    debits_pending           bigint NOT NULL,
    debits_posted            bigint NOT NULL,
    credits_pending          bigint NOT NULL,
    credits_posted           bigint NOT NULL,
    at_debits_pending        bigint NOT NULL,
    at_debits_posted         bigint NOT NULL,
    at_credits_pending       bigint NOT NULL,
    at_credits_posted        bigint NOT NULL,
    PRIMARY KEY (account_id, global_seq)
);
CREATE INDEX ON projection.entries (account_id, recorded_at, global_seq);

-- Payments as listed: the PaymentInitiated, and the stream's state after its last event.
CREATE TABLE projection.payments (
    payment_id        text PRIMARY KEY,
    initiated_seq     bigint NOT NULL UNIQUE,
    payer_account_id  text NOT NULL,
    payee_account_id  text NOT NULL,
    amount_minor      bigint NOT NULL,
    currency          text NOT NULL,
    reference         text,
    metadata          jsonb NOT NULL,
    state             text NOT NULL,
    status            text NOT NULL,
    failure_reason    text,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    last_seq          bigint NOT NULL
);
CREATE INDEX ON projection.payments (status, initiated_seq);
CREATE INDEX ON projection.payments (payer_account_id, initiated_seq);
CREATE INDEX ON projection.payments (payee_account_id, initiated_seq);

-- Risk alerts, from the RiskAlertRaised events the risk consumer appends.
CREATE TABLE projection.risk_alerts (
    global_seq   bigint PRIMARY KEY,
    event_id     uuid NOT NULL,
    account_id   text NOT NULL,
    rule         text NOT NULL,
    payment_id   text NOT NULL,
    trigger_seq  bigint NOT NULL,
    reason       text NOT NULL,
    raised_at    timestamptz NOT NULL
);
CREATE INDEX ON projection.risk_alerts (account_id, global_seq);
CREATE INDEX ON projection.risk_alerts (rule, global_seq);

-- The risk consumer's memory of each payer, as of its checkpoint ('risk_consumer').
-- It is not a read model: what it concludes is appended to the ledger.
CREATE TABLE projection.risk_payers (
    account_id       text PRIMARY KEY,
    payments_n       bigint NOT NULL DEFAULT 0,
    amount_sum       numeric NOT NULL DEFAULT 0,
    amount_sum_sq    numeric NOT NULL DEFAULT 0,
    -- When the payer's latest payments were initiated, oldest first, at most the
    -- velocity rule's count.
    recent_at        timestamptz[] NOT NULL DEFAULT '{}',
    -- Whether the latest payment took the payer over the velocity rule's count: a
    -- burst raises one alert, where it crosses, not one per payment.
    velocity_over    boolean NOT NULL DEFAULT false,
    declines_in_row  integer NOT NULL DEFAULT 0,
    last_seq         bigint NOT NULL
);
