"""Benchmarks of the aria daemon: `python -m bench [NAME ...]` (see bench/README.md)."""
