"""Benchmarks for refundq (issue 7): `python -m bench --help`.

Not part of the test suite: every figure here is a measurement on a real stack (a private
Redis, the sandbox as a process, real `celery worker` processes, SQLite or PostgreSQL), printed
and written to a JSON file under `bench-results/`. BENCHMARKS.md holds the figures and how to
reproduce them.
"""
