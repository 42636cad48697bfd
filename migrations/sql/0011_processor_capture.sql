-- Revision 0011: the processor simulator captures. Settlement is real at the processor
-- (the saga's pivot), and the simulator can report what it settled.
--
-- An authorization is captured at most once (the payment id is the idempotency key),
-- and captured and voided exclude each other. Capture, capture fence and void each
-- lock the authorization's row before they decide, so whichever comes first wins and
-- the others see what it did. Each logs its call in processor_calls in the same
-- transaction.

ALTER TABLE processor_authorizations
    DROP CONSTRAINT processor_authorizations_status_check,
    ADD CONSTRAINT processor_authorizations_status_check
        CHECK (status IN ('authorized', 'captured', 'voided', 'fenced')),
    -- Set by a closer before it releases a reserved payment's hold: no capture may land
    -- after it.
    ADD COLUMN capture_fenced_at timestamptz;

CREATE TABLE processor_captures (
    payment_id        text PRIMARY KEY REFERENCES processor_authorizations (payment_id),
    capture_id        text NOT NULL UNIQUE,
    authorization_id  text NOT NULL,
    amount_minor      bigint NOT NULL CHECK (amount_minor > 0),
    currency          char(3) NOT NULL,
    captured_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- When the processor pays the capture out: at once, unless a settlement report
    -- moved it later (an injected late settlement). Reports select by it.
    settles_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (settles_at >= captured_at)
);
CREATE INDEX processor_captures_by_settlement ON processor_captures (settles_at);
CREATE INDEX processor_captures_by_capture_time ON processor_captures (captured_at);

ALTER TABLE processor_calls
    DROP CONSTRAINT processor_calls_operation_check,
    ADD CONSTRAINT processor_calls_operation_check
        CHECK (operation IN ('authorize', 'capture', 'fence_capture', 'void'));

-- Capture a payment's authorization. Outcomes: captured, replayed (an earlier capture
-- is returned), refused_unauthorized, refused_voided, refused_fenced, refused_mismatch
-- (more than authorized, or another currency).
CREATE FUNCTION processor_capture(
    p_payment_id text, p_capture_id text, p_amount_minor bigint, p_currency text,
    p_attempt integer
) RETURNS TABLE (outcome text, capture_id text)
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_auth processor_authorizations%ROWTYPE;
    v_outcome text;
    v_capture_id text;
    v_now timestamptz;
BEGIN
    SELECT * INTO v_auth FROM processor_authorizations a
     WHERE a.payment_id = p_payment_id FOR UPDATE;
    IF NOT FOUND THEN
        v_outcome := 'refused_unauthorized';
    ELSIF v_auth.status = 'captured' THEN
        SELECT c.capture_id INTO v_capture_id FROM processor_captures c
         WHERE c.payment_id = p_payment_id;
        v_outcome := 'replayed';
    ELSIF v_auth.status IN ('voided', 'fenced') THEN
        v_outcome := 'refused_voided';
    ELSIF v_auth.capture_fenced_at IS NOT NULL THEN
        v_outcome := 'refused_fenced';
    ELSIF p_amount_minor > v_auth.amount_minor OR p_currency <> v_auth.currency THEN
        v_outcome := 'refused_mismatch';
    ELSE
        -- One instant for both: a capture settles when it is captured, to the
        -- microsecond, unless a report later moves it.
        v_now := clock_timestamp();
        INSERT INTO processor_captures
               (payment_id, capture_id, authorization_id, amount_minor, currency,
                captured_at, settles_at)
        VALUES (p_payment_id, p_capture_id, v_auth.authorization_id, p_amount_minor,
                p_currency, v_now, v_now);
        UPDATE processor_authorizations a SET status = 'captured'
         WHERE a.payment_id = p_payment_id;
        v_capture_id := p_capture_id;
        v_outcome := 'captured';
    END IF;
    INSERT INTO processor_calls (payment_id, operation, outcome, attempt)
    VALUES (p_payment_id, 'capture', v_outcome, p_attempt);
    RETURN QUERY SELECT v_outcome, v_capture_id;
END
$$;

-- Fence off any later capture of a payment, or report the capture it already has.
-- Outcomes: captured (nothing fenced: the payment must settle), fenced, already_fenced.
-- A payment the processor never authorized gets a fence row, which also declines any
-- later authorization (as a void's fence does).
CREATE FUNCTION processor_fence_capture(p_payment_id text, p_attempt integer)
RETURNS TABLE (outcome text, capture_id text)
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_auth processor_authorizations%ROWTYPE;
    v_outcome text;
    v_capture_id text;
BEGIN
    INSERT INTO processor_authorizations
           (payment_id, authorization_id, amount_minor, currency, status, capture_fenced_at)
    VALUES (p_payment_id, NULL, NULL, NULL, 'fenced', clock_timestamp())
    ON CONFLICT (payment_id) DO NOTHING;
    IF FOUND THEN
        v_outcome := 'fenced';
    ELSE
        SELECT * INTO v_auth FROM processor_authorizations a
         WHERE a.payment_id = p_payment_id FOR UPDATE;
        IF v_auth.status = 'captured' THEN
            SELECT c.capture_id INTO v_capture_id FROM processor_captures c
             WHERE c.payment_id = p_payment_id;
            v_outcome := 'captured';
        ELSIF v_auth.capture_fenced_at IS NOT NULL OR v_auth.status <> 'authorized' THEN
            v_outcome := 'already_fenced';
        ELSE
            UPDATE processor_authorizations a SET capture_fenced_at = clock_timestamp()
             WHERE a.payment_id = p_payment_id;
            v_outcome := 'fenced';
        END IF;
    END IF;
    INSERT INTO processor_calls (payment_id, operation, outcome, attempt)
    VALUES (p_payment_id, 'fence_capture', v_outcome, p_attempt);
    RETURN QUERY SELECT v_outcome, v_capture_id;
END
$$;

-- Void a payment's authorization; with none, leave a fence that declines any later
-- one. A captured authorization is not voided. Outcomes: voided, fenced,
-- already_voided, already_fenced, refused_captured.
CREATE FUNCTION processor_void(p_payment_id text, p_attempt integer)
RETURNS TABLE (outcome text, authorization_id text)
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_auth processor_authorizations%ROWTYPE;
    v_outcome text;
BEGIN
    INSERT INTO processor_authorizations
           (payment_id, authorization_id, amount_minor, currency, status, voided_at)
    VALUES (p_payment_id, NULL, NULL, NULL, 'fenced', clock_timestamp())
    ON CONFLICT (payment_id) DO NOTHING;
    IF FOUND THEN
        v_outcome := 'fenced';
    ELSE
        SELECT * INTO v_auth FROM processor_authorizations a
         WHERE a.payment_id = p_payment_id FOR UPDATE;
        IF v_auth.status = 'authorized' THEN
            UPDATE processor_authorizations a
               SET status = 'voided', voided_at = clock_timestamp()
             WHERE a.payment_id = p_payment_id;
            v_outcome := 'voided';
        ELSIF v_auth.status = 'captured' THEN
            v_outcome := 'refused_captured';
        ELSIF v_auth.status = 'fenced' THEN
            v_outcome := 'already_fenced';
        ELSE
            v_outcome := 'already_voided';
        END IF;
    END IF;
    INSERT INTO processor_calls (payment_id, operation, outcome, attempt)
    VALUES (p_payment_id, 'void', v_outcome, p_attempt);
    RETURN QUERY SELECT v_outcome, v_auth.authorization_id;
END
$$;
