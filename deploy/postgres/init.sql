-- Runs once, when the postgres container initialises its volume.
-- The application role: services log in as it, and migrations grant it only what it
-- needs (INSERT and SELECT on the ledger). Change the password for any real use.
CREATE ROLE paysaga_app LOGIN PASSWORD 'paysaga_app';
