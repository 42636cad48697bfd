-- Revision 0006: a void before any authorization fences the payment off at the
-- processor simulator, and the sweeper finds open payments without a scan.

-- A fence is a row with no authorization: a void that found nothing to void leaves
-- it, and any later authorization of the payment is declined.
ALTER TABLE processor_authorizations
    ALTER COLUMN authorization_id DROP NOT NULL,
    ALTER COLUMN amount_minor DROP NOT NULL,
    ALTER COLUMN currency DROP NOT NULL,
    DROP CONSTRAINT processor_authorizations_status_check,
    ADD CONSTRAINT processor_authorizations_status_check
        CHECK (status IN ('authorized', 'voided', 'fenced')),
    ADD CONSTRAINT processor_authorizations_fence_or_authorization CHECK (
        status = 'fenced'
        OR (authorization_id IS NOT NULL AND amount_minor IS NOT NULL AND currency IS NOT NULL)
    );

-- Payment streams that have not reached a terminal event: what the sweeper checks
-- against Temporal every minute.
CREATE INDEX streams_open_payments ON streams (stream_id)
    WHERE stream_id LIKE 'payment-%'
      AND state NOT IN ('settled', 'declined', 'rejected', 'failed', 'cancelled');
