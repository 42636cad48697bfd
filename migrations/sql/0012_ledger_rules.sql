-- Rendered by `python -m ledger.rules` from ledger/state_machine.py and ledger/events.py.
-- Do not edit by hand: change the Python rules, render a new file, add a revision.
INSERT INTO ledger_transitions (stream_kind, from_state, event_type, to_state) VALUES
    ('account', 'new', 'AccountOpened', 'open'),
    ('payment', 'approved', 'AuthorizationVoided', 'voided'),
    ('payment', 'approved', 'FundsReserved', 'reserved'),
    ('payment', 'authorized', 'ApprovalRequested', 'pending_approval'),
    ('payment', 'authorized', 'AuthorizationVoided', 'voided'),
    ('payment', 'authorized', 'FundsReserved', 'reserved'),
    ('payment', 'initiated', 'PaymentAuthorized', 'authorized'),
    ('payment', 'initiated', 'PaymentCancelled', 'cancelled'),
    ('payment', 'initiated', 'PaymentDeclined', 'declined'),
    ('payment', 'initiated', 'PaymentFailed', 'failed'),
    ('payment', 'new', 'PaymentInitiated', 'initiated'),
    ('payment', 'pending_approval', 'AuthorizationVoided', 'voided_unapproved'),
    ('payment', 'pending_approval', 'PaymentApproved', 'approved'),
    ('payment', 'released', 'AuthorizationVoided', 'voided'),
    ('payment', 'reserved', 'FundsReleased', 'released'),
    ('payment', 'reserved', 'PaymentSettled', 'settled'),
    ('payment', 'voided', 'PaymentCancelled', 'cancelled'),
    ('payment', 'voided', 'PaymentFailed', 'failed'),
    ('payment', 'voided_unapproved', 'PaymentCancelled', 'cancelled'),
    ('payment', 'voided_unapproved', 'PaymentFailed', 'failed'),
    ('payment', 'voided_unapproved', 'PaymentRejected', 'rejected'),
    ('recon', 'completed', 'DiscrepancyResolved', 'completed'),
    ('recon', 'new', 'DiscrepancyDetected', 'running'),
    ('recon', 'new', 'ReconciliationCompleted', 'completed'),
    ('recon', 'running', 'DiscrepancyDetected', 'running'),
    ('recon', 'running', 'ReconciliationCompleted', 'completed'),
    ('risk', 'new', 'RiskAlertRaised', 'open'),
    ('risk', 'open', 'RiskAlertRaised', 'open');

INSERT INTO ledger_event_types (event_type, schema_version, stream_kind, entity_field, starts_stream, moves_money) VALUES
    ('AccountOpened', 1, 'account', 'account_id', true, true),
    ('PaymentInitiated', 1, 'payment', 'payment_id', true, false),
    ('PaymentAuthorized', 1, 'payment', 'payment_id', false, false),
    ('FundsReserved', 1, 'payment', 'payment_id', false, true),
    ('PaymentSettled', 1, 'payment', 'payment_id', false, true),
    ('PaymentDeclined', 1, 'payment', 'payment_id', false, false),
    ('ApprovalRequested', 1, 'payment', 'payment_id', false, false),
    ('PaymentApproved', 1, 'payment', 'payment_id', false, false),
    ('PaymentRejected', 1, 'payment', 'payment_id', false, false),
    ('FundsReleased', 1, 'payment', 'payment_id', false, true),
    ('AuthorizationVoided', 1, 'payment', 'payment_id', false, false),
    ('PaymentFailed', 1, 'payment', 'payment_id', false, false),
    ('PaymentCancelled', 1, 'payment', 'payment_id', false, false),
    ('RiskAlertRaised', 1, 'risk', 'account_id', true, false),
    ('DiscrepancyDetected', 1, 'recon', 'run_id', true, false),
    ('ReconciliationCompleted', 1, 'recon', 'run_id', true, false),
    ('DiscrepancyResolved', 1, 'recon', 'run_id', false, false);

