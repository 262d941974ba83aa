"""HTTP failure paths and hostile clients, through sidelink in-process, on real sockets.

Upstreams are hand-written asyncio servers that misbehave on purpose (close mid-response,
answer garbage, never answer, close a pooled connection under a request) and aiohttp
servers that behave, on 127.0.0.2, 127.0.0.3, ... with port 0. Clients are raw sockets,
so every byte sidelink sends back is seen. Every failure is checked the way an operator
sees it: the status, the ``sidelink-error`` header, a short text body, and the metrics.
Every test runs on asyncio's default loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import wire
from support.h2peers import H2Client
from support.inproc import no_connections, resolver_yaml, route_address, running_server
from support.metrics import Scrape
from support.pods import HANG_UPS, AppPods, StreamPods, pod_of
from support.procs import free_port
from support.wait import until
from support.wire import Response, connect, get, post, raw_client

from proxy.dnsserver import DnsServer
from proxy.server import Server

pytestmark = [pytest.mark.both_loops, pytest.mark.usefixtures("loop_errors")]

APP1 = "app1.ns1.svc.cluster.local"
POD = "127.0.0.2"
DEAD = "127.0.0.5"  # a pod IP nothing listens on: connects are refused
KIB = 1024
# Short route timeouts so that every timeout path runs in well under a second.
TIMEOUTS = {
    "connect_timeout": "300ms",
    "request_timeout": "500ms",
    "head_timeout": "500ms",
    "idle_timeout": "10s",
}
# How long a test waits for an answer sidelink owes it: far above every route timeout
# above, and below idle_timeout, so that a connection left hanging is seen as such.
ANSWER_DEADLINE = 5.0
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


# --- sidelink -----------------------------------------------------------------------


def config(dns: DnsServer | None = None, **route: Any) -> str:
    full = {
        "name": "app1",
        "listen": "127.0.0.1:0",
        "protocol": "http",
        "service": POD,
        **TIMEOUTS,
        **route,
    }
    text = yaml.safe_dump({"routes": [full]})
    return resolver_yaml(dns.port) + text if dns is not None else text


def grew(before: Scrape, server: Server, name: str, **labels: str) -> float:
    """How much a metric rose since `before`."""
    return Scrape.of(server).get(name, **labels) - before.get(name, **labels)


def upstream_errors(before: Scrape, server: Server) -> dict[str, float]:
    """sidelink_upstream_errors_total increases since `before`, by reason (non-zero only)."""
    after = Scrape.of(server)
    reasons = ("connect_refused", "connect_timeout", "reset", "timeout", "no_endpoints", "protocol")
    out = {}
    for reason in reasons:
        delta = after.get("sidelink_upstream_errors_total", reason=reason) - before.get(
            "sidelink_upstream_errors_total", reason=reason
        )
        if delta:
            out[reason] = delta
    return out


def requests_by_code(before: Scrape, server: Server) -> dict[str, float]:
    """sidelink_requests_total increases since `before`, by code (non-zero only)."""
    after = Scrape.of(server)
    codes = {lbl["code"] for n, lbl, _ in after.samples if n == "sidelink_requests_total"}
    out = {}
    for code in sorted(codes):
        delta = grew(before, server, "sidelink_requests_total", code=code)
        if delta:
            out[code] = delta
    return out


# --- clients ------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> Response:
    """One response, which sidelink owes within ANSWER_DEADLINE."""
    return await wire.read_response(reader, method, timeout=ANSWER_DEADLINE)


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True when sidelink closes (or resets) the connection without sending anything more."""
    return await wire.closed_by_peer(reader, ANSWER_DEADLINE, reset=True)


