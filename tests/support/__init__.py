"""Scaffolding the tests share, each concern in the module named after it.

wait       conditions with a deadline (until, until_sync, settled); never a sleep
procs      sidelink as a subprocess, system tools the interop tests need, this process's RSS
inproc     sidelink in this process (running_server, serving) and its configs and addresses
metrics    the Prometheus exposition read the way a scraper reads it
pods       upstream servers on loopback "pod IPs" sharing one port, and line-echo pods
wire       raw bytes on a client connection: HTTP requests out, responses parsed back
data       large incompressible payloads and their digests
transport  a fake asyncio transport for driving protocol objects without sockets
manifests  Kubernetes manifests for the injection tests

Test modules import from here as ``from support.wire import ...`` (pytest puts tests/
on sys.path); the benchmarks, run from the repo root, as ``tests.support...``.
"""
