"""One route at run time: its listener, endpoint set, DNS watch, stats and connections.

Both forwarders reach upstream through :meth:`Route.connect`, which owns the
shared rules: wait for the first resolution, pick an endpoint, connect within
``connect_timeout``, eject and re-resolve on failure, retry on another endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from proxy.addr import join_host_port
from proxy.config import RetryBudgetConfig, RouteConfig
from proxy.endpoints import DRAINING, Endpoint, EndpointSet
from proxy.errors import FdLimit, NoEndpoints, UpstreamError, connect_error
from proxy.fds import process_budget
from proxy.metrics import Metrics, RouteStats
from proxy.pool import Pool, StreamPool
from proxy.resolver import Resolver

log = logging.getLogger("sidelink.route")

P = TypeVar("P", bound=asyncio.BaseProtocol)


# How often the ticker checks connection timeouts and sweeps idle pools.
TICK_INTERVAL = 0.1
# Connections the ticker checks between two turns of the loop: a sweep that times out
# a thousand slow heads at once (1,000 answers 408) would hold every other client for
# tens of milliseconds; 64 at a time hold it for a few.
TICK_BATCH = 64


class Connection(Protocol):
    """What the lifecycle needs from a downstream connection of either protocol."""

    def tick(self, now: float) -> None:
        """Check timeouts (called every TICK_INTERVAL)."""

    def shutdown(self) -> None:
        """Finish the work in flight, then close."""

    def abort(self) -> None:
        """Close now."""


class Route:
    def __init__(
        self,
        config: RouteConfig,
        resolver: Resolver,
        metrics: Metrics,
        access_log: bool = False,
    ) -> None:
        self.config = config
        self.settings = config.settings
        # The loop, taken once: asyncio.get_running_loop() costs a getpid() per call.
        self.loop = asyncio.get_running_loop()
        self.clock = self.loop.time
        self.fds = process_budget()
        self.access_log = access_log
        self.stats = metrics.route(config.name)
        # (The newest route of the name counts: one a reload retired has let its go.)
        self.stats.idle_multiplexed = self._idle_multiplexed
        settings = config.settings
        self.endpoints = EndpointSet(
            config.name, settings.balance, self.stats, settings.outlier, settings.slow_start
        )
        self.retry_budget = RetryBudget(settings.retry_budget, self.stats, self.clock)
        self.resolver = resolver
        self.watch = resolver.watch(config.service, config.port)
        self.watch.subscribe(self.endpoints.update)
        self.connections: set[Connection] = set()
        # The process is shutting down: HTTP/1 answers say Connection: close (and their
        # connections close after them), so that no client is caught sending a request on
        # a keep-alive connection as the drain closes it. (HTTP/2 is told by GOAWAY.)
        self.draining = False
        self.listener: asyncio.Server | None = None
        self.bound: tuple[str, int] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        listen = join_host_port(*self.bound) if self.bound else self.config.listen
        return (
            f"<Route {self.config.name} {listen} -> {self.config.service}:"
            f"{self.config.port}/{self.config.protocol} connections={len(self.connections)}>"
        )

    @property
    def ready(self) -> bool:
        return self.listener is not None and self.watch.resolved

    def not_ready_reason(self) -> str | None:
        if self.listener is None:
            return f"route {self.config.name}: listener {self.config.listen} not bound"
        if not self.watch.resolved:
            why = self.watch.last_error or "no answer yet"
            return f"route {self.config.name}: {self.config.service} not resolved ({why})"
        return None

    async def listen(self, factory: Callable[[], asyncio.Protocol]) -> None:
        loop = asyncio.get_running_loop()
        self.listener = await loop.create_server(
            factory,
            self.config.listen_host,
            self.config.listen_port,
            reuse_address=True,
            backlog=1024,
        )
        sockname = self.listener.sockets[0].getsockname()
        self.bound = (sockname[0], sockname[1])

    def stop_listening(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def close(self) -> None:
        """Forget DNS and let the pooled connections go (the idle ones close); live ones
        are the lifecycle's."""
        self.stop_listening()
        self.watch.unsubscribe(self.endpoints.update)
        self.resolver.release(self.watch)
        self.let_go()
        if self._ticker is not None and not self.connections:
            self._ticker.cancel()

    def let_go(self) -> None:
        """No new work here: every endpoint's pooled connections go (see Endpoint.let_go).
        Again once a retired route's last client has gone: its streams may have opened
        connections since it was closed."""
        for ep in self.endpoints.all():
            ep.let_go()

    def admit(self, transport: asyncio.Transport) -> bool:
        """A downstream connection was accepted: counted against the fd budget, or, at the
        limit, shed before any work (closed at once, counted)."""
        if self.fds.admit():
            return True
        self.stats.shed += 1
        transport.abort()
        return False

    def pool(self, ep: Endpoint) -> Pool:
        pool = ep.pool
        if pool is None:
            pool = ep.pool = Pool(self.config.name, ep.address, self.settings.pool, self.stats)
        return pool

    def _idle_multiplexed(self) -> int:
        """Its pooled HTTP/2 connections that carry no stream."""
        return sum(ep.streams.idle() for ep in self.endpoints.all() if ep.streams is not None)

    def streams(self, ep: Endpoint) -> StreamPool:
        pool = ep.streams
        if pool is None:
            pool = ep.streams = StreamPool(self.config.name, ep.address, self.settings.pool)
        return pool

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a connection's coroutine (a connect), holding it until done: the loop keeps
        only weak references to tasks, and one collected mid-connect would vanish."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = self.loop.create_task(self._tick())

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while self.connections or self.listener is not None:
            await asyncio.sleep(TICK_INTERVAL)
            now = loop.time()
            self.retry_budget.sample(now)
            for i, conn in enumerate(list(self.connections), 1):
                if conn in self.connections:  # (not closed while the loop turned)
                    conn.tick(now)
                if i % TICK_BATCH == 0:
                    await asyncio.sleep(0)
            self.endpoints.revive()
            for ep in self.endpoints.all():
                if ep.pool is not None:
                    ep.pool.sweep(now)
                if ep.streams is not None:
                    ep.streams.sweep(now)

    async def connect(
        self,
        factory: Callable[[], P],
        exclude: list[Endpoint] | None = None,
        first: Endpoint | None = None,
    ) -> tuple[Endpoint, asyncio.Transport, P]:
        """Connect to `first` or a picked endpoint, retrying on others; the caller releases it.

        Raises NoEndpoints (or FdLimit) for the caller to report and count; each failed
        attempt is counted here.
        """
        settings = self.settings
        stats = self.stats
        watch = self.watch
        if not watch.resolved and not await watch.wait_resolved(settings.connect_timeout):
            why = watch.last_error or "no answer yet"
            raise NoEndpoints(f"{self.config.service} has not resolved ({why})")
        tried = exclude if exclude is not None else []
        loop = asyncio.get_running_loop()
        error: UpstreamError | None = None
        # A failed connect is tried again on each endpoint not tried yet (nothing reached
        # the service, so it is always safe), and on the only one up to `retries` times.
        attempt = 0
        while True:
            ep = first if attempt == 0 and first is not None else self.endpoints.pick(tried)
            if (
                ep is None
                and tried
                and len(self.endpoints) == 1
                and tried[-1].state != DRAINING
                and attempt <= settings.retries
            ):
                # The one endpoint (a ClusterIP) failed to connect: a lost SYN, say. With
                # nowhere else to go, try it again rather than fail at once.
                ep = tried[-1]
            if ep is None:
                break
            if not self.fds.room_upstream():
                raise FdLimit("no file descriptor left for an upstream connection")
            if attempt:
                stats.retries += 1
            self.endpoints.acquire(ep)
            started = time.perf_counter()
            try:
                transport, protocol = await asyncio.wait_for(
                    loop.create_connection(factory, ep.host, ep.port),
                    settings.connect_timeout,
                )
            except BaseException as e:
                self.endpoints.release(ep)
                if not isinstance(e, OSError | TimeoutError):
                    raise
                if error is not None:
                    stats.errors[error.reason] += 1
                error = connect_error(e)
                if isinstance(error, FdLimit):
                    self.fds.warn("upstream connects fail (fd_limit)")
                    raise error from None  # ours, not the endpoint's: no ejection, no retry
                self.endpoints.failed(ep)
                self.watch.nudge()
                tried.append(ep)
                attempt += 1
                log.info(
                    "route %s: connect to %s:%d failed: %s",
                    self.config.name,
                    ep.host,
                    ep.port,
                    error,
                )
                continue
            if error is not None:
                stats.errors[error.reason] += 1  # the failure just retried past
            stats.connect_duration.observe(time.perf_counter() - started)
            stats.opened_upstream += 1
            return ep, transport, protocol
        # Nothing to try, or every endpoint failed: the service has no endpoints (503).
        if error is None:
            raise NoEndpoints(f"{self.config.service} has no endpoints")
        stats.errors[error.reason] += 1
        raise NoEndpoints(f"every endpoint of {self.config.service} failed: {error.detail}")

    def to_dict(self) -> dict[str, object]:
        watch = self.watch
        ttl = watch.ttl_remaining
        return {
            "name": self.config.name,
            "listen": self.config.listen,
            # (Where it is bound: the port the kernel chose for a listen port of 0.)
            "bound": join_host_port(*self.bound) if self.bound else None,
            "protocol": self.config.protocol,
            "service": self.config.service,
            "port": self.config.port,
            "answered_name": watch.answered_name,
            "ttl_remaining": None if ttl is None else round(ttl, 3),
            "last_resolved": _iso(watch.last_resolved),
            "last_error": watch.last_error,
            "source": watch.source,
            "ready": self.ready,
            "endpoints": [ep.to_dict() for ep in self.endpoints.all()],
        }


