"""``sidelink demo``: a self-contained local "cluster" with rolling updates.

An in-process DNS server plays cluster DNS, and the pods of
``app1-service.namespace-a`` are replicas on 127.0.0.x addresses, each with two
ports: HTTP/1 (aiohttp) and HTTP/2 (cleartext, :mod:`proxy.demo_h2`). sidelink
runs in front of them in this process, with a route for each port. Clients call
through sidelink while the replicas are replaced one by one, as a Deployment
rollout does: the new pod starts and enters DNS, the old one leaves DNS, keeps
serving for a grace period, then stops (its HTTP/2 port with GOAWAY, finishing
its streams). The HTTP/1 clients each keep one keep-alive connection; the HTTP/2
traffic is one connection for the whole demo, as a gRPC channel is, its calls on
concurrent streams, each balanced on its own over the replicas.
Needs no root and no network: everything is on the loopback range.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from proxy.config import (
    AdminConfig,
    Config,
    LoggingConfig,
    ResolverConfig,
    RouteConfig,
    ShutdownConfig,
)
from proxy.demo_h2 import CallFailed, H2Channel, H2Replica
from proxy.dnsserver import DnsServer
from proxy.endpoints import ACTIVE, DRAINING, EJECTED
from proxy.logs import configure_logging
from proxy.route import Route
from proxy.server import Server

SERVICE = "app1-service.namespace-a"
ZONE_NAME = "app1-service.namespace-a.svc.cluster.local"
SEARCH = ("namespace-a.svc.cluster.local", "svc.cluster.local", "cluster.local")
REPLICAS = 3
DNS_TTL = 1
ROLLOUT_EVERY = 3.0
# How long a replacement replica keeps serving after leaving DNS, like a pod's
# preStop sleep: long enough for every client's DNS view to move on.
TERMINATION_GRACE = 3.0
CLIENTS = 8
# Calls in flight at once on the one HTTP/2 connection.
H2_STREAMS = 8
CALL_TIMEOUT = 5.0


@dataclass
class Replica:
    """One pod: an HTTP/1 port and an HTTP/2 port on its own address."""

    index: int
    host: str
    port: int
    h2_port: int
    runner: web.AppRunner | None = None
    h2: H2Replica | None = None

    @property
    def name(self) -> str:
        return f"replica-{self.index}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self.hello)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, reuse_address=True).start()
        self.h2 = H2Replica(self.name, self.host, self.h2_port)
        await self.h2.start()

    async def stop(self) -> tuple[int, int]:
        """Stop both ports; what the HTTP/2 port's stop did (see H2Replica.stop)."""
        assert self.runner is not None and self.h2 is not None, "stopped before it started"
        _, h2 = await asyncio.gather(self.runner.cleanup(), self.h2.stop())
        return h2

    async def hello(self, request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {self.name} ({self.host})\n")


@dataclass
class Figures:
    """One protocol's calls: totals, and what the live figures show per second."""

    requests: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)  # since the last report
    errors: Counter[str] = field(default_factory=Counter)
    replicas: Counter[str] = field(default_factory=Counter)  # answers per replica
    recent: Counter[str] = field(default_factory=Counter)  # ...since the last report

    def record(self, seconds: float, error: str | None, replica: str | None = None) -> None:
        self.requests += 1
        self.latencies.append(seconds)
        if error is not None:
            self.failed += 1
            self.errors[error] += 1
        if replica is not None:
            self.replicas[replica] += 1
            self.recent[replica] += 1


@dataclass
class Demo:
    """The figures of one run: the HTTP/1 clients', the HTTP/2 connection's, the rollouts."""

    http1: Figures = field(default_factory=Figures)
    http2: Figures = field(default_factory=Figures)
    rollouts: int = 0


