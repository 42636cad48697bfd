"""Stored workflow histories, replayed against the current code by tests/test_replay.py."""