CREATE FUNCTION ledger_integers_only(p jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- jsonpath cannot see a number's text, so each number is checked as text.
    RETURN NOT EXISTS (
        SELECT 1 FROM jsonb_path_query(p, 'strict $.** ? (@.type() == "number")') AS n
         WHERE n::text !~ '^-?[0-9]+$');
END
$$;

CREATE FUNCTION ledger_payload_problem(p_event_type text, p jsonb) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, public, pg_temp AS $rules$
BEGIN
    IF jsonb_typeof(p) IS DISTINCT FROM 'object' THEN
        RETURN 'the payload must be a JSON object';
    END IF;
    IF pg_column_size(p) > 65536 THEN
        RETURN 'the payload is larger than 64 KiB';
    END IF;
    CASE p_event_type
    WHEN 'AccountOpened' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['account_id', 'currency', 'kind', 'metadata', 'overdraft_limit_minor']::text[] AND p - ARRAY['account_id', 'currency', 'kind', 'metadata', 'overdraft_limit_minor']::text[] = '{}'::jsonb)
                THEN 'AccountOpened has exactly the fields account_id, currency, kind, metadata, overdraft_limit_minor'
            WHEN NOT (jsonb_typeof(p->'account_id') = 'string' AND p->>'account_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field account_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'currency') = 'string' AND p->>'currency' ~ '^[A-Z]{3}$')
                THEN 'field currency must be a string matching ^[A-Z]{3}$'
            WHEN NOT (jsonb_typeof(p->'kind') = 'string' AND p->>'kind' = ANY (ARRAY['customer', 'merchant', 'settlement', 'fees', 'external']::text[]))
                THEN 'field kind must be one of customer, merchant, settlement, fees, external'
            WHEN NOT (CASE WHEN p->'metadata' = '{}'::jsonb THEN true WHEN jsonb_typeof(p->'metadata') = 'object' THEN ledger_integers_only(p->'metadata') ELSE false END)
                THEN 'field metadata must be a JSON object whose numbers are integers'
            WHEN NOT ((jsonb_typeof(p->'overdraft_limit_minor') = 'null' OR CASE WHEN jsonb_typeof(p->'overdraft_limit_minor') = 'number' AND (p->'overdraft_limit_minor')::text ~ '^-?[0-9]+$' THEN (p->'overdraft_limit_minor')::numeric >= 0 AND (p->'overdraft_limit_minor')::numeric <= 9223372036854775807 ELSE false END))
                THEN 'field overdraft_limit_minor must be an integer from 0 to 9223372036854775807, or null'
        END;
    WHEN 'PaymentInitiated' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['amount_minor', 'currency', 'metadata', 'payee_account_id', 'payer_account_id', 'payment_id', 'reference']::text[] AND p - ARRAY['amount_minor', 'currency', 'metadata', 'payee_account_id', 'payer_account_id', 'payment_id', 'reference']::text[] = '{}'::jsonb)
                THEN 'PaymentInitiated has exactly the fields amount_minor, currency, metadata, payee_account_id, payer_account_id, payment_id, reference'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'amount_minor') = 'number' AND (p->'amount_minor')::text ~ '^-?[0-9]+$' THEN (p->'amount_minor')::numeric > 0 AND (p->'amount_minor')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field amount_minor must be an integer in (0, 9223372036854775807]'
            WHEN NOT (jsonb_typeof(p->'currency') = 'string' AND p->>'currency' ~ '^[A-Z]{3}$')
                THEN 'field currency must be a string matching ^[A-Z]{3}$'
            WHEN NOT (CASE WHEN p->'metadata' = '{}'::jsonb THEN true WHEN jsonb_typeof(p->'metadata') = 'object' THEN ledger_integers_only(p->'metadata') ELSE false END)
                THEN 'field metadata must be a JSON object whose numbers are integers'
            WHEN NOT (jsonb_typeof(p->'payee_account_id') = 'string' AND p->>'payee_account_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payee_account_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'payer_account_id') = 'string' AND p->>'payer_account_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payer_account_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT ((jsonb_typeof(p->'reference') = 'null' OR jsonb_typeof(p->'reference') = 'string' AND length(p->>'reference') BETWEEN 0 AND 200))
                THEN 'field reference must be a string of 0 to 200 characters, or null'
        END;
    WHEN 'PaymentAuthorized' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['authorization_id', 'payment_id', 'processor']::text[] AND p - ARRAY['authorization_id', 'payment_id', 'processor']::text[] = '{}'::jsonb)
                THEN 'PaymentAuthorized has exactly the fields authorization_id, payment_id, processor'
            WHEN NOT (jsonb_typeof(p->'authorization_id') = 'string' AND length(p->>'authorization_id') BETWEEN 1 AND 200)
                THEN 'field authorization_id must be a string of 1 to 200 characters'
            WHEN NOT (jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'processor') = 'string' AND length(p->>'processor') BETWEEN 1 AND 100)
                THEN 'field processor must be a string of 1 to 100 characters'
        END;
    WHEN 'FundsReserved' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['amount_minor', 'currency', 'expires_at', 'payee_account_id', 'payer_account_id', 'payment_id']::text[] AND p - ARRAY['amount_minor', 'currency', 'expires_at', 'payee_account_id', 'payer_account_id', 'payment_id']::text[] = '{}'::jsonb)
                THEN 'FundsReserved has exactly the fields amount_minor, currency, expires_at, payee_account_id, payer_account_id, payment_id'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'amount_minor') = 'number' AND (p->'amount_minor')::text ~ '^-?[0-9]+$' THEN (p->'amount_minor')::numeric > 0 AND (p->'amount_minor')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field amount_minor must be an integer in (0, 9223372036854775807]'
            WHEN NOT (jsonb_typeof(p->'currency') = 'string' AND p->>'currency' ~ '^[A-Z]{3}$')
                THEN 'field currency must be a string matching ^[A-Z]{3}$'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'expires_at') = 'string' AND p->>'expires_at' ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})$' THEN (p->>'expires_at')::timestamptz IS NOT NULL ELSE false END)
                THEN 'field expires_at must be an RFC 3339 date-time'
            WHEN NOT (jsonb_typeof(p->'payee_account_id') = 'string' AND p->>'payee_account_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payee_account_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'payer_account_id') = 'string' AND p->>'payer_account_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payer_account_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
        END;
    WHEN 'PaymentSettled' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['currency', 'fee_minor', 'payment_id', 'postings']::text[] AND p - ARRAY['currency', 'fee_minor', 'payment_id', 'postings']::text[] = '{}'::jsonb)
                THEN 'PaymentSettled has exactly the fields currency, fee_minor, payment_id, postings'
            WHEN NOT (jsonb_typeof(p->'currency') = 'string' AND p->>'currency' ~ '^[A-Z]{3}$')
                THEN 'field currency must be a string matching ^[A-Z]{3}$'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'fee_minor') = 'number' AND (p->'fee_minor')::text ~ '^-?[0-9]+$' THEN (p->'fee_minor')::numeric >= 0 AND (p->'fee_minor')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field fee_minor must be an integer from 0 to 9223372036854775807'
            WHEN NOT (jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'postings') = 'array' THEN jsonb_array_length(p->'postings') BETWEEN 2 AND 16 ELSE false END)
                THEN 'field postings must be a JSON array of 2 to 16 items'
        END;
    WHEN 'PaymentDeclined' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['declined_by', 'payment_id', 'reason', 'rule']::text[] AND p - ARRAY['declined_by', 'payment_id', 'reason', 'rule']::text[] = '{}'::jsonb)
                THEN 'PaymentDeclined has exactly the fields declined_by, payment_id, reason, rule'
            WHEN NOT (jsonb_typeof(p->'declined_by') = 'string' AND p->>'declined_by' = ANY (ARRAY['processor', 'risk']::text[]))
                THEN 'field declined_by must be one of processor, risk'
            WHEN NOT (jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'reason') = 'string' AND length(p->>'reason') BETWEEN 1 AND 500)
                THEN 'field reason must be a string of 1 to 500 characters'
            WHEN NOT ((jsonb_typeof(p->'rule') = 'null' OR jsonb_typeof(p->'rule') = 'string' AND length(p->>'rule') BETWEEN 0 AND 100))
                THEN 'field rule must be a string of 0 to 100 characters, or null'
        END;
    WHEN 'ApprovalRequested' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['deadline_at', 'payment_id', 'threshold_minor']::text[] AND p - ARRAY['deadline_at', 'payment_id', 'threshold_minor']::text[] = '{}'::jsonb)
                THEN 'ApprovalRequested has exactly the fields deadline_at, payment_id, threshold_minor'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'deadline_at') = 'string' AND p->>'deadline_at' ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})$' THEN (p->>'deadline_at')::timestamptz IS NOT NULL ELSE false END)
                THEN 'field deadline_at must be an RFC 3339 date-time'
            WHEN NOT (jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'threshold_minor') = 'number' AND (p->'threshold_minor')::text ~ '^-?[0-9]+$' THEN (p->'threshold_minor')::numeric >= 0 AND (p->'threshold_minor')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field threshold_minor must be an integer from 0 to 9223372036854775807'
        END;
    WHEN 'PaymentApproved' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['approved_by', 'note', 'payment_id']::text[] AND p - ARRAY['approved_by', 'note', 'payment_id']::text[] = '{}'::jsonb)
                THEN 'PaymentApproved has exactly the fields approved_by, note, payment_id'
            WHEN NOT (jsonb_typeof(p->'approved_by') = 'string' AND length(p->>'approved_by') BETWEEN 1 AND 200)
                THEN 'field approved_by must be a string of 1 to 200 characters'
            WHEN NOT ((jsonb_typeof(p->'note') = 'null' OR jsonb_typeof(p->'note') = 'string' AND length(p->>'note') BETWEEN 0 AND 500))
                THEN 'field note must be a string of 0 to 500 characters, or null'
            WHEN NOT (jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
        END;
    WHEN 'PaymentRejected' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['payment_id', 'reason', 'rejected_by']::text[] AND p - ARRAY['payment_id', 'reason', 'rejected_by']::text[] = '{}'::jsonb)
                THEN 'PaymentRejected has exactly the fields payment_id, reason, rejected_by'
            WHEN NOT (jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'reason') = 'string' AND length(p->>'reason') BETWEEN 1 AND 500)
                THEN 'field reason must be a string of 1 to 500 characters'
            WHEN NOT (jsonb_typeof(p->'rejected_by') = 'string' AND length(p->>'rejected_by') BETWEEN 1 AND 200)
                THEN 'field rejected_by must be a string of 1 to 200 characters'
        END;
    WHEN 'FundsReleased' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['amount_minor', 'payment_id', 'reason']::text[] AND p - ARRAY['amount_minor', 'payment_id', 'reason']::text[] = '{}'::jsonb)
                THEN 'FundsReleased has exactly the fields amount_minor, payment_id, reason'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'amount_minor') = 'number' AND (p->'amount_minor')::text ~ '^-?[0-9]+$' THEN (p->'amount_minor')::numeric > 0 AND (p->'amount_minor')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field amount_minor must be an integer in (0, 9223372036854775807]'
            WHEN NOT (jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'reason') = 'string' AND length(p->>'reason') BETWEEN 1 AND 500)
                THEN 'field reason must be a string of 1 to 500 characters'
        END;
    WHEN 'AuthorizationVoided' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['authorization_id', 'payment_id', 'reason']::text[] AND p - ARRAY['authorization_id', 'payment_id', 'reason']::text[] = '{}'::jsonb)
                THEN 'AuthorizationVoided has exactly the fields authorization_id, payment_id, reason'
            WHEN NOT (jsonb_typeof(p->'authorization_id') = 'string' AND length(p->>'authorization_id') BETWEEN 1 AND 200)
                THEN 'field authorization_id must be a string of 1 to 200 characters'
            WHEN NOT (jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'reason') = 'string' AND length(p->>'reason') BETWEEN 1 AND 500)
                THEN 'field reason must be a string of 1 to 500 characters'
        END;
    WHEN 'PaymentFailed' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['payment_id', 'reason', 'step']::text[] AND p - ARRAY['payment_id', 'reason', 'step']::text[] = '{}'::jsonb)
                THEN 'PaymentFailed has exactly the fields payment_id, reason, step'
            WHEN NOT (jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'reason') = 'string' AND length(p->>'reason') BETWEEN 1 AND 500)
                THEN 'field reason must be a string of 1 to 500 characters'
            WHEN NOT (jsonb_typeof(p->'step') = 'string' AND length(p->>'step') BETWEEN 1 AND 50)
                THEN 'field step must be a string of 1 to 50 characters'
        END;
    WHEN 'PaymentCancelled' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['cancelled_by', 'payment_id', 'reason', 'step']::text[] AND p - ARRAY['cancelled_by', 'payment_id', 'reason', 'step']::text[] = '{}'::jsonb)
                THEN 'PaymentCancelled has exactly the fields cancelled_by, payment_id, reason, step'
            WHEN NOT (jsonb_typeof(p->'cancelled_by') = 'string' AND length(p->>'cancelled_by') BETWEEN 1 AND 200)
                THEN 'field cancelled_by must be a string of 1 to 200 characters'
            WHEN NOT (jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'reason') = 'string' AND length(p->>'reason') BETWEEN 1 AND 500)
                THEN 'field reason must be a string of 1 to 500 characters'
            WHEN NOT (jsonb_typeof(p->'step') = 'string' AND length(p->>'step') BETWEEN 1 AND 50)
                THEN 'field step must be a string of 1 to 50 characters'
        END;
    WHEN 'RiskAlertRaised' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['account_id', 'payment_id', 'reason', 'rule', 'trigger_seq']::text[] AND p - ARRAY['account_id', 'payment_id', 'reason', 'rule', 'trigger_seq']::text[] = '{}'::jsonb)
                THEN 'RiskAlertRaised has exactly the fields account_id, payment_id, reason, rule, trigger_seq'
            WHEN NOT (jsonb_typeof(p->'account_id') = 'string' AND p->>'account_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field account_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'reason') = 'string' AND length(p->>'reason') BETWEEN 1 AND 500)
                THEN 'field reason must be a string of 1 to 500 characters'
            WHEN NOT (jsonb_typeof(p->'rule') = 'string' AND p->>'rule' = ANY (ARRAY['velocity', 'amount_outlier', 'decline_streak']::text[]))
                THEN 'field rule must be one of velocity, amount_outlier, decline_streak'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'trigger_seq') = 'number' AND (p->'trigger_seq')::text ~ '^-?[0-9]+$' THEN (p->'trigger_seq')::numeric >= 1 AND (p->'trigger_seq')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field trigger_seq must be an integer from 1 to 9223372036854775807'
        END;
    WHEN 'DiscrepancyDetected' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['description', 'discrepancy_id', 'discrepancy_type', 'ledger_amount_minor', 'ledger_currency', 'ledger_seq', 'payment_id', 'reference', 'run_id', 'statement_amount_minor', 'statement_currency', 'statement_line_id']::text[] AND p - ARRAY['description', 'discrepancy_id', 'discrepancy_type', 'ledger_amount_minor', 'ledger_currency', 'ledger_seq', 'payment_id', 'reference', 'run_id', 'statement_amount_minor', 'statement_currency', 'statement_line_id']::text[] = '{}'::jsonb)
                THEN 'DiscrepancyDetected has exactly the fields description, discrepancy_id, discrepancy_type, ledger_amount_minor, ledger_currency, ledger_seq, payment_id, reference, run_id, statement_amount_minor, statement_currency, statement_line_id'
            WHEN NOT (jsonb_typeof(p->'description') = 'string' AND length(p->>'description') BETWEEN 1 AND 500)
                THEN 'field description must be a string of 1 to 500 characters'
            WHEN NOT (jsonb_typeof(p->'discrepancy_id') = 'string' AND p->>'discrepancy_id' ~ '^[a-z0-9][a-z0-9-]{0,63}$')
                THEN 'field discrepancy_id must be a string matching ^[a-z0-9][a-z0-9-]{0,63}$'
            WHEN NOT (jsonb_typeof(p->'discrepancy_type') = 'string' AND p->>'discrepancy_type' = ANY (ARRAY['missing_in_ledger', 'missing_in_statement', 'amount_mismatch', 'currency_mismatch', 'duplicate_in_statement', 'internal_drift']::text[]))
                THEN 'field discrepancy_type must be one of missing_in_ledger, missing_in_statement, amount_mismatch, currency_mismatch, duplicate_in_statement, internal_drift'
            WHEN NOT ((jsonb_typeof(p->'ledger_amount_minor') = 'null' OR CASE WHEN jsonb_typeof(p->'ledger_amount_minor') = 'number' AND (p->'ledger_amount_minor')::text ~ '^-?[0-9]+$' THEN (p->'ledger_amount_minor')::numeric >= -9223372036854775807 AND (p->'ledger_amount_minor')::numeric <= 9223372036854775807 ELSE false END))
                THEN 'field ledger_amount_minor must be an integer from -9223372036854775807 to 9223372036854775807, or null'
            WHEN NOT ((jsonb_typeof(p->'ledger_currency') = 'null' OR jsonb_typeof(p->'ledger_currency') = 'string' AND p->>'ledger_currency' ~ '^[A-Z]{3}$'))
                THEN 'field ledger_currency must be a string matching ^[A-Z]{3}$, or null'
            WHEN NOT ((jsonb_typeof(p->'ledger_seq') = 'null' OR CASE WHEN jsonb_typeof(p->'ledger_seq') = 'number' AND (p->'ledger_seq')::text ~ '^-?[0-9]+$' THEN (p->'ledger_seq')::numeric >= 0 AND (p->'ledger_seq')::numeric <= 9223372036854775807 ELSE false END))
                THEN 'field ledger_seq must be an integer from 0 to 9223372036854775807, or null'
            WHEN NOT ((jsonb_typeof(p->'payment_id') = 'null' OR jsonb_typeof(p->'payment_id') = 'string' AND p->>'payment_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'))
                THEN 'field payment_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$, or null'
            WHEN NOT ((jsonb_typeof(p->'reference') = 'null' OR jsonb_typeof(p->'reference') = 'string' AND length(p->>'reference') BETWEEN 0 AND 200))
                THEN 'field reference must be a string of 0 to 200 characters, or null'
            WHEN NOT (jsonb_typeof(p->'run_id') = 'string' AND p->>'run_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field run_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
            WHEN NOT ((jsonb_typeof(p->'statement_amount_minor') = 'null' OR CASE WHEN jsonb_typeof(p->'statement_amount_minor') = 'number' AND (p->'statement_amount_minor')::text ~ '^-?[0-9]+$' THEN (p->'statement_amount_minor')::numeric >= -9223372036854775807 AND (p->'statement_amount_minor')::numeric <= 9223372036854775807 ELSE false END))
                THEN 'field statement_amount_minor must be an integer from -9223372036854775807 to 9223372036854775807, or null'
            WHEN NOT ((jsonb_typeof(p->'statement_currency') = 'null' OR jsonb_typeof(p->'statement_currency') = 'string' AND p->>'statement_currency' ~ '^[A-Z]{3}$'))
                THEN 'field statement_currency must be a string matching ^[A-Z]{3}$, or null'
            WHEN NOT ((jsonb_typeof(p->'statement_line_id') = 'null' OR CASE WHEN jsonb_typeof(p->'statement_line_id') = 'number' AND (p->'statement_line_id')::text ~ '^-?[0-9]+$' THEN (p->'statement_line_id')::numeric >= 0 AND (p->'statement_line_id')::numeric <= 9223372036854775807 ELSE false END))
                THEN 'field statement_line_id must be an integer from 0 to 9223372036854775807, or null'
        END;
    WHEN 'ReconciliationCompleted' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['amount_mismatch', 'currency_mismatch', 'discrepancies', 'duplicate_in_statement', 'internal_drift', 'item_checkpoint', 'items_matched', 'items_unmatched', 'kind', 'line_checkpoint', 'lines_matched', 'lines_unmatched', 'missing_in_ledger', 'missing_in_statement', 'run_id']::text[] AND p - ARRAY['amount_mismatch', 'currency_mismatch', 'discrepancies', 'duplicate_in_statement', 'internal_drift', 'item_checkpoint', 'items_matched', 'items_unmatched', 'kind', 'line_checkpoint', 'lines_matched', 'lines_unmatched', 'missing_in_ledger', 'missing_in_statement', 'run_id']::text[] = '{}'::jsonb)
                THEN 'ReconciliationCompleted has exactly the fields amount_mismatch, currency_mismatch, discrepancies, duplicate_in_statement, internal_drift, item_checkpoint, items_matched, items_unmatched, kind, line_checkpoint, lines_matched, lines_unmatched, missing_in_ledger, missing_in_statement, run_id'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'amount_mismatch') = 'number' AND (p->'amount_mismatch')::text ~ '^-?[0-9]+$' THEN (p->'amount_mismatch')::numeric >= 0 AND (p->'amount_mismatch')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field amount_mismatch must be an integer from 0 to 9223372036854775807'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'currency_mismatch') = 'number' AND (p->'currency_mismatch')::text ~ '^-?[0-9]+$' THEN (p->'currency_mismatch')::numeric >= 0 AND (p->'currency_mismatch')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field currency_mismatch must be an integer from 0 to 9223372036854775807'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'discrepancies') = 'number' AND (p->'discrepancies')::text ~ '^-?[0-9]+$' THEN (p->'discrepancies')::numeric >= 0 AND (p->'discrepancies')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field discrepancies must be an integer from 0 to 9223372036854775807'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'duplicate_in_statement') = 'number' AND (p->'duplicate_in_statement')::text ~ '^-?[0-9]+$' THEN (p->'duplicate_in_statement')::numeric >= 0 AND (p->'duplicate_in_statement')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field duplicate_in_statement must be an integer from 0 to 9223372036854775807'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'internal_drift') = 'number' AND (p->'internal_drift')::text ~ '^-?[0-9]+$' THEN (p->'internal_drift')::numeric >= 0 AND (p->'internal_drift')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field internal_drift must be an integer from 0 to 9223372036854775807'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'item_checkpoint') = 'number' AND (p->'item_checkpoint')::text ~ '^-?[0-9]+$' THEN (p->'item_checkpoint')::numeric >= 0 AND (p->'item_checkpoint')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field item_checkpoint must be an integer from 0 to 9223372036854775807'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'items_matched') = 'number' AND (p->'items_matched')::text ~ '^-?[0-9]+$' THEN (p->'items_matched')::numeric >= 0 AND (p->'items_matched')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field items_matched must be an integer from 0 to 9223372036854775807'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'items_unmatched') = 'number' AND (p->'items_unmatched')::text ~ '^-?[0-9]+$' THEN (p->'items_unmatched')::numeric >= 0 AND (p->'items_unmatched')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field items_unmatched must be an integer from 0 to 9223372036854775807'
            WHEN NOT (jsonb_typeof(p->'kind') = 'string' AND p->>'kind' = ANY (ARRAY['continuous', 'daily', 'manual', 'statement']::text[]))
                THEN 'field kind must be one of continuous, daily, manual, statement'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'line_checkpoint') = 'number' AND (p->'line_checkpoint')::text ~ '^-?[0-9]+$' THEN (p->'line_checkpoint')::numeric >= 0 AND (p->'line_checkpoint')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field line_checkpoint must be an integer from 0 to 9223372036854775807'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'lines_matched') = 'number' AND (p->'lines_matched')::text ~ '^-?[0-9]+$' THEN (p->'lines_matched')::numeric >= 0 AND (p->'lines_matched')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field lines_matched must be an integer from 0 to 9223372036854775807'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'lines_unmatched') = 'number' AND (p->'lines_unmatched')::text ~ '^-?[0-9]+$' THEN (p->'lines_unmatched')::numeric >= 0 AND (p->'lines_unmatched')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field lines_unmatched must be an integer from 0 to 9223372036854775807'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'missing_in_ledger') = 'number' AND (p->'missing_in_ledger')::text ~ '^-?[0-9]+$' THEN (p->'missing_in_ledger')::numeric >= 0 AND (p->'missing_in_ledger')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field missing_in_ledger must be an integer from 0 to 9223372036854775807'
            WHEN NOT (CASE WHEN jsonb_typeof(p->'missing_in_statement') = 'number' AND (p->'missing_in_statement')::text ~ '^-?[0-9]+$' THEN (p->'missing_in_statement')::numeric >= 0 AND (p->'missing_in_statement')::numeric <= 9223372036854775807 ELSE false END)
                THEN 'field missing_in_statement must be an integer from 0 to 9223372036854775807'
            WHEN NOT (jsonb_typeof(p->'run_id') = 'string' AND p->>'run_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field run_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
        END;
    WHEN 'DiscrepancyResolved' THEN
        RETURN CASE
            WHEN NOT (p ?& ARRAY['discrepancy_id', 'evidence_line_id', 'note', 'resolution', 'resolved_by', 'run_id']::text[] AND p - ARRAY['discrepancy_id', 'evidence_line_id', 'note', 'resolution', 'resolved_by', 'run_id']::text[] = '{}'::jsonb)
                THEN 'DiscrepancyResolved has exactly the fields discrepancy_id, evidence_line_id, note, resolution, resolved_by, run_id'
            WHEN NOT (jsonb_typeof(p->'discrepancy_id') = 'string' AND p->>'discrepancy_id' ~ '^[a-z0-9][a-z0-9-]{0,63}$')
                THEN 'field discrepancy_id must be a string matching ^[a-z0-9][a-z0-9-]{0,63}$'
            WHEN NOT ((jsonb_typeof(p->'evidence_line_id') = 'null' OR CASE WHEN jsonb_typeof(p->'evidence_line_id') = 'number' AND (p->'evidence_line_id')::text ~ '^-?[0-9]+$' THEN (p->'evidence_line_id')::numeric >= 0 AND (p->'evidence_line_id')::numeric <= 9223372036854775807 ELSE false END))
                THEN 'field evidence_line_id must be an integer from 0 to 9223372036854775807, or null'
            WHEN NOT (jsonb_typeof(p->'note') = 'string' AND length(p->>'note') BETWEEN 1 AND 500)
                THEN 'field note must be a string of 1 to 500 characters'
            WHEN NOT (jsonb_typeof(p->'resolution') = 'string' AND p->>'resolution' = ANY (ARRAY['posted_capture', 'matched_later', 'accepted', 'corrected_at_source', 'written_off', 'duplicate_ignored', 'false_positive']::text[]))
                THEN 'field resolution must be one of posted_capture, matched_later, accepted, corrected_at_source, written_off, duplicate_ignored, false_positive'
            WHEN NOT (jsonb_typeof(p->'resolved_by') = 'string' AND length(p->>'resolved_by') BETWEEN 1 AND 200)
                THEN 'field resolved_by must be a string of 1 to 200 characters'
            WHEN NOT (jsonb_typeof(p->'run_id') = 'string' AND p->>'run_id' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
                THEN 'field run_id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'
        END;
    ELSE
        RETURN 'unknown event type';
    END CASE;
END
$rules$;
