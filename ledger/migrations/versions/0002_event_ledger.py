"""The event ledger: append-only events, stream heads, accounts and positions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

One function, `ledger_append`, is the only way the application writes money: under
the stream's lock it checks the state machine, chains the hash, inserts the event
and moves the positions, all in one transaction and one round trip. It runs with the
owner's rights (SECURITY DEFINER), so the application role needs no UPDATE right on
anything: it holds INSERT and SELECT on events, SELECT on the rest, and EXECUTE.

Errors it raises on purpose carry SQLSTATEs of class PS, which the store translates
into domain errors (ledger/errors.py):

    PS001 invalid transition     PS005 currency mismatch
    PS002 idempotency conflict   PS006 wrong expected version
    PS003 insufficient funds     PS007 invalid postings or hold
    PS004 unknown account        PS008 account exists
    PS100 events are immutable
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from paysaga.migrate import app_role

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = """
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
"""

IMMUTABILITY = """
CREATE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are immutable: % on events is refused', TG_OP
        USING ERRCODE = 'PS100';
END
$$;

CREATE TRIGGER events_no_update_or_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
"""

APPLY_MONEY = r"""
-- Moves the positions for one money event and returns the global_seq for its event.
-- The sequence number is taken only once every position involved is locked: two
-- appends that touch the same position row then get sequence numbers in the order
-- their effects apply, so folding the events by global_seq reproduces the positions.
CREATE FUNCTION ledger_apply_money(
    p_event_type text, p_stream_id text, p_payload jsonb
) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
DECLARE
    v_seq          bigint;
    v_hold         jsonb;
    v_payer        text;
    v_payee        text;
    v_payee_stripe smallint;
    v_amount       bigint;
    v_currency     text;
    v_sign         bigint;
    v_accounts     text[];
    v_found        integer := 0;
    v_debits       numeric;
    v_credits      numeric;
    v_ok           boolean;
    v_available    numeric;
    r              record;
