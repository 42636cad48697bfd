-- Revision 0008: ledger_append, idempotent in streams whose machine loops.
--
-- Changed from 0005 (`git diff --no-index` the two files): a transition that leads a
-- stream back to the state it is in (a payer's risk stream takes RiskAlertRaised again
-- and again) is always allowed, so 0005 never looked for an earlier append of the same
-- event there, and a retried append that had committed hit the unique event id, a raw
-- error instead of the event. Such a transition now looks the event id up first, as
-- every refused transition already did. Transitions that move the stream on are
-- unchanged: a retry of them is refused by the state machine and found that way.
CREATE OR REPLACE FUNCTION ledger_append(
    p_event_id uuid,
    p_stream_id text,
    p_event_type text,
    p_schema_version integer,
    p_payload jsonb,
    p_actor text,
    p_correlation_id text,
    p_causation_id text,
    p_attempt integer,
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
    attempt integer,
    state text,
    checked_at timestamptz
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    v_kind      text;
    v_entity    text;
    v_type      record;
    v_problem   text;
    v_state     text;
    v_version   integer;
    v_last_hash bytea;
    v_to_state  text;
    v_seq       bigint;
    v_now       timestamptz;
    v_content   bytea;
    v_hash      bytea;
    v_stored    events%ROWTYPE;
BEGIN
    -- 0. This transaction's id exists before it takes any global_seq: the safe
    --    horizon (ledger_safe_horizon) rests on that order.
    PERFORM pg_current_xact_id();

    -- 1. The envelope and the payload, against the catalog.
    IF p_event_id IS NULL OR p_stream_id IS NULL OR p_event_type IS NULL
       OR p_schema_version IS NULL OR p_payload IS NULL OR p_actor IS NULL THEN
        RAISE EXCEPTION 'event id, stream, type, schema version, payload and actor are required'
            USING ERRCODE = 'PS009';
    END IF;
    v_kind := split_part(p_stream_id, '-', 1);
    v_entity := substr(p_stream_id, length(v_kind) + 2);
    SELECT t.schema_version, t.stream_kind, t.entity_field, t.starts_stream, t.moves_money
      INTO v_type
      FROM ledger_event_types t WHERE t.event_type = p_event_type;
    IF NOT FOUND OR v_type.stream_kind <> v_kind THEN
        RAISE EXCEPTION '% does not belong in stream %', p_event_type, p_stream_id
            USING ERRCODE = 'PS001';
    END IF;
    IF v_entity !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$' THEN
        RAISE EXCEPTION 'stream id % names no valid %', p_stream_id, v_kind
            USING ERRCODE = 'PS009';
    END IF;
    IF p_schema_version <> v_type.schema_version THEN
        RAISE EXCEPTION '% has schema version %, not %', p_event_type, v_type.schema_version,
            p_schema_version USING ERRCODE = 'PS009';
    END IF;
    v_problem := ledger_payload_problem(p_event_type, p_payload);
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION '%: %', p_event_type, v_problem USING ERRCODE = 'PS009';
    END IF;
    -- The one rule across fields that a per-field spec cannot say (the others, such as
    -- balanced postings or an unlimited overdraft only for external accounts, belong
    -- to the money rules and the accounts table).
    IF p_event_type = 'PaymentInitiated'
       AND p_payload->>'payer_account_id' = p_payload->>'payee_account_id' THEN
        RAISE EXCEPTION 'a payment''s payer and payee must differ' USING ERRCODE = 'PS009';
    END IF;
    IF p_payload->>v_type.entity_field IS DISTINCT FROM v_entity THEN
        RAISE EXCEPTION '% of % is %, but the stream is %', v_type.entity_field, p_event_type,
            p_payload->>v_type.entity_field, p_stream_id USING ERRCODE = 'PS009';
    END IF;
    IF length(p_actor) NOT BETWEEN 1 AND 200 OR length(p_correlation_id) > 200
       OR length(p_causation_id) > 200 OR p_attempt < 1 OR p_expected_version < 0 THEN
        RAISE EXCEPTION 'actor (1 to 200 characters), correlation and causation ids (at most '
            '200), attempt (at least 1) or expected version (at least 0) out of bounds'
            USING ERRCODE = 'PS009';
    END IF;

    -- 2. The stream's lock. Everything below happens while no one else can append here.
    --    A stream's first event creates its head; an inserted row is ours until commit.
    IF v_type.starts_stream THEN
        INSERT INTO streams AS s (stream_id, version, state, last_hash)
        VALUES (p_stream_id, 0, 'new', decode(repeat('00', 32), 'hex'))
        ON CONFLICT (stream_id) DO NOTHING
        RETURNING s.state, s.version, s.last_hash INTO v_state, v_version, v_last_hash;
    END IF;
    IF v_state IS NULL THEN
        SELECT s.state, s.version, s.last_hash INTO v_state, v_version, v_last_hash
          FROM streams s WHERE s.stream_id = p_stream_id FOR UPDATE;
        IF NOT FOUND THEN
            v_state := 'new';
            v_version := 0;
        END IF;
    END IF;

    -- 3. The state machine, from the database's own table, and optimistic concurrency
    --    if the caller asked for it.
    SELECT tr.to_state INTO v_to_state FROM ledger_transitions tr
     WHERE tr.stream_kind = v_kind AND tr.from_state = v_state AND tr.event_type = p_event_type;
    IF v_to_state = v_state THEN
        -- A loop is always allowed: only the event id tells a retry from a new event.
        SELECT * INTO v_stored FROM events e WHERE e.event_id = p_event_id;
        IF FOUND THEN
            v_to_state := NULL;
        END IF;
    END IF;
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
                -- Cast: revision 0007 gives these columns domain types.
                RETURN QUERY SELECT v_stored.global_seq, v_stored.stream_version::integer,
                    v_stored.recorded_at, v_stored.prev_hash::bytea, v_stored.hash::bytea,
                    false, v_stored.actor::text, v_stored.correlation_id,
                    v_stored.causation_id, v_stored.attempt, v_state, clock_timestamp();
                RETURN;
            END IF;
            RAISE EXCEPTION 'event % exists with different content (% in %)',
                p_event_id, v_stored.event_type, v_stored.stream_id
                USING ERRCODE = 'PS002',
                      DETAIL = json_build_object('version', v_version, 'state', v_state)::text;
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

    -- 4. Positions move in the same transaction as the event that moves them. The
    --    sequence number comes after their locks (see ledger_apply_money).
    IF v_type.moves_money THEN
        v_seq := ledger_apply_money(p_event_type, p_stream_id, p_payload);
    ELSE
        v_seq := nextval('events_global_seq');
    END IF;
    -- Taken with the sequence number, so recorded_at never runs backwards against it
    -- for events that touch the same account or stream.
    v_now := clock_timestamp();

    -- 5. The event, chained to the stream's previous hash. Every input of the hash is
    --    the database's own: the envelope (each text field prefixed by its length in
    --    bytes, -1 for NULL; the payload as its jsonb text, which ledger/hashing.py
    --    reproduces in Python), the previous hash, the sequence, the version and the time.
    v_version := v_version + 1;
    v_content := sha256(
        int4send(octet_length(p_stream_id)) || convert_to(p_stream_id, 'UTF8')
        || uuid_send(p_event_id)
        || int4send(octet_length(p_event_type)) || convert_to(p_event_type, 'UTF8')
        || int4send(p_schema_version)
        || int4send(octet_length(p_payload::text)) || convert_to(p_payload::text, 'UTF8')
        || int4send(octet_length(p_actor)) || convert_to(p_actor, 'UTF8')
        || coalesce(int4send(octet_length(p_correlation_id))
                    || convert_to(p_correlation_id, 'UTF8'), int4send(-1))
        || coalesce(int4send(octet_length(p_causation_id))
                    || convert_to(p_causation_id, 'UTF8'), int4send(-1))
        || int4send(coalesce(p_attempt, -1)));
    v_hash := sha256(v_last_hash || v_content || int8send(v_seq) || int8send(v_version::bigint)
                     || int8send((extract(epoch FROM v_now) * 1000000)::bigint));
    INSERT INTO events (global_seq, stream_id, stream_version, event_id, event_type,
                        schema_version, payload, actor, correlation_id, causation_id, attempt,
                        recorded_at, prev_hash, hash, hash_scheme)
    VALUES (v_seq, p_stream_id, v_version, p_event_id, p_event_type, p_schema_version,
            p_payload, p_actor, p_correlation_id, p_causation_id, p_attempt, v_now,
            v_last_hash, v_hash, 2);

    UPDATE streams SET version = v_version, state = v_to_state, last_hash = v_hash,
                       last_seq = v_seq
     WHERE streams.stream_id = p_stream_id;

    RETURN QUERY SELECT v_seq, v_version, v_now, v_last_hash, v_hash, true,
        p_actor, p_correlation_id, p_causation_id, p_attempt, v_to_state, clock_timestamp();
END
$$;
