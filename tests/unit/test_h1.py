"""H1Downstream and H1Upstream with the Exchange between them, fed bytes over fake transports.

One http route for the IP service 127.0.0.1:8080 (it "resolves" at once, no DNS), a client
connection, and an upstream connection already in the endpoint's pool: every request here
is served by a pooled connection, so nothing connects and no socket is opened. The
route's ``spawn`` is replaced by a recorder that closes the coroutine unrun, and the
fixture fails a test that asked for a connect it did not expect (the connect path is the
socket tests' business).

The transports close as asyncio's do: ``close()`` tells the protocol on the next loop
iteration (``settle()``), not from inside the call. (FakeTransport's own close() calls
connection_lost at once, re-entering the protocol in the middle of its own close: an
upstream that closes on garbage would then see its own connection_lost as a reset on a
reused connection and ask for a retry, which a real loop never does.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

import pytest
from support.transport import FakeTransport

from proxy.config import Overrides, parse
from proxy.errors import ClientGone, ConnectionCut
from proxy.flow import BUFFER, PEER, PIPELINE
from proxy.http import heads
from proxy.http.exchange import (
    AWAITING,
    BUFFER_LIMIT,
    DONE,
    HEAD,
    PHASES,
    SENDING,
    STREAMING,
    TUNNEL,
    Exchange,
)
from proxy.http.h1 import (
    LINGER_TIMEOUT,
    MAX_PIPELINED,
    H1Downstream,
    H1Upstream,
    downstream_factory,
)
from proxy.http.heads import MAX_HEAD_BYTES
from proxy.metrics import RESET_CODE, Metrics
from proxy.resolver import Resolver
from proxy.route import Route

# The Host line upstream gets on this route (host: auto, the service as written, its port).
HOST = b"host: 127.0.0.1:8080\r\n"
OK_HI = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


class Transport(FakeTransport):
    """A FakeTransport whose close() and abort() tell the protocol a loop iteration later."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.lose, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()


async def settle() -> None:
    """Let the connection_lost calls scheduled by close() run."""
    for _ in range(3):
        await asyncio.sleep(0)


class Rig:
    """The route, one client connection (down/client) and one pooled upstream (up/server)."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.stats = route.stats
        self.loop = asyncio.get_running_loop()
        [self.endpoint] = route.endpoints.all()
        self.pool = route.pool(self.endpoint)
        self.connects: list[str] = []  # what route.spawn was given (closed, never run)
        self.expected_connects = 0
        self.down, self.client = self.new_client()
        self.up, self.server = self.pooled_upstream()

    def spawn(self, coro: Any) -> None:
        # (a compiled coroutine has no __qualname__; its type is named after the function)
        self.connects.append(getattr(coro, "__qualname__", type(coro).__name__))
        coro.close()

    def new_client(self, **kwargs: Any) -> tuple[H1Downstream, Transport]:
        down = downstream_factory(self.route)()
        transport = Transport(down, **kwargs)
        down.connection_made(transport)
        return down, transport

    def pooled_upstream(self) -> tuple[H1Upstream, Transport]:
        """A connection made (adopted) and given back idle, as after a first request."""
        up = H1Upstream(self.route)
        transport = Transport(up, peername=("127.0.0.1", 8080), sockname=("127.0.0.1", 50000))
        up.connection_made(transport)
        self.pool.adopt(up)
        self.pool.put(up, self.loop.time(), reusable=True)
        return up, transport

    def request(self, *parts: bytes, down: H1Downstream | None = None) -> None:
        """The client sends: each part is one read."""
        for part in parts:
            if part:
                (down or self.down).data_received(part)

    def respond(self, *parts: bytes, up: H1Upstream | None = None) -> None:
        """The server answers: each part is one read."""
        for part in parts:
            if part:
                (up or self.up).data_received(part)

    def later(self, seconds: float) -> float:
        return self.loop.time() + seconds

    @property
    def durations(self) -> int:
        """How many request durations were observed."""
        return sum(self.stats.request_duration.counts)

    @property
    def active(self) -> Exchange:
        ex = self.down.active
        assert ex is not None
        return ex


@pytest.fixture
async def rig(loop_errors: list[dict[str, Any]]) -> AsyncIterator[Rig]:
    config = parse(
        None, quick_routes=["0=127.0.0.1:8080/http"], overrides=Overrides(admin="127.0.0.1:0")
    )
    metrics = Metrics()
    route = Route(config.routes[0], Resolver(config.resolver, metrics, {}), metrics)
    await asyncio.sleep(0)  # the IP service "resolves" at once
    rig = Rig(route)
    route.spawn = rig.spawn  # type: ignore[method-assign]
    try:
        yield rig
        await settle()
        assert route._tasks == set()
        assert len(rig.connects) == rig.expected_connects, rig.connects
    finally:
        route.close()
        ticker = route._ticker
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker


def answer(status: int, reason: str, detail: str, keep_alive: bool = False) -> bytes:
    """sidelink's own answer, written out independently of heads.error_response."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {detail}\n".encode()
    connection = "keep-alive" if keep_alive else "close"
    return (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n"
        f"sidelink-error: {reason}\r\n"
        f"connection: {connection}\r\n\r\n"
    ).encode() + body


def assert_answer(
    data: bytes, status: int, reason: str, detail_start: str, keep_alive: bool = False
) -> None:
    """As answer(), for details that quote llhttp's message: only their start is fixed."""
    prefix = f"{status} {HTTPStatus(status).phrase}: ".encode()
    body = data.partition(b"\r\n\r\n")[2]
    assert body.startswith(prefix + detail_start.encode()) and body.endswith(b"\n"), data
    assert data == answer(status, reason, body[len(prefix) : -1].decode(), keep_alive)


