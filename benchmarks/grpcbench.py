"""The gRPC unary scenario's two ends, run as child processes of the benchmark:

    python -m benchmarks.grpcbench server --host 127.0.0.4 --port P
    python -m benchmarks.grpcbench client --host H --port P --concurrency 10 --duration 5

The server is grpcio with one generic unary method (no generated code): it answers
every request with the same 100-byte message. The client keeps ``--concurrency``
unary calls in flight on one channel (one HTTP/2 connection) for ``--duration``
seconds and prints one JSON line: calls, elapsed seconds, p50/p99 in µs and the
non-OK status codes it saw. Both need grpcio (a test extra); without it the harness
reports the gRPC rows as n/a.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

try:
    import grpc
except ImportError:  # the harness asks available() before it starts either end
    grpc = None

SERVICE = "bench.Bench"
METHOD = "Unary"
FULL_METHOD = f"/{SERVICE}/{METHOD}"
REQUEST = b"sidelink grpc benchmark request " * 2  # 64 bytes
RESPONSE = (b"sidelink grpc benchmark response " * 4)[:100]
CALL_TIMEOUT = 5.0
MARK = "GRPCJSON "
WARMUP_CALLS = 20


def available() -> bool:
    return importlib.util.find_spec("grpc") is not None


def _identity(data: bytes) -> bytes:
    return data


async def _serve(host: str, port: int) -> None:
    async def unary(request: bytes, context: Any) -> bytes:
        return RESPONSE

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 1000)]
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"serving {host}:{port}", flush=True)
    await server.wait_for_termination()


async def _load(host: str, port: int, concurrency: int, duration: float) -> dict[str, Any]:
    latencies: list[int] = []
    codes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary(
            FULL_METHOD, request_serializer=_identity, response_deserializer=_identity
        )

        async def one() -> None:
            started = time.perf_counter_ns()
            try:
                answer = await call(REQUEST, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
                return
            if answer != RESPONSE:
                codes["WRONG_BODY"] += 1
                return
            latencies.append((time.perf_counter_ns() - started) // 1000)

        for _ in range(WARMUP_CALLS):
            await one()
        latencies.clear()
        codes.clear()
        deadline = time.monotonic() + duration

        async def worker() -> None:
            while time.monotonic() < deadline:
                await one()

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - start
    latencies.sort()
    return {
        "calls": len(latencies),
        "elapsed_s": elapsed,
        "p50_us": _percentile(latencies, 0.50),
        "p99_us": _percentile(latencies, 0.99),
        "errors": dict(codes),
    }


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return 0.0
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grpcbench")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, required=True)
    load = sub.add_parser("client")
    load.add_argument("--host", default="127.0.0.1")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--concurrency", type=int, default=10)
    load.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    # The default asyncio loop: grpc.aio's own poller is what is tested and supported.
    if args.command == "server":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args.host, args.port))
        return 0
    result = asyncio.run(_load(args.host, args.port, args.concurrency, args.duration))
    print(MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
