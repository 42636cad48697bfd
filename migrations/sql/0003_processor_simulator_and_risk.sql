-- Revision 0003: the processor simulator's records, and the velocity index.
CREATE TABLE processor_authorizations (
    -- One authorization per payment: the payment id is the idempotency key.
    payment_id        text PRIMARY KEY,
    authorization_id  text NOT NULL UNIQUE,
    amount_minor      bigint NOT NULL CHECK (amount_minor > 0),
    currency          char(3) NOT NULL,
    status            text NOT NULL CHECK (status IN ('authorized', 'voided')),
    authorized_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    voided_at         timestamptz
);
CREATE TABLE processor_calls (
    call_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payment_id        text NOT NULL,
    operation         text NOT NULL CHECK (operation IN ('authorize', 'void')),
    -- What the call did: authorized, declined, failed, voided, already_voided,
    -- nothing_to_void, replayed (an idempotent repeat of an authorization).
    outcome           text NOT NULL,
    attempt           integer NOT NULL,
    called_at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX processor_calls_by_payment ON processor_calls (payment_id);

-- Velocity rule: a payer's recent payments, without scanning the ledger.
CREATE INDEX events_initiated_by_payer
    ON events ((payload->>'payer_account_id'), recorded_at)
    WHERE event_type = 'PaymentInitiated';
