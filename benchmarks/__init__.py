"""Benchmarks of sidelink against HAProxy, NGINX and the direct path, all on loopback.

Run with ``python -m benchmarks`` (``--quick`` for a one-round smoke run); see
``benchmarks/README.md`` for what each scenario measures and how to read the table.
Numbers are reported, never asserted: a benchmark is not a test.
"""
