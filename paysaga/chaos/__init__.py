"""Chaos runs: a Jepsen-style bank workload against a running stack, under faults.

- `history`: the run directory's format (run.json, history.jsonl, summary.json), shared
  by the driver and the checker;
- `workload`: accounts, clients, operators and readers over the HTTP API;
- `faults`: the faults injected while the load runs;
- `driver`: `paysaga chaos run`, which ties them together;
- `checker`: `paysaga chaos check`, which judges a run afterwards.
"""
