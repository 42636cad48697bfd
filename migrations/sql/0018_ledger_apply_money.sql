-- Revision 0018: ledger_apply_money, its locks one primary-key seek per account.
--
-- Changed from 0017 (`git diff --no-index` the two files): the positions to move are
-- locked one account at a time, each by its primary key, in ascending account order
-- (the order the single query's ORDER BY gave). The single query joined accounts and
-- positions for `account_id = ANY (v_accounts)`; its generic plan, which cannot know the
-- array holds two or three ids, is a hash join over a sequential scan of every position,
-- so the plan cache judged it dearer than a plan made for the call's own values and
-- planned the query again on every FundsReserved and PaymentSettled: 22 % of the
-- server's time for a payment's four appends (perf, one backend appending in a loop),
-- and the generic plan's cost grew with the number of positions. Each seek's plan is
-- the same for any values, so the cache keeps one.
--
-- Otherwise as 0017:
--
-- Revision 0017: ledger_apply_money, its hold check one index seek.
--
-- Changed from 0005 (`git diff --no-index` the two files): FundsReserved's check that the
-- hold is exactly the payment PaymentInitiated recorded names that event by its place,
-- the stream's first (stream_version 1, which the state machine guarantees), so it is
-- one seek of events_stream_version_key. By stream and type alone, the planner's generic
-- plan ANDed a bitmap of the stream's rows with one of every PaymentInitiated in the
-- ledger (the partial index events_initiated_by_payee): 238 us an append at 1,700
-- payments (pg_stat_statements, track all), growing with the ledger.
--
-- which was otherwise as 0005:
--
-- Revision 0005: the money rules, trusting nothing the caller sent beyond the payload
-- that ledger_append has already checked against the catalog. Changed from 0002: every
-- posting is checked (side, sign, account, currency, who may be debited or credited),
-- search_path puts pg_temp last, so no temporary table can shadow the ledger's, and a
-- settlement updates each position row once.
--
-- Moves the positions for one money event and returns the global_seq for its event.
-- The sequence number is taken only once every position involved is locked: two
-- appends that touch the same position row then get sequence numbers in the order
-- their effects apply, so folding the events by global_seq reproduces the positions.
CREATE OR REPLACE FUNCTION ledger_apply_money(
    p_event_type text, p_stream_id text, p_payload jsonb
) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
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
    v_account      text;
    v_found        integer := 0;
    v_debits       numeric;
    v_credits      numeric;
    v_fees         numeric;
    v_postings     integer;
    v_valid        integer;
    v_payee_paid   boolean;
    v_problem      text;
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
         WHERE e.stream_id = p_stream_id AND e.stream_version = 1
           AND e.event_type = 'PaymentInitiated'
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
    -- In ascending order: the order the positions are locked in (below).
    v_accounts := CASE WHEN v_payee < v_payer THEN ARRAY[v_payee, v_payer]
                       ELSE ARRAY[v_payer, v_payee] END;

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
        -- Each posting is {account_id, side, amount_minor} and nothing else: a side of
        -- debit or credit, a positive int64 amount. Only the payer is debited, by
        -- exactly the hold; only the payee and fees accounts are credited; the payee
        -- is; the postings balance; fee_minor is what the fees accounts receive.
        SELECT count(*),
               count(*) FILTER (
                   WHERE x.amount_minor IS NOT NULL
                     AND ((x.side = 'debit' AND x.account_id = v_payer)
                          OR (x.side = 'credit' AND x.account_id <> v_payer
                              AND (x.account_id = v_payee OR x.kind = 'fees')))),
               coalesce(sum(x.amount_minor) FILTER (WHERE x.side = 'debit'), 0),
               coalesce(sum(x.amount_minor) FILTER (WHERE x.side = 'credit'), 0),
               coalesce(sum(x.amount_minor)
                        FILTER (WHERE x.side = 'credit' AND x.account_id <> v_payee), 0),
               coalesce(bool_or(x.side = 'credit' AND x.account_id = v_payee), false),
               array_agg(DISTINCT x.account_id ORDER BY x.account_id)
                   FILTER (WHERE x.amount_minor IS NOT NULL)
          INTO v_postings, v_valid, v_debits, v_credits, v_fees, v_payee_paid, v_accounts
          FROM (
              -- A posting's amount is NULL unless the posting is well formed. CASE, not
              -- AND: SQL does not promise to evaluate AND's operands in order, and a cast
              -- of a malformed posting must never run.
              -- The account's kind by one index probe per posting: a join here was
              -- planned as a scan of every account, for each settlement.
              SELECT e.value->>'account_id' AS account_id, e.value->>'side' AS side,
                     (SELECT a.kind FROM accounts a WHERE a.account_id = e.value->>'account_id')
                         AS kind,
                     CASE
                     WHEN jsonb_typeof(e.value) <> 'object' THEN NULL
                     WHEN NOT (e.value ?& ARRAY['account_id', 'amount_minor', 'side']
                               AND e.value - ARRAY['account_id', 'amount_minor', 'side']
                                   = '{}'::jsonb) THEN NULL
                     WHEN jsonb_typeof(e.value->'account_id') <> 'string'
                          OR jsonb_typeof(e.value->'side') <> 'string'
                          OR e.value->>'side' NOT IN ('debit', 'credit')
                          OR jsonb_typeof(e.value->'amount_minor') <> 'number' THEN NULL
                     WHEN (e.value->'amount_minor')::text !~ '^[0-9]+$' THEN NULL
                     WHEN (e.value->'amount_minor')::numeric
                          NOT BETWEEN 1 AND 9223372036854775807 THEN NULL
                     ELSE (e.value->'amount_minor')::numeric
                     END AS amount_minor
                FROM jsonb_array_elements(p_payload->'postings') AS e
          ) AS x;
        v_problem := CASE
            WHEN v_valid <> v_postings THEN
                'every posting must be {account_id, side, amount_minor} with a positive '
                'amount, debit only the payer and credit only the payee or a fees account'
            WHEN v_debits <> v_amount THEN
                format('the payer must be debited exactly the hold of %s, not %s',
                       v_amount, v_debits)
            WHEN v_credits <> v_debits THEN
                format('postings must balance: debits %s, credits %s', v_debits, v_credits)
            WHEN NOT v_payee_paid THEN 'the payee must be credited'
            WHEN v_fees <> (p_payload->'fee_minor')::numeric THEN
                format('fee_minor %s is not what the fees accounts receive (%s)',
                       p_payload->'fee_minor', v_fees)
        END;
        IF v_problem IS NOT NULL THEN
            RAISE EXCEPTION '%', v_problem USING ERRCODE = 'PS007';
        END IF;
    ELSIF p_event_type <> 'FundsReserved' THEN
        RAISE EXCEPTION 'no money rule for %', p_event_type USING ERRCODE = 'PS001';
    END IF;

    -- Lock the rows that move, in one fixed order, ascending account id (one row per
    -- account), so that two appends can never wait on each other in a cycle: the
    -- payer's stripe 0 (debits), and each credited account's stripe for this payment.
    -- One primary-key seek per account: a plan that is the same for any ids, so the
    -- plan cache keeps it (see the header).
    FOREACH v_account IN ARRAY v_accounts LOOP
        SELECT p.account_id, p.stripe, p.currency, p.overdraft_limit_minor, p.credit_stripes,
               p.debits_pending, p.debits_posted, p.credits_posted
          INTO r
          FROM accounts a
          JOIN positions p
            ON p.account_id = a.account_id
           AND p.stripe = CASE WHEN a.account_id = v_payer THEN 0
                               ELSE ledger_credit_stripe(p_stream_id, a.credit_stripes) END
         WHERE a.account_id = v_account
           FOR UPDATE OF p;
        CONTINUE WHEN NOT FOUND;
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
        -- Each account's row is updated once: the hold leaves pending, and its postings
        -- are posted, in one primary-key update per row. (A join would be planned as a
        -- scan; and a row updated twice in one transaction has its foreign key
        -- checked again.) The payer is always debited and the payee always credited,
        -- so both rows are among these.
        FOR r IN
            SELECT x.account_id,
                   coalesce(sum(x.amount_minor) FILTER (WHERE x.side = 'debit'), 0)::bigint
                       AS debit_minor,
                   coalesce(sum(x.amount_minor) FILTER (WHERE x.side = 'credit'), 0)::bigint
                       AS credit_minor
              FROM jsonb_to_recordset(p_payload->'postings')
                   AS x(account_id text, side text, amount_minor bigint)
             GROUP BY x.account_id
             ORDER BY x.account_id
        LOOP
            UPDATE positions p
               SET debits_pending  = p.debits_pending
                                     - CASE WHEN r.account_id = v_payer THEN v_amount ELSE 0 END,
                   credits_pending = p.credits_pending
                                     - CASE WHEN r.account_id = v_payee THEN v_amount ELSE 0 END,
                   debits_posted   = p.debits_posted + r.debit_minor,
                   credits_posted  = p.credits_posted + r.credit_minor,
                   last_seq        = v_seq
             WHERE p.account_id = r.account_id
               AND p.stripe = CASE WHEN r.account_id = v_payer THEN 0
                                   WHEN r.account_id = v_payee THEN v_payee_stripe
                                   ELSE (SELECT ledger_credit_stripe(p_stream_id, a.credit_stripes)
                                           FROM accounts a WHERE a.account_id = r.account_id)
                              END;
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
