"""sidelink's own work per HTTP request, without sockets: `python -m benchmarks.inprocess`.

The protocol objects of one http route are fed a request and its response as bytes,
with fake transports that only count writes, so what is timed is sidelink's code (llhttp
included) and nothing of the kernel, the event loop's I/O or the other processes.
It is the quickest way to see what a change to the hot path costs: run it before and
after (best of several runs: the machine's noise is larger than most changes).
`--profile` adds cProfile's top functions (pure Python builds only show much there).
With ``SIDELINK_BENCH_NO_METRICS=1`` the per-request metric work is off (see
proxy/metrics.py): ``benchmarks.metrics_cost`` runs it both ways.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

import uvloop

from proxy import build
from proxy.config import Overrides, parse
from proxy.http.h1 import H1Upstream, downstream_factory
from proxy.metrics import NO_METRICS, Metrics
from proxy.resolver import Resolver
from proxy.route import Route
from tests.support.transport import FakeTransport

# A small keep-alive GET as wrk sends it, and nginx's answer to it.
REQUEST = (
    b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8081\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 07:57:04 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 75\r\nConnection: keep-alive\r\n\r\n" + b"x" * 75
)


async def measure(requests: int, profile: bool, batches: int = 1) -> None:
    config = parse(
        None, quick_routes=["0=127.0.0.1:8080/http"], overrides=Overrides(admin="127.0.0.1:0")
    )
    metrics = Metrics()
    route = Route(config.routes[0], Resolver(config.resolver, metrics, {}), metrics)
    await asyncio.sleep(0)  # the IP service "resolves" at once
    down = downstream_factory(route)()
    down.connection_made(FakeTransport(keep=False))
    [endpoint] = route.endpoints.all()
    up = H1Upstream(route)
    up.connection_made(FakeTransport(keep=False))
    pool = route.pool(endpoint)
    pool.adopt(up)
    pool.put(up, asyncio.get_running_loop().time(), reusable=True)

    def exchange() -> None:
        down.data_received(REQUEST)  # parsed, rewritten, written to the pooled upstream
        up.data_received(RESPONSE)  # parsed, rewritten, written back; the upstream idles

    for _ in range(1000):
        exchange()
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    clock = time.perf_counter_ns
    request_side = response_side = 0
    best = None  # the fastest batch's ns, the least disturbed by other work on the machine
    for _ in range(batches):
        before = request_side + response_side
        for _ in range(requests):
            t0 = clock()
            down.data_received(REQUEST)
            t1 = clock()
            up.data_received(RESPONSE)
            request_side += t1 - t0
            response_side += clock() - t1
        took = request_side + response_side - before
        best = took if best is None else min(best, took)
    if profiler is not None:
        profiler.disable()
    answered = sum(n for (_, status), n in route.stats.requests.items() if status == 200)
    assert answered == (0 if NO_METRICS else requests * batches + 1000), answered
    what = f"{build()}, metrics off" if NO_METRICS else build()
    total = requests * batches
    print(
        f"sidelink ({what}): {(request_side + response_side) / total / 1000:.2f} µs "
        f"per request: request side {request_side / total / 1000:.2f}, "
        f"response side {response_side / total / 1000:.2f}"
    )
    if batches > 1 and best is not None:
        print(f"best of {batches} batches of {requests}: {best / requests / 1000:.2f} µs/request")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    route.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--batches", type=int, default=1, help="run --requests this many times; print the best"
    )
    args = parser.parse_args()
    uvloop.run(measure(args.requests, args.profile, args.batches))


if __name__ == "__main__":
    main()
