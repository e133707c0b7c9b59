"""Benchmarks (not tests): `python -m bench` prints the fan-out table; see docs/benchmarks.md."""
