"""L7 forwarding: HTTP/1.x on asyncio Protocols, parsed by httptools (llhttp) both ways.

Per downstream connection, requests are parsed as bytes arrive and answered in
order (pipelining). Each request picks an endpoint and takes a pooled upstream
connection or makes one; its head is rewritten (hop-by-hop headers, Host) and its
body streamed as it arrives, never buffered whole. The response comes back the
same way. ``Upgrade`` turns the pair into a byte tunnel. Failures become 502, 503
or 504 with a ``sidelink-error`` header, and a request is retried on another
endpoint only where that is safe (see :meth:`HttpDownstream.upstream_failed`).

This module is on every request's path and is compiled with mypyc where a compiler
is at hand (setup.py): its constants are ``Final`` (compiled code reads them without
a lookup), and calls made on every read are bound once per connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from http import HTTPStatus
from typing import Final, cast

import httptools

from proxy.endpoints import DRAINING, Endpoint
from proxy.errors import (
    NoEndpoints,
    ProtocolError,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.flow import FlowControl
from proxy.pool import Pool
from proxy.route import Route, access_log, peer_name

log = logging.getLogger("sidelink.http")
perf_counter: Final = time.perf_counter  # (Final: compiled code calls it without a lookup)

MAX_HEAD_BYTES: Final = 64 * 1024
# Request bytes kept so an idempotent request can be replayed on a fresh connection.
REPLAY_LIMIT: Final = 64 * 1024
# Request bytes held while no upstream is attached (connecting, or pipelined behind
# another request) before the client is paused.
BUFFER_LIMIT: Final = 256 * 1024
MAX_PIPELINED: Final = 32
# After refusing a request, how long to read and drop what the client still sends.
LINGER_TIMEOUT: Final = 2.0

# Connection tokens that are not header names, or that name the framing: dropping
# that would have the receiver read a body as the next message (smuggling).
CONNECTION_OPTIONS: Final = frozenset((b"keep-alive", b"close", b"upgrade", b"content-length"))
# What the proxy does with a header, by its lowercase name: most pass as they came.
# The kinds up to LENGTH are end-to-end; the others hop-by-hop (RFC 9110 7.6.1).
PASS: Final = 0
HOST: Final = 1
LENGTH: Final = 2
CONNECTION: Final = 3
TRANSFER_ENCODING: Final = 4
UPGRADE: Final = 5
HOP: Final = 6
FIELDS: Final = {
    b"host": HOST,
    b"content-length": LENGTH,
    b"connection": CONNECTION,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"upgrade": UPGRADE,
    b"keep-alive": HOP,
    b"proxy-connection": HOP,
    b"te": HOP,
}
# The usual spellings of the usual names, so that most headers are classified by one
# lookup (lowercasing each name costs more); any other spelling is lowercased.
SPELLINGS: Final = {
    spelling: FIELDS.get(name, PASS)
    for name in (
        *FIELDS,
        *(
            b"accept accept-encoding accept-language accept-ranges age authorization "
            b"cache-control content-encoding content-language content-type cookie date etag "
            b"expires if-modified-since if-none-match last-modified location origin pragma "
            b"referer server set-cookie traceparent tracestate user-agent vary "
            b"x-forwarded-for x-forwarded-proto x-request-id"
        ).split(),
    )
    for spelling in (name, name.title())
}

IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}
CRLF: Final = b"\r\n"
NO_ENDPOINTS: Final[tuple[Endpoint, ...]] = ()
LAST_CHUNK: Final = b"0\r\n"
# How a response body is delimited.
FRAMING_LENGTH: Final = 0
FRAMING_CHUNKED: Final = 1
FRAMING_CLOSE: Final = 2


def field_kind(name: bytes) -> int:
    kind = SPELLINGS.get(name)
    return FIELDS.get(name.lower(), PASS) if kind is None else kind


class ClientError(Exception):
    """A request sidelink refuses: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


class _HeadOnly(Exception):
    """Stops the response parser after the head of a response that has no body."""


