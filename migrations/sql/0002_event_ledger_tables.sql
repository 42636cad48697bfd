-- Revision 0002: the event ledger's tables, its stream heads, accounts and positions.
CREATE SEQUENCE events_global_seq AS bigint;

CREATE TABLE events (
    global_seq      bigint PRIMARY KEY DEFAULT nextval('events_global_seq'),
    stream_id       text NOT NULL CHECK (length(stream_id) BETWEEN 3 AND 200),
    stream_version  integer NOT NULL CHECK (stream_version >= 1),
    event_id        uuid NOT NULL,
    event_type      text NOT NULL CHECK (length(event_type) BETWEEN 1 AND 100),
    schema_version  integer NOT NULL CHECK (schema_version >= 1),
    payload         jsonb NOT NULL CHECK (jsonb_typeof(payload) = 'object'),
    actor           text NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    correlation_id  text,
    causation_id    text,
    attempt         integer,
    recorded_at     timestamptz NOT NULL,
    -- The writing transaction: lets readers of the feed wait for a transaction that
    -- took an earlier global_seq but commits later, instead of skipping its event.
    tx_id           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    prev_hash       bytea NOT NULL CHECK (length(prev_hash) = 32),
    hash            bytea NOT NULL CHECK (length(hash) = 32),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);
ALTER SEQUENCE events_global_seq OWNED BY events.global_seq;

-- One row per stream: the lock that serialises its appends, its version, its state in
-- the state machine, and the hash its next event chains to.
CREATE TABLE streams (
    stream_id   text PRIMARY KEY,
    version     integer NOT NULL CHECK (version >= 0),
    state       text NOT NULL,
    last_hash   bytea NOT NULL CHECK (length(last_hash) = 32),
    last_seq    bigint
);

CREATE TABLE accounts (
    account_id             text PRIMARY KEY,
    currency               char(3) NOT NULL,
    kind                   text NOT NULL
        CHECK (kind IN ('customer', 'merchant', 'settlement', 'fees', 'external')),
    -- NULL: unlimited, for external funding accounts only.
    overdraft_limit_minor  bigint CHECK (overdraft_limit_minor >= 0),
    metadata               jsonb NOT NULL DEFAULT '{}',
    -- How many position rows share this account's credits (see positions).
    credit_stripes         smallint NOT NULL CHECK (credit_stripes BETWEEN 1 AND 64),
    -- The AccountOpened event (its recorded_at is when the account was opened).
    opened_seq             bigint NOT NULL,
    CONSTRAINT accounts_unlimited_only_external
        CHECK (overdraft_limit_minor IS NOT NULL OR kind = 'external')
);

-- Positions in the style of TigerBeetle, moved only by ledger_append, in the same
-- transaction as the event that moves them. An account's position is the sum of its
-- stripes. Debits always land on stripe 0, which the overdraft check locks. Credits
-- land on the stripe the payment's stream hashes to: an account that many payments
-- pay into (a merchant, the fees account) has several stripes, so concurrent
-- settlements to it do not all queue on one row lock. Credits only ever raise what is
-- available, so the check may read the other stripes without locking them.
CREATE TABLE positions (
    account_id             text NOT NULL REFERENCES accounts (account_id),
    stripe                 smallint NOT NULL CHECK (stripe >= 0),
    currency               char(3) NOT NULL,
    overdraft_limit_minor  bigint,
    credit_stripes         smallint NOT NULL,
    debits_pending         bigint NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    debits_posted          bigint NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_pending        bigint NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    credits_posted         bigint NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    last_seq               bigint NOT NULL,
    PRIMARY KEY (account_id, stripe),
    CONSTRAINT positions_debits_on_stripe_zero
        CHECK (stripe = 0 OR (debits_pending = 0 AND debits_posted = 0)),
    -- The last line of defence for invariant 2 on single-stripe accounts (customers),
    -- whatever the code above it does. Striped accounts rely on the function's check.
    CONSTRAINT positions_within_overdraft CHECK (
        credit_stripes > 1
        OR overdraft_limit_minor IS NULL
        OR credits_posted - debits_posted - debits_pending + overdraft_limit_minor >= 0
    )
);

-- One account's position: the sum of its stripes.
CREATE VIEW account_positions AS
SELECT account_id,
       min(currency) AS currency,
       min(overdraft_limit_minor) AS overdraft_limit_minor,
       sum(debits_pending)::bigint AS debits_pending,
       sum(debits_posted)::bigint AS debits_posted,
       sum(credits_pending)::bigint AS credits_pending,
       sum(credits_posted)::bigint AS credits_posted,
       max(last_seq) AS last_seq
  FROM positions
 GROUP BY account_id;

-- Which of an account's stripes a payment's credits land on: the same for every event
-- of the stream (so a pending credit is posted on the row that holds it), stable
-- across PostgreSQL versions (sha256, not hashtext).
CREATE FUNCTION ledger_credit_stripe(p_stream_id text, p_stripes smallint)
RETURNS smallint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (get_byte(sha256(convert_to(p_stream_id, 'UTF8')), 0) % p_stripes)::smallint
$$;
