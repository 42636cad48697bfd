-- Revision 0006: a void before any authorization fences the payment off at the
-- processor simulator.
--
-- (No index helps the sweeper find open payments: any index whose columns or predicate
-- name the stream's state turns every append's update of its head from a HOT update
-- into a new index entry, which cost each append more than the sweeper's scan of
-- `streams` once a minute costs.)

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