BEGIN
    IF p_event_type = 'AccountOpened' THEN
        IF p_stream_id <> 'account-' || (p_payload->>'account_id') THEN
            RAISE EXCEPTION 'AccountOpened for % does not belong in stream %',
                p_payload->>'account_id', p_stream_id USING ERRCODE = 'PS001';
        END IF;
        v_seq := nextval('events_global_seq');
        INSERT INTO accounts (account_id, currency, kind, overdraft_limit_minor, metadata,
                              credit_stripes, opened_seq)
        VALUES (p_payload->>'account_id', p_payload->>'currency', p_payload->>'kind',
                (p_payload->>'overdraft_limit_minor')::bigint,
                coalesce(p_payload->'metadata', '{}'::jsonb),
                -- Accounts that many payments pay into get their credits spread out.
                CASE WHEN p_payload->>'kind' IN ('merchant', 'settlement', 'fees') THEN 8
                     ELSE 1 END,
                v_seq)
        RETURNING credit_stripes INTO v_found;
        INSERT INTO positions (account_id, stripe, currency, overdraft_limit_minor,
                               credit_stripes, last_seq)
        SELECT p_payload->>'account_id', stripe, p_payload->>'currency',
               (p_payload->>'overdraft_limit_minor')::bigint, v_found, v_seq
          FROM generate_series(0, v_found - 1) AS stripe;
        RETURN v_seq;
    END IF;

    -- A payment's money events all act on its hold, which FundsReserved describes, and
    -- the hold must be exactly the payment that PaymentInitiated recorded.
    IF p_event_type = 'FundsReserved' THEN
        v_hold := p_payload;
        PERFORM 1 FROM events e
         WHERE e.stream_id = p_stream_id AND e.event_type = 'PaymentInitiated'
           AND e.payload->'payer_account_id' = v_hold->'payer_account_id'
           AND e.payload->'payee_account_id' = v_hold->'payee_account_id'
           AND e.payload->'amount_minor' = v_hold->'amount_minor'
           AND e.payload->'currency' = v_hold->'currency';
        IF NOT FOUND THEN
            RAISE EXCEPTION 'the hold does not match the payment it reserves for'
                USING ERRCODE = 'PS007';
        END IF;
    ELSE
        SELECT e.payload INTO v_hold FROM events e
         WHERE e.stream_id = p_stream_id AND e.event_type = 'FundsReserved';
        IF v_hold IS NULL THEN
            RAISE EXCEPTION '% without a hold in %', p_event_type, p_stream_id
                USING ERRCODE = 'PS001';
        END IF;
    END IF;
    v_payer    := v_hold->>'payer_account_id';
    v_payee    := v_hold->>'payee_account_id';
    v_amount   := (v_hold->>'amount_minor')::bigint;
    v_currency := v_hold->>'currency';
    v_accounts := ARRAY[v_payer, v_payee];

    IF p_event_type = 'FundsReleased' THEN
        IF (p_payload->>'amount_minor')::bigint <> v_amount THEN
            RAISE EXCEPTION 'release of % does not match the hold of %',
                p_payload->>'amount_minor', v_amount USING ERRCODE = 'PS007';
        END IF;
    ELSIF p_event_type = 'PaymentSettled' THEN
        IF p_payload->>'currency' <> v_currency THEN
            RAISE EXCEPTION 'settlement in % for a hold in %', p_payload->>'currency', v_currency
                USING ERRCODE = 'PS005';
        END IF;
        -- Balanced, debiting only the payer by exactly the hold, crediting the payee.
        SELECT coalesce(sum(x.amount_minor) FILTER (WHERE x.side = 'debit'), 0),
               coalesce(sum(x.amount_minor) FILTER (WHERE x.side = 'credit'), 0),
               bool_and(x.amount_minor > 0 AND x.side IN ('debit', 'credit')
                        AND (x.side = 'credit' OR x.account_id = v_payer))
               AND bool_or(x.side = 'credit' AND x.account_id = v_payee),
               array_agg(DISTINCT x.account_id)
          INTO v_debits, v_credits, v_ok, v_accounts
          FROM jsonb_to_recordset(p_payload->'postings')
               AS x(account_id text, side text, amount_minor bigint);
        IF v_debits <> v_credits OR v_debits <> v_amount OR NOT coalesce(v_ok, false) THEN
            RAISE EXCEPTION 'postings must balance, debit only the payer by the hold and '
                'credit the payee (hold %, debits %, credits %)', v_amount, v_debits, v_credits
                USING ERRCODE = 'PS007';
        END IF;
    ELSIF p_event_type <> 'FundsReserved' THEN
        RAISE EXCEPTION 'no money rule for %', p_event_type USING ERRCODE = 'PS001';
    END IF;

    -- Lock the rows that move, in one fixed order, (account id, stripe), so that two
    -- appends can never wait on each other in a cycle: the payer's stripe 0 (debits),
    -- and each credited account's stripe for this payment.
    FOR r IN
        SELECT p.account_id, p.stripe, p.currency, p.overdraft_limit_minor, p.credit_stripes,
               p.debits_pending, p.debits_posted, p.credits_posted
          FROM accounts a
          JOIN positions p
            ON p.account_id = a.account_id
           AND p.stripe = CASE WHEN a.account_id = v_payer THEN 0
                               ELSE ledger_credit_stripe(p_stream_id, a.credit_stripes) END
         WHERE a.account_id = ANY (v_accounts)
         ORDER BY p.account_id, p.stripe
           FOR UPDATE OF p
    LOOP
        v_found := v_found + 1;
        IF r.currency <> v_currency THEN
            RAISE EXCEPTION 'account % holds %, the payment is in %',
                r.account_id, r.currency, v_currency USING ERRCODE = 'PS005';
        END IF;
        IF r.account_id = v_payee THEN
            v_payee_stripe := r.stripe;
        END IF;
        IF p_event_type = 'FundsReserved' AND r.account_id = v_payer
           AND r.overdraft_limit_minor IS NOT NULL THEN
            IF r.credit_stripes = 1 THEN
                v_available := r.credits_posted::numeric - r.debits_posted - r.debits_pending
                               + r.overdraft_limit_minor;
            ELSE
                -- Debits live on the locked stripe 0; the others hold only credits, which
                -- only ever grow, so reading them unlocked can only understate.
                SELECT sum(p.credits_posted) - sum(p.debits_posted) - sum(p.debits_pending)
                       + min(p.overdraft_limit_minor)
                  INTO v_available
                  FROM positions p WHERE p.account_id = v_payer;
            END IF;
            IF v_available < v_amount THEN
                RAISE EXCEPTION 'account % has % available, % requested',
                    v_payer, v_available, v_amount
                    USING ERRCODE = 'PS003',
                          DETAIL = json_build_object('account_id', v_payer,
                                                     'available_minor', v_available,
                                                     'requested_minor', v_amount)::text;
            END IF;
        END IF;
    END LOOP;
    IF v_found <> cardinality(v_accounts) THEN
        RAISE EXCEPTION 'unknown account(s): %',
            array_to_string(ARRAY(SELECT unnest(v_accounts)
                                  EXCEPT SELECT a.account_id FROM accounts a), ', ')
            USING ERRCODE = 'PS004';
    END IF;

    v_seq := nextval('events_global_seq');
    IF p_event_type = 'PaymentSettled' THEN
        -- The hold leaves pending on both sides; then each account's postings are posted,
        -- one primary-key update per row (a join here would be planned as a scan).
        UPDATE positions p
           SET debits_pending  = p.debits_pending
                                 - CASE WHEN p.account_id = v_payer THEN v_amount ELSE 0 END,
               credits_pending = p.credits_pending
                                 - CASE WHEN p.account_id = v_payee THEN v_amount ELSE 0 END,
               last_seq        = v_seq
         WHERE (p.account_id = v_payer AND p.stripe = 0)
            OR (p.account_id = v_payee AND p.stripe = v_payee_stripe);
        FOR r IN
            SELECT x.account_id, x.side, sum(x.amount_minor)::bigint AS amount_minor
              FROM jsonb_to_recordset(p_payload->'postings')
                   AS x(account_id text, side text, amount_minor bigint)
             GROUP BY x.account_id, x.side
             ORDER BY x.account_id, x.side
        LOOP
            IF r.side = 'debit' THEN
                UPDATE positions p
                   SET debits_posted = p.debits_posted + r.amount_minor, last_seq = v_seq
                 WHERE p.account_id = r.account_id AND p.stripe = 0;
            ELSE
                UPDATE positions p
                   SET credits_posted = p.credits_posted + r.amount_minor, last_seq = v_seq
                 WHERE p.account_id = r.account_id
                   AND p.stripe = CASE WHEN r.account_id = v_payer THEN 0
                                       WHEN r.account_id = v_payee THEN v_payee_stripe
                                       ELSE (SELECT ledger_credit_stripe(p_stream_id,
                                                                         a.credit_stripes)
                                               FROM accounts a
                                              WHERE a.account_id = r.account_id)
                                  END;
            END IF;
        END LOOP;
    ELSE
        -- A reservation adds the hold to pending on both sides; a release takes it back.
        v_sign := CASE WHEN p_event_type = 'FundsReserved' THEN 1 ELSE -1 END;
        UPDATE positions p
           SET debits_pending  = p.debits_pending + v_sign
                                 * CASE WHEN p.account_id = v_payer THEN v_amount ELSE 0 END,
               credits_pending = p.credits_pending + v_sign
                                 * CASE WHEN p.account_id = v_payee THEN v_amount ELSE 0 END,
               last_seq        = v_seq
         WHERE (p.account_id = v_payer AND p.stripe = 0)
            OR (p.account_id = v_payee AND p.stripe = v_payee_stripe);
    END IF;
    RETURN v_seq;
