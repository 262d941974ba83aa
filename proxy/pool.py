"""Upstream connections kept per endpoint for reuse: idle HTTP/1, multiplexed HTTP/2.

A connection is handed out only while it is healthy: not closing, idle for less
than ``pool.idle_timeout`` and younger than ``pool.max_lifetime`` (recycling lets
new pods behind a ClusterIP get their share). The newest idle connection is
reused first, so surplus ones age out. A connection the server closes while idle
removes itself at once (see ``http.h1.H1Upstream.connection_lost``). A connection
joins its endpoint's pool when made (:meth:`Pool.adopt`), then goes out and comes
back through :meth:`Pool.get` and :meth:`Pool.put`.

A :class:`StreamPool` holds an endpoint's HTTP/2 connections, which carry many
streams at once: a stream goes on the first connection with room, and a new one is
made when all are full. A connection past ``max_lifetime`` is retired (no new
streams, closed once its last one ends), as is one the server sent GOAWAY on.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from mypy_extensions import mypyc_attr

from proxy.addr import join_host_port
from proxy.config import PoolConfig
from proxy.flow import Forwarding
from proxy.metrics import RouteStats

# The streams an HTTP/2 server is taken to allow at once before it has said (RFC 9113's
# recommended least, what nghttp2 and Go assume too).
ASSUMED_STREAM_LIMIT: Final = 100

# The two bases below are classes rather than typing Protocols: compiled code reads a
# base class's attributes and calls its methods directly, a Protocol's through generic
# lookups, on every request. Tests subclass them (interpreted) for their stand-ins.


@mypyc_attr(allow_interpreted_subclasses=True)
class Pooled(Forwarding):
    """An HTTP/1 connection as its pool sees it (the base of ``http.exchange.Upstream``)."""

    created: float  # loop times, for the idle timeout and max lifetime
    idle_since: float
    closed: bool  # closed or closing: never handed out again
    pool: Pool | None  # the pool it belongs to

    def close(self) -> None:
        raise NotImplementedError


class Pool:
    __slots__ = (
        "active",
        "address",
        "config",
        "idle",
        "idle_timeout",
        "max_idle",
        "max_lifetime",
        "name",
        "stats",
    )

    def __init__(
        self, name: str, address: tuple[str, int], config: PoolConfig, stats: RouteStats
    ) -> None:
        self.name = name
        self.address = address
        self.config = config
        # (Read for every request: held here, the config is not compiled.)
        self.idle_timeout = config.idle_timeout
        self.max_lifetime = config.max_lifetime
        self.max_idle = config.max_idle
        self.stats = stats
        self.idle: list[Pooled] = []
        self.active = 0  # handed out and not yet returned

    def __repr__(self) -> str:
        return (
            f"<Pool {self.name} {join_host_port(*self.address)} "
            f"idle={len(self.idle)} active={self.active}>"
        )

    def get(self, now: float) -> Pooled | None:
        """A healthy idle connection, or None; stale ones found on the way are closed."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            self.stats.pool_idle -= 1
            if (
                conn.closed
                or now - conn.idle_since >= self.idle_timeout
                or now - conn.created >= self.max_lifetime
            ):
                conn.close()
                continue
            self.active += 1
            return conn
        return None

    def adopt(self, conn: Pooled) -> None:
        """A new connection to this endpoint was made, and is handed out at once."""
        conn.pool = self
        self.active += 1

    def put(self, conn: Pooled, now: float, reusable: bool) -> None:
        """Take a connection back after a request: keep it idle, or close it."""
        self.active -= 1
        if (
            reusable
            and len(self.idle) < self.max_idle
            and not conn.closed
            and now - conn.created < self.max_lifetime
        ):
            conn.idle_since = now
            self.idle.append(conn)
            self.stats.pool_idle += 1
        else:
            conn.close()

    def discard(self, conn: Pooled) -> None:
        """An idle connection died (the server closed it): forget it."""
        try:
            self.idle.remove(conn)
        except ValueError:
            return
        self.stats.pool_idle -= 1

    def sweep(self, now: float) -> None:
        """Close idle connections past their idle timeout or lifetime."""
        if not self.idle:
            return
        keep = [c for c in self.idle if self._fresh(c, now) and not c.closed]
        if len(keep) != len(self.idle):
            for conn in self.idle:
                if conn not in keep:
                    conn.close()
            self.stats.pool_idle -= len(self.idle) - len(keep)
            self.idle = keep

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        self.stats.pool_idle -= len(idle)
        for conn in idle:
            conn.close()

    def _fresh(self, conn: Pooled, now: float) -> bool:
        return now - conn.idle_since < self.idle_timeout and now - conn.created < self.max_lifetime


@mypyc_attr(allow_interpreted_subclasses=True)
class Multiplexed(asyncio.Protocol):
    """A connection that carries many streams at once, as its pool sees it (the base of
    ``http.h2.Carrier``)."""

    created: float
    idle_since: float  # when its last stream ended
    closed: bool

    def room(self) -> int:
        """How many more streams it takes now (0 when retired or closed)."""
        raise NotImplementedError

    def busy(self) -> bool:
        """Whether it carries a stream."""
        raise NotImplementedError

    def retire(self) -> None:
        """No new streams; closed once the last one ends."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class StreamPool:
    __slots__ = ("address", "config", "conns", "max_lifetime", "name", "peer_limit", "waiting")

    def __init__(self, name: str, address: tuple[str, int], config: PoolConfig) -> None:
        self.name = name
        self.address = address
        self.config = config
        self.max_lifetime = config.max_lifetime  # (read for every stream)
        self.conns: list[Multiplexed] = []  # open and taking streams
        # Streams waiting for the connection being made (None: none is being made).
        self.waiting: list[Any] | None = None
        # The server's MAX_CONCURRENT_STREAMS, as its last connection said (100, the usual,
        # until one has): what a new connection takes before its own SETTINGS come.
        self.peer_limit = ASSUMED_STREAM_LIMIT

    def __repr__(self) -> str:
        return f"<StreamPool {self.name} {join_host_port(*self.address)} conns={len(self.conns)}>"

    def get(self, now: float) -> Multiplexed | None:
        """A connection with room for one more stream, or None; old ones are retired."""
        for conn in self.conns:
            if now - conn.created >= self.max_lifetime:
                self.retire(conn)
                return self.get(now)
            if conn.room() > 0:
                return conn
        return None

    def add(self, conn: Multiplexed) -> None:
        self.conns.append(conn)

    def retire(self, conn: Multiplexed) -> None:
        """No new streams on ``conn`` (its lifetime is over, or the server said GOAWAY)."""
        self.remove(conn)
        conn.retire()

    def remove(self, conn: Multiplexed) -> None:
        if conn in self.conns:
            self.conns.remove(conn)

    def sweep(self, now: float) -> None:
        """Close connections without streams past their idle timeout or lifetime."""
        config = self.config
        for conn in [c for c in self.conns if not c.busy()]:
            if (
                now - conn.idle_since >= config.idle_timeout
                or now - conn.created >= config.max_lifetime
            ):
                self.remove(conn)
                conn.close()

    def idle(self) -> int:
        """Its connections that carry no stream."""
        return sum(1 for conn in self.conns if not conn.busy())

    def retire_all(self) -> None:
        """No new streams on any of its connections (the endpoint is leaving): the idle
        ones close now, the others once their last stream has ended."""
        for conn in list(self.conns):
            self.retire(conn)
