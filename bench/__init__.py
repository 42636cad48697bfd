"""Benchmarks: scripts that print figures and write JSON to bench/results/."""
