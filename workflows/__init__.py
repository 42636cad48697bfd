"""Temporal workflow definitions. Deterministic: no I/O, no clocks, no randomness."""
