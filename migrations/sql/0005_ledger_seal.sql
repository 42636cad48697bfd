-- Revision 0005: the sealer's one step. It takes nothing from its caller but a bound
-- on the block's size: the range it seals ends at the safe horizon, which it proves
-- itself, so a caller cannot make it seal past an event that may still commit.
--
-- It seals the events after the last block, up to the horizon, at most p_events_max
-- of them (1 to 100000), into one new block; it returns that block, or no row when
-- there is nothing to seal. Sealers serialise on the blocks table's lock, a mode the
-- application role cannot take itself.
CREATE FUNCTION ledger_seal(p_events_max integer) RETURNS TABLE (
    block_no bigint,
    first_seq bigint,
    last_seq bigint,
    event_count integer,
    hash bytea
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    v_safe    bigint;
    v_limit   integer := least(greatest(coalesce(p_events_max, 1000), 1), 100000);
    v_prev    ledger_blocks%ROWTYPE;
    v_first   bigint;
    v_last    bigint;
    v_count   integer;
    v_max     bigint;
    v_seqs    bigint[];
    v_streams text[];
    v_hashes  bytea[];
    v_hash    bytea;
BEGIN
    SELECT h.safe_seq INTO v_safe FROM ledger_safe_horizon() AS h;
    LOCK TABLE ledger_blocks IN SHARE ROW EXCLUSIVE MODE;
    SELECT * INTO v_prev FROM ledger_blocks b ORDER BY b.block_no DESC LIMIT 1;
    v_first := coalesce(v_prev.last_seq, 0) + 1;
    SELECT count(*), max(p.global_seq),
           array_agg(p.global_seq ORDER BY p.global_seq),
           array_agg(p.stream_id ORDER BY p.global_seq),
           array_agg(p.hash ORDER BY p.global_seq)
      INTO v_count, v_max, v_seqs, v_streams, v_hashes
      FROM (SELECT e.global_seq, e.stream_id, e.hash FROM events e
             WHERE e.global_seq >= v_first AND e.global_seq <= v_safe
             ORDER BY e.global_seq LIMIT v_limit) AS p;
    IF v_count = 0 THEN
        RETURN;
    END IF;
    -- A full block ends at its last event; otherwise at the horizon, so that it also
    -- vouches that no event exists in the numbers that rolled back.
    v_last := CASE WHEN v_count = v_limit THEN v_max ELSE v_safe END;
    v_hash := sha256(coalesce(v_prev.hash, decode(repeat('00', 32), 'hex'))
                     || int8send(v_first) || int8send(v_last)
                     || (SELECT string_agg(int8send(u.s) || u.h, ''::bytea ORDER BY u.s)
                           FROM unnest(v_seqs, v_hashes) AS u(s, h)));
    INSERT INTO ledger_blocks (block_no, first_seq, last_seq, event_count, seqs, stream_ids,
                               event_hashes, prev_hash, hash, sealed_at)
    VALUES (coalesce(v_prev.block_no, 0) + 1, v_first, v_last, v_count, v_seqs, v_streams,
            v_hashes, coalesce(v_prev.hash, decode(repeat('00', 32), 'hex')), v_hash,
            clock_timestamp());
    RETURN QUERY SELECT coalesce(v_prev.block_no, 0) + 1, v_first, v_last, v_count, v_hash;
END
$$;