# --- a GET, keep-alive, pipelining -----------------------------------------------------


async def test_get_goes_upstream_origin_form_without_hop_by_hop_headers_and_back(rig: Rig) -> None:
    rig.request(
        b"GET /a?b=1 HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive, X-Hop\r\n"
        b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"User-Agent: t\r\nAccept: */*\r\n\r\n"
    )
    ex = rig.active
    assert PHASES[ex.phase] == "AWAITING"
    upstream_head = b"GET /a?b=1 HTTP/1.1\r\nUser-Agent: t\r\nAccept: */*\r\n" + HOST + b"\r\n"
    assert rig.server.take() == upstream_head
    assert rig.pool.idle == [] and rig.pool.active == 1 and rig.endpoint.in_flight == 1
    assert rig.client.take() == b""

    rig.respond(
        b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 5\r\nConnection: keep-alive\r\n"
        b"Keep-Alive: timeout=5\r\n\r\n"
    )
    assert ex.phase == STREAMING
    assert repr(ex) == "<Exchange GET /a?b=1 STREAMING status=200>"
    client_head = b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 5\r\n\r\n"
    assert rig.client.take() == client_head
    assert rig.durations == 1  # (request head read -> response head received)
    assert rig.stats.requests == {}  # counted once answered whole

    rig.respond(b"hel", b"lo")
    assert rig.client.writes == [b"hel", b"lo"]  # streamed as it came
    assert ex.phase == DONE and rig.down.active is None
    assert rig.pool.idle == [rig.up] and rig.pool.active == 0 and rig.endpoint.in_flight == 0
    assert rig.stats.requests == {(b"GET", 200): 1}
    assert rig.durations == 1
    assert not rig.client.closed and not rig.server.closed
    assert rig.stats.bytes_to_upstream == len(upstream_head)
    assert rig.stats.bytes_to_downstream == len(client_head) + 5
    assert rig.stats.errors == dict.fromkeys(rig.stats.errors, 0)


async def test_keep_alive_requests_in_sequence_reuse_the_pooled_upstream(rig: Rig) -> None:
    for path in (b"/one", b"/two"):
        rig.request(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
        assert rig.active.upstream is rig.up  # the pooled one, no connect
        assert rig.server.take() == b"GET %s HTTP/1.1\r\n%s\r\n" % (path, HOST)
        rig.respond(OK_HI)
        assert rig.client.take() == OK_HI
        assert rig.pool.idle == [rig.up]
    assert rig.stats.requests == {(b"GET", 200): 2}
    assert rig.durations == 2
    assert rig.stats.opened_upstream == 0


async def test_pipelined_requests_are_answered_in_order_the_next_sent_after_the_first(
    rig: Rig,
) -> None:
    rig.request(
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    )
    first = rig.active
    [second] = rig.down.queue
    assert second.phase == HEAD and second.buffer == [b"abc"]  # held, no upstream yet
    assert repr(rig.down) == (
        "<H1Downstream 127.0.0.1:0 127.0.0.1:40000 "
        "active=<Exchange GET /1 AWAITING status=0> queued=1>"
    )
    assert rig.server.take() == b"GET /1 HTTP/1.1\r\n" + HOST + b"\r\n"

    rig.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert first.phase == DONE and rig.down.active is second
    assert rig.client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"
    # The second went out only now, head and held body in one write, on the same connection.
    assert rig.server.writes == [b"POST /2 HTTP/1.1\r\nContent-Length: 3\r\n" + HOST + b"\r\nabc"]
    assert second.phase == AWAITING and second.upstream is rig.up
    rig.server.take()

    rig.respond(b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\n2")
    assert rig.client.take() == b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\n2"
    assert rig.stats.requests == {(b"GET", 200): 1, (b"POST", 201): 1}
    assert rig.down.active is None and not rig.down.queue


async def test_max_pipelined_pauses_reading_until_the_queue_shrinks(rig: Rig) -> None:
    count = MAX_PIPELINED + 1
    rig.request(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(count)))
    assert len(rig.down.queue) == MAX_PIPELINED
    assert rig.client.reading_paused and rig.down.flow.reasons == PIPELINE

    for i in range(count):
        assert rig.server.take() == b"GET /%d HTTP/1.1\r\n%s\r\n" % (i, HOST)
        body = b"%d" % i
        rig.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert rig.client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )
        # Below the limit from the first answer on: reading goes on.
        assert not rig.client.reading_paused and rig.down.flow.reasons == 0
    assert rig.stats.requests == {(b"GET", 200): count}
    assert rig.durations == count


# --- bodies ------------------------------------------------------------------------------


