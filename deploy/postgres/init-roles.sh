#!/bin/sh
# Runs once, when the postgres container initialises its volume.
#
# The application role: the worker, the API and the projector log in as it, with a
# password of its own (POSTGRES_APP_PASSWORD), and the migrations grant it only what
# it needs. The owner's login (POSTGRES_USER) belongs to the migrate job alone.
# psql reads the password from the environment (\getenv), so it appears in no
# command line; without it, `:'app_password'` stays unexpanded and the statement fails.
set -e
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
\getenv app_password POSTGRES_APP_PASSWORD
CREATE ROLE paysaga_app LOGIN PASSWORD :'app_password';
SQL
