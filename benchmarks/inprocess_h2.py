"""sidelink's own work per HTTP/2 stream, without sockets: `python -m benchmarks.inprocess_h2`.

As `benchmarks.inprocess` does for HTTP/1.1: one client connection and one pooled
upstream connection of an http route are fed frames made by two other ngh2 engines (a
client sending `--streams` GETs at a time, as `h2load -m` does, and a server answering
each with a small body), through fake transports. The time counted is sidelink's: its
data_received calls and the writes they schedule on the loop (the peers' engines run
outside it). The collector is set as `sidelink run` sets it. Run it before and after a
change to the HTTP/2 hot path, best of several runs (`--batches`): the machine's noise is
larger than most changes.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import ngh2
import uvloop
from ngh2 import Configuration, RequestReceived, ResponseReceived, Role, Setting

from proxy import build
from proxy.cli import settle_collector
from proxy.config import Overrides, parse
from proxy.http.h1 import downstream_factory
from proxy.http.h2 import H2Upstream
from proxy.metrics import Metrics
from proxy.resolver import Resolver
from proxy.route import Route
from tests.support.transport import FakeTransport

REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"127.0.0.1:8081"),
    (b":path", b"/index.html"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
]
RESPONSE = [(b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"content-type", b"text/plain")]
BODY = b"x" * 75
PEER = Configuration(auto_window_update=True)


class Lab:
    """sidelink's downstream and upstream connection, and the two peers' engines."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.client = ngh2.Connection(Role.CLIENT, PEER)
        self.client.initiate_connection({Setting.INITIAL_WINDOW_SIZE: 1 << 30})
        self.server = ngh2.Connection(Role.SERVER, PEER)
        self.server.initiate_connection({Setting.MAX_CONCURRENT_STREAMS: 1000})
        [endpoint] = route.endpoints.all()
        self.up = H2Upstream(route)
        self.up_wire = FakeTransport(self.up)
        self.up.connection_made(self.up_wire)
        pool = route.streams(endpoint)
        self.up.pool = pool
        pool.add(self.up)
        self.down_wire = FakeTransport()
        downstream = downstream_factory(route)()
        self.down_wire.protocol = downstream
        downstream.connection_made(self.down_wire)
        self.answered = 0
        self.sidelink_ns = 0

    async def sidelink(self, call: object, data: bytes) -> None:
        """Hand ``data`` to sidelink (``call``: a protocol's data_received), and let the
        writes it scheduled run: both counted as its time."""
        t0 = time.perf_counter_ns()
        call(data)  # type: ignore[operator]
        await asyncio.sleep(0)
        self.sidelink_ns += time.perf_counter_ns() - t0

    async def start(self) -> None:
        await self.round(1)  # (the client's first bytes: the preface and its SETTINGS)

    async def round(self, streams: int) -> None:
        """``streams`` requests from the client, through sidelink, answered and back."""
        client, server = self.client, self.server
        for _ in range(streams):
            client.send_request(REQUEST, end_stream=True)
        await self.sidelink(self.down_wire.protocol.data_received, client.data_to_send())  # type: ignore[union-attr]
        server.receive_data(self.up_wire.take())
        for event in server.events():
            if type(event) is RequestReceived:
                server.send_response(event.stream_id, RESPONSE)
                server.send_data(event.stream_id, BODY, end_stream=True)
        await self.sidelink(self.up.data_received, server.data_to_send())
        server.receive_data(self.up_wire.take())  # (window updates)
        server.events()
        client.receive_data(self.down_wire.take())
        for event in client.events():
            if type(event) is ResponseReceived:
                self.answered += 1
        # Nothing the peers owe each other may be left for the next round's count.
        await self.sidelink(self.down_wire.protocol.data_received, client.data_to_send())  # type: ignore[union-attr]
        server.receive_data(self.up_wire.take())
        server.events()


async def measure(requests: int, streams: int, batches: int) -> None:
    config = parse(
        None, quick_routes=["0=127.0.0.1:8080/http"], overrides=Overrides(admin="127.0.0.1:0")
    )
    metrics = Metrics()
    route = Route(config.routes[0], Resolver(config.resolver, metrics, {}), metrics)
    await asyncio.sleep(0)  # the IP service "resolves" at once
    lab = Lab(route)
    await lab.start()
    # As `sidelink run` does once it serves: what lives on is out of the collector's sight.
    settle_collector()
    for _ in range(1000 // streams + 1):
        await lab.round(streams)
    rounds = max(1, requests // streams)
    best = None
    total_ns = 0
    for _ in range(batches):
        lab.sidelink_ns = 0
        before = lab.answered
        for _ in range(rounds):
            await lab.round(streams)
        assert lab.answered - before == rounds * streams, (lab.answered, before)
        per = lab.sidelink_ns / (rounds * streams)
        best = per if best is None else min(best, per)
        total_ns += lab.sidelink_ns
    print(
        f"sidelink ({build()}): HTTP/2, {streams} streams at a time: "
        f"{total_ns / (rounds * streams * batches) / 1000:.2f} µs per stream"
        + (f" (best of {batches} batches: {best / 1000:.2f})" if batches > 1 and best else "")
    )
    route.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--streams", type=int, default=100, help="streams sent at a time")
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    uvloop.run(measure(args.requests, args.streams, args.batches))


if __name__ == "__main__":
    main()
