"""L4 forwarding: each downstream connection gets its own upstream connection.

Bytes go from one side's ``data_received`` straight to the other side's
``transport.write``. Half-close is passed through (EOF from one side becomes
``write_eof`` on the other, and the pair closes once both directions are done),
and a full write buffer on either side pauses reading on the other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import perf_counter
from typing import cast

from proxy.endpoints import Endpoint
from proxy.errors import UpstreamError, UpstreamReset
from proxy.flow import CONNECTING, FlowControl, Forwarding
from proxy.logs import log_access
from proxy.route import Route, peer_name

log = logging.getLogger("sidelink.tcp")


class TcpDownstream(Forwarding):
    """The accepted side; owns the pair and its lifetime."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.stats = route.stats
        self.transport: asyncio.Transport | None = None
        self.upstream: TcpUpstream | None = None
        # Bound once, for every read: each side's transport write, and the clock.
        self.write_up: Callable[[bytes], object] | None = None
        self.write_down: Callable[[bytes], object] | None = None
        self.clock = route.clock
        self.endpoint: Endpoint | None = None
        self.started = 0.0
        self.last_active = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.pending: list[bytes] = []
        self.eof_down = False
        self.eof_up = False
        self.closed = False
        self.shed = False
        self.outcome = "ok"

    def __repr__(self) -> str:
        peer = peer_name(self.transport)
        return f"<TcpDownstream {self.route.config.name} {peer} -> {self.endpoint}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        if not self.route.admit(transport):
            self.closed = self.shed = True
            return
        self.write_down = transport.write
        self.flow = FlowControl(transport)
        # Read nothing until upstream is connected: the kernel buffers meanwhile. (uvloop
        # may still deliver a first chunk; data_received keeps that in `pending`.)
        self.flow.pause(CONNECTING)
        self.stats.opened_downstream += 1
        self.stats.active_downstream += 1
        self.route.connections.add(self)
        self.route.ensure_ticker()
        self.last_active = self.clock()
        # (Timed by perf_counter, as http requests are: uvloop's loop clock moves in ms.)
        self.started = perf_counter()
        self.route.spawn(self._connect())

    async def _connect(self) -> None:
        route = self.route
        try:
            ep, transport, upstream = await route.connect(lambda: TcpUpstream(self))
        except UpstreamError as e:
            self.outcome = e.reason
            self.stats.errors[e.reason] += 1
            if self.transport is not None:
                self.transport.close()
            return
        if self.closed:
            # The client left while we were connecting.
            route.endpoints.release(ep)
            transport.close()
            return
        self.endpoint = ep
        route.endpoints.succeeded(ep)  # (for tcp, a connection made is the good answer)
        self.upstream = upstream
        self.write_up = transport.write
        self.flow.link(upstream.flow)
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            self.stats.bytes_to_upstream += len(data)
            transport.write(data)
        if self.eof_down:
            # The client finished sending while we were connecting: pass its EOF on now.
            if self.eof_up:
                self.close()
            elif transport.can_write_eof():
                transport.write_eof()
            return
        self.flow.resume(CONNECTING)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        write = self.write_up
        if write is not None:
            # Counted when forwarded: bytes held in `pending` are lost if the connect fails.
            self.stats.bytes_to_upstream += len(data)
            write(data)
            self.last_active = self.clock()
        else:
            self.pending.append(data)
            self.flow.repause()  # the transport let a read through the first pause

    def eof_received(self) -> bool:
        self.eof_down = True
        upstream = self.upstream
        if upstream is None:
            # Still connecting (uvloop can report an EOF before our pause takes hold):
            # _connect passes it on after `pending`, as a half-close, not a hang-up.
            return True
        if upstream.transport is None or self.eof_up:
            self.close()
            return False
        if upstream.transport.can_write_eof():
            upstream.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.shed:
            return
        self.route.fds.closed()
        if exc is not None and self.outcome == "ok":
            self.outcome = "downstream_reset"
        self.close()

    def upstream_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.stats.bytes_to_downstream += len(data)
        if self.write_down is not None:
            self.write_down(data)

    def upstream_eof(self) -> bool:
        self.eof_up = True
        if self.transport is None or (self.eof_down and self.upstream is not None):
            # (While still connecting, _connect first sends the client's pending bytes.)
            self.close()
            return False
        if self.transport.can_write_eof():
            self.transport.write_eof()
        return True

    def upstream_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.outcome == "ok":
            self.outcome = UpstreamReset.reason
            self.stats.errors[UpstreamReset.reason] += 1
            if self.endpoint is not None:
                self.route.endpoints.went_wrong(self.endpoint, UpstreamReset.reason)
        self.close()

    # Connection (lifecycle) interface

    def tick(self, now: float) -> None:
        if self.upstream is not None and now - self.last_active >= self.route.settings.idle_timeout:
            self.outcome = "idle_timeout"
            # Nothing moved for that long, so bytes still queued are stuck behind a peer that
            # does not read: drop them, or the socket would stay open until it does.
            self.close(flush=False)

    def shutdown(self) -> None:
        """A tcp connection is in flight until one side closes it: nothing to cut short."""

    def abort(self) -> None:
        self.outcome = "aborted"
        self.close(flush=False)

    def close(self, flush: bool = True) -> None:
        """Close both sides, after sending what they have queued unless `flush` is False."""
        if self.closed:
            return
        self.closed = True
        for transport in (self.transport, self.upstream.transport if self.upstream else None):
            if transport is None:
                continue
            if flush:
                transport.close()
            else:
                transport.abort()
        if self.endpoint is not None:
            self.route.endpoints.release(self.endpoint)
        self.stats.active_downstream -= 1
        self.route.connections.discard(self)
        if self.route.access_log:
            self._log()

    def _log(self) -> None:
        ep = self.endpoint
        fields = {
            "route": self.route.config.name,
            "protocol": "tcp",
            "duration_seconds": round(perf_counter() - self.started, 6),
            "bytes_received": self.bytes_in,
            "bytes_sent": self.bytes_out,
            "endpoint": ep.label if ep is not None else None,
            "error": None if self.outcome == "ok" else self.outcome,
        }
        log_access(peer_name(self.transport), fields)


class TcpUpstream(Forwarding):
    """The connected side: hands everything to its downstream."""

    def __init__(self, downstream: TcpDownstream) -> None:
        self.downstream = downstream
        self.transport: asyncio.Transport | None = None
        self.clock = downstream.clock

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        self.flow = FlowControl(transport)
        self.downstream.stats.active_upstream += 1
        self.downstream.route.fds.opened()

    def data_received(self, data: bytes) -> None:
        self.downstream.last_active = self.clock()
        self.downstream.upstream_data(data)

    def eof_received(self) -> bool:
        return self.downstream.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.downstream.stats.active_upstream -= 1
        self.downstream.route.fds.closed()
        self.downstream.upstream_lost(exc)
