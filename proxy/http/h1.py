"""HTTP/1.x on asyncio Protocols, parsed by httptools (llhttp) both ways.

:class:`H1Downstream` is an accepted client connection: requests are parsed as bytes
arrive and answered in order (pipelining), each one an
:class:`~proxy.http.exchange.Exchange` that finds itself an upstream connection.
:class:`H1Upstream` is a pooled connection to one endpoint: it sends what its
exchange gives it and parses the response back. Heads are rewritten by the rules of
``heads.py``; bodies stream as they arrive, never buffered whole. ``Upgrade`` turns
the pair into a byte tunnel.

On every request's path and compiled with mypyc where a compiler is at hand
(setup.py): calls made on every read are bound once per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Final, cast

import httptools

from proxy.endpoints import Endpoint
from proxy.errors import (
    BadRequest,
    BodyStalled,
    ClientError,
    HeadTimeout,
    HeadTooLarge,
    InternalError,
    MethodNotAllowed,
    ProtocolError,
    ProxyError,
    UpstreamReset,
    VersionNotSupported,
)
from proxy.flow import BUFFER, PIPELINE, REFUSED, FlowControl
from proxy.http import h2, heads
from proxy.http.exchange import (
    BUFFER_LIMIT,
    CLIENT_EOF,
    DONE,
    SERVER_EOF,
    STREAMING,
    TUNNEL,
    Downstream,
    Exchange,
    Upstream,
    perf_counter,
)
from proxy.http.heads import (
    CRLF,
    FRAMING_CLOSE,
    FRAMING_LENGTH,
    LAST_CHUNK,
    MAX_HEAD_BYTES,
    MEASURE_ABOVE,
    NO_METHOD,
)
from proxy.pool import Pool
from proxy.route import Route, peer_name

log = logging.getLogger("sidelink.http")

MAX_PIPELINED: Final = 32
# The raw bytes an unfinished head may take before it is cut, whitespace and all: the
# limit itself is on the head's plain size (heads.head_size), measured once it is whole.
RAW_HEAD_LIMIT: Final = 2 * MAX_HEAD_BYTES
# After refusing a request, how long to read and drop what the client still sends.
LINGER_TIMEOUT: Final = 2.0
# What a lost connection holds instead of its parsers: they call back the protocol, so
# keeping them would leave every connection a cycle for the garbage collector to find.
CLOSED_REQUESTS: Final = httptools.HttpRequestParser(object())
CLOSED_RESPONSES: Final = httptools.HttpResponseParser(object())


def downstream_factory(route: Route) -> Callable[[], H1Downstream]:
    """The listener's protocol factory: the route's Host rule is worked out once."""
    config = route.config
    hosts = heads.HostRule(config.service, config.port, config.settings.host)
    return lambda: H1Downstream(route, hosts)


class _HeadOnly(Exception):
    """Stops the response parser after the head of a response that has no body."""


class H1Downstream(Downstream):
    """An accepted client connection: parses requests, answers them in order."""

    def __init__(self, route: Route, hosts: heads.HostRule) -> None:
        self.route = route
        self.stats = route.stats
        self.endpoints = route.endpoints
        self.settings = route.settings
        self.hosts = hosts
        self.clock = route.clock  # (the loop's, bound once: called for every read)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.feed = self.parser.feed_data
        # The request being parsed, the one being proxied, and those waiting behind it.
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.url = b""
        self.headers: list[bytes] = []  # name, value, name, value...
        # The head being read: the size of the read it began in, and the bytes since.
        self.head_first = 0
        self.head_rest = 0
        self.read_size = 0
        self.head_started = 0.0
        self.in_head = False
        self.last_active = 0.0
        # An Upgrade request read, and then the one whose head llhttp stopped at: the raw
        # bytes that follow are its body (upgrade_body bytes of it), then the new protocol,
        # held until a 101 (so that nothing unparsed reaches an upstream that declines).
        self.upgrade_next: Exchange | None = None
        self.upgrading: Exchange | None = None
        self.upgrade_body = 0
        self.held: list[bytes] = []
        self.held_size = 0
        self.rejected: ClientError | None = None
        self.rejected_method = NO_METHOD
        self.valid_host = b""  # the last Host value found valid: spared the check next time
        self.bridged = route.settings.upstream_protocol == "http2"
        self.lingering = False  # answered, and closing: see _linger
        self.linger_until = float("inf")
        self.close_after_response = False
        self.fresh = True  # no byte yet: head_timeout runs from the accept
        self.preface = b""  # the first bytes, while too few to tell HTTP/2's preface
        self.closed = False
        self.cut = False  # sidelink ends the connection: what is unanswered is connection_cut
        self.shed = False  # closed at once: the process was at its fd limit

    def __repr__(self) -> str:
        return (
            f"<H1Downstream {self.route.config.name} {self.peer()} "
            f"active={self.active} queued={len(self.queue)}>"
        )

    @property
    def last_response(self) -> bool:
        """The connection closes after this response: asked to, and nothing queued behind.

        (Requests pipelined before a client's half-close are still answered.)
        """
        return (self.close_after_response or self.route.draining) and not self.queue

    def peer(self) -> str:
        return peer_name(self.transport)

    # --- asyncio callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if not self.route.admit(self.transport):
            self.closed = self.shed = True
            return
        self.flow = FlowControl(self.transport)
        self.last_active = self.head_started = self.clock()
        self.stats.opened_downstream += 1
        self.stats.active_downstream += 1
        self.route.connections.add(self)
        self.route.ensure_ticker()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.clock()
        if self.fresh and data[:1] == b"P":  # (the first bytes: HTTP/2's preface?)
            data = self.preface + data
            is_h2 = h2.sniff(data)
            if is_h2 is None:
                self.preface = data  # too few bytes yet to say
                return
            self.preface = b""
            if is_h2:
                self._switch_to_h2(data)
                return
        if self.upgrading is not None:
            self._tunnel_data(data)
            return
        if self.rejected is not None or self.lingering:
            return  # refused, or answered early: the rest of the stream is meaningless
        self.read_size = len(data)
        if self.in_head:
            self.head_rest += len(data)
        try:
            self.feed(data)
        except httptools.HttpParserUpgrade as e:
            # The request just read asked for an Upgrade: llhttp stops at its head.
            self.upgrading = self.upgrade_next
            self._tunnel_data(data[e.args[0] :])
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, ClientError):
                self._reject(cause)
            else:
                log.error(
                    "route %s: internal error on a request", self.route.config.name, exc_info=cause
                )
                self._reject(InternalError("internal error"))
        except httptools.HttpParserError as e:
            if str(e) == "Invalid HTTP version":  # HTTP/1.2, 3.0...: as for 0.9 and 2.0
                self._reject(VersionNotSupported("only HTTP/1.0 and 1.1 are supported"))
            else:
                self._reject(BadRequest(f"malformed request: {e}"))
        else:
            # httptools holds a partial head internally: bound what came after the read
            # it began in (a head within the limit never gets there, however it is cut).
            if self.in_head and self.head_rest > RAW_HEAD_LIMIT:
                self._reject(HeadTooLarge("request head over 64 KiB"))

    def _switch_to_h2(self, data: bytes) -> None:
        """The connection speaks HTTP/2: the transport goes to an H2Downstream."""
        transport = self.transport
        assert transport is not None
        self.route.connections.discard(self)
        self.closed = True
        # (The parser calls back this protocol: dropped, so that the pair is not a cycle
        # left for the garbage collector, as on connection_lost.)
        self.parser = CLOSED_REQUESTS
        self.feed = CLOSED_REQUESTS.feed_data
        down = h2.H2Downstream(self.route, self.hosts)
        transport.set_protocol(down)
        down.adopt(transport, data)

    def eof_received(self) -> bool:
        tunnel = self.upgrading
        if tunnel is not None and tunnel.phase == TUNNEL:
            return tunnel.tunnel_eof(CLIENT_EOF)
        if self.active is None and not self.queue:
            return False
        ex = self.parsing
        if ex is not None:
            # Half-closed in the middle of a request body: it can never be whole.
            if ex is self.active:
                # Free both sides now (the upstream's copy of it is cut), not at idle_timeout.
                ex.client_gone(cut=False)  # (the client's doing, though sidelink closes)
                self.close()
                return False
            self.parsing = None  # pipelined behind others: those are still answered
            self.queue.remove(ex)
        # A client that half-closes after its requests still gets the responses (a head it
        # left unfinished is dropped).
        self.close_after_response = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.shed:
            return
        self.route.fds.closed()
        self.closed = True
        self.stats.active_downstream -= 1
        self.route.connections.discard(self)
        ex = self.active
        if ex is not None:
            self.active = None
            ex.client_gone(self.cut)
        for queued in self.queue:  # (pipelined behind it, never answered)
            queued.client_gone(self.cut)
        self.queue.clear()
        self.parser = CLOSED_REQUESTS
        self.feed = CLOSED_REQUESTS.feed_data

    # --- httptools callbacks (request parser) -------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.fresh = False
        self.head_started = self.last_active
        self.url = b""
        self.headers.clear()
        self.head_first = self.read_size
        self.head_rest = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        parsing = self.parsing
        if parsing is not None:  # after the head: a trailer of a chunked body
            if heads.trailer_field(name):
                trailers = parsing.trailers
                if trailers is None:
                    trailers = parsing.trailers = []
                trailers.append(b"%s: %s\r\n" % (name, value))
            return
        headers = self.headers
        headers.append(name)
        headers.append(value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        method = parser.get_method()
        url = self.url
        headers = self.headers
        # Measured only when it may be over: the reads it came in are at least that big.
        if (
            self.head_first + self.head_rest > MEASURE_ABOVE
            and heads.head_size(method, url, headers) > MAX_HEAD_BYTES
        ):
            raise HeadTooLarge("request head over 64 KiB")
        if method == b"CONNECT":
            raise MethodNotAllowed("CONNECT is not allowed")
        ex = Exchange(self, method, url, perf_counter())
        ex.keep_alive = parser.should_keep_alive()
        target = url
        authority: bytes | None = None
        if not target.startswith(b"/") and target != b"*":
            answered = self.route.watch.answered_name
            own = heads.own_hosts(self.route.config.service, answered)
            target, authority = heads.origin_form(target, own)
        head = heads.scan_request(method, target, headers, self.valid_host)
        if head.host is None and parser.get_http_version() == "1.1":
            raise BadRequest("HTTP/1.1 request without Host")  # RFC 9112 3.2
        if heads.version_unsure(ex.keep_alive, head.tokens):
            version = parser.get_http_version()  # (slow: asked only when it may matter)
            if version not in ("1.1", "1.0"):
                raise VersionNotSupported(f"HTTP/{version} is not supported")
            ex.http10 = version == "1.0"
        ex.chunked = head.chunked
        if ex.http10 and ex.chunked:
            ex.keep_alive = False  # RFC 9112 6.1: its framing cannot be trusted after it
        ex.upgrade = head.upgrade is not None and parser.should_upgrade()
        if ex.upgrade:
            if ex.chunked:
                raise BadRequest("an Upgrade request with a chunked body")
            self.upgrade_next = ex
            self.upgrade_body = int(head.content_length or 0)
        hosts = self.hosts
        if head.host is not None:
            self.valid_host = head.host
        # (An absolute-form target's authority replaces the client's Host: RFC 9112 3.2.2.)
        host = heads.host_line(hosts.fixed, authority or head.host, hosts.default)
        ex.head = heads.request_bytes(head, host, ex.upgrade)
        if not ex.chunked and not ex.upgrade and int(head.content_length or 0) == 0:
            ex.complete = True  # (no body: whole already, for an answer made at once)
        self.parsing = ex
        if self.active is None:
            self.active = ex
            ex.start()
        else:
            self.queue.append(ex)
            if len(self.queue) >= MAX_PIPELINED:
                self.flow.pause(PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.send(heads.chunk(body) if ex.chunked else body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        self.parsing = None
        if ex.chunked:
            ex.send(LAST_CHUNK + b"".join(ex.trailers or ()) + CRLF)
        ex.request_complete()

    # --- what an exchange calls -------------------------------------------------------

    def new_upstream(self) -> H1Upstream:
        return H1Upstream(self.route)

    def bridge(self, ex: Exchange, ep: Endpoint | None) -> None:
        h2.H2Bridge(ex).start(ep)

    def touch(self, now: float) -> None:
        """The upstream side moved: the connection is not idle."""
        self.last_active = now

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.stats.bytes_to_downstream += len(data)

    def answer_error(self, ex: Exchange, error: ProxyError, keep_alive: bool) -> None:
        ex.deliver(heads.error_response(error, keep_alive and not self.last_response))

    def finished(self, ex: Exchange, keep_alive: bool) -> None:
        """ex is answered: start the next pipelined request, or close, or wait for one."""
        if ex is not self.active:
            return
        self.active = None
        if not ex.complete:
            self._linger()  # answered before the request was read whole
            return
        if not keep_alive or self.last_response:
            self.close()
            return
        queue = self.queue
        if queue:
            nxt = self.active = queue.popleft()
            nxt.start()
        elif self.rejected is not None:
            self._send_rejection(self.rejected)
        flow = self.flow
        if flow.reasons and len(queue) < MAX_PIPELINED:
            flow.resume(PIPELINE)

    def switch_to_tunnel(self, ex: Exchange) -> None:
        """101 Switching Protocols: from now on both connections are one byte pipe."""
        if self.held:
            ex.send_raw(b"".join(self.held))
            self.held.clear()
            self.held_size = 0
        self.flow.resume(BUFFER)

    def write_eof(self) -> None:
        transport = self.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()

    def _tunnel_data(self, data: bytes) -> None:
        ex = self.upgrading
        if ex is None or ex.phase == DONE:
            return  # declined or failed: what follows never goes upstream
        if ex.phase == TUNNEL:
            ex.send_raw(data)
            return
        body = self.upgrade_body
        if body:
            # Its body goes up as it comes (replayed with the request if need be).
            part = data[:body]
            self.upgrade_body = body - len(part)
            ex.send(part)
            data = data[len(part) :]
        if data:
            self.held.append(data)
            self.held_size += len(data)
            if self.held_size > BUFFER_LIMIT:
                self.flow.pause(BUFFER)

    # --- refusals ---------------------------------------------------------------------

    def _reject(self, error: ClientError) -> None:
        """Refuse a malformed or forbidden request: answer in turn, then close."""
        self.rejected = error
        if self.url:  # (the target began: the method was read whole)
            with contextlib.suppress(httptools.HttpParserError):
                self.rejected_method = self.parser.get_method()
        self.flow.pause(REFUSED)
        ex = self.parsing
        if ex is not None:
            # Its body broke off: the request can never be forwarded whole, so it goes no
            # further, and an upstream connection holding part of it is not reused.
            self.parsing = None
            if ex is self.active:
                answered = ex.phase >= STREAMING  # the client has (part of) an answer
                self.active = None
                ex.abandon()
                if answered:
                    self.close()
                    return
            elif ex in self.queue:
                self.queue.remove(ex)
        if self.active is None:
            self._send_rejection(error)

    def _send_rejection(self, error: ClientError) -> None:
        # An exchange of its own, so a refusal is timed, counted and logged as any answer.
        waited = self.clock() - self.head_started if self.head_started else 0.0
        ex = Exchange(self, self.rejected_method, self.url, perf_counter() - waited)
        ex.refuse(error)
        self._linger()

    def _linger(self) -> None:
        """Lingering close: sidelink's FIN goes after the answer, then whatever the client
        still sends is read and dropped until it hangs up (or LINGER_TIMEOUT), so that a
        close with unread bytes (a reset) does not destroy the answer before the client
        has read it."""
        transport = self.transport
        if transport is None or not transport.can_write_eof():
            self.close()
            return
        transport.write_eof()
        self.lingering = True
        self.linger_until = self.clock() + LINGER_TIMEOUT
        self.flow.resume(REFUSED | BUFFER | PIPELINE)

    # --- lifecycle --------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Timeouts, checked by the route's ticker rather than a timer per request."""
        ex = self.active
        settings = self.settings
        if ex is None:
            if self.lingering:
                # Refused or answered early (never twice): closed when the client hangs
                # up, or at the end of the linger time.
                if now > self.linger_until:
                    self.close()
            elif self.in_head and now - self.head_started > settings.head_timeout:
                self._reject(HeadTimeout("request head too slow"))
            elif self.fresh and now - self.head_started > settings.head_timeout:
                self.close()  # not a byte since the accept: no request to answer
            elif not self.in_head and now - self.last_active > settings.idle_timeout:
                self.close()
            return
        if ex.timed_out(now, settings.request_timeout):
            ex.time_out()
        elif now - self.last_active > settings.idle_timeout:
            if ex is self.parsing and ex.phase < STREAMING:
                # The client stopped halfway through its request body.
                self._reject(BodyStalled("request body stalled"))
            else:
                self.close()

    def shutdown(self) -> None:
        if self.active is None and not self.queue and not self.in_head:
            self.close()
        else:
            self.close_after_response = True

    def abort(self) -> None:
        self.cut = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.cut = True
            if self.transport.is_closing():
                # Closed before and still not gone: the client has not taken what was
                # left to flush for a whole timeout. Drop it rather than hold it for ever.
                self.transport.abort()
            else:
                self.transport.close()


class H1Upstream(Upstream):
    """A (pooled) connection to one endpoint; parses the responses coming back."""

    def __init__(self, route: Route) -> None:
        self.stats = route.stats
        self.fds = route.fds
        self.clock = route.clock
        self.transport: asyncio.Transport | None = None
        self.write: Callable[[bytes], object] | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.feed = self.parser.feed_data
        self.pool: Pool | None = None
        self.exchange: Exchange | None = None
        self.created = self.clock()
        self.idle_since = self.created
        self.closed = False  # closed or closing: never handed out again
        self.headers: list[bytes] = []  # name, value, name, value...
        self.out: list[bytes] = []
        self.head_bytes = 0  # received while waiting for a response head
        self.rechunk = False  # frame the body as chunked for the client
        self.until_close = False  # the body ends when the server closes
        self.interim = False
        self.keep_alive_down = True
        self.head_keep_alive = True  # the server keeps the connection (a HEAD's answer)
        self.tunnel = False
        # The response ended within the read being parsed: the exchange is finished once
        # the rest of the read is parsed (bytes after a response break the connection).
        self.complete = False
        self.reusable = False

    def __repr__(self) -> str:
        pool = self.pool
        return f"<H1Upstream {pool.name if pool else '-'} exchange={self.exchange}>"

    # --- what an exchange calls -------------------------------------------------------

    def attach(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.head_bytes = 0

    def send(self, data: bytes) -> None:
        write = self.write
        if write is not None and not self.closed:
            write(data)
            self.stats.bytes_to_upstream += len(data)

    def detach(self, reusable: bool, now: float) -> None:
        self.exchange = None
        if self.pool is not None:
            self.pool.put(self, now, reusable)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def write_eof(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed and transport.can_write_eof():
            transport.write_eof()

    # --- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.write = self.transport.write
        self.flow = FlowControl(self.transport)
        self.stats.active_upstream += 1
        self.fds.opened()

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # Bytes on an idle connection: the server broke the protocol; drop it.
            if self.pool is not None:
                self.pool.discard(self)
            self.close()
            return
        ex.down.touch(self.clock())
        if self.tunnel:
            ex.deliver(data)
            return
        if ex.phase < STREAMING:
            self.head_bytes += len(data)  # (with what follows the head: a bound to measure)
        try:
            self.feed(data)
        except httptools.HttpParserUpgrade as e:
            self._flush(ex)
            if self.tunnel:
                rest = data[e.args[0] :]
                if rest:
                    ex.deliver(rest)
            return
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _HeadOnly):
                self._flush(ex)
                end = data.find(b"\r\n\r\n")
                clean = end != -1 and end + 4 == len(data)
                self.parser = httptools.HttpResponseParser(self)
                self.feed = self.parser.feed_data
                reusable = clean and self.head_keep_alive
                ex.response_complete(reusable=reusable, keep_alive=self.keep_alive_down)
                return
            self._protocol_error(ex, str(e.__context__ or e))
            return
        except httptools.HttpParserError as e:
            self._protocol_error(ex, f"invalid response: {e}")
            return
        if self.complete:
            self.complete = False
            ex.response_complete(reusable=self.reusable, keep_alive=self.keep_alive_down)
            return
        if self.out:
            self._flush(ex)
        if ex.phase < STREAMING and self.head_bytes > RAW_HEAD_LIMIT:
            # Still no (final) head: bound what httptools holds of it, as for requests.
            self._protocol_error(ex, "response head over 64 KiB")

    def eof_received(self) -> bool:
        ex = self.exchange
        if self.tunnel and ex is not None and ex.tunnel_eof(SERVER_EOF):
            return True  # (the client may still send: its bytes go on)
        self.closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stats.active_upstream -= 1
        self.fds.closed()
        self.parser = CLOSED_RESPONSES
        self.feed = CLOSED_RESPONSES.feed_data
        ex = self.exchange
        if ex is None:
            if self.pool is not None:
                self.pool.discard(self)
            return
        if self.tunnel:
            ex.down.close()
            return
        if ex.phase == STREAMING and self.until_close:
            # The body was delimited by the close: this is its normal end.
            if self.rechunk:
                self.out.append(LAST_CHUNK + CRLF)
            self._flush(ex)
            ex.response_complete(reusable=False, keep_alive=self.keep_alive_down)
            return
        detail = "upstream closed the connection" + (f": {exc}" if exc else "")
        ex.upstream_failed(UpstreamReset(detail))

    # --- httptools callbacks (response parser) -------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        # Before the head completes these are headers; after it, trailers. (The list is
        # emptied after each head and each message.)
        headers = self.headers
        headers.append(name)
        headers.append(value)

    def on_headers_complete(self) -> None:
        ex = self.exchange
        assert ex is not None
        parser = self.parser
        status = parser.get_status_code()
        headers = self.headers
        heads.check_response_head(self.head_bytes, status, headers)
        lines, framing = heads.response_lines(status, headers)
        self.headers.clear()  # what on_header collects from now on are trailers
        if 100 <= status < 200 and status != 101:
            self.interim = True
            if not ex.http10:  # HTTP/1.0 clients do not know interim responses
                lines.append(CRLF)
                self.out.append(b"".join(lines))
            return
        keep_alive = ex.keeps_alive()
        self.rechunk = self.until_close = False
        if framing != FRAMING_LENGTH and heads.has_body(ex.method, status):
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
        lines.append(heads.last_line(keep_alive, ex.http10))
        self.out.append(b"".join(lines))
        ex.response_started(status)
        if ex.method == b"HEAD" and status != 101:
            self.head_keep_alive = parser.should_keep_alive()
            raise _HeadOnly

    def on_body(self, body: bytes) -> None:
        self.out.append(heads.chunk(body) if self.rechunk else body)

    def on_message_complete(self) -> None:
        ex = self.exchange
        assert ex is not None
        if self.interim:
            self.interim = False
            return
        if self.tunnel:
            # llhttp completes a 101 before it stops at the upgrade: the exchange goes on
            # as a tunnel, it is not done (nor its connection reusable).
            return
        if self.rechunk:
            self.out.append(heads.trailer_block(self.headers))
        self._flush(ex)
        self.reusable = self.parser.should_keep_alive() and not self.until_close
        self.headers.clear()
        self.complete = True

    def on_message_begin(self) -> None:
        if self.complete:
            raise ProtocolError("bytes after the response")

    # --- helpers ------------------------------------------------------------------------------

    def _flush(self, ex: Exchange) -> None:
        out = self.out
        if out:
            ex.deliver(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _protocol_error(self, ex: Exchange, detail: str) -> None:
        self.out.clear()
        self.close()
        if self.complete:
            # The bad bytes came after a whole response: that answer stands, and the
            # connection, which can no longer be trusted, goes.
            self.complete = False
            log.info(
                "route %s: %s after a complete response; connection closed",
                ex.down.route.config.name,
                detail,
            )
            ex.response_complete(reusable=False, keep_alive=self.keep_alive_down)
            return
        ex.upstream_failed(ProtocolError(detail))