def error_response(status: int, reason: str, detail: str, keep_alive: bool) -> bytes:
    body = f"{status} {REASONS.get(status, b'').decode()}: {detail}\n".encode()
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"sidelink-error: %s\r\n" % reason.encode(),
            b"connection: keep-alive\r\n\r\n" if keep_alive else b"connection: close\r\n\r\n",
            body,
        )
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")}


def drop_named(lines: list[bytes], tokens: set[bytes]) -> list[bytes]:
    """Head lines (after the first) less the headers Connection names: they are hop-by-hop
    too (RFC 9110 7.6.1). Never the framing: see CONNECTION_OPTIONS."""
    named = tokens - CONNECTION_OPTIONS
    if not named:
        return lines
    return [lines[0]] + [ln for ln in lines[1:] if ln.split(b":", 1)[0].lower() not in named]


class Exchange:
    """One request and its response: the per-request state."""

    __slots__ = (
        "buffer",
        "buffered",
        "chunked",
        "complete",
        "failed",
        "head",
        "http10",
        "keep_alive",
        "method",
        "path",
        "replay",
        "response_started",
        "reused",
        "sent_at",
        "served_by",
        "started",
        "status",
        "trailers",
        "tried",
        "upgrade",
        "upstream",
    )

    def __init__(self, method: bytes, path: bytes, started: float) -> None:
        self.method = method
        self.path = path
        self.started = started
        self.head = b""
        self.http10 = False
        self.keep_alive = True
        self.chunked = False
        self.upgrade = False
        self.complete = False
        self.failed = False  # answered with an error before the request was fully read
        self.buffer: list[bytes] | None = None  # request bytes not yet written upstream
        self.buffered = 0
        # The body kept to replay an idempotent request (None: it cannot be replayed).
        self.replay: bytes | None = b"" if method in IDEMPOTENT else None
        self.trailers: list[bytes] | None = None
        self.upstream: Upstream | None = None
        self.reused = False
        self.sent_at = 0.0
        self.served_by: Endpoint | None = None  # the last endpoint tried, for the access log
        self.response_started = False
        self.status = 0
        self.tried: Sequence[Endpoint] = NO_ENDPOINTS

    def __repr__(self) -> str:
        path = self.path.decode(errors="replace")
        return f"<Exchange {self.method.decode()} {path} status={self.status}>"