async def run_demo(duration: float, ended: asyncio.Event | None = None) -> int:
    """Run the demo for ``duration`` seconds, or until ``ended`` is set (Ctrl-C); exit
    code 0 when no request failed. The summary is printed either way."""
    ended = ended or asyncio.Event()
    configure_logging("warning", "text")
    port = _free_port("127.0.0.10")
    h2_port = _free_port("127.0.0.10", avoid=port)
    addresses = (f"127.0.0.{n}" for n in itertools.count(11))
    async with DnsServer() as dns:
        replicas = [Replica(i, next(addresses), port, h2_port) for i in range(REPLICAS)]
        for replica in replicas:
            await replica.start()
        dns.set_a(ZONE_NAME, [r.host for r in replicas], ttl=DNS_TTL)
        server = Server(_config(dns.port, port, h2_port))
        await server.start()
        assert len(server.routes) == 2 and server.admin_address is not None
        route, h2_route = server.routes.values()
        assert route.bound is not None and h2_route.bound is not None
        url = f"http://127.0.0.1:{route.bound[1]}/"
        h2_url = f"http://127.0.0.1:{h2_route.bound[1]}/"
        print(
            f"sidelink demo: {SERVICE} -> {REPLICAS} replicas on 127.0.0.x "
            f"(HTTP/1 port {port}, HTTP/2 port {h2_port}), DNS TTL {DNS_TTL}s, "
            f"a rollout step every {ROLLOUT_EVERY:g}s"
        )
        print(
            f"  traffic: {CLIENTS} HTTP/1 keep-alive clients, and one HTTP/2 connection "
            f"with {H2_STREAMS} calls in flight (gRPC-shaped)"
        )
        print(f"  call it yourself: curl {url}  or  curl --http2-prior-knowledge {h2_url}")
        print(f"  admin: http://127.0.0.1:{server.admin_address[1]}/routes and /metrics")
        demo = Demo()
        counter = itertools.count(REPLICAS)
        stop = asyncio.Event()
        channel = await asyncio.wait_for(
            H2Channel.connect("127.0.0.1", h2_route.bound[1]), CALL_TIMEOUT
        )
        tasks = [asyncio.ensure_future(_client(url, demo.http1, stop)) for _ in range(CLIENTS)]
        tasks += [
            asyncio.ensure_future(_h2_caller(channel, demo.http2, stop)) for _ in range(H2_STREAMS)
        ]
        tasks.append(asyncio.ensure_future(_report(demo, route, stop)))
        deadline = time.monotonic() + duration
        background: set[asyncio.Task[None]] = set()
        try:
            while time.monotonic() + ROLLOUT_EVERY < deadline:
                if await _ended(ended, ROLLOUT_EVERY):
                    break
                old = replicas.pop(0)
                new = Replica(next(counter), next(addresses), port, h2_port)
                await new.start()
                replicas.append(new)
                dns.set_a(ZONE_NAME, [r.host for r in replicas], ttl=DNS_TTL)
                demo.rollouts += 1
                print(f"  rollout: {old.name} ({old.host}) -> {new.name} ({new.host})")
                task = asyncio.ensure_future(_terminate(old))
                background.add(task)
                task.add_done_callback(background.discard)
            else:
                await _ended(ended, max(0.0, deadline - time.monotonic()))
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            channel_ended = channel.ended
            channel.close()
            await asyncio.gather(*background, return_exceptions=True)
            server.shutdown()
            await server.serve_until_shutdown()
            await asyncio.gather(*(replica.stop() for replica in replicas))
    http1, http2 = demo.http1, demo.http2
    print(f"  http/1: {http1.requests} requests from {CLIENTS} clients, {http1.failed} failed")
    print(
        f"  http/2: {http2.requests} calls on 1 connection, {http2.failed} failed, "
        f"by replica: {_by_replica(http2.replicas)}"
    )
    if channel_ended is not None:
        print(f"  http/2 connection ended early: {channel_ended}")
    for name, figures in (("http/1", http1), ("http/2", http2)):
        if figures.errors:
            errors = ", ".join(f"{k}={v}" for k, v in figures.errors.items())
            print(f"  {name} failures: {errors}")
    failed = http1.failed + http2.failed
    print(
        f"summary: {http1.requests + http2.requests} requests, {failed} failed, "
        f"{demo.rollouts} rollouts"
    )
    return 0 if failed == 0 and channel_ended is None else 1


