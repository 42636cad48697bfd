-- Revision 0004: idempotency keys for the API, and indexes to list payments.
CREATE TABLE idempotency_keys (
    api_key_id        text NOT NULL,
    idempotency_key   text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    -- What was asked: SHA-256 of the method, the path and the canonical body.
    request_hash      bytea NOT NULL CHECK (length(request_hash) = 32),
    state             text NOT NULL CHECK (state IN ('in_flight', 'completed')),
    resource_id       text NOT NULL,
    response_status   integer,
    response_body     jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- A request that died mid-flight may be taken over after this moment.
    locked_until      timestamptz NOT NULL,
    expires_at        timestamptz NOT NULL,
    PRIMARY KEY (api_key_id, idempotency_key),
    CONSTRAINT idempotency_completed_has_response
        CHECK (state = 'in_flight' OR (response_status IS NOT NULL
                                       AND response_body IS NOT NULL))
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- Listing payments: newest first, by payee as well as by payer.
CREATE INDEX events_initiated_by_seq ON events (global_seq)
    WHERE event_type = 'PaymentInitiated';
CREATE INDEX events_initiated_by_payee
    ON events ((payload->>'payee_account_id'), global_seq)
    WHERE event_type = 'PaymentInitiated';
