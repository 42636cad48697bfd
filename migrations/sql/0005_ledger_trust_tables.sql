-- Revision 0005: the tables behind a ledger that trusts no caller.

-- The state machines, as the database enforces them. Rendered from
-- ledger/state_machine.py (0005_ledger_rules.sql): ledger_append reads its
-- transitions here, never from its arguments.
CREATE TABLE ledger_transitions (
    stream_kind  text NOT NULL,
    from_state   text NOT NULL,
    event_type   text NOT NULL,
    to_state     text NOT NULL,
    PRIMARY KEY (stream_kind, from_state, event_type)
);

-- The event catalog: which kind of stream each event type belongs to, its schema
-- version, the payload field that names its stream's entity, whether it may start a
-- stream and whether it moves money. The shape of each payload is checked by
-- ledger_payload_problem, rendered from the same Python models (ledger/rules.py).
CREATE TABLE ledger_event_types (
    event_type      text PRIMARY KEY,
    schema_version  integer NOT NULL CHECK (schema_version >= 1),
    stream_kind     text NOT NULL,
    entity_field    text NOT NULL,
    starts_stream   boolean NOT NULL,
    moves_money     boolean NOT NULL
);

-- How an event's hash was computed. 1: the content digest came from the writer
-- (Python's canonical JSON), as revision 0002 did; 2: the database computes every
-- input of the hash itself (0005_ledger_append.sql). Stored events are never
-- rewritten, so both stay verifiable. Adding a column with a constant default
-- rewrites nothing and fires no trigger.
ALTER TABLE events ADD COLUMN hash_scheme smallint NOT NULL DEFAULT 1
    CHECK (hash_scheme IN (1, 2));
ALTER TABLE events ALTER COLUMN hash_scheme DROP DEFAULT;

-- The safe horizon's proof needs global_seq handed out in increasing order across
-- sessions: no per-session cache of sequence values.
ALTER SEQUENCE events_global_seq CACHE 1;

ALTER TABLE accounts ADD CONSTRAINT accounts_currency_code CHECK (currency ~ '^[A-Z]{3}$');

-- Marks of the safe horizon (0005_ledger_safe_horizon.sql): `head_seq` is the highest
-- global_seq some transaction saw, and `xid` that transaction's id, taken after it
-- looked. Once every transaction older than `xid` has ended, no event at or below
-- `head_seq` can still appear.
CREATE TABLE ledger_horizon_marks (
    xid       xid8 NOT NULL,
    head_seq  bigint NOT NULL CHECK (head_seq >= 0)
);
CREATE INDEX ledger_horizon_marks_by_xid ON ledger_horizon_marks (xid);

-- The seal: the log chained in global_seq order into blocks, up to the safe horizon.
-- A block vouches for every event with first_seq <= global_seq <= last_seq: exactly
-- those listed, with exactly those hashes. Deleting, inserting or rewriting any
-- sealed event, or a whole stream, breaks its block.
--
--   hash = SHA-256(prev_hash || int8(first_seq) || int8(last_seq)
--                  || for each event, in order: int8(global_seq) || event hash)
--
-- `stream_ids` only names what a deletion removed; the hash does not need it, since
-- each event's hash already covers its stream.
CREATE TABLE ledger_blocks (
    block_no      bigint PRIMARY KEY CHECK (block_no >= 1),
    first_seq     bigint NOT NULL CHECK (first_seq >= 1),
    last_seq      bigint NOT NULL,
    event_count   integer NOT NULL CHECK (event_count >= 1),
    seqs          bigint[] NOT NULL,
    stream_ids    text[] NOT NULL,
    event_hashes  bytea[] NOT NULL,
    prev_hash     bytea NOT NULL CHECK (length(prev_hash) = 32),
    hash          bytea NOT NULL CHECK (length(hash) = 32),
    sealed_at     timestamptz NOT NULL,
    CONSTRAINT ledger_blocks_range CHECK (last_seq >= first_seq),
    CONSTRAINT ledger_blocks_lists CHECK (
        cardinality(seqs) = event_count
        AND cardinality(stream_ids) = event_count
        AND cardinality(event_hashes) = event_count
    ),
    CONSTRAINT ledger_blocks_last_seq_key UNIQUE (last_seq)
);

CREATE FUNCTION ledger_refuse_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % is refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'PS100';
END
$$;

CREATE TRIGGER ledger_blocks_no_update_or_delete
    BEFORE UPDATE OR DELETE ON ledger_blocks
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();

CREATE TRIGGER ledger_blocks_no_truncate
    BEFORE TRUNCATE ON ledger_blocks
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