def _config(dns_port: int, service_port: int, h2_port: int) -> Config:
    routes = tuple(
        RouteConfig(
            name=name,
            listen_host="127.0.0.1",
            listen_port=0,
            service=SERVICE,
            port=upstream_port,
            protocol="http",
        )
        for name, upstream_port in (("app1", service_port), ("app1-h2", h2_port))
    )
    return Config(
        admin=AdminConfig(host="127.0.0.1", port=0),
        resolver=ResolverConfig(
            nameservers=(("127.0.0.1", dns_port),), search=SEARCH, ndots=5, min_ttl=0.5
        ),
        logging=LoggingConfig(level="warning"),
        shutdown=ShutdownConfig(drain_delay=0.0, drain_timeout=1.0),
        routes=routes,
    )


async def _ended(ended: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``; True at once if the demo is ended meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ended.wait(), seconds)
    return ended.is_set()


async def _client(url: str, figures: Figures, stop: asyncio.Event) -> None:
    # One keep-alive connection per client: sidelink still balances every request.
    connector = aiohttp.TCPConnector(limit=1)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        while not stop.is_set():
            started = time.perf_counter()
            error = None
            try:
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        error = f"http_{response.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                error = type(e).__name__
            figures.record(time.perf_counter() - started, error)


async def _h2_caller(channel: H2Channel, figures: Figures, stop: asyncio.Event) -> None:
    # One of the streams in flight on the demo's one HTTP/2 connection.
    while not stop.is_set() and channel.ended is None:
        started = time.perf_counter()
        replica = error = None
        try:
            replica = await channel.call(CALL_TIMEOUT)
        except CallFailed as e:
            error = str(e)
        figures.record(time.perf_counter() - started, error, replica)


async def _report(demo: Demo, route: Route, stop: asyncio.Event) -> None:
    started = time.monotonic()
    last = {id(figures): 0 for figures in (demo.http1, demo.http2)}
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        states = Counter(ep.state for ep in route.endpoints.all())
        endpoints = " ".join(f"{states[state]} {state}" for state in (ACTIVE, EJECTED, DRAINING))
        http1 = _window(demo.http1, "http/1 requests", last)
        http2 = _window(demo.http2, "http/2 calls   ", last)
        print(
            f"  t={time.monotonic() - started:4.0f}s  {http1}  endpoints: {endpoints}  "
            f"rollouts={demo.rollouts}\n"
            f"           {http2}  by replica: {_by_replica(demo.http2.recent)}"
        )
        demo.http2.recent = Counter()


def _window(figures: Figures, what: str, last: dict[int, int]) -> str:
    """The figures since the last report (whose latencies it takes)."""
    window = figures.latencies
    figures.latencies = []
    p50 = statistics.median(window) * 1000 if window else 0.0
    p99 = _percentile(window, 0.99) * 1000
    new = figures.requests - last[id(figures)]
    last[id(figures)] = figures.requests
    return (
        f"{what}={figures.requests:6d} (+{new:5d})  failed={figures.failed}  "
        f"p50={p50:.2f}ms  p99={p99:.2f}ms"
    )


def _by_replica(counts: Counter[str]) -> str:
    if not counts:
        return "none"
    ordered = sorted(counts.items(), key=lambda item: int(item[0].rpartition("-")[2]))
    return " ".join(f"{name}={n}" for name, n in ordered)


async def _terminate(replica: Replica) -> None:
    await asyncio.sleep(TERMINATION_GRACE)
    connections, finished = await replica.stop()
    if connections:
        told = (
            f"HTTP/2 GOAWAY on {connections} connection(s), {finished} stream(s) finished after it"
        )
    else:  # (the usual case: sidelink closed its connection when the replica left DNS)
        told = "no HTTP/2 connection left open to it"
    print(f"  stopped: {replica.name} ({replica.host}), {told}")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _free_port(host: str, avoid: int = 0) -> int:
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port != avoid:
            return port


logging.getLogger("aiohttp").setLevel(logging.ERROR)
