"""``sidelink demo``: a self-contained local "cluster" with rolling updates.

An in-process DNS server plays cluster DNS, a few aiohttp servers on 127.0.0.x
addresses play the pods of ``app1-service.namespace-a``, and sidelink runs in
front of them in this process. Clients call through sidelink while the replicas
are replaced one by one, as a Deployment rollout does: the new pod starts and
enters DNS, the old one leaves DNS, keeps serving for a grace period, then stops.
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


@dataclass
class Replica:
    index: int
    host: str
    port: int
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self.hello)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def hello(self, request: web.Request) -> web.Response:
        return web.Response(text=f"hello from replica-{self.index} ({self.host})\n")


@dataclass
class Figures:
    requests: int = 0
    failed: int = 0
    rollouts: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def record(self, seconds: float, error: str | None) -> None:
        self.requests += 1
        self.latencies.append(seconds)
        if error is not None:
            self.failed += 1
            self.errors[error] = self.errors.get(error, 0) + 1


async def run_demo(duration: float) -> int:
    """Run the demo for ``duration`` seconds; exit code 0 when no request failed."""
    configure_logging("warning", "text")
    port = _free_port("127.0.0.10")
    addresses = (f"127.0.0.{n}" for n in itertools.count(11))
    async with DnsServer() as dns:
        replicas = [Replica(i, next(addresses), port) for i in range(REPLICAS)]
        for replica in replicas:
            await replica.start()
        dns.set_a(ZONE_NAME, [r.host for r in replicas], ttl=DNS_TTL)
        server = Server(_config(dns.port, port))
        await server.start()
        assert server.routes and server.admin_address is not None
        route = next(iter(server.routes.values()))
        assert route.bound is not None
        url = f"http://127.0.0.1:{route.bound[1]}/"
        print(
            f"sidelink demo: {SERVICE} -> {REPLICAS} replicas on 127.0.0.x:{port}, "
            f"DNS TTL {DNS_TTL}s, a rollout step every {ROLLOUT_EVERY:g}s"
        )
        print(f"  call it yourself: curl {url}")
        print(f"  admin: http://127.0.0.1:{server.admin_address[1]}/routes and /metrics")
        figures = Figures()
        counter = itertools.count(REPLICAS)
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(_client(url, figures, stop)) for _ in range(CLIENTS)]
        tasks.append(asyncio.ensure_future(_report(figures, route, stop)))
        deadline = time.monotonic() + duration
        background: set[asyncio.Task[None]] = set()
        try:
            while time.monotonic() + ROLLOUT_EVERY < deadline:
                await asyncio.sleep(ROLLOUT_EVERY)
                old = replicas.pop(0)
                new = Replica(next(counter), next(addresses), port)
                await new.start()
                replicas.append(new)
                dns.set_a(ZONE_NAME, [r.host for r in replicas], ttl=DNS_TTL)
                figures.rollouts += 1
                print(f"  rollout: replica-{old.index} ({old.host}) -> {new.index} ({new.host})")
                task = asyncio.ensure_future(_terminate(old))
                background.add(task)
                task.add_done_callback(background.discard)
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*background, return_exceptions=True)
            server.shutdown()
            await server.serve_until_shutdown()
            for replica in replicas:
                await replica.stop()
    if figures.errors:
        print("  failures: " + ", ".join(f"{k}={v}" for k, v in figures.errors.items()))
    print(
        f"summary: {figures.requests} requests, {figures.failed} failed, "
        f"{figures.rollouts} rollouts"
    )
    return 0 if figures.failed == 0 else 1


def _config(dns_port: int, service_port: int) -> Config:
    route = RouteConfig(
        name="app1",
        listen_host="127.0.0.1",
        listen_port=0,
        service=SERVICE,
        port=service_port,
        protocol="http",
    )
    return Config(
        admin=AdminConfig(host="127.0.0.1", port=0),
        resolver=ResolverConfig(
            nameservers=(("127.0.0.1", dns_port),), search=SEARCH, ndots=5, min_ttl=0.5
        ),
        logging=LoggingConfig(level="warning"),
        shutdown=ShutdownConfig(drain_delay=0.0, drain_timeout=1.0),
        routes=(route,),
    )


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


async def _report(figures: Figures, route: Route, stop: asyncio.Event) -> None:
    started = time.monotonic()
    last = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        window = figures.latencies
        figures.latencies = []
        p50 = statistics.median(window) * 1000 if window else 0.0
        p99 = _percentile(window, 0.99) * 1000
        states = Counter(ep.state for ep in route.endpoints.all())
        endpoints = " ".join(f"{states[state]} {state}" for state in (ACTIVE, EJECTED, DRAINING))
        print(
            f"  t={time.monotonic() - started:4.0f}s  requests={figures.requests:6d} "
            f"(+{figures.requests - last:5d})  failed={figures.failed}  "
            f"endpoints: {endpoints}  p50={p50:.2f}ms  p99={p99:.2f}ms  "
            f"rollouts={figures.rollouts}"
        )
        last = figures.requests


async def _terminate(replica: Replica) -> None:
    await asyncio.sleep(TERMINATION_GRACE)
    await replica.stop()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


logging.getLogger("aiohttp").setLevel(logging.ERROR)