END
$$;
"""

APPEND = r"""
CREATE FUNCTION ledger_append(
    p_event_id uuid,
    p_stream_id text,
    p_event_type text,
    p_schema_version integer,
    p_payload jsonb,
    p_content bytea,
    p_actor text,
    p_correlation_id text,
    p_causation_id text,
    p_attempt integer,
    p_from_states text[],
    p_to_states text[],
    p_expected_version integer
) RETURNS TABLE (
    global_seq bigint,
    stream_version integer,
    recorded_at timestamptz,
    prev_hash bytea,
    hash bytea,
    appended boolean,
    actor text,
    correlation_id text,
    causation_id text,
    attempt integer
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    v_state     text;
    v_version   integer;
    v_last_hash bytea;
    v_to_state  text;
    v_seq       bigint;
    v_now       timestamptz;
    v_hash      bytea;
    v_stored    events%ROWTYPE;
BEGIN
    -- 1. The stream's lock. Everything below happens while no one else can append here.
    --    A stream's first event creates its head; an inserted row is ours until commit.
    IF p_from_states = ARRAY['new'] THEN
        INSERT INTO streams AS s (stream_id, version, state, last_hash)
        VALUES (p_stream_id, 0, 'new', decode(repeat('00', 32), 'hex'))
        ON CONFLICT (stream_id) DO NOTHING
        RETURNING s.state, s.version, s.last_hash INTO v_state, v_version, v_last_hash;
    END IF;
    IF v_state IS NULL THEN
        SELECT s.state, s.version, s.last_hash INTO v_state, v_version, v_last_hash
          FROM streams s WHERE s.stream_id = p_stream_id FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO streams AS s (stream_id, version, state, last_hash)
            VALUES (p_stream_id, 0, 'new', decode(repeat('00', 32), 'hex'))
            ON CONFLICT (stream_id) DO NOTHING;
            SELECT s.state, s.version, s.last_hash INTO v_state, v_version, v_last_hash
              FROM streams s WHERE s.stream_id = p_stream_id FOR UPDATE;
        END IF;
    END IF;

    -- 2. The state machine, and optimistic concurrency if the caller asked for it.
    v_to_state := p_to_states[array_position(p_from_states, v_state)];
    IF v_to_state IS NULL OR v_version IS DISTINCT FROM coalesce(p_expected_version, v_version) THEN
        -- A retry of an event already appended returns it and appends nothing; so does
        -- the same fact under another id (a second FundsReserved is never a second hold).
        SELECT * INTO v_stored FROM events e WHERE e.event_id = p_event_id;
        IF NOT FOUND THEN
            SELECT * INTO v_stored FROM events e
             WHERE e.stream_id = p_stream_id AND e.event_type = p_event_type
               AND e.payload = p_payload;
        END IF;
        IF FOUND THEN
            IF v_stored.stream_id = p_stream_id AND v_stored.event_type = p_event_type
               AND v_stored.schema_version = p_schema_version AND v_stored.payload = p_payload THEN
                RETURN QUERY SELECT v_stored.global_seq, v_stored.stream_version,
                    v_stored.recorded_at, v_stored.prev_hash, v_stored.hash, false,
                    v_stored.actor, v_stored.correlation_id, v_stored.causation_id,
                    v_stored.attempt;
                RETURN;
            END IF;
            RAISE EXCEPTION 'event % exists with different content (% in %)',
                p_event_id, v_stored.event_type, v_stored.stream_id USING ERRCODE = 'PS002';
        END IF;
        IF p_expected_version IS NOT NULL AND v_version <> p_expected_version THEN
            RAISE EXCEPTION '% is at version %, not %', p_stream_id, v_version, p_expected_version
                USING ERRCODE = 'PS006',
                      DETAIL = json_build_object('version', v_version, 'state', v_state)::text;
        END IF;
        RAISE EXCEPTION '% may not follow state % in %', p_event_type, v_state, p_stream_id
            USING ERRCODE = 'PS001',
                  DETAIL = json_build_object('version', v_version, 'state', v_state)::text;
    END IF;

    -- 3. Positions move in the same transaction as the event that moves them. The
    --    sequence number comes after their locks (see ledger_apply_money).
    IF p_event_type IN ('AccountOpened', 'FundsReserved', 'PaymentSettled', 'FundsReleased') THEN
        v_seq := ledger_apply_money(p_event_type, p_stream_id, p_payload);
    ELSE
        v_seq := nextval('events_global_seq');
    END IF;
    -- Taken with the sequence number, so recorded_at never runs backwards against it
    -- for events that touch the same account or stream.
    v_now := clock_timestamp();

    -- 4. The event, chained to the stream's previous hash.
    v_version := v_version + 1;
    v_hash := sha256(v_last_hash || p_content || int8send(v_seq) || int8send(v_version::bigint)
                     || int8send((extract(epoch FROM v_now) * 1000000)::bigint));
    INSERT INTO events (global_seq, stream_id, stream_version, event_id, event_type,
                        schema_version, payload, actor, correlation_id, causation_id, attempt,
                        recorded_at, prev_hash, hash)
    VALUES (v_seq, p_stream_id, v_version, p_event_id, p_event_type, p_schema_version,
            p_payload, p_actor, p_correlation_id, p_causation_id, p_attempt, v_now,
            v_last_hash, v_hash);

    UPDATE streams SET version = v_version, state = v_to_state, last_hash = v_hash,
                       last_seq = v_seq
     WHERE streams.stream_id = p_stream_id;

    RETURN QUERY SELECT v_seq, v_version, v_now, v_last_hash, v_hash, true,
        p_actor, p_correlation_id, p_causation_id, p_attempt;
END
$$;
"""

APPEND_SIGNATURE = (
    "ledger_append(uuid, text, text, integer, jsonb, bytea, text, text, text, integer, "
    "text[], text[], integer)"
)
APPLY_MONEY_SIGNATURE = "ledger_apply_money(text, text, jsonb)"


def upgrade() -> None:
    role = app_role()
    op.execute(TABLES)
    op.execute(IMMUTABILITY)
    op.execute(APPLY_MONEY)
    op.execute(APPEND)
    # Functions are executable by PUBLIC unless revoked.
    op.execute(f"REVOKE ALL ON FUNCTION {APPEND_SIGNATURE} FROM PUBLIC")
    op.execute(f"REVOKE ALL ON FUNCTION {APPLY_MONEY_SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {APPEND_SIGNATURE} TO {role}")
    # The application may read everything, and insert events; it may never change them.
    op.execute(f"GRANT SELECT, INSERT ON events TO {role}")
    op.execute(f"GRANT USAGE ON SEQUENCE events_global_seq TO {role}")
    op.execute(f"GRANT SELECT ON streams, accounts, positions, account_positions TO {role}")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {APPEND_SIGNATURE}")
    op.execute(f"DROP FUNCTION {APPLY_MONEY_SIGNATURE}")
    op.execute("DROP VIEW account_positions")
    op.execute("DROP FUNCTION ledger_credit_stripe(text, smallint)")
    op.execute("DROP TABLE positions, accounts, streams")
    # The immutability triggers refuse TRUNCATE, not DROP: a downgrade is the owner's act.
    op.execute("DROP TABLE events")
    op.execute("DROP FUNCTION events_refuse_change()")
