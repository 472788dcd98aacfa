"""What both daemons share: errors, settings, logs, start and stop, the SQLite engine, bundle manifests.

Imports nothing of `runtime`, `quilt` or `cli` (tests/test_layout.py checks it).
"""