class HttpDownstream(asyncio.Protocol):
    """An accepted client connection: parses requests, answers them in order."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.stats = route.stats
        self.settings = route.settings
        self.endpoints = route.endpoints
        self.access_log = route.access_log
        # The Host line for upstream, unless it is the client's (host: preserve).
        self.host_line = None if route.http_host is None else b"host: %s\r\n" % route.http_host
        self.loop = asyncio.get_running_loop()
        self.clock = self.loop.time  # (bound once: called for every read)
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.feed = self.parser.feed_data
        # The request being parsed, the one being proxied, and those waiting behind it.
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.url = b""
        self.headers: list[bytes] = []  # name, value, name, value...
        self.head_raw = 0
        self.read_size = 0
        self.head_started = 0.0
        self.in_head = False
        self.last_active = 0.0
        self.write_paused = False
        self.tunnel: bytes | None = None  # after an Upgrade request: raw bytes for upstream
        self.rejected: ClientError | None = None
        self.linger_until = float("inf")
        self.close_after_response = False
        self.closed = False

    def __repr__(self) -> str:
        return (
            f"<HttpDownstream {self.route.config.name} {peer_name(self.transport)} "
            f"active={self.active} "
            f"queued={len(self.queue)}>"
        )

    @property
    def last_response(self) -> bool:
        """The connection closes after this response: asked to, and nothing queued behind.

        (Requests pipelined before a client's half-close are still answered.)
        """
        return self.close_after_response and not self.queue

    # --- asyncio callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.flow = FlowControl(self.transport)
        self.last_active = self.loop.time()
        self.stats.opened_downstream += 1
        self.stats.active_downstream += 1
        self.route.connections.add(self)
        self.route.ensure_ticker()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.clock()
        if self.tunnel is not None:
            self._tunnel_data(data)
            return
        if self.rejected is not None:
            return  # a request was refused: the rest of the stream is meaningless
        was_in_head = self.in_head
        self.read_size = len(data)
        try:
            self.feed(data)
        except httptools.HttpParserUpgrade as e:
            self.tunnel = b""
            self._tunnel_data(data[e.args[0] :])
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, ClientError):
                self._reject(cause)
            else:
                log.error(
                    "route %s: internal error on a request", self.route.config.name, exc_info=cause
                )
                self._reject(ClientError(500, "internal", "internal error"))
        except httptools.HttpParserError as e:
            self._reject(ClientError(400, "bad_request", f"malformed request: {e}"))
        else:
            if self.in_head and was_in_head:
                # httptools holds a partial head internally: bound it by the bytes received
                # since the head began (from the read after the one it began in).
                self.head_raw += len(data)
                if self.head_raw > MAX_HEAD_BYTES:
                    self._reject(ClientError(431, "head_too_large", "request head over 64 KiB"))

    def eof_received(self) -> bool:
        # A client that half-closes after its request still gets the response.
        if self.active is None and not self.queue:
            return False
        self.close_after_response = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stats.active_downstream -= 1
        self.route.connections.discard(self)
        ex = self.active
        if ex is not None:
            # The client left mid-exchange: the upstream connection's state is unknown.
            self._detach(ex, reusable=False)
        self.active = None
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.active
        if ex is not None and ex.upstream is not None and ex.upstream.flow is not None:
            ex.upstream.flow.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.active
        if ex is not None and ex.upstream is not None and ex.upstream.flow is not None:
            ex.upstream.flow.resume_reading()

    # --- httptools callbacks (request parser) -------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_started = self.last_active
        self.url = b""
        self.headers.clear()
        self.head_raw = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.parsing is not None:  # after the head: a trailer of a chunked body
            trailers = self.parsing.trailers
            if trailers is None:
                trailers = self.parsing.trailers = []
            trailers.append(b"%s: %s\r\n" % (name, value))
            return
        headers = self.headers
        headers.append(name)
        headers.append(value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        # The head is at most what came since it began; measure it only when that is big.
        if self.head_raw + self.read_size > MAX_HEAD_BYTES:
            size = len(self.url) + sum(len(h) + 2 for h in self.headers)
            if size > MAX_HEAD_BYTES:
                raise ClientError(431, "head_too_large", "request head over 64 KiB")
        parser = self.parser
        method = parser.get_method()
        ex = Exchange(method, self.url, perf_counter())
        if method == b"CONNECT":
            raise ClientError(405, "method_not_allowed", "CONNECT is not allowed")
        ex.keep_alive = parser.should_keep_alive()
        ex.head = self._request_head(ex)
        self.parsing = ex
        if self.active is None:
            self._dispatch(ex)
        else:
            self.queue.append(ex)
            if len(self.queue) >= MAX_PIPELINED and self.flow is not None:
                self.flow.pause_reading()

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        self._send(ex, chunk(body) if ex.chunked else body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        self.parsing = None
        ex.complete = True
        if ex.upstream is not None:
            # request_timeout counts from the end of the request (the read that brought
            # it): a slow upload is the client's time, guarded by idle_timeout.
            ex.sent_at = self.last_active
        if ex.failed:
            self._finish(ex, ex.keep_alive and not self.last_response)
        elif ex.chunked:
            self._send(ex, LAST_CHUNK + b"".join(ex.trailers or ()) + CRLF)

    # --- requests -------------------------------------------------------------------

    def _request_head(self, ex: Exchange) -> bytes:
        """The head sent upstream: origin-form target, hop-by-hop headers removed, Host set."""
        target = ex.path
        if not target.startswith(b"/") and target != b"*":
            target = self._origin_form(target)
        tokens: set[bytes] | None = None
        upgrade: bytes | None = None
        host: bytes | None = None
        content_length = None
        lines = [b"%s %s HTTP/1.1\r\n" % (ex.method, target)]
        headers = self.headers
        for i in range(0, len(headers), 2):
            name = headers[i]
            value = headers[i + 1]
            kind = field_kind(name)
            if kind == PASS:
                lines.append(b"%s: %s\r\n" % (name, value))
            elif kind == HOST:
                if host is not None:
                    raise ClientError(400, "bad_request", "more than one Host header")
                host = value
            elif kind == LENGTH:
                if content_length is not None and content_length != value:
                    raise ClientError(400, "bad_request", "conflicting Content-Length headers")
                content_length = value
                lines.append(b"%s: %s\r\n" % (name, value))
            elif kind == CONNECTION:
                tokens = connection_tokens(value) | (tokens or set())
            elif kind == TRANSFER_ENCODING:
                ex.chunked = True
            elif kind == UPGRADE:
                upgrade = value
        if not ex.keep_alive or (tokens and b"keep-alive" in tokens):
            # Not surely HTTP/1.1 (llhttp takes 0.9, 1.0, 1.1 and 2.0, and only 1.1 keeps
            # the connection without being asked to): ask for the version (it is slow).
            version = self.parser.get_http_version()
            if version not in ("1.1", "1.0"):
                raise ClientError(505, "version_not_supported", f"HTTP/{version} is not supported")
            ex.http10 = version == "1.0"
        if tokens:
            lines = drop_named(lines, tokens)
        host_line = self.host_line
        if host_line is None:
            host_line = b"host: %s\r\n" % (host or self.route.default_host)
        lines.append(host_line)
        if ex.chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        if upgrade is not None and self.parser.should_upgrade():
            ex.upgrade = True
            lines.append(b"connection: upgrade\r\nupgrade: %s\r\n" % upgrade)
        lines.append(CRLF)
        return b"".join(lines)

    def _origin_form(self, target: bytes) -> bytes:
        """Absolute-form is served only for the route's own service: never an open proxy."""
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise ClientError(400, "bad_request", "invalid request target") from None
        host = (url.host or b"").decode(errors="replace").lower().rstrip(".")
        if host not in self.route.own_hosts():
            raise ClientError(400, "forbidden_host", f"{host} is not this route's service")
        path: bytes | None = url.path  # (typed: compiled code checks what it is given)
        query: bytes | None = url.query
        if not path:
            path = b"/"
        return path + b"?" + query if query else path

    def _send(self, ex: Exchange, data: bytes) -> None:
        """Request bytes for upstream: written now, or held until a connection is attached."""
        if ex.failed:
            return
        replay = ex.replay
        if replay is not None:
            ex.replay = replay + data if len(replay) + len(data) <= REPLAY_LIMIT else None
        upstream = ex.upstream
        if upstream is not None and ex is self.active and upstream.transport is not None:
            upstream.transport.write(data)
            self.stats.bytes_to_upstream += len(data)
            return
        if ex.buffer is None:
            ex.buffer = []
        ex.buffer.append(data)
        ex.buffered += len(data)
        if ex.buffered > BUFFER_LIMIT and self.flow is not None:
            self.flow.pause_reading()

    def _dispatch(self, ex: Exchange) -> None:
        """Send ex upstream: a pooled connection at once, else connect in a task."""
        self.active = ex
        route = self.route
        ep = self.endpoints.pick(ex.tried)
        if ep is not None:
            now = self.last_active  # (of the read that brought ex, or of its turn)
            conn = (ep.pool or route.pool(ep)).get(now)
            if conn is not None:
                ep.in_flight += 1
                ex.reused = True
                self._attach(ex, ep, conn, now)
                return
        elif route.watch.resolved:
            self._fail(ex, NoEndpoints(f"{route.config.service} has no endpoints"))
            return
        route.spawn(self._connect(ex, ep))

    async def _connect(self, ex: Exchange, first: Endpoint | None) -> None:
        route = self.route
        tried = ex.tried = list(ex.tried)  # route.connect adds the endpoints that fail
        try:
            ep, _, conn = await route.connect(lambda: Upstream(route), exclude=tried, first=first)
        except UpstreamError as e:
            if ex is self.active and not self.closed:
                self._fail(ex, e, counted=True)
            return
        conn.endpoint = ep
        conn.pool = route.pool(ep)
        conn.pool.opened()
        if ex is not self.active or self.closed:
            self.endpoints.release(ep)
            conn.pool.put(conn, self.loop.time(), reusable=True)
            return
        ex.reused = False
        self._attach(ex, ep, conn, self.loop.time())

    def _attach(self, ex: Exchange, ep: Endpoint, conn: Upstream, now: float) -> None:
        ex.served_by = ep
        ex.upstream = conn
        conn.exchange = ex
        conn.downstream = self
        conn.head_bytes = 0
        assert conn.transport is not None
        buffer = ex.buffer
        if buffer:
            data = b"".join((ex.head, *buffer))
            ex.buffer = None
            ex.buffered = 0
        else:
            data = ex.head
        conn.transport.write(data)
        self.stats.bytes_to_upstream += len(data)
        ex.sent_at = now
        if self.write_paused and conn.flow is not None:
            conn.flow.pause_reading()
        self._maybe_resume()

    def _detach(self, ex: Exchange, reusable: bool) -> None:
        """Give ex's upstream connection back (or close it) and release its endpoint."""
        conn = ex.upstream
        if conn is None:
            return
        ex.upstream = None
        conn.exchange = None
        conn.downstream = None
        flow = conn.flow
        if flow is not None and flow.read_paused:
            flow.resume_reading()  # an idle connection must notice a server close
        ep = conn.endpoint
        pool = conn.pool
        if pool is not None and ep is not None:
            # (last_active: the time of the read that completed the exchange, if any)
            pool.put(conn, self.last_active, reusable and ep.state != DRAINING)
        else:
            conn.close()
        if ep is not None:
            self.endpoints.release(ep)

    def _finish(self, ex: Exchange, keep_alive: bool) -> None:
        """ex is answered: start the next pipelined request, or close, or wait for one."""
        self.active = None
        if self.access_log:
            self._log(ex)
        if not keep_alive or self.last_response:
            self.close()
            return
        if self.queue:
            self._dispatch(self.queue.popleft())
        elif self.rejected is not None:
            self._send_rejection(self.rejected)
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        flow = self.flow
        if flow is None or not flow.read_paused or self.closed or self.rejected is not None:
            return
        ex = self.parsing
        if len(self.queue) < MAX_PIPELINED and (ex is None or ex.buffered <= BUFFER_LIMIT):
            upstream = self.active.upstream if self.active is not None else None
            if upstream is None or not upstream.write_paused:
                flow.resume_reading()

    # --- responses (called by Upstream) ----------------------------------------------

    def count_response(self, ex: Exchange) -> None:
        """ex's answer (the upstream's or ours, with ex.status) starts going to the client."""
        ex.response_started = True
        self.stats.request_duration.observe(perf_counter() - ex.started)
        self.stats.count_request(ex.method, ex.status)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.stats.bytes_to_downstream += len(data)

    def response_complete(self, ex: Exchange, reusable: bool, keep_alive: bool) -> None:
        self._detach(ex, reusable and ex.complete)
        self._finish(ex, keep_alive and ex.complete)

    def switch_to_tunnel(self, ex: Exchange) -> None:
        """101 Switching Protocols: from now on both connections are one byte pipe."""
        pending, self.tunnel = self.tunnel or b"", b""
        conn = ex.upstream
        if pending and conn is not None and conn.transport is not None:
            conn.transport.write(pending)
            self.stats.bytes_to_upstream += len(pending)
        if self.flow is not None:
            self.flow.resume_reading()

    def _tunnel_data(self, data: bytes) -> None:
        ex = self.active
        conn = ex.upstream if ex is not None else None
        if conn is not None and conn.tunnel and conn.transport is not None:
            conn.transport.write(data)
            self.stats.bytes_to_upstream += len(data)
        elif data:
            # Bytes after an Upgrade request, before the 101: hold them (bounded).
            assert self.tunnel is not None
            self.tunnel += data
            if len(self.tunnel) > BUFFER_LIMIT and self.flow is not None:
                self.flow.pause_reading()

    def upstream_failed(self, ex: Exchange, error: UpstreamError) -> None:
        """The upstream connection failed mid-exchange: retry where safe, else report."""
        conn = ex.upstream
        self._detach(ex, reusable=False)
        if (
            not ex.response_started
            and ex.reused
            and isinstance(error, UpstreamReset)
            and ex.replay is not None
            and ex.complete
            and len(ex.tried) < self.settings.retries
            and ex is self.active
        ):
            # A reused connection the server had already closed: nothing reached the
            # application, and the request is idempotent and kept whole: send it again
            # on a fresh connection: to another endpoint if there is one, else to the
            # same one (the stale connection failed, not the endpoint: a Service with
            # one ClusterIP has no other).
            assert conn is not None and conn.endpoint is not None
            self.stats.retries += 1
            ep = conn.endpoint
            ex.tried = [*ex.tried, ep]
            ex.buffer = [ex.replay] if ex.replay else None
            ex.buffered = len(ex.replay)
            first = self.endpoints.pick(ex.tried)
            if first is None and ep.state != DRAINING:
                first = ep
            self.route.spawn(self._connect(ex, first))
            return
        self._fail(ex, error)

    def _fail(self, ex: Exchange, error: UpstreamError, counted: bool = False) -> None:
        if not counted:
            self.stats.errors[error.reason] += 1
        self._detach(ex, reusable=False)
        if ex.response_started:
            # Part of the response is out: the client can only learn of it by a close.
            self.close()
            return
        ex.status = error.status
        self.count_response(ex)
        keep_alive = ex.keep_alive and not self.last_response and not ex.upgrade
        self.write(error_response(error.status, error.reason, error.detail, keep_alive))
        if ex.complete:
            self._finish(ex, keep_alive)
        else:
            # Read and drop the rest of the request body; then the connection is reusable.
            ex.failed = True

    def _reject(self, error: ClientError) -> None:
        """Refuse a malformed or forbidden request: answer in turn, then close."""
        self.rejected = error
        if self.flow is not None:
            self.flow.pause_reading()
        ex = self.parsing
        if ex is not None:
            # Its body broke off: the request can never be forwarded whole, so it goes no
            # further, and an upstream connection holding part of it is not reused.
            self.parsing = None
            if ex is self.active:
                self._detach(ex, reusable=False)
                self.active = None
                if ex.response_started or ex.failed:
                    self.close()  # the client already has (part of) an answer to it
                    return
            elif ex in self.queue:
                self.queue.remove(ex)
        if self.active is None:
            self._send_rejection(error)

    def _send_rejection(self, error: ClientError) -> None:
        try:
            method = self.parser.get_method()
        except httptools.HttpParserError:
            method = b"OTHER"
        self.stats.count_request(method, error.status)
        self.write(error_response(error.status, error.reason, error.detail, keep_alive=False))
        transport = self.transport
        if transport is None or not transport.can_write_eof():
            self.close()
            return
        # Lingering close: send our FIN after the answer, then read and drop whatever the
        # client still sends, so a close with unread bytes (a reset) does not destroy
        # the answer before the client has read it.
        transport.write_eof()
        self.linger_until = self.loop.time() + LINGER_TIMEOUT
        if self.flow is not None:
            self.flow.resume_reading()

    # --- lifecycle --------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Timeouts, checked by the route's ticker rather than a timer per request."""
        ex = self.active
        settings = self.settings
        if ex is None:
            if self.rejected is not None:
                # Refused and lingering (never refused twice): closed when the client
                # hangs up, or at the end of the linger time.
                if now > self.linger_until:
                    self.close()
            elif self.in_head and now - self.head_started > settings.head_timeout:
                self._reject(ClientError(408, "head_timeout", "request head too slow"))
            elif not self.in_head and now - self.last_active > settings.idle_timeout:
                self.close()
            return
        if (
            ex.sent_at
            and ex.complete
            and not ex.response_started
            and not ex.failed  # already answered (504 or other) while its body still comes
            and now - ex.sent_at > settings.request_timeout
        ):
            self._fail(ex, UpstreamTimeout("upstream did not answer in time"))
        elif now - self.last_active > settings.idle_timeout:
            if ex is self.parsing and not ex.response_started:
                # The client stopped halfway through its request body.
                self._reject(ClientError(408, "idle_timeout", "request body stalled"))
            else:
                self.close()

    def shutdown(self) -> None:
        if self.active is None and not self.queue and not self.in_head:
            self.close()
        else:
            self.close_after_response = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            if self.transport.is_closing():
                # Closed before and still not gone: the client has not taken what was
                # left to flush for a whole timeout. Drop it rather than hold it for ever.
                self.transport.abort()
            else:
                self.transport.close()

    def _log(self, ex: Exchange) -> None:
        ep = ex.served_by
        access_log.info(
            "http route=%s peer=%s %s %s status=%d upstream=%s duration_ms=%.3f",
            self.route.config.name,
            peer_name(self.transport),
            ex.method.decode(errors="replace"),
            ex.path.decode(errors="replace"),
            ex.status,
            f"{ep.host}:{ep.port}" if ep else "-",
            (perf_counter() - ex.started) * 1000,
        )


class Upstream(asyncio.Protocol):
    """A (pooled) connection to one endpoint; parses the responses coming back."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.stats = route.stats
        self.loop = asyncio.get_running_loop()
        self.clock = self.loop.time
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.feed = self.parser.feed_data
        self.endpoint: Endpoint | None = None
        self.pool: Pool[Upstream] | None = None
        self.exchange: Exchange | None = None
        self.downstream: HttpDownstream | None = None
        self.created = self.loop.time()
        self.idle_since = self.created
        self.closed = False  # closed or closing: never handed out again
        self.headers: list[bytes] = []  # name, value, name, value...
        self.out: list[bytes] = []
        self.head_bytes = 0  # received while waiting for a response head
        self.rechunk = False  # frame the body as chunked for the client
        self.until_close = False  # the body ends when the server closes
        self.interim = False
        self.keep_alive_down = True
        self.write_paused = False
        self.tunnel = False

    def __repr__(self) -> str:
        return f"<Upstream {self.endpoint} exchange={self.exchange}>"

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # --- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.flow = FlowControl(self.transport)
        self.stats.active_upstream += 1

    def data_received(self, data: bytes) -> None:
        down = self.downstream
        ex = self.exchange
        if down is None or ex is None:
            # Bytes on an idle connection: the server broke the protocol; drop it.
            if self.pool is not None:
                self.pool.discard(self)
            self.close()
            return
        down.last_active = self.clock()
        if self.tunnel:
            down.write(data)
            return
        out = self.out
        try:
            self.feed(data)
        except httptools.HttpParserUpgrade as e:
            self._flush(down)
            if self.tunnel:
                rest = data[e.args[0] :]
                if rest:
                    down.write(rest)
            return
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _HeadOnly):
                self._flush(down)
                end = data.find(b"\r\n\r\n")
                clean = end != -1 and end + 4 == len(data)
                self.parser = httptools.HttpResponseParser(self)
                self.feed = self.parser.feed_data
                down.response_complete(ex, reusable=clean, keep_alive=self.keep_alive_down)
                return
            self._protocol_error(down, ex, str(e.__context__ or e))
            return
        except httptools.HttpParserError as e:
            self._protocol_error(down, ex, f"invalid response: {e}")
            return
        if out:
            self._flush(down)
        if not ex.response_started:
            # Still no (final) head: bound what httptools holds of it, as for requests.
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._protocol_error(down, ex, "response head over 64 KiB")

    def eof_received(self) -> bool:
        self.closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stats.active_upstream -= 1
        ex = self.exchange
        down = self.downstream
        if ex is None or down is None:
            if self.pool is not None:
                self.pool.discard(self)
            return
        if self.tunnel:
            down.close()
            return
        if ex.response_started and self.until_close:
            # The body was delimited by the close: this is its normal end.
            if self.rechunk:
                self.out.append(LAST_CHUNK + CRLF)
            self._flush(down)
            down.response_complete(ex, reusable=False, keep_alive=self.keep_alive_down)
            return
        detail = "upstream closed the connection" + (f": {exc}" if exc else "")
        down.upstream_failed(ex, UpstreamReset(detail))

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.downstream is not None and self.downstream.flow is not None:
            self.downstream.flow.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.downstream is not None:
            self.downstream._maybe_resume()

    # --- httptools callbacks (response parser) -------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        # Before the head completes these are headers; after it, trailers. (The list is
        # emptied after each head and each message.)
        headers = self.headers
        headers.append(name)
        headers.append(value)

    def on_headers_complete(self) -> None:
        ex = self.exchange
        down = self.downstream
        assert ex is not None and down is not None
        status = self.parser.get_status_code()
        ex.status = status
        lines, framing = self._head_lines(status)
        self.headers.clear()  # what on_header collects from now on are trailers
        if 100 <= status < 200 and status != 101:
            self.interim = True
            if not ex.http10:  # HTTP/1.0 clients do not know interim responses
                lines.append(CRLF)
                self.out.append(b"".join(lines))
            return
        keep_alive = ex.keep_alive and not down.last_response
        self.rechunk = self.until_close = False
        if framing != FRAMING_LENGTH and not (
            ex.method == b"HEAD" or status in (204, 304) or status == 101
        ):
            # Chunked or delimited by the close: re-frame as chunked for HTTP/1.1 clients;
            # 1.0 clients read to the close.
            self.until_close = framing == FRAMING_CLOSE
            self.rechunk = not ex.http10
            if self.rechunk:
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                keep_alive = False
        if status == 101:
            keep_alive = self.tunnel = True
        elif ex.upgrade:
            keep_alive = False  # the client's stream is raw bytes after an Upgrade request
        self.keep_alive_down = keep_alive
        if not keep_alive:
            lines.append(b"connection: close\r\n\r\n")
        elif ex.http10:
            lines.append(b"connection: keep-alive\r\n\r\n")
        else:
            lines.append(CRLF)
        self.out.append(b"".join(lines))
        down.count_response(ex)
        if status == 101:
            down.switch_to_tunnel(ex)
        elif ex.method == b"HEAD":
            raise _HeadOnly

    def on_body(self, body: bytes) -> None:
        self.out.append(chunk(body) if self.rechunk else body)

    def on_message_complete(self) -> None:
        ex = self.exchange
        down = self.downstream
        assert ex is not None and down is not None
        if self.interim:
            self.interim = False
            return
        if self.tunnel:
            # llhttp completes a 101 before it stops at the upgrade: the exchange goes on
            # as a tunnel, it is not done (nor its connection reusable).
            return
        if self.rechunk:
            h = self.headers
            trailers = b"".join(
                b"%s: %s\r\n" % (h[i], h[i + 1])
                for i in range(0, len(h), 2)
                if field_kind(h[i]) <= LENGTH
            )
            self.out.append(LAST_CHUNK + trailers + CRLF)
        self._flush(down)
        reusable = self.parser.should_keep_alive() and not self.until_close
        self.headers.clear()
        down.response_complete(ex, reusable=reusable, keep_alive=self.keep_alive_down)

    # --- helpers ------------------------------------------------------------------------------

    def _head_lines(self, status: int) -> tuple[list[bytes], int]:
        """The response head for the client, less its last line, and how the body is framed.

        One pass over the headers: hop-by-hop ones are dropped (the framing is redone
        for the client), end-to-end ones kept as they came.
        """
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Unknown"))]
        framing = FRAMING_CLOSE
        tokens: set[bytes] | None = None
        headers = self.headers
        for i in range(0, len(headers), 2):
            name = headers[i]
            value = headers[i + 1]
            kind = field_kind(name)
            if kind <= LENGTH:
                if kind == LENGTH:
                    framing = FRAMING_LENGTH
                lines.append(b"%s: %s\r\n" % (name, value))
            elif kind == TRANSFER_ENCODING:
                if b"chunked" in value.lower() and framing == FRAMING_CLOSE:
                    framing = FRAMING_CHUNKED
            elif status == 101 and kind in (UPGRADE, CONNECTION):
                lines.append(b"%s: %s\r\n" % (name, value))
            elif kind == CONNECTION and value.lower() not in (b"keep-alive", b"close"):
                tokens = connection_tokens(value) | (tokens or set())
        if tokens:
            lines = drop_named(lines, tokens)
        return lines, framing

    def _flush(self, down: HttpDownstream) -> None:
        out = self.out
        if out:
            down.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _protocol_error(self, down: HttpDownstream, ex: Exchange, detail: str) -> None:
        self.out.clear()
        self.close()
        down.upstream_failed(ex, ProtocolError(detail))
