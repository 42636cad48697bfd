-- Revision 0005: the safe horizon, the one primitive every in-order reader of the log
-- uses (the event feed, the sealer, the projector).
--
-- Concurrent appends commit out of global_seq order, so a reader that hands out
-- events up to the highest global_seq it can see may skip one that commits later
-- with a lower number. The horizon is the highest global_seq at or below which no
-- event can still appear.
--
-- How it is proved. Each call leaves a mark (head_seq, xid): head_seq is the highest
-- global_seq visible to a snapshot taken before the call's transaction id `xid` was
-- assigned. Take any transaction T that holds a global_seq s <= head_seq that the
-- snapshot did not see. T took s before head_seq was taken (the sequence hands out
-- increasing values, CACHE 1), hence before the snapshot; and T had its transaction
-- id before it took s (ledger_append takes one first). So T's id is older than
-- `xid`. Once pg_snapshot_xmin, the oldest transaction still running anywhere in the
-- cluster, is newer than `xid`, T has ended: committed, and visible to every later
-- snapshot, or rolled back, and never visible. The mark is then safe: every event at
-- or below head_seq that will ever exist is visible. The horizon is the highest safe
-- mark.
--
-- Cost: a transaction that stays open anywhere in the cluster, appending or not,
-- holds pg_snapshot_xmin back, and the horizon with it, until it ends. A call returns
-- the horizon proven by earlier calls' marks; a caller that wants the newest events
-- calls again once its previous call has committed (a few milliseconds later).
CREATE FUNCTION ledger_safe_horizon(OUT safe_seq bigint, OUT head_seq bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    v_xmin xid8;
BEGIN
    -- The mark's xid must be assigned after the snapshot that read head_seq. A caller
    -- whose transaction already has an id would break that order.
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'ledger_safe_horizon must run before its transaction writes anything'
            USING ERRCODE = 'PS010';
    END IF;
    v_xmin := pg_snapshot_xmin(pg_current_snapshot());
    SELECT coalesce(max(m.head_seq), 0) INTO safe_seq
      FROM ledger_horizon_marks m WHERE m.xid < v_xmin;
    SELECT coalesce(max(e.global_seq), 0) INTO head_seq FROM events e;
    IF head_seq > safe_seq THEN
        INSERT INTO ledger_horizon_marks (xid, head_seq) VALUES (pg_current_xact_id(), head_seq);
    END IF;
    -- Marks below the horizon are spent; the highest safe one stays, so the horizon
    -- never moves back.
    DELETE FROM ledger_horizon_marks m WHERE m.xid < v_xmin AND m.head_seq < safe_seq;
END
$$;