async def test_chunked_request_body_streams_rechunked_as_it_came_with_trailers(rig: Rig) -> None:
    rig.request(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    ex = rig.active
    assert ex.phase == SENDING
    assert rig.server.take() == (
        b"POST /up HTTP/1.1\r\n" + HOST + b"transfer-encoding: chunked\r\n\r\n"
    )
    rig.request(b"a\r\nhello")  # one chunk of 10 cut in two reads: two chunks of 5
    assert rig.server.take() == b"5\r\nhello\r\n"
    rig.request(b"world\r\n3\r\nabc\r\n")
    assert rig.server.writes == [b"5\r\nworld\r\n", b"3\r\nabc\r\n"]
    rig.server.take()
    assert ex.phase == SENDING
    rig.request(b"0\r\nX-Sum: 42\r\nX-More: 1\r\n\r\n")
    assert rig.server.take() == b"0\r\nX-Sum: 42\r\nX-More: 1\r\n\r\n"
    assert ex.phase == AWAITING and ex.complete

    rig.respond(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert rig.client.take() == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert rig.pool.idle == [rig.up]
    assert rig.stats.requests == {(b"POST", 204): 1}


async def test_chunked_response_is_streamed_rechunked_and_its_connection_reused(rig: Rig) -> None:
    rig.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    rig.respond(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert rig.client.take() == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    rig.respond(b"5\r\nhel")
    assert rig.client.take() == b"3\r\nhel\r\n"
    rig.respond(b"lo\r\n0\r\nX-T: 1\r\n\r\n")
    assert rig.client.take() == b"2\r\nlo\r\n0\r\nX-T: 1\r\n\r\n"
    assert rig.down.active is None and rig.pool.idle == [rig.up]
    assert rig.stats.requests == {(b"GET", 200): 1}


async def test_response_delimited_by_close_is_chunked_for_an_http11_client(rig: Rig) -> None:
    rig.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    rig.respond(b"HTTP/1.1 200 OK\r\nServer: s\r\n\r\nabc", b"de")
    assert rig.client.take() == (
        b"HTTP/1.1 200 OK\r\nServer: s\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n"
    )
    ex = rig.active
    rig.server.lose()
    assert rig.client.take() == b"0\r\n\r\n"
    assert ex.phase == DONE and rig.down.active is None
    assert rig.pool.idle == [] and rig.endpoint.in_flight == 0
    assert not rig.client.closed  # the client keeps its connection
    assert rig.stats.requests == {(b"GET", 200): 1}
    assert rig.stats.errors["reset"] == 0


async def test_response_delimited_by_close_is_read_to_close_by_an_http10_client(rig: Rig) -> None:
    rig.request(b"GET / HTTP/1.0\r\n\r\n")
    assert rig.server.take() == b"GET / HTTP/1.1\r\n" + HOST + b"\r\n"
    rig.respond(b"HTTP/1.1 200 OK\r\nServer: s\r\n\r\nabc", b"de")
    assert rig.client.take() == b"HTTP/1.1 200 OK\r\nServer: s\r\nconnection: close\r\n\r\nabcde"
    rig.server.lose()
    assert rig.client.take() == b""
    assert rig.client.closed
    assert rig.stats.requests == {(b"GET", 200): 1}


async def test_chunked_response_to_an_http10_client_is_unchunked_and_read_to_close(
    rig: Rig,
) -> None:
    rig.request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    rig.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert rig.client.take() == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabc"
    assert rig.client.closed
    assert rig.pool.idle == [rig.up]  # the upstream's message was whole


# --- HTTP/1.0, HEAD, no-body statuses, 100-continue --------------------------------------


async def test_http10_keep_alive_is_answered_when_asked(rig: Rig) -> None:
    rig.request(b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert rig.server.take() == b"GET /k HTTP/1.1\r\n" + HOST + b"\r\n"
    assert rig.active.http10
    rig.respond(OK_HI)
    assert rig.client.take() == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: keep-alive\r\n\r\nhi"
    )
    assert not rig.client.closed
    rig.request(b"GET /plain HTTP/1.0\r\n\r\n")
    rig.respond(OK_HI)
    assert (
        rig.client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nhi"
    )
    assert rig.client.closed
    assert rig.pool.idle == [rig.up]
    assert rig.stats.requests == {(b"GET", 200): 2}


async def test_head_response_has_no_body_and_its_upstream_is_reused(rig: Rig) -> None:
    rig.request(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
    assert rig.server.take() == b"HEAD /h HTTP/1.1\r\n" + HOST + b"\r\n"
    rig.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert rig.client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    assert rig.down.active is None and rig.pool.idle == [rig.up]
    # The same connection parses the next response afresh.
    rig.request(b"GET /g HTTP/1.1\r\nHost: x\r\n\r\n")
    assert rig.active.upstream is rig.up
    rig.respond(OK_HI)
    assert rig.client.take() == OK_HI
    assert rig.stats.requests == {(b"HEAD", 200): 1, (b"GET", 200): 1}


async def test_head_response_with_connection_close_does_not_go_back_to_the_pool(rig: Rig) -> None:
    rig.request(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    rig.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\n")
    assert rig.client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    assert rig.pool.idle == []
    assert rig.server.closed


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\nContent-Length: 100\r\n\r\n',
    ],
)
async def test_204_and_304_have_no_body_and_their_upstream_is_reused(
    rig: Rig, response: bytes
) -> None:
    rig.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    rig.respond(response)
    assert rig.client.take() == response
    assert rig.down.active is None and rig.pool.idle == [rig.up]
    assert rig.stats.requests == {(b"GET", int(response[9:12])): 1}


async def test_connection_close_request_is_answered_then_closed_the_upstream_kept(
    rig: Rig,
) -> None:
    rig.request(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert rig.server.take() == b"GET / HTTP/1.1\r\n" + HOST + b"\r\n"
    rig.respond(OK_HI)
    assert rig.client.take() == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nhi"
    )
    assert rig.client.closed and rig.pool.idle == [rig.up]


async def test_an_answer_before_the_request_body_is_all_sent_ends_both_connections(
    rig: Rig,
) -> None:
    rig.request(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    rig.respond(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    # The upstream holds part of a request, the client is mid-body: neither can go on, and
    # the head says so (RFC 9110 10.1.1; before, it said nothing and the connection was
    # closed under a client that could send its next request on it).
    assert rig.client.take() == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nconnection: close\r\n\r\n"
    )
    assert rig.server.closed and rig.pool.idle == []
    assert rig.server.take().endswith(b"\r\n\r\nabc")
    # A lingering close: the answer, then sidelink's EOF; the rest of the body is dropped.
    assert rig.client.eof_written and not rig.client.closed
    rig.request(b"x" * 97, b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert rig.client.take() == b"" and rig.server.take() == b""
    rig.down.tick(rig.later(LINGER_TIMEOUT + 1))
    assert rig.client.closed
    assert rig.stats.requests == {(b"POST", 403): 1}


async def test_an_answer_to_expect_100_continue_without_the_100_closes_after_it(
    rig: Rig,
) -> None:
    # A 417 (or any final answer) instead of the 100: whether the body comes now is the
    # client's to choose, so the connection goes no further. (Before, the answer said
    # nothing and the connection was closed; sidelink's own answer said keep-alive, and
    # it then read the client's next request as the body.)
    rig.request(b"PUT /c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    rig.respond(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 2\r\n\r\nno")
    assert rig.client.take() == (
        b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 2\r\nconnection: close\r\n\r\nno"
    )
    assert rig.client.eof_written
    down, client = rig.new_client()
    rig.route.endpoints.endpoints = []  # (nothing to send it to: sidelink's own 503)
    rig.request(
        b"PUT /c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n",
        down=down,
    )
    got = client.take()
    assert got.startswith(b"HTTP/1.1 503 ") and got.count(b"HTTP/1.1") == 1, got
    assert b"connection: close\r\n" in got and client.eof_written
    assert rig.stats.requests == {(b"PUT", 417): 1, (b"PUT", 503): 1}


async def test_sidelink_s_own_answer_to_a_bodiless_request_keeps_the_connection(rig: Rig) -> None:
    rig.route.endpoints.endpoints = []
    rig.request(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    got = rig.client.take()
    assert got.count(b"HTTP/1.1 503 ") == 2 and b"connection: keep-alive\r\n" in got, got
    assert not rig.client.eof_written and not rig.client.closed


async def test_100_continue_is_passed_to_an_http11_client(rig: Rig) -> None:
    rig.request(b"POST /c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert rig.server.take() == (
        b"POST /c HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n" + HOST + b"\r\n"
    )
    rig.respond(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert rig.client.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert rig.active.phase == SENDING and rig.active.status == 0
    rig.request(b"hello")
    assert rig.server.take() == b"hello"
    rig.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert rig.client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert rig.stats.requests == {(b"POST", 200): 1}
    assert rig.durations == 1  # the interim response is not the answer
    assert rig.pool.idle == [rig.up]


async def test_100_continue_is_not_passed_to_an_http10_client(rig: Rig) -> None:
    rig.request(
        b"POST /c HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\n\r\n"
    )
    rig.respond(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert rig.client.take() == b""
    rig.request(b"hello")
    rig.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert rig.client.take() == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nconnection: keep-alive\r\n\r\n"
    )
    assert rig.stats.requests == {(b"POST", 200): 1}


# --- refusals ----------------------------------------------------------------------------

REFUSALS = {
    "connect": (
        b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
        b"CONNECT",
        405,
        "method_not_allowed",
        "CONNECT is not allowed",
    ),
    "two-hosts": (
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET",
        400,
        "bad_request",
        "more than one Host header",
    ),
    "differing-content-length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST",
        400,
        "bad_request",
        "malformed request: ",
    ),
    "content-length-and-chunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        b"POST",
        400,
        "bad_request",
        "malformed request: ",
    ),
    "malformed": (
        b"\x01\x02 / HTTP/1.1\r\n\r\n",
        b"",  # (none was read: counted as OTHER)
        400,
        "bad_request",
        "malformed request: ",
    ),
    "absolute-form-other-host": (
        b"GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        b"GET",
        400,
        "forbidden_host",
        "evil.example is not this route's service",
    ),
    "http2.0": (
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        b"GET",
        505,
        "version_not_supported",
        "HTTP/2.0 is not supported",
    ),
    "http2.0-keep-alive": (
        b"GET / HTTP/2.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
        b"GET",
        505,
        "version_not_supported",
        "HTTP/2.0 is not supported",
    ),
    "http0.9": (
        b"GET / HTTP/0.9\r\nHost: a\r\n\r\n",
        b"GET",
        505,
        "version_not_supported",
        "HTTP/0.9 is not supported",
    ),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
async def test_refusal_is_answered_counted_timed_then_the_connection_lingers_and_closes(
    rig: Rig, case: tuple[bytes, bytes, int, str, str]
) -> None:
    request, method, status, reason, detail = case
    rig.request(request)
    data = rig.client.take()
    if detail.endswith(": "):  # llhttp's own words follow
        assert_answer(data, status, reason, detail)
    else:
        assert data == answer(status, reason, detail)
    assert rig.server.writes == [] and rig.pool.idle == [rig.up]
    assert rig.stats.requests == {(method, status): 1}
    assert rig.durations == 1
    assert rig.stats.errors == dict.fromkeys(rig.stats.errors, 0)  # the client's fault
    # Lingering close: our FIN after the answer, reading on, what still comes dropped.
    assert rig.client.eof_written and not rig.client.closed
    assert not rig.client.reading_paused
    rig.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rig.client.take() == b"" and rig.server.writes == []
    rig.down.tick(rig.later(LINGER_TIMEOUT / 2))
    assert not rig.client.closed
    rig.down.tick(rig.later(LINGER_TIMEOUT + 1))
    assert rig.client.closed


async def test_absolute_form_for_the_routes_own_service_is_served_origin_form(rig: Rig) -> None:
    rig.request(b"GET http://127.0.0.1:8080/x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n")
    assert rig.server.take() == b"GET /x?y=1 HTTP/1.1\r\n" + HOST + b"\r\n"
    rig.respond(OK_HI)
    assert rig.client.take() == OK_HI
    assert rig.stats.requests == {(b"GET", 200): 1}


async def test_refusal_behind_a_pipelined_request_waits_for_its_turn(rig: Rig) -> None:
    rig.request(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nCONNECT x:1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert rig.client.take() == b""  # the first is still being answered
    assert rig.client.reading_paused
    rig.respond(OK_HI)
    assert rig.client.take() == OK_HI + answer(405, "method_not_allowed", "CONNECT is not allowed")
    assert rig.client.eof_written
    assert rig.stats.requests == {(b"GET", 200): 1, (b"CONNECT", 405): 1}
    assert rig.durations == 2
    assert rig.pool.idle == [rig.up]


async def test_refusal_behind_two_pipelined_requests_comes_after_both(rig: Rig) -> None:
    rig.request(
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"\x01\x02 / HTTP/1.1\r\n\r\n"
    )
    assert len(rig.down.queue) == 1
    rig.respond(OK_HI)
    assert rig.server.take() == (
        b"GET /1 HTTP/1.1\r\n" + HOST + b"\r\nGET /2 HTTP/1.1\r\n" + HOST + b"\r\n"
    )
    assert rig.client.take() == OK_HI and not rig.client.eof_written
    rig.respond(OK_HI)
    data = rig.client.take()
    assert data.startswith(OK_HI)
    assert_answer(data[len(OK_HI) :], 400, "bad_request", "malformed request: ")
    assert rig.stats.requests == {(b"GET", 200): 2, (b"", 400): 1}  # (b"": OTHER)
    assert rig.client.eof_written


async def test_malformed_request_after_a_served_one_counts_as_other(rig: Rig) -> None:
    rig.request(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    rig.respond(OK_HI)
    rig.client.take()
    rig.request(b"\x01\x02 / HTTP/1.1\r\n\r\n")
    assert_answer(rig.client.take(), 400, "bad_request", "malformed request: ")
    assert rig.stats.requests == {(b"GET", 200): 1, (b"", 400): 1}  # (b"": OTHER)


async def test_malformed_chunked_body_abandons_the_upstream_and_is_refused(rig: Rig) -> None:
    rig.request(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    rig.server.take()
    rig.request(b"zz\r\n")
    assert_answer(rig.client.take(), 400, "bad_request", "malformed request: ")
    # Part of the request went up: that connection's state is unknown, it is not reused.
    assert rig.server.closed and rig.pool.idle == [] and rig.endpoint.in_flight == 0
    assert rig.stats.requests == {(b"POST", 400): 1}
    assert rig.client.eof_written


# --- the 64 KiB head limit -----------------------------------------------------------------


def request_head(size: int) -> bytes:
    """A GET whose head, as written plainly, is `size` bytes: one header fills it."""
    base = b"GET / HTTP/1.1\r\nHost: x\r\nX-Fill: \r\n\r\n"
    value = b"v" * (size - len(base))
    assert heads.head_size(b"GET", b"/", [b"Host", b"x", b"X-Fill", value]) == size
    return b"GET / HTTP/1.1\r\nHost: x\r\nX-Fill: %s\r\n\r\n" % value


def cuts(size: int) -> list[int]:
    """Where a head of `size` bytes is cut in two reads (size: in one read)."""
    points = {1, 2, 16, 100, 4096, 32768, 65535, 65536, 65537, size - 4, size - 2, size - 1, size}
    return sorted(p for p in points if 0 < p <= size)


HUNDRED_KB_HEAD = (
    b"GET / HTTP/1.1\r\n"
    + b"".join(b"X-H%03d: %s\r\n" % (i, b"a" * 1016) for i in range(100))
    + b"\r\n"
)


@pytest.mark.parametrize("cut", cuts(len(HUNDRED_KB_HEAD)))
async def test_head_of_a_hundred_kilobytes_gets_431_however_it_is_cut(rig: Rig, cut: int) -> None:
    rig.request(HUNDRED_KB_HEAD[:cut], HUNDRED_KB_HEAD[cut:])
    assert rig.client.take() == answer(431, "head_too_large", "request head over 64 KiB")
    assert rig.server.writes == []
    assert rig.stats.requests == {(b"GET", 431): 1}
    assert rig.durations == 1
    assert rig.client.eof_written


@pytest.mark.parametrize("cut", cuts(MAX_HEAD_BYTES))
async def test_head_of_exactly_64_kib_passes_however_it_is_cut(rig: Rig, cut: int) -> None:
    head = request_head(MAX_HEAD_BYTES)
    rig.request(head[:cut], head[cut:])
    assert rig.server.take() == head.replace(b"Host: x\r\n", b"")[:-2] + HOST + b"\r\n"
    rig.respond(OK_HI)
    assert rig.client.take() == OK_HI


@pytest.mark.parametrize("cut", cuts(MAX_HEAD_BYTES + 1))
async def test_head_of_64_kib_and_one_byte_gets_431_however_it_is_cut(rig: Rig, cut: int) -> None:
    head = request_head(MAX_HEAD_BYTES + 1)
    rig.request(head[:cut], head[cut:])
    assert rig.client.take() == answer(431, "head_too_large", "request head over 64 KiB")
    assert rig.server.writes == []
    assert rig.stats.requests == {(b"GET", 431): 1}


async def test_head_within_the_limit_padded_with_whitespace_passes_in_three_reads(
    rig: Rig,
) -> None:
    pad = b" " * 2000  # optional whitespace before the value: not counted
    head = request_head(MAX_HEAD_BYTES - 100).replace(b"X-Fill: ", b"X-Fill: " + pad)
    # In one read it passes ...
    other, other_client = rig.new_client()
    rig.request(head, down=other)
    assert rig.server.take().startswith(b"GET / HTTP/1.1\r\nX-Fill: v")
    rig.respond(OK_HI)
    assert other_client.take() == OK_HI
    # ... and so it should cut in three.
    rig.request(head[:1], head[1:-1], head[-1:])
    assert rig.client.take() == b""
    assert rig.server.take().startswith(b"GET / HTTP/1.1\r\nX-Fill: v")


async def test_head_over_the_limit_written_without_spaces_gets_431(rig: Rig) -> None:
    head = request_head(MAX_HEAD_BYTES + 1).replace(b"X-Fill: ", b"X-Fill:")
    assert len(head) == MAX_HEAD_BYTES  # one byte fewer than it counts
    rig.request(head)
    assert rig.client.take() == answer(431, "head_too_large", "request head over 64 KiB")


# --- upstream failures ---------------------------------------------------------------------


async def test_post_on_a_reused_connection_lost_before_any_response_byte_gets_502_reset(
    rig: Rig,
) -> None:
    rig.request(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert rig.server.take() == b"POST /p HTTP/1.1\r\nContent-Length: 2\r\n" + HOST + b"\r\nhi"
    rig.server.lose()
    assert rig.client.take() == answer(
        502, "reset", "upstream closed the connection", keep_alive=True
    )
    assert rig.stats.errors["reset"] == 1 and rig.stats.retries == 0
    assert rig.stats.requests == {(b"POST", 502): 1}
    assert rig.durations == 1
    assert rig.pool.idle == [] and rig.endpoint.in_flight == 0
    assert rig.down.active is None and not rig.client.closed


async def test_get_on_a_reused_connection_lost_before_any_response_byte_is_retried(
    rig: Rig,
) -> None:
    rig.expected_connects = 1  # the retry's connect (closed unrun here)
    rig.request(b"GET /g HTTP/1.1\r\nHost: x\r\n\r\n")
    ex = rig.active
    rig.server.lose()
    assert rig.connects in (["Exchange._connect"], ["_connect_Exchange_gen"])
    assert PHASES[ex.phase] == "CONNECTING" and ex.tried == [rig.endpoint]
    assert ex.buffer is None  # nothing to replay but the head
    assert (
        rig.stats.retries == 1 and rig.stats.errors["reset"] == 1
    )  # (counted, as a failed connect retried past is)
    assert rig.client.take() == b"" and rig.stats.requests == {}


async def test_upstream_lost_mid_response_closes_the_client_counted_as_reset(rig: Rig) -> None:
    rig.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    rig.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert rig.client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    rig.server.lose()
    assert rig.client.take() == b""
    assert rig.client.closed
    assert rig.stats.requests == {(b"GET", RESET_CODE): 1}
    assert rig.stats.errors["reset"] == 1
    assert rig.durations == 1
    assert rig.pool.idle == [] and rig.endpoint.in_flight == 0


async def test_garbage_from_upstream_gets_502_protocol(rig: Rig) -> None:
    rig.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    rig.respond(b"XYZ garbage\r\n\r\n")
    assert_answer(rig.client.take(), 502, "protocol", "invalid response: ", keep_alive=True)
    assert rig.server.closed and rig.pool.idle == []
    assert rig.stats.errors["protocol"] == 1 and rig.stats.retries == 0
    assert rig.stats.requests == {(b"GET", 502): 1}
    await settle()
    assert rig.stats.active_upstream == 0 and rig.endpoint.in_flight == 0


async def test_upstream_failure_while_the_body_still_comes_closes_after_the_answer(
    rig: Rig,
) -> None:
    # Answered before the request was read whole: whether the rest comes is the client's
    # to say (a client that sent Expect: 100-continue may never send it), so the answer
    # says close and the rest is dropped. (Before, sidelink read the rest as the body and
    # went on: a client that never sent it had its next request taken for the body.)
    second, second_server = rig.pooled_upstream()
    rig.request(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nab")
    assert rig.active.upstream is second  # the newest idle connection goes first
    rig.respond(b"garbage\r\n\r\n", up=second)
    assert_answer(rig.client.take(), 502, "protocol", "invalid response: ")
    assert rig.down.active is None and rig.client.eof_written
    rig.request(b"cdef", b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert second_server.take() == (b"POST /p HTTP/1.1\r\nContent-Length: 6\r\n" + HOST + b"\r\nab")
    assert rig.server.take() == b"" and rig.client.take() == b""
    assert rig.down.eof_received() is False  # the client hangs up: the transport closes
    assert rig.stats.requests == {(b"POST", 502): 1}


HUNDRED_KB_RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-H%03d: %s\r\n" % (i, b"a" * 1016) for i in range(100))
    + b"Content-Length: 0\r\n\r\n"
)


@pytest.mark.parametrize(
    "cut",
    [
        65537,
        80000,
        len(HUNDRED_KB_RESPONSE_HEAD) - 1,
        1,
        60000,
        len(HUNDRED_KB_RESPONSE_HEAD),
    ],
)
async def test_response_head_over_64_kib_gets_502_protocol(rig: Rig, cut: int) -> None:
    rig.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = HUNDRED_KB_RESPONSE_HEAD
    rig.respond(head[:cut], head[cut:])
    assert rig.client.take() == answer(
        502, "protocol", "response head over 64 KiB", keep_alive=True
    )
    assert rig.server.closed and rig.pool.idle == []
    assert rig.stats.errors["protocol"] == 1
    assert rig.stats.requests == {(b"GET", 502): 1}


async def test_bytes_on_an_idle_pooled_connection_drop_it(rig: Rig) -> None:
    rig.respond(b"HTTP/1.1 200 OK\r\n\r\n")
    assert rig.server.closed and rig.pool.idle == [] and rig.stats.pool_idle == 0


async def test_an_idle_pooled_connection_closed_by_the_server_leaves_the_pool(rig: Rig) -> None:
    assert rig.stats.pool_idle == 1
    rig.server.lose()
    assert rig.pool.idle == [] and rig.stats.pool_idle == 0 and rig.stats.active_upstream == 0


# --- timeouts --------------------------------------------------------------------------------


async def test_request_timeout_while_awaiting_the_response_gets_504(rig: Rig) -> None:
    rig.request(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    assert rig.active.phase == AWAITING
    rig.down.tick(rig.later(rig.route.settings.request_timeout / 2))
    assert rig.client.take() == b""
    rig.down.tick(rig.later(rig.route.settings.request_timeout + 1))
    assert rig.client.take() == answer(
        504, "timeout", "upstream did not answer in time", keep_alive=True
    )
    assert rig.stats.errors["timeout"] == 1
    assert rig.stats.requests == {(b"GET", 504): 1}
    assert rig.server.closed and rig.pool.idle == [] and rig.endpoint.in_flight == 0
    assert rig.down.active is None and not rig.client.closed


@pytest.mark.parametrize(
    ("partial", "method"), [(b"GET /slow HTTP/1.1\r\nHost:", b"GET"), (b"GE", b"")]
)
async def test_head_timeout_on_a_partial_head_gets_408(
    rig: Rig, partial: bytes, method: bytes
) -> None:
    rig.request(partial)
    rig.down.tick(rig.later(rig.route.settings.head_timeout / 2))
    assert rig.client.take() == b""
    rig.down.tick(rig.later(rig.route.settings.head_timeout + 1))
    assert rig.client.take() == answer(408, "head_timeout", "request head too slow")
    assert rig.stats.requests == {(method, 408): 1}
    assert rig.durations == 1
    assert rig.client.eof_written and rig.server.writes == []


async def test_stalled_request_body_gets_408_idle_timeout(rig: Rig) -> None:
    rig.request(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    assert rig.active.phase == SENDING
    rig.down.tick(rig.later(rig.route.settings.request_timeout + 1))  # not AWAITING: no 504
    assert rig.client.take() == b""
    rig.down.tick(rig.later(rig.route.settings.idle_timeout + 1))
    assert rig.client.take() == answer(408, "idle_timeout", "request body stalled")
    assert rig.stats.requests == {(b"POST", 408): 1}
    assert rig.server.closed and rig.pool.idle == [] and rig.endpoint.in_flight == 0
    assert rig.client.eof_written


async def test_an_idle_keep_alive_client_is_closed_after_idle_timeout(rig: Rig) -> None:
    rig.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    rig.respond(OK_HI)
    rig.down.tick(rig.later(rig.route.settings.idle_timeout - 1))
    assert not rig.client.closed
    rig.down.tick(rig.later(rig.route.settings.idle_timeout + 1))
    assert rig.client.closed and rig.pool.idle == [rig.up]


# --- Upgrade ---------------------------------------------------------------------------------


async def test_upgrade_then_101_makes_both_connections_one_byte_pipe(rig: Rig) -> None:
    rig.request(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: k\r\n\r\nearly"
    )
    ex = rig.active
    assert rig.server.take() == (
        b"GET /ws HTTP/1.1\r\nSec-WebSocket-Key: k\r\n"
        + HOST
        + b"connection: upgrade\r\nupgrade: websocket\r\n\r\n"
    )
    rig.request(b" bytes")  # before the 101: held (an upstream that declines never sees it)
    assert rig.server.take() == b""
    rig.respond(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: a\r\n\r\n\x81\x02hi"
    )
    assert ex.phase == TUNNEL
    assert rig.client.take() == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: a\r\n\r\n\x81\x02hi"
    )
    assert rig.server.take() == b"early bytes"
    rig.request(b"GET / HTTP/1.1\r\n\r\n\x00\xff")  # anything, verbatim
    assert rig.server.take() == b"GET / HTTP/1.1\r\n\r\n\x00\xff"
    rig.respond(b"HTTP/1.1 200 OK\r\n\r\n\x88\x00")
    assert rig.client.take() == b"HTTP/1.1 200 OK\r\n\r\n\x88\x00"
    assert ex.phase == TUNNEL and rig.stats.requests == {}
    rig.server.lose()  # the server hangs up: so does the client
    assert rig.client.closed
    await settle()
    assert rig.stats.requests == {(b"GET", 101): 1}
    assert rig.pool.idle == [] and rig.endpoint.in_flight == 0


async def test_upgrade_declined_answers_then_closes(rig: Rig) -> None:
    rig.request(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    rig.server.take()
    rig.respond(OK_HI)
    assert (
        rig.client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nhi"
    )
    assert rig.client.closed
    assert rig.stats.requests == {(b"GET", 200): 1}


# --- flow control ----------------------------------------------------------------------------


async def test_upstream_write_buffer_full_pauses_the_client_and_back(rig: Rig) -> None:
    rig.request(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    rig.up.pause_writing()
    assert rig.client.reading_paused and rig.down.flow.reasons == PEER
    rig.up.resume_writing()
    assert not rig.client.reading_paused and rig.down.flow.reasons == 0


async def test_client_write_buffer_full_pauses_the_upstream_and_back(rig: Rig) -> None:
    rig.request(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    rig.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    rig.down.pause_writing()
    assert rig.server.reading_paused and rig.up.flow.reasons == PEER
    rig.down.resume_writing()
    assert not rig.server.reading_paused and rig.up.flow.reasons == 0
    # Paused again, and the exchange ends: the idle connection is not left paused.
    rig.down.pause_writing()
    rig.respond(b"x" * 97)
    assert rig.down.active is None and rig.pool.idle == [rig.up]
    assert not rig.server.reading_paused and rig.up.flow.reasons == 0


async def test_an_upstream_already_full_pauses_the_client_as_soon_as_attached(rig: Rig) -> None:
    rig.up.pause_writing()
    assert not rig.client.reading_paused
    rig.request(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    assert rig.client.reading_paused and rig.down.flow.reasons == PEER


async def test_a_pipelined_body_held_over_the_buffer_limit_pauses_until_attached(
    rig: Rig,
) -> None:
    body = b"b" * (BUFFER_LIMIT + 1)
    rig.request(
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"PUT /2 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body),
        body,
    )
    assert rig.client.reading_paused and rig.down.flow.reasons == BUFFER
    rig.server.take()
    rig.respond(OK_HI)
    assert rig.server.take() == (
        b"PUT /2 HTTP/1.1\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), HOST, body)
    )
    assert not rig.client.reading_paused and rig.down.flow.reasons == 0


# --- the client leaving ------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["awaiting", "streaming"])
async def test_client_leaving_mid_exchange_closes_the_upstream(rig: Rig, when: str) -> None:
    rig.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    ex = rig.active
    if when == "streaming":
        rig.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert rig.endpoint.in_flight == 1
    rig.client.lose()
    assert ex.phase == DONE and rig.down.active is None
    assert rig.server.closed and rig.pool.idle == [] and rig.pool.active == 0
    assert rig.endpoint.in_flight == 0
    assert rig.stats.active_downstream == 0 and rig.down not in rig.route.connections
    # It never got its answer whole (nothing of it, or the head of a 200 and part of the
    # body): counted as a reset, the client's doing.
    assert rig.stats.requests == {(b"GET", RESET_CODE): 1}
    assert isinstance(ex.error, ClientGone)
    await settle()
    assert rig.stats.active_upstream == 0


async def test_a_request_cut_by_sidelink_is_a_reset_of_its_doing(rig: Rig) -> None:
    """A drain past its timeout aborts what is still open: the request counts as a reset,
    put down to sidelink (connection_cut), not to the client."""
    rig.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    ex = rig.active
    rig.down.abort()
    await settle()  # (the transport tells the protocol a loop iteration later, as asyncio's)
    assert ex.phase == DONE and isinstance(ex.error, ConnectionCut)
    assert rig.stats.requests == {(b"GET", RESET_CODE): 1}


async def test_client_half_close_after_its_request_still_gets_the_answer_then_close(
    rig: Rig,
) -> None:
    rig.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert rig.down.eof_received() is True
    rig.respond(OK_HI)
    assert (
        rig.client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nhi"
    )
    assert rig.client.closed and rig.pool.idle == [rig.up]


@pytest.mark.parametrize(
    "unfinished",
    [
        b"GET /2 HTTP/1.1\r\nHo",  # a head that can never end
        b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345",  # nor a body
    ],
)
async def test_a_half_close_behind_a_whole_request_still_answers_that_one(
    rig: Rig, unfinished: bytes
) -> None:
    rig.request(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n" + unfinished)
    assert rig.down.eof_received() is True
    rig.respond(OK_HI)
    assert (
        rig.client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nhi"
    )
    assert rig.client.closed
    assert rig.stats.requests == {(b"GET", 200): 1}  # the unfinished one went nowhere


async def test_a_half_close_in_the_middle_of_the_body_in_flight_lets_both_sides_go(
    rig: Rig,
) -> None:
    rig.request(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
    assert rig.down.eof_received() is False
    assert rig.client.closed
    await settle()
    assert rig.server.closed and rig.pool.idle == [] and rig.endpoint.in_flight == 0


# --- reprs --------------------------------------------------------------------------------------


async def test_reprs(rig: Rig) -> None:
    assert repr(rig.down) == "<H1Downstream 127.0.0.1:0 127.0.0.1:40000 active=None queued=0>"
    assert repr(rig.up) == "<H1Upstream 127.0.0.1:0 exchange=None>"
    rig.request(b"GET /r?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    ex = rig.active
    assert repr(ex) == "<Exchange GET /r?q=1 AWAITING status=0>"
    assert (
        repr(rig.up) == "<H1Upstream 127.0.0.1:0 exchange=<Exchange GET /r?q=1 AWAITING status=0>>"
    )
    rig.respond(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nn")
    assert repr(ex) == "<Exchange GET /r?q=1 STREAMING status=404>"
    assert repr(rig.down) == (
        "<H1Downstream 127.0.0.1:0 127.0.0.1:40000 "
        "active=<Exchange GET /r?q=1 STREAMING status=404> queued=0>"
    )
    rig.respond(b"ot")
    assert repr(ex) == "<Exchange GET /r?q=1 DONE status=404>"
    assert repr(rig.up) == "<H1Upstream 127.0.0.1:0 exchange=None>"
