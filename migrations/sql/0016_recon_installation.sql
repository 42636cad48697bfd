-- Discrepancy ids unique to their ledger (revision 0016 says why).
CREATE TABLE recon.installation (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    ledger_id uuid NOT NULL DEFAULT gen_random_uuid()
);
INSERT INTO recon.installation DEFAULT VALUES;

-- The id is still checked against what it names, now with the ledger's identity: a
-- CHECK cannot read another table, so a trigger does, on every new or changed id. Rows
-- recorded before keep their ids (derived without it).
ALTER TABLE recon.discrepancies DROP CONSTRAINT discrepancies_id_from_problem;

CREATE FUNCTION recon.discrepancy_id_from_problem() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.discrepancy_id IS DISTINCT FROM md5(
        (SELECT ledger_id FROM recon.installation)::text || ':' || NEW.problem_key
    )::uuid THEN
        RAISE EXCEPTION 'a discrepancy''s id is derived from the ledger''s identity and its '
            'problem key (%)', NEW.problem_key
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER discrepancies_id_from_problem
BEFORE INSERT OR UPDATE OF discrepancy_id, problem_key ON recon.discrepancies
FOR EACH ROW EXECUTE FUNCTION recon.discrepancy_id_from_problem();
