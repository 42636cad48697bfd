-- Revision 0002: the one way the application writes money (superseded by 0005).
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
