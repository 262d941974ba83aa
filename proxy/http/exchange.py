"""One request in flight, its phase, and the contract between its two connections.

An :class:`Exchange` is made when a request head has been read downstream. It picks
an endpoint, takes a pooled upstream connection or connects one, sends the request
(held while no connection is attached), takes the response back, and retries on
another endpoint where that is safe. Its phase is one value::

    HEAD -> CONNECTING -> SENDING -> AWAITING -> STREAMING -> DONE
                                                  '-> TUNNEL (101) -> DONE

(HEAD: read, waiting its turn behind pipelined requests; SENDING: attached, the
request body still arriving; AWAITING: the request is all sent, no response head
yet, which is when ``request_timeout`` runs.) Whether the request has been read
whole is a separate fact (``complete``): a response may start, or an error be
answered, while the body still arrives.

The two sides are seams with few calls. An upstream connection (:class:`Upstream`)
is attached, sent to and detached; it calls back only the exchange's
``response_*`` methods, ``deliver`` and ``upstream_failed``. The downstream
connection (:class:`Downstream`) writes what the exchange hands it and is told when
the exchange is over. HTTP/1 provides one of each (``h1.py``).

On every request's path and compiled with mypyc (setup.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Protocol, cast

from proxy.endpoints import DRAINING, Endpoint, EndpointSet
from proxy.errors import (
    ClientGone,
    ConnectionCut,
    NoEndpoints,
    ProxyError,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.flow import BUFFER, Forwarding
from proxy.http.heads import IDEMPOTENT
from proxy.logs import log_access
from proxy.metrics import RESET_CODE, RouteStats
from proxy.pool import Pooled

if TYPE_CHECKING:
    from proxy.route import Route

perf_counter: Final = time.perf_counter  # (Final: compiled code calls it without a lookup)

# Request bytes kept so an idempotent request can be replayed on a fresh connection.
REPLAY_LIMIT: Final = 64 * 1024
# Request bytes held while no upstream is attached (connecting, or pipelined behind
# another request) before the client is paused.
BUFFER_LIMIT: Final = 256 * 1024

HEAD: Final = 0
CONNECTING: Final = 1
SENDING: Final = 2
AWAITING: Final = 3
STREAMING: Final = 4
TUNNEL: Final = 5
DONE: Final = 6
PHASES: Final = ("HEAD", "CONNECTING", "SENDING", "AWAITING", "STREAMING", "TUNNEL", "DONE")

# Whose EOF a tunnel has had (Exchange.tunnel_eof): bits.
CLIENT_EOF: Final = 1
SERVER_EOF: Final = 2

NO_ENDPOINTS: Final[tuple[Endpoint, ...]] = ()


class Upstream(Pooled):
    """An upstream connection as an exchange uses it: attached, sent to, detached.

    What it may call back is the exchange's ``response_started``, ``deliver``,
    ``response_complete`` and ``upstream_failed``, and its downstream's ``touch``.
    (A base class rather than a typing Protocol: compiled code calls a base class's
    methods directly, a Protocol's through a generic lookup, on every request.)
    """

    def attach(self, exchange: Exchange) -> None:
        """Carry ``exchange``: its response goes to it from now on."""
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        """Request bytes, as they should go on the wire."""
        raise NotImplementedError

    def detach(self, reusable: bool, now: float) -> None:
        """The exchange is over: back to the pool if ``reusable``, else closed."""
        raise NotImplementedError

    def write_eof(self) -> None:
        """A tunnel's client has sent all it will: half-close the connection."""
        raise NotImplementedError


class Downstream(Forwarding):
    """The client connection as an exchange uses it."""

    route: Route
    stats: RouteStats  # the route's, and its endpoints: held here for a direct reach
    endpoints: EndpointSet
    clock: Callable[[], float]  # the loop's
    last_active: float  # the loop time of the last read on either side
    closed: bool
    bridged: bool  # requests go upstream as HTTP/2 streams (upstream_protocol: http2)

    @property
    def last_response(self) -> bool:
        """The connection closes after the response under way."""
        raise NotImplementedError

    def peer(self) -> str:
        """The client's address, for the access log."""
        raise NotImplementedError

    def new_upstream(self) -> Upstream:
        """A protocol object for a new upstream connection."""
        raise NotImplementedError

    def bridge(self, exchange: Exchange, ep: Endpoint | None) -> None:
        """Carry ``exchange`` upstream as an HTTP/2 stream to ``ep`` (or to an endpoint
        picked once the service resolves)."""
        raise NotImplementedError

    def touch(self, now: float) -> None:
        """The upstream side moved: the connection is not idle."""
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        """Response bytes for the client."""
        raise NotImplementedError

    def answer_error(self, exchange: Exchange, error: ProxyError, keep_alive: bool) -> None:
        """Send sidelink's own answer to ``exchange``."""
        raise NotImplementedError

    def finished(self, exchange: Exchange, keep_alive: bool) -> None:
        """``exchange`` is answered: go on to the next request, or close."""
        raise NotImplementedError

    def switch_to_tunnel(self, exchange: Exchange) -> None:
        """A 101 came: from now on the connections are one byte pipe."""
        raise NotImplementedError

    def write_eof(self) -> None:
        """A tunnel's server has sent all it will: half-close the connection."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Exchange:
    """One request and its response: the per-request state and its moves."""

    __slots__ = (
        "attached",
        "buffer",
        "buffered",
        "bytes_in",
        "bytes_out",
        "chunked",
        "complete",
        "cut_short",
        "down",
        "endpoint",
        "eofs",
        "error",
        "head",
        "http10",
        "keep_alive",
        "method",
        "path",
        "phase",
        "replay",
        "retries",
        "sent_at",
        "started",
        "status",
        "trailers",
        "tried",
        "upgrade",
        "upstream",
    )

    def __init__(self, down: Downstream, method: bytes, path: bytes, started: float) -> None:
        self.down = down
        self.method = method
        self.path = path
        self.started = started  # perf_counter when the head was read
        self.phase = HEAD
        self.head = b""
        self.http10 = False
        self.keep_alive = True
        self.chunked = False
        self.upgrade = False
        self.complete = False  # the request has been read whole
        self.buffer: list[bytes] | None = None  # request bytes not yet written upstream
        self.buffered = 0
        # The body kept to replay an idempotent request (None: it cannot be replayed).
        self.replay: bytes | None = b"" if method in IDEMPOTENT else None
        self.trailers: list[bytes] | None = None
        self.upstream: Upstream | None = None
        self.endpoint: Endpoint | None = None  # the last endpoint tried
        self.attached = 0.0  # perf_counter when it went on its upstream connection
        self.sent_at = 0.0  # loop time the request was all sent (AWAITING from then)
        self.status = 0  # the status sent downstream (0: none yet)
        self.cut_short = False  # the client never got the answer whole: code="reset"
        self.error: ProxyError | None = None  # what went wrong, for the access log
        self.tried: Sequence[Endpoint] = NO_ENDPOINTS
        self.retries = 0
        self.bytes_in = 0  # request bytes forwarded
        self.bytes_out = 0  # response bytes sent downstream
        self.eofs = 0  # a tunnel's sides that have sent their EOF (CLIENT_EOF, SERVER_EOF)

    def __repr__(self) -> str:
        path = self.path.decode(errors="replace")
        return f"<Exchange {self.method.decode()} {path} {PHASES[self.phase]} status={self.status}>"

    # --- the request side (called by the downstream) -------------------------------

    def start(self) -> None:
        """Its turn: a pooled connection at once, else connect in a task."""
        self.phase = CONNECTING
        down = self.down
        route = down.route
        ep = down.endpoints.pick(self.tried)
        if down.bridged and (ep is not None or not route.watch.resolved):
            down.bridge(self, ep)  # carried upstream as an HTTP/2 stream
            return
        if ep is not None:
            now = down.last_active  # (of the read that brought the request, or of its turn)
            conn = (ep.pool or route.pool(ep)).get(now)
            if conn is not None:
                ep.in_flight += 1
                self.attach_to(ep, cast(Upstream, conn), now)  # (a Pool holds Upstreams)
                return
        elif route.watch.resolved:
            self.fail(NoEndpoints(f"{route.config.service} has no endpoints"))
            return
        route.spawn(self._connect(ep))

    def send(self, data: bytes) -> None:
        """Request bytes for upstream: written now, or held until a connection is attached."""
        phase = self.phase
        if phase == DONE:
            return  # answered already: the rest of the body is dropped
        replay = self.replay
        if replay is not None:
            self.replay = replay + data if len(replay) + len(data) <= REPLAY_LIMIT else None
        self.bytes_in += len(data)
        upstream = self.upstream
        if upstream is not None:
            upstream.send(data)
            return
        if self.buffer is None:
            self.buffer = []
        self.buffer.append(data)
        self.buffered += len(data)
        if self.buffered > BUFFER_LIMIT:
            self.down.flow.pause(BUFFER)

    def request_complete(self) -> None:
        self.complete = True
        if self.phase == SENDING:
            # request_timeout counts from the end of the request (the read that brought
            # it): a slow upload is the client's time, guarded by idle_timeout.
            self.phase = AWAITING
            self.sent_at = self.down.last_active

    def keeps_alive(self) -> bool:
        """Whether the client's connection goes on after the answer (its head says so). Not
        when the answer comes before the request was read whole (an upstream's early 413,
        a 417 to Expect: 100-continue, sidelink's own error): whether the rest of its body
        would come is the client's to say, so the connection closes after the answer."""
        return self.keep_alive and self.complete and not self.down.last_response

    def timed_out(self, now: float, request_timeout: float) -> bool:
        return self.phase == AWAITING and now - self.sent_at > request_timeout

    def time_out(self) -> None:
        """No answer within request_timeout: counted against the endpoint, and 504."""
        if self.endpoint is not None:
            self.down.endpoints.went_wrong(self.endpoint, UpstreamTimeout.reason)
        self.fail(UpstreamTimeout("upstream did not answer in time"))

    def send_raw(self, data: bytes) -> None:
        """Tunnel bytes (after a 101), as they came."""
        if self.upstream is not None:
            self.upstream.send(data)

    def tunnel_eof(self, side: int) -> bool:
        """One side of a tunnel sent its EOF (``side``: CLIENT_EOF or SERVER_EOF): passed
        on to the other as a half-close, as a tcp route does. Returned: whether the side it
        came from stays open, to be written to; not once both sides have sent theirs (the
        pair is done and closes)."""
        self.eofs |= side
        if self.eofs == CLIENT_EOF | SERVER_EOF:
            return False
        if side == SERVER_EOF:
            self.down.write_eof()
        elif self.upstream is not None:
            self.upstream.write_eof()
        else:
            return False
        return True

    def refuse(self, error: ProxyError) -> None:
        """Answer a request refused before it could become an exchange of its own."""
        self._answer_with(error, keep_alive=False)

    def abandon(self) -> None:
        """The client is gone or its request broke off: the upstream's state is unknown."""
        self._detach(reusable=False)
        self.end()

    def client_gone(self, cut: bool) -> None:
        """The client's connection ended before it had the answer whole (``cut``: sidelink
        ended it; a tunnel's end is no such thing): counted as a reset."""
        if self.phase < TUNNEL:  # (not yet answered whole, nor a tunnel)
            self.cut_short = True
            self.error = ConnectionCut() if cut else ClientGone()
        self.abandon()

    # --- connecting ---------------------------------------------------------------

    async def _connect(self, first: Endpoint | None) -> None:
        down = self.down
        route = down.route
        tried = self.tried = list(self.tried)  # route.connect adds the endpoints that fail
        before = len(tried)
        try:
            ep, _, conn = await route.connect(down.new_upstream, exclude=tried, first=first)
        except UpstreamError as e:
            # Every attempt failed: all but the first were retries (as route.connect counts).
            self.retries += max(0, len(tried) - before - 1)
            if self.phase == CONNECTING and not down.closed:
                self.fail(e)
            else:
                route.stats.errors[e.reason] += 1  # (nobody is told, but it happened)
            return
        self.retries += len(tried) - before
        if conn.closed:
            # The server closed it before the request could go (one that speaks only
            # HTTP/2 answers an HTTP/1 request's connection so): counted against it.
            route.endpoints.release(ep)
            route.endpoints.went_wrong(ep, UpstreamReset.reason)
            if self.phase == CONNECTING and not down.closed:
                self.fail(UpstreamReset("upstream closed a new connection at once"))
            return
        pool = route.pool(ep)
        pool.adopt(conn)
        now = down.clock()
        if self.phase != CONNECTING or down.closed:
            route.endpoints.release(ep)
            pool.put(conn, now, reusable=True)
            return
        self.attach_to(ep, conn, now)

    def attach_to(self, ep: Endpoint, conn: Upstream, now: float) -> None:
        self.endpoint = ep
        self.upstream = conn
        self.attached = perf_counter()
        conn.attach(self)
        buffer = self.buffer
        if buffer:
            data = b"".join((self.head, *buffer))
            self.buffer = None
            self.buffered = 0
        else:
            data = self.head
        conn.send(data)
        if self.complete:
            self.phase = AWAITING
            self.sent_at = now
        else:
            self.phase = SENDING
        flow = self.down.flow
        flow.link(conn.flow)
        if flow.reasons:  # (checked here: this runs once per request)
            flow.resume(BUFFER)

    def _detach(self, reusable: bool) -> None:
        """Give the upstream connection back (or close it) and release its endpoint."""
        conn = self.upstream
        if conn is None:
            return
        self.upstream = None
        down = self.down
        down.flow.unlink()
        ep = self.endpoint
        assert ep is not None
        # (last_active: the time of the read that completed the exchange, if any)
        conn.detach(reusable and ep.state != DRAINING, down.last_active)
        down.endpoints.release(ep)

    # --- the response side (called by the upstream) ---------------------------------

    def response_started(self, status: int) -> None:
        """The (final) response head is in: it starts going to the client."""
        now = self._answered(status)
        ep = self.endpoint
        if ep is not None:
            self.down.endpoints.answered_by(ep, status, now - self.attached)
        if status == 101:
            self.phase = TUNNEL
            self.down.switch_to_tunnel(self)
        else:
            self.phase = STREAMING

    def deliver(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.down.write(data)

    def response_complete(self, reusable: bool, keep_alive: bool) -> None:
        complete = self.complete
        # (After an Upgrade request the upstream may hold bytes of the new protocol.)
        self._detach(reusable and complete and not self.upgrade)
        self.end()
        # Answered before the request was all read: the connection cannot go on.
        self.down.finished(self, keep_alive and complete)

    def upstream_failed(self, error: UpstreamError) -> None:
        """The upstream connection failed mid-exchange: retry where safe, else report."""
        ep = self.endpoint
        awaiting = self.phase == AWAITING
        self._detach(reusable=False)
        down = self.down
        route = down.route
        assert ep is not None
        down.endpoints.went_wrong(ep, error.reason)
        if (
            awaiting
            and isinstance(error, UpstreamReset)
            and self.replay is not None
            and len(self.tried) < route.settings.retries
            and route.retry_budget.allow()
        ):
            # The connection failed before any response byte, and the request is
            # idempotent and kept whole: send it again on a fresh connection, to another
            # endpoint if there is one, else to the same one (a reused connection may
            # just have been stale; a Service with one ClusterIP has no other).
            route.stats.errors[error.reason] += 1  # (as a connect failure retried past is)
            route.stats.retries += 1
            self.retries += 1
            self.tried = [*self.tried, ep]
            self.buffer = [self.replay] if self.replay else None
            self.buffered = len(self.replay)
            self.phase = CONNECTING
            first = down.endpoints.pick(self.tried)
            if first is None and ep.state != DRAINING:
                first = ep
            if down.bridged:
                down.bridge(self, first)
            else:
                route.spawn(self._connect(first))
            return
        self.fail(error)

    # --- the end --------------------------------------------------------------------

    def fail(self, error: ProxyError) -> None:
        """Answer with sidelink's own error, or, with a response under way, cut it."""
        if isinstance(error, UpstreamError):
            self.down.stats.errors[error.reason] += 1
        self._detach(reusable=False)
        down = self.down
        if self.phase in (STREAMING, TUNNEL):
            # Part of the response is out: the client can only learn of it by a close,
            # and it never got the response whole.
            self.error = error
            self.cut_short = True
            self.end()
            down.close()
            return
        keep_alive = self.keeps_alive() and not self.upgrade
        self._answer_with(error, keep_alive)
        down.finished(self, keep_alive)

    def end(self) -> None:
        """The answer is complete, or cut short: counted once, and logged if asked."""
        if self.phase == DONE:
            return
        self.phase = DONE
        if self.status or self.cut_short:
            down = self.down
            down.stats.count_request(self.method, RESET_CODE if self.cut_short else self.status)
            if down.route.access_log:
                self._log()

    def _answer_with(self, error: ProxyError, keep_alive: bool) -> None:
        """sidelink's own answer, timed, sent and counted."""
        self.error = error
        self._answered(error.status)
        self.down.answer_error(self, error, keep_alive)
        self.end()

    def _answered(self, status: int) -> float:
        """The answer's status is known: timed (returned: perf_counter now)."""
        self.status = status
        now = perf_counter()
        self.down.stats.request_duration.observe(now - self.started)
        return now

    def _log(self) -> None:
        down = self.down
        log_answer(down.route.config.name, down.peer(), self)


class Answered(Protocol):
    """What an access-log line tells of a request: an exchange's, or an HTTP/2 stream's."""

    @property
    def method(self) -> bytes: ...
    @property
    def path(self) -> bytes: ...
    @property
    def status(self) -> int: ...
    @property
    def cut_short(self) -> bool: ...
    @property
    def started(self) -> float: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def endpoint(self) -> Endpoint | None: ...
    @property
    def retries(self) -> int: ...
    @property
    def error(self) -> ProxyError | None: ...


def log_answer(route: str, peer: str, answer: Answered) -> None:
    """One request's access-log line."""
    error = answer.error
    endpoint = answer.endpoint
    fields = {
        "route": route,
        "protocol": "http",
        # (null when it was never read: a request refused before its method or target)
        "method": answer.method.decode(errors="replace") or None,
        "path": answer.path.decode(errors="replace") or None,
        # (The status sent, or null: one cut short says so in error, as the metric's
        # code="reset" does.)
        "status": answer.status or None,
        "duration_seconds": round(perf_counter() - answer.started, 6),
        "bytes_received": answer.bytes_in,
        "bytes_sent": answer.bytes_out,
        "endpoint": endpoint.label if endpoint is not None else None,
        "retries": answer.retries,
        "error": error.reason if error is not None else None,
    }
    log_access(peer, fields)