async def read_until_close(reader: asyncio.StreamReader) -> bytes:
    """Everything the peer sent before it closed, reset or not."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(64 * KIB):
            data += chunk
    return data


async def request(server: Server, raw: bytes, method: str = "GET") -> Response:
    """raw on a fresh connection; the response to it."""
    async with raw_client(server) as (reader, writer):
        writer.write(raw)
        return await read_response(reader, method)


def assert_error(response: Response, status: int, reason: str) -> None:
    """A proxy-made failure: status, the sidelink-error header, a short text body."""
    assert response.status == status, response
    assert response.header("sidelink-error") == reason, response.headers
    assert (response.header("content-type") or "").startswith("text/plain")
    assert 0 < len(response.body) <= 200, response.body
    assert response.body.decode().startswith(str(status)), response.body


# --- upstreams ----------------------------------------------------------------------


@dataclass
class Request:
    line: str
    headers: dict[str, str]
    body: bytes

    @property
    def method(self) -> str:
        return self.line.split(" ")[0]

    @property
    def target(self) -> str:
        return self.line.split(" ")[1]


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request off an upstream connection (None at a clean EOF)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    return Request(lines[0], headers, body)


RawHandler = Callable[["RawUpstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream(StreamPods):
    """A hand-written HTTP server on one loopback address that misbehaves as told.

    The handler is given this upstream too: it reads requests with next_request (which
    keeps them in `requests`) and may wait on `release`.
    """

    def __init__(self, handler: RawHandler, host: str = POD) -> None:
        # A head sidelink lets through may be near 64 KiB: above the streams' default limit.
        super().__init__(
            functools.partial(handler, self), host, tolerate=HANG_UPS, limit=1024 * KIB
        )
        self.requests: list[Request] = []
        self.release = asyncio.Event()  # for handlers that wait

    @property
    def connections(self) -> int:
        return sum(self.accepted.values())

    async def next_request(self, reader: asyncio.StreamReader) -> Request | None:
        req = await read_request(reader)
        if req is not None:
            self.requests.append(req)
        return req


Through = tuple[RawUpstream, Server, asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def through(handler: RawHandler, **route: Any) -> AsyncIterator[Through]:
    """A client connection through sidelink (the route's keys as given) to a RawUpstream
    running `handler`: the upstream, the server, and the client's reader and writer."""
    async with (
        RawUpstream(handler) as up,
        running_server(config(port=up.port, **route)) as server,
        raw_client(server) as (reader, writer),
    ):
        yield up, server, reader, writer


async def answer_ok(up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """A well-behaved keep-alive server: 200 "ok" to every request."""
    while await up.next_request(reader) is not None:
        w.write(OK)
        await w.drain()


def tagged_app() -> web.Application:
    """A well-behaved pod: answers every request with where it landed and what it was."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(
            text=f"{pod_of(request)} {request.method} {request.path_qs} {len(body)}"
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


# --- 502: the upstream failed or sent garbage -------------------------------------------


async def test_upstream_closing_mid_response_closes_the_client() -> None:
    async def half_a_body(
        up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await up.next_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        await w.drain()  # then the handler returns and the socket closes

    async with through(half_a_body) as (up, server, reader, writer):
        before = Scrape.of(server)
        writer.write(get("/half"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_DEADLINE)
        rest = await asyncio.wait_for(reader.read(), ANSWER_DEADLINE)
        # The head went out before the failure: the client learns of it by the close,
        # with the body short of its length, and never a second (error) response. It
        # never got the response whole: counted as code="reset", not as the 200 it began.
        assert head.startswith(b"HTTP/1.1 200 ")
        assert rest == b"x" * 10
        assert upstream_errors(before, server) == {"reset": 1}
        assert requests_by_code(before, server) == {"reset": 1}
        assert len(up.requests) == 1


async def test_upstream_closing_before_any_byte_fails_a_post_with_502_reset() -> None:
    async def hang_up(
        up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await up.next_request(reader)

    async with RawUpstream(hang_up) as up, running_server(config(port=up.port)) as server:
        before = Scrape.of(server)
        response = await request(server, post("/order", b"pay once"))
        assert_error(response, 502, "reset")
        assert upstream_errors(before, server) == {"reset": 1}
        assert requests_by_code(before, server) == {"502": 1}
        # A fresh connection failed: the request may have reached the application, so a
        # POST is never sent twice.
        assert [r.body for r in up.requests] == [b"pay once"]


async def test_garbage_instead_of_http_is_502_protocol() -> None:
    async def garbage(
        up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await up.next_request(reader)
        w.write(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02 not http at all\r\n\r\n")
        await w.drain()
        await reader.read()  # keep the socket open: sidelink must end it

    async with RawUpstream(garbage) as up, running_server(config(port=up.port)) as server:
        before = Scrape.of(server)
        async with raw_client(server) as (reader, writer):
            writer.write(get("/"))
            response = await read_response(reader)
            assert_error(response, 502, "protocol")
            # The connection to the client stays usable: the failure was upstream's.
            assert not response.close
            writer.write(get("/again"))
            assert_error(await read_response(reader), 502, "protocol")
        assert upstream_errors(before, server) == {"protocol": 2}
        assert requests_by_code(before, server) == {"502": 2}
        # The garbled connections are not pooled.
        assert server.routes["app1"].stats.pool_idle == 0
        await until(lambda: server.routes["app1"].stats.active_upstream == 0, ANSWER_DEADLINE)


@pytest.mark.parametrize(
    "after",
    [b"JUNK\r\n\r\n", b"HTTP/1.1 200 OK\r\n", OK],
    ids=["garbage", "half-a-head", "an-unasked-response"],
)
async def test_bytes_after_a_whole_response_close_that_connection_and_nothing_else(
    after: bytes,
) -> None:
    async def answer_then_more(
        up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        while await up.next_request(reader) is not None:
            w.write(OK + after)  # one write: the extra bytes come in the same read
            await w.drain()

    async with through(answer_then_more) as (up, server, reader, writer):
        before = Scrape.of(server)
        for path in ("/first", "/second"):
            writer.write(get(path))
            response = await read_response(reader)
            # The answer that came whole stands; what followed it is never taken as the
            # answer to the client's next request (nor does it make one up).
            assert (response.status, response.body) == (200, b"ok")
        writer.write(get("/third"))
        assert (await read_response(reader)).status == 200
        assert not await more_arrives(reader)
        assert requests_by_code(before, server) == {"200": 3}
        assert upstream_errors(before, server) == {}
        # Each connection that said too much was dropped, not pooled.
        assert up.connections == 3
        await until(lambda: server.routes["app1"].stats.active_upstream == 0, ANSWER_DEADLINE)


async def test_bytes_after_a_whole_response_close_the_bridged_connection_only() -> None:
    """The same through an HTTP/2 client, bridged to the HTTP/1.1 pod."""

    async def answer_then_more(
        up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        while await up.next_request(reader) is not None:
            w.write(OK + b"HTTP/1.1 200 OK\r\n")
            await w.drain()

    async with (
        RawUpstream(answer_then_more) as up,
        running_server(config(port=up.port, upstream_protocol="http1")) as server,
        H2Client.open(route_address(server)) as client,
    ):
        before = Scrape.of(server)
        for path in ("/first", "/second", "/third"):
            answer = await client.request("GET", path)
            assert (answer.status, answer.body) == (200, b"ok")
        assert requests_by_code(before, server) == {"200": 3}
        assert upstream_errors(before, server) == {}
        assert up.connections == 3
        await until(lambda: server.routes["app1"].stats.active_upstream == 0, ANSWER_DEADLINE)


async def more_arrives(reader: asyncio.StreamReader) -> bool:
    """Whether anything (a byte or the close) comes within a short wait."""
    try:
        await asyncio.wait_for(reader.read(1), 0.2)
    except TimeoutError:
        return False
    return True


# --- 503: nothing to send the request to ------------------------------------------------


async def test_a_name_never_resolved_is_503_no_endpoints_at_once(dns: DnsServer) -> None:
    # No record at all: every name of the search list answers NXDOMAIN. The request is
    # answered once that first lookup has failed, not held for connect_timeout (a client
    # whose deadline is shorter would see a timeout, not the name's failure).
    text = config(dns, service="app1", port=80, connect_timeout="20s")
    async with running_server(text) as server:
        before = Scrape.of(server)
        started = time.monotonic()
        response = await request(server, get("/"))
        elapsed = time.monotonic() - started
        assert_error(response, 503, "no_endpoints")
        assert b"NXDOMAIN" in response.body or b"nxdomain" in response.body.lower(), response
        assert elapsed < 10.0
        assert upstream_errors(before, server) == {"no_endpoints": 1}
        assert requests_by_code(before, server) == {"503": 1}


async def test_a_request_waits_for_the_first_answer_of_a_slow_nameserver(
    dns: DnsServer,
) -> None:
    """At start the first lookup may still be on its way: a request waits for it (up to
    connect_timeout) rather than fail while nothing is known yet."""
    async with AppPods(tagged_app(), POD) as up:
        dns.set_a(f"{APP1}.", [POD], ttl=30)
        dns.set_failure(None, "drop")  # its first try times out (500ms); the second is answered
        asyncio.get_running_loop().call_later(0.2, dns.set_failure, None, None)
        text = config(dns, service="app1", port=up.port, connect_timeout="5s")
        async with running_server(text) as server:
            response = await request(server, get("/"))
            assert response.status == 200, response


@pytest.mark.parametrize("dead", [(DEAD,), (DEAD, "127.0.0.6", "127.0.0.7")])
async def test_connect_refused_on_every_endpoint_counts_each_failure(
    dns: DnsServer, dead: tuple[str, ...]
) -> None:
    dns.set_a(APP1, list(dead), ttl=30)
    async with running_server(config(dns, service="app1", port=free_port(DEAD))) as server:
        await until(lambda: len(server.routes["app1"].endpoints) == len(dead), ANSWER_DEADLINE)
        before = Scrape.of(server)
        response = await request(server, get("/"))
        # Three attempts (retries: 2): each endpoint once, or the only one three times (a
        # ClusterIP has nowhere else to go), then nothing is left: as the SPEC's table
        # says for "every endpoint failing", that is 503 no_endpoints; the metric counts
        # every refusal and no_endpoints once.
        assert_error(response, 503, "no_endpoints")
        assert upstream_errors(before, server) == {"connect_refused": 3, "no_endpoints": 1}
        assert grew(before, server, "sidelink_retries_total") == 2
        assert requests_by_code(before, server) == {"503": 1}
        # Never more than max_ejected_percent (50) out: none of one, one of three.
        out = len(dead) * 50 // 100
        assert grew(before, server, "sidelink_endpoint_ejections_total") == out
        states = [ep.state for ep in server.routes["app1"].endpoints.endpoints]
        assert states.count("ejected") == out


# --- 504: the upstream did not answer in time ------------------------------------------


@contextlib.contextmanager
def full_backlog(host: str) -> Iterator[int]:
    """A port whose accept queue is full: Linux drops further SYNs, so connects hang."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind((host, 0))
        listener.listen(0)  # room for one connection, never accepted
        port = int(listener.getsockname()[1])
        filler.connect((host, port))
        yield port
    finally:
        filler.close()
        listener.close()


async def test_a_connect_that_hangs_is_counted_as_connect_timeout() -> None:
    with full_backlog(POD) as port:
        try:
            await asyncio.wait_for(asyncio.open_connection(POD, port), 0.2)
        except TimeoutError:
            pass
        else:
            pytest.skip("this kernel completes connects beyond a full accept queue")
        async with running_server(config(port=port)) as server:
            before = Scrape.of(server)
            started = time.monotonic()
            response = await request(server, get("/"))
            elapsed = time.monotonic() - started
            # The one endpoint failed three times (retries: 2; a lost SYN is survived):
            # counted as such, and as "every endpoint failing", which the client hears as
            # 503 no_endpoints (the detail says why).
            assert_error(response, 503, "no_endpoints")
            assert b"timed out" in response.body
            assert elapsed < 3.0  # three connects of connect_timeout (300ms) each
            assert upstream_errors(before, server) == {"connect_timeout": 3, "no_endpoints": 1}
            assert requests_by_code(before, server) == {"503": 1}


async def test_an_upstream_that_never_answers_is_504_and_the_client_connection_lives_on() -> None:
    async def silent_on_slow(
        up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        while (req := await up.next_request(reader)) is not None:
            if req.target == "/slow":
                await reader.read()  # read on, answer never
                return
            w.write(OK)
            await w.drain()

    async with through(silent_on_slow) as (up, server, reader, writer):
        before = Scrape.of(server)
        started = time.monotonic()
        writer.write(get("/slow"))
        response = await read_response(reader)
        elapsed = time.monotonic() - started
        assert_error(response, 504, "timeout")
        assert not response.close
        assert 0.5 <= elapsed < 2.0  # request_timeout is 500ms
        assert upstream_errors(before, server) == {"timeout": 1}
        # Same connection, next request: served.
        writer.write(get("/good"))
        response = await read_response(reader)
        assert (response.status, response.body) == (200, b"ok")
        assert requests_by_code(before, server) == {"504": 1, "200": 1}
        assert [r.target for r in up.requests] == ["/slow", "/good"]


# --- retries: only where safe --------------------------------------------------------------


async def test_connect_failure_on_one_of_two_endpoints_is_retried(dns: DnsServer) -> None:
    async with AppPods(tagged_app(), POD) as p:
        dns.set_a(APP1, [POD, DEAD], ttl=30)
        text = config(dns, service="app1", port=p.port, balance="round_robin")
        async with running_server(text) as server:
            await until(lambda: len(server.routes["app1"].endpoints) == 2, ANSWER_DEADLINE)
            before = Scrape.of(server)
            async with raw_client(server) as (reader, writer):
                for i in range(6):
                    writer.write(get(f"/r{i}"))
                    response = await read_response(reader)
                    assert response.status == 200, response
                    assert response.body.startswith(POD.encode())
            # Round robin sends one of the first two requests to the dead pod: refused,
            # retried on the other, and the dead one ejected.
            assert grew(before, server, "sidelink_retries_total") >= 1
            assert upstream_errors(before, server) == {"connect_refused": 1}
            assert requests_by_code(before, server) == {"200": 6}
            assert grew(before, server, "sidelink_endpoint_ejections_total") == 1
            assert len(p.seen) == 6


def stale_after_one(counts: list[int]) -> RawHandler:
    """A server that answers one request per connection with keep-alive, then hangs up.

    The next request on that connection is read and the socket closed without a byte of
    answer: the race of a server closing an idle keep-alive connection just as the
    client reuses it, made deterministic. `counts` gets the requests seen per connection.
    """

    async def handler(
        up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        index = len(counts)
        counts.append(0)
        if await up.next_request(reader) is None:
            return
        counts[index] += 1
        w.write(OK)
        await w.drain()
        if await up.next_request(reader) is not None:
            counts[index] += 1
        # Returning closes the socket with no answer.

    return handler


async def test_get_on_a_pooled_connection_the_server_closed_is_retried() -> None:
    counts: list[int] = []
    async with through(stale_after_one(counts)) as (up, server, reader, writer):
        stats = server.routes["app1"].stats
        writer.write(get("/first"))
        assert (await read_response(reader)).status == 200
        await until(lambda: stats.pool_idle == 1, ANSWER_DEADLINE, "the connection pooled")
        before = Scrape.of(server)
        writer.write(get("/second"))
        response = await read_response(reader)
        assert (response.status, response.body) == (200, b"ok")
        assert grew(before, server, "sidelink_retries_total") == 1
        assert requests_by_code(before, server) == {"200": 1}
        # The GET reached the first connection (which died) and then a fresh one.
        assert [r.target for r in up.requests] == ["/first", "/second", "/second"]
        assert counts == [2, 1]


async def test_post_on_a_pooled_connection_the_server_closed_is_not_replayed() -> None:
    counts: list[int] = []
    async with through(stale_after_one(counts)) as (up, server, reader, writer):
        stats = server.routes["app1"].stats
        writer.write(get("/first"))
        assert (await read_response(reader)).status == 200
        await until(lambda: stats.pool_idle == 1, ANSWER_DEADLINE, "the connection pooled")
        before = Scrape.of(server)
        writer.write(post("/pay", b"once"))
        response = await read_response(reader)
        assert_error(response, 502, "reset")
        assert grew(before, server, "sidelink_retries_total") == 0
        assert upstream_errors(before, server) == {"reset": 1}
        assert requests_by_code(before, server) == {"502": 1}
        assert [r.method for r in up.requests].count("POST") == 1
        assert counts == [2]


# --- security on the request path ------------------------------------------------------


# request_timeout runs from the request head sent upstream: the neighbour, which stops
# mid-body while the hostile client acts, needs longer than the usual 500ms.
PATIENT = {"request_timeout": "5s"}


@dataclass
class Neighbour:
    """A well-behaved keep-alive client, mid-request while something hostile happens."""

    server: Server
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(*route_address(self.server))
        self.writer.write(get("/warmup"))
        assert (await read_response(self.reader)).status == 200
        # Half a request is in: sidelink has forwarded the head and waits for the body.
        self.writer.write(
            b"POST /neighbour HTTP/1.1\r\nHost: app1\r\nContent-Length: 8\r\n\r\nhalf"
        )
        await self.writer.drain()

    async def finish(self) -> None:
        assert self.reader is not None and self.writer is not None
        self.writer.write(b"done")
        response = await read_response(self.reader)
        assert response.status == 200, response
        assert response.body.endswith(b"POST /neighbour 8")
        for i in range(3):
            self.writer.write(get(f"/after{i}"))
            assert (await read_response(self.reader)).status == 200
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def neighbour(server: Server) -> AsyncIterator[Neighbour]:
    n = Neighbour(server)
    await n.start()
    yield n
    await n.finish()


HUGE_VALUE = b"v" * (70 * KIB)
MANY_HEADERS = b"".join(b"x-filler-%05d: %s\r\n" % (i, b"f" * 40) for i in range(1400))

HOSTILE = {
    "connect": (
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        405,
        "method_not_allowed",
    ),
    "absolute_form_for_another_host": (
        b"GET http://evil.example/hostile HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        400,
        "forbidden_host",
    ),
    "one_huge_header": (
        b"GET /hostile HTTP/1.1\r\nHost: app1\r\nX-Huge: " + HUGE_VALUE + b"\r\n\r\n",
        431,
        "head_too_large",
    ),
    "many_headers": (
        b"GET /hostile HTTP/1.1\r\nHost: app1\r\n" + MANY_HEADERS + b"\r\n",
        431,
        "head_too_large",
    ),
    "huge_target": (
        b"GET /hostile?" + b"q" * (70 * KIB) + b" HTTP/1.1\r\nHost: app1\r\n\r\n",
        431,
        "head_too_large",
    ),
    "content_length_and_transfer_encoding": (
        b"POST /hostile HTTP/1.1\r\nHost: app1\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        400,
        "bad_request",
    ),
    "transfer_encoding_and_content_length": (
        b"POST /hostile HTTP/1.1\r\nHost: app1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        400,
        "bad_request",
    ),
    "two_differing_content_lengths": (
        b"POST /hostile HTTP/1.1\r\nHost: app1\r\nContent-Length: 4\r\nContent-Length: 30\r\n\r\n"
        b"abcdGET /smuggled HTTP/1.1\r\n\r\n",
        400,
        "bad_request",
    ),
    "two_host_headers": (
        b"GET /hostile HTTP/1.1\r\nHost: app1\r\nHost: evil.example\r\n\r\n",
        400,
        "bad_request",
    ),
    "bad_chunk_size": (
        b"POST /hostile HTTP/1.1\r\nHost: app1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
        "bad_request",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
async def test_hostile_request_is_refused_without_disturbing_a_neighbour(case: str) -> None:
    raw, status, reason = HOSTILE[case]
    async with (
        AppPods(tagged_app(), POD) as p,
        running_server(config(port=p.port, **PATIENT)) as server,
    ):
        route = server.routes["app1"]
        async with neighbour(server):
            before = Scrape.of(server)
            async with raw_client(server) as (reader, writer):
                writer.write(raw)
                response = await read_response(reader)
                assert_error(response, status, reason)
                assert response.close
                assert await closed_by_peer(reader)
            assert requests_by_code(before, server) == {str(status): 1}
            # A refusal is the client's fault, never counted against the upstream.
            assert upstream_errors(before, server) == {}
        paths = [path for _, _, path, _ in p.seen]
        assert not [path for path in paths if "hostile" in path or "smuggled" in path], paths
        # The refused connection took no upstream connection with it.
        await no_connections(server)
        assert route.stats.active_upstream == route.stats.pool_idle


async def test_absolute_form_for_the_routes_own_ip_service_is_served_in_origin_form() -> None:
    async with RawUpstream(answer_ok) as up, running_server(config(port=up.port)) as server:
        target = f"http://{POD}:{up.port}/x?q=1"
        response = await request(server, get(target, host=f"{POD}:{up.port}"))
        assert (response.status, response.body) == (200, b"ok")
        assert [r.line for r in up.requests] == ["GET /x?q=1 HTTP/1.1"]


async def test_absolute_form_for_the_routes_own_service_name_is_served(dns: DnsServer) -> None:
    async with RawUpstream(answer_ok) as up:
        dns.set_a(APP1, [POD], ttl=30)
        async with running_server(config(dns, service="app1", port=up.port)) as server:
            response = await request(server, get("http://app1/x", host="app1"))
            assert (response.status, response.body) == (200, b"ok")
            response = await request(server, get(f"http://{APP1}./y", host="app1"))
            assert (response.status, response.body) == (200, b"ok")
        assert [r.line for r in up.requests] == ["GET /x HTTP/1.1", "GET /y HTTP/1.1"]


async def test_a_slow_head_is_cut_by_head_timeout_without_disturbing_a_neighbour() -> None:
    async with (
        AppPods(tagged_app(), POD) as p,
        running_server(config(port=p.port, **PATIENT)) as server,
    ):
        async with neighbour(server), raw_client(server) as (reader, writer):
            before = Scrape.of(server)
            head = get("/slowloris", "X-Pad: " + "p" * 100)
            answer = asyncio.ensure_future(read_until_close(reader))
            started = time.monotonic()
            for byte in head:
                if answer.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.wait([answer], timeout=0.2)  # one byte every 200ms
            data = await asyncio.wait_for(answer, ANSWER_DEADLINE)
            elapsed = time.monotonic() - started
            # head_timeout is 500ms, checked every 100ms (the whole head would take 20s).
            assert elapsed < 2.0
            if data:  # (a byte sent after the close may make the kernel reset it unread)
                reader2 = asyncio.StreamReader()
                reader2.feed_data(data)
                reader2.feed_eof()
                assert_error(await read_response(reader2), 408, "head_timeout")
            assert requests_by_code(before, server) == {"408": 1}
        assert all(path != "/slowloris" for _, _, path, _ in p.seen)


async def test_a_client_that_never_reads_is_dropped_after_idle_timeout() -> None:
    """Closing a connection whose client takes nothing must not wait for ever to flush."""

    async def big(up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await up.next_request(reader) is not None:
            body = b"b" * (8 * 1024 * KIB)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
            await w.drain()

    async with RawUpstream(big) as up:
        text = config(port=up.port, idle_timeout="1s")
        async with running_server(text) as server:
            _, writer = await connect(server, sockopt=(socket.SO_RCVBUF, 4 * KIB))
            before = Scrape.of(server)
            try:
                # A big response nobody reads, then half a head that head_timeout refuses.
                writer.write(get("/big") + b"GET /never-finished HTTP/1.1\r\n")
                await until(lambda: up.requests, ANSWER_DEADLINE)
                started = time.monotonic()
                await no_connections(server)
                assert time.monotonic() - started < 3.0  # idle_timeout is 1s
            finally:
                writer.close()
            assert requests_by_code(before, server).get("408", 0) <= 1


# --- hostile heads, generated -------------------------------------------------------------

# Each part of a generated head: usually well-formed, sometimes hostile, now and then
# random text, so that most heads get far enough into sidelink to meet the hostile part.
METHODS = (
    ["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "PATCH"],
    ["CONNECT", "TRACE", "PRI", "get", "G ET", "GET\x00", "", "\xff\xfe", "M" * 300],
)
TARGETS = (
    ["/", "/x?y=1", "/a/b%20c", "*", "http://app1/ok", "http://127.0.0.2/x"],
    [
        "http://evil.example/",
        "//evil.example/",
        "/%00",
        "/\x00",
        "/ /",
        "",
        "evil.example:443",
        "/" + "a" * (70 * KIB),
        "https://app1/",
        "/\r\nX-Injected: 1",
        "/\xff",
        "http://@evil/",
    ],
)
VERSIONS = (
    ["HTTP/1.1", "HTTP/1.0"],
    ["HTTP/2.0", "HTTP/0.9", "HTTP/1.1x", "", "http/1.1", "HTTP/9.9", "HTTP/1", "HTTP/1.1 x"],
)
NAMES = (
    [
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "Upgrade",
        "Expect",
        "TE",
        "Keep-Alive",
        "X-Ok",
        "Trailer",
        "Proxy-Connection",
    ],
    ["X Space", "X:Colon", "X\x00Nul", "", ":", "\xff", "N" * 5000, "Content-Length ", " Host"],
)
VALUES = (
    [
        "app1",
        "0",
        "3",
        "5",
        "chunked",
        "close",
        "keep-alive",
        "keep-alive, x-ok",
        "upgrade",
        "websocket",
        "100-continue",
        "trailers",
        "x",
    ],
    [
        "evil.example",
        "-1",
        "99999999999999999999",
        "gzip, chunked",
        "chunked, gzip",
        "a\r\nX-Injected: 1",
        "a\nX-Injected: 1",
        "a\x00b",
        "a\r\n folded",
        "\t",
        "v" * 5000,
        "0x10",
        "1 2",
        "v" * (70 * KIB),
        "content-length",
    ],
)
BODIES = [
    b"",
    b"abc",
    b"0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"zz\r\n",
    b"-1\r\n",
    b"ffffffffffffffffffff\r\nx\r\n",
    b"5;ext=1\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    b"5\r\nhelloXX",
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app1\r\n\r\n",
    b"3\nabc\n0\n\n",
]


def mostly(parts: tuple[list[str], list[str]]) -> st.SearchStrategy[str]:
    valid, hostile = parts
    return st.integers(0, 9).flatmap(
        lambda n: (
            st.sampled_from(valid)
            if n < 6
            else st.sampled_from(hostile)
            if n < 9
            else st.text(max_size=30)
        )
    )


@st.composite
def hostile_heads(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(min_size=1, max_size=600))
    eol = draw(st.sampled_from(["\r\n"] * 6 + ["\n", "\r"]))
    method, target, version = draw(mostly(METHODS)), draw(mostly(TARGETS)), draw(mostly(VERSIONS))
    headers = draw(st.lists(st.tuples(mostly(NAMES), mostly(VALUES)), max_size=6))
    head = f"{method} {target} {version}{eol}" + "".join(f"{n}: {v}{eol}" for n, v in headers)
    raw = head.encode("utf-8", "surrogateescape") + eol.encode() + draw(st.sampled_from(BODIES))
    if draw(st.booleans()):
        raw += get("/pipelined")  # a well-formed request right behind it
    if draw(st.integers(0, 3)) == 0:
        raw = raw[: draw(st.integers(1, len(raw)))]  # cut anywhere
    return raw


RESPONSE_HEAD = re.compile(
    rb"HTTP/1\.1 (\d{3}) [\t -~]*\r\n(?:[!#-'*+.0-9A-Z^_`a-z|~-]+: [\t -~]*\r\n)*\r\n"
)


def parse_responses(data: bytes) -> list[int]:
    """The statuses of the responses in data, whose heads must be well-formed HTTP/1.1.

    (Bodies are not parsed: a response to HEAD declares a length it does not send, and
    only the request says which one that is.)
    """
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    statuses = []
    for match in re.finditer(rb"HTTP/1\.1 \d{3} ", data):
        head = RESPONSE_HEAD.match(data, match.start())
        assert head, data[match.start() : match.start() + 300]
        statuses.append(int(head.group(1)))
    return statuses


async def probe(server: Server, raw: bytes) -> list[int]:
    """raw on a fresh connection, then EOF: the statuses sidelink answered before closing."""
    reader, writer = await asyncio.open_connection(*route_address(server))
    try:
        writer.write(raw)
        with contextlib.suppress(ConnectionError):
            writer.write_eof()
        try:
            data = await asyncio.wait_for(reader.read(), ANSWER_DEADLINE)
        except ConnectionResetError:
            return []
    finally:
        writer.close()
    return parse_responses(data) if data else []


async def test_hostile_heads_get_an_answer_or_a_close(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sidelink")
    sidelink_logger = logging.getLogger("sidelink")
    sidelink_logger.addHandler(caplog.handler)  # in case another test stopped propagation
    loop = asyncio.get_running_loop()
    try:
        async with RawUpstream(answer_ok) as up, running_server(config(port=up.port)) as server:

            @settings(
                max_examples=100,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture],
            )
            @given(raw=hostile_heads())
            def every_head_is_answered(raw: bytes) -> None:
                future = asyncio.run_coroutine_threadsafe(probe(server, raw), loop)
                statuses = future.result(ANSWER_DEADLINE + 2)
                for status in statuses:
                    assert status == 200 or 400 <= status <= 599, (raw, statuses)

            # Hypothesis drives the examples from a thread while sidelink serves here.
            await asyncio.to_thread(every_head_is_answered)
            response = await request(server, get("/still-serving"))
            assert (response.status, response.body) == (200, b"ok")
            await no_connections(server)
    finally:
        sidelink_logger.removeHandler(caplog.handler)
    errors = [
        r for r in caplog.records if r.name.startswith("sidelink") and r.levelno >= logging.ERROR
    ]
    assert not errors, [r.getMessage() for r in errors]


# --- leaks -------------------------------------------------------------------------------


async def test_a_refused_request_leaks_no_connection() -> None:
    async with RawUpstream(answer_ok) as up, running_server(config(port=up.port)) as server:
        stats = server.routes["app1"].stats
        before = Scrape.of(server)
        clients = []
        for _ in range(5):
            clients.append(await asyncio.open_connection(*route_address(server)))
        await until(lambda: stats.active_downstream == 5, ANSWER_DEADLINE)
        assert Scrape.of(server).get("sidelink_connections_active", side="downstream") == 5
        for reader, writer in clients:
            writer.write(b"GET /bad path HTTP/1.1\r\nHost: app1\r\n\r\n")
            assert_error(await read_response(reader), 400, "bad_request")
            writer.close()
        await no_connections(server)
        after = Scrape.of(server)
        assert after.get("sidelink_connections_active", side="downstream") == 0
        assert after.get("sidelink_connections_active", side="upstream") == 0
        assert after.get("sidelink_pool_idle_connections") == 0
        assert grew(before, server, "sidelink_connections_opened_total", side="upstream") == 0
        assert up.connections == 0
        assert requests_by_code(before, server) == {"400": 5}


async def read_head_then_wait(
    up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> None:
    """Reads a request head, then reads on (a body that may never end) and never answers."""
    await up.next_request(reader)
    await reader.read()


async def test_a_body_broken_mid_request_is_400_at_once_and_not_blamed_on_upstream() -> None:
    async with (
        RawUpstream(read_head_then_wait) as up,
        running_server(config(port=up.port, **PATIENT)) as server,
    ):
        stats = server.routes["app1"].stats
        before = Scrape.of(server)
        async with raw_client(server) as (reader, writer):
            writer.write(
                b"POST /upload HTTP/1.1\r\nHost: app1\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n"
            )
            # The head and the first chunk have gone upstream; then a bad chunk size.
            await until(lambda: up.requests, ANSWER_DEADLINE, "the head upstream")
            started = time.monotonic()
            writer.write(b"zz\r\n")
            response = await read_response(reader)
            assert_error(response, 400, "bad_request")
            assert time.monotonic() - started < 2.5  # not after request_timeout (5s)
            assert await closed_by_peer(reader)
        assert requests_by_code(before, server) == {"400": 1}
        assert upstream_errors(before, server) == {}
        # The upstream has half a request: that connection can never be reused.
        await until(lambda: stats.active_upstream == 0, ANSWER_DEADLINE)
        assert stats.pool_idle == 0
        await no_connections(server)


async def test_a_body_that_stalls_is_cut_by_idle_timeout_not_request_timeout() -> None:
    async with through(read_head_then_wait, idle_timeout="1s") as (_, server, reader, writer):
        before = Scrape.of(server)
        started = time.monotonic()
        writer.write(post("/upload", b"0123456789")[:-5])  # half the body, then nothing
        response = await read_response(reader)
        elapsed = time.monotonic() - started
        # request_timeout (500ms) waits for the whole request; the stall is the
        # client's, cut by idle_timeout (1s) with a 408, and the connection closes.
        assert elapsed > 0.9
        assert_error(response, 408, "idle_timeout")
        assert response.close
        assert await closed_by_peer(reader)
        assert upstream_errors(before, server) == {}
        assert requests_by_code(before, server) == {"408": 1}
        await until(lambda: server.routes["app1"].stats.active_upstream == 0, ANSWER_DEADLINE)


async def test_pipelined_requests_then_a_half_close_are_all_answered() -> None:
    async with RawUpstream(answer_ok) as up, running_server(config(port=up.port)) as server:
        async with raw_client(server) as (reader, writer):
            writer.write(get("/a") + get("/b") + get("/c"))
            writer.write_eof()  # nothing more to say, but the answers are still wanted
            for _ in range(3):
                response = await read_response(reader)
                assert (response.status, response.body) == (200, b"ok")
            assert response.close
            assert await closed_by_peer(reader)
        assert [r.target for r in up.requests] == ["/a", "/b", "/c"]


async def test_a_broken_body_behind_a_pipelined_request_never_goes_upstream() -> None:
    async def slow_first(
        up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        while (req := await up.next_request(reader)) is not None:
            if req.target == "/first":
                await up.release.wait()
            w.write(OK)
            await w.drain()

    async with through(slow_first, **PATIENT) as (up, server, reader, writer):
        before = Scrape.of(server)
        writer.write(get("/first"))
        await until(lambda: up.requests, ANSWER_DEADLINE, "the first request upstream")
        # Queued behind /first: a chunked upload whose second chunk size is garbage.
        writer.write(
            b"POST /second HTTP/1.1\r\nHost: app1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\nzz\r\n"
        )
        connections = server.routes["app1"].connections
        await until(
            lambda: any(getattr(c, "rejected", None) for c in connections),
            ANSWER_DEADLINE,
            "sidelink to refuse the second request",
        )
        up.release.set()
        response = await read_response(reader)
        assert (response.status, response.body) == (200, b"ok")  # /first, answered in turn
        assert_error(await read_response(reader), 400, "bad_request")
        assert await closed_by_peer(reader)
        assert [r.target for r in up.requests] == ["/first"]
        assert requests_by_code(before, server) == {"200": 1, "400": 1}
        assert upstream_errors(before, server) == {}


async def test_a_header_line_that_never_ends_is_cut_at_64_kib() -> None:
    async with (
        RawUpstream(answer_ok) as up,
        running_server(config(port=up.port, head_timeout="10s")) as server,
    ):
        before = Scrape.of(server)
        async with raw_client(server) as (reader, writer):
            # More than one read of sidelink's (256 KiB at most), so it must decide on a
            # partial line rather than wait for the line's end.
            writer.write(b"GET / HTTP/1.1\r\nHost: app1\r\nX-Endless: " + b"e" * (400 * KIB))
            # (Closed with part of the head unread, the kernel may send a reset first.)
            with contextlib.suppress(ConnectionResetError, asyncio.IncompleteReadError):
                assert_error(await read_response(reader), 431, "head_too_large")
        await until(lambda: requests_by_code(before, server) == {"431": 1}, ANSWER_DEADLINE)
        assert up.connections == 0
        await no_connections(server)


# --- refusals reach the client whole ---------------------------------------------------------


async def test_an_unsupported_http_version_is_505() -> None:
    async with running_server(config(port=free_port(POD))) as server:
        before = Scrape.of(server)
        response = await request(server, b"GET / HTTP/2.0\r\nHost: app1\r\n\r\n")
        assert_error(response, 505, "version_not_supported")
        assert requests_by_code(before, server) == {"505": 1}


async def test_a_refused_client_still_sending_gets_the_whole_answer() -> None:
    """Lingering close: the refusal is not destroyed by a reset when the client sends on."""
    async with (
        running_server(config(port=free_port(POD))) as server,
        raw_client(server) as (reader, writer),
    ):
        writer.write(b"CONNECT evil:443 HTTP/1.1\r\nHost: evil\r\n\r\n")
        await writer.drain()
        # The client goes on sending (a body sidelink will never read) after the refusal.
        for _ in range(20):
            writer.write(b"x" * 16384)
            await asyncio.sleep(0)
        response = await read_response(reader)
        assert_error(response, 405, "method_not_allowed")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), ANSWER_DEADLINE) == b""


async def test_a_slow_upload_is_not_cut_by_request_timeout() -> None:
    """request_timeout (500ms here) runs from the end of the request, not its head."""

    async def answer(
        up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        while (req := await up.next_request(reader)) is not None:
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(req.body), req.body))
            await w.drain()

    async with through(answer) as (up, _, reader, writer):
        parts = [b"a" * 100, b"b" * 100, b"c" * 100, b"d" * 100]
        writer.write(b"POST /up HTTP/1.1\r\nHost: app1\r\nContent-Length: 400\r\n\r\n")
        for part in parts:  # 4 x 300ms: well past request_timeout before the body ends
            await asyncio.sleep(0.3)
            writer.write(part)
        response = await read_response(reader)
        assert (response.status, response.body) == (200, b"".join(parts))
        assert [r.body for r in up.requests] == [b"".join(parts)]


async def test_an_endless_response_head_is_502_protocol() -> None:
    async def endless(
        up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await up.next_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\n")
        with contextlib.suppress(ConnectionError):
            for i in range(2000):  # 2000 x 100 bytes: never a blank line
                w.write(b"X-Filler-%04d: %s\r\n" % (i, b"f" * 83))
                await w.drain()
        await reader.read()

    async with RawUpstream(endless) as up, running_server(config(port=up.port)) as server:
        before = Scrape.of(server)
        response = await request(server, get("/"))
        assert_error(response, 502, "protocol")
        assert b"64 KiB" in response.body
        assert upstream_errors(before, server) == {"protocol": 1}


@pytest.mark.parametrize("client", ["http1", "http2"])
async def test_a_whole_response_head_over_64_kib_is_502_protocol(client: str) -> None:
    """A head that ends, but past the limit (one 70 KB field): refused as the endless one
    is, also to an HTTP/2 client bridged to the HTTP/1.1 pod (which the client's engine
    could not have taken: it was counted 200 and the stream reset)."""

    async def big_head(
        up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        while await up.next_request(reader) is not None:
            w.write(
                b"HTTP/1.1 200 OK\r\nX-Big: %s\r\nContent-Length: 2\r\n\r\nok" % (b"b" * 70_000)
            )
            await w.drain()

    async with (
        RawUpstream(big_head) as up,
        running_server(config(port=up.port, upstream_protocol="http1")) as server,
    ):
        before = Scrape.of(server)
        if client == "http1":
            response = await request(server, get("/"))
            assert_error(response, 502, "protocol")
        else:
            async with H2Client.open(route_address(server)) as h2:
                answer = await h2.request("GET", "/")
            assert (answer.status, answer.header("sidelink-error")) == (502, "protocol")
            assert b"64 KiB" in answer.body
        assert upstream_errors(before, server) == {"protocol": 1}
        assert requests_by_code(before, server) == {"502": 1}


# --- every answer counted and timed once ------------------------------------------------


async def test_every_answer_is_counted_and_timed_once_refusals_included() -> None:
    """requests_total and the duration histogram see the same answers: the upstream's,
    sidelink's own errors, and its refusals (400, 405, 408, 431), each with its method,
    or OTHER for a request too malformed to have one."""

    async def ok_or_404(
        up: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        while (request := await read_request(reader)) is not None:
            w.write(
                OK
                if request.target != "/missing"
                else b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
            )
            await w.drain()

    refusals = [
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "GET", "400"),
        (b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org\r\n\r\n", "CONNECT", "405"),
        (b"\x01\x02\x03 / HTTP/1.1\r\n\r\n", "OTHER", "400"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 70 * KIB + b"\r\n\r\n", "POST", "431"),
        (b"PUT /slow HTTP/1.1\r\nHost: a\r\n", "PUT", "408"),  # the head never ends
    ]
    async with (
        RawUpstream(ok_or_404) as up,
        running_server(config(port=up.port)) as server,
    ):
        before = Scrape.of(server)
        async with raw_client(server) as (reader, writer):
            for path in ("/", "/missing", "/"):
                writer.write(get(path))
                await read_response(reader)
        for raw, _, code in refusals:
            async with raw_client(server) as (reader, writer):
                writer.write(raw)
                response = await read_response(reader)
                assert response.status == int(code), raw[:40]
        after = Scrape.of(server)

        def grown(name: str, **labels: str) -> float:
            return after.get(name, **labels) - before.get(name, **labels)

        assert requests_by_code(before, server) == {
            "200": 2,
            "404": 1,
            "400": 2,
            "405": 1,
            "408": 1,
            "431": 1,
        }
        for method, code in (
            ("GET", "400"),
            ("OTHER", "400"),
            ("CONNECT", "405"),  # (a method SPEC names: not OTHER, which is for no method)
            ("POST", "431"),
            ("PUT", "408"),
        ):
            assert grown("sidelink_requests_total", method=method, code=code) == 1, (method, code)
        assert grown("sidelink_requests_total", method="DELETE") == 0
        assert grown("sidelink_request_duration_seconds_count") == 8
        assert grown("sidelink_requests_total") == 8