class RetryBudget:
    """Retries may add at most ``percent`` of a route's requests over the last WINDOW
    seconds, or ``min_per_second``, whichever is more: a sick service is not hit by a
    storm of retries. (A retry after a failed connect is outside it: no request reached
    the service.)"""

    WINDOW = 10.0

    def __init__(
        self, config: RetryBudgetConfig, stats: RouteStats, clock: Callable[[], float]
    ) -> None:
        self.config = config
        self.stats = stats
        self.clock = clock
        self.retries: deque[float] = deque()  # when the retries in the window were made
        # (time, answers so far), sampled once a second by the route's ticker.
        self.samples: deque[tuple[float, int]] = deque()

    def __repr__(self) -> str:
        return f"<RetryBudget retries={len(self.retries)} percent={self.config.percent}>"

    def sample(self, now: float) -> None:
        samples = self.samples
        if not samples or now - samples[-1][0] >= 1.0:
            samples.append((now, self.stats.request_duration.observations()))
            while now - samples[0][0] > self.WINDOW:
                samples.popleft()

    def allow(self) -> bool:
        """Whether one more retry fits; counted as made if it does."""
        now = self.clock()
        retries = self.retries
        while retries and now - retries[0] > self.WINDOW:
            retries.popleft()
        samples = self.samples
        while len(samples) > 1 and now - samples[0][0] > self.WINDOW:
            samples.popleft()
        answered = self.stats.request_duration.observations()
        requests = answered - samples[0][1] if samples else answered
        config = self.config
        # (Whole retries: a share under one allows none.)
        allowed = max(config.min_per_second * self.WINDOW, requests * config.percent // 100)
        if len(retries) >= allowed:
            self.stats.retry_budget_exhausted += 1
            return False
        retries.append(now)
        return True


def peer_name(transport: asyncio.BaseTransport | None) -> str:
    """The client's address, for logs and reprs (looked up only when one is written)."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if peer else "?"


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
