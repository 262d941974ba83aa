"""HTTP forwarding through sidelink in-process, with real clients and real upstream servers.

Upstreams are aiohttp servers (or, for framings aiohttp will not produce, raw asyncio
servers) on 127.0.0.2, 127.0.0.3, ... standing in for pod IPs. Clients are the ones
applications use: the stdlib's http.client, aiohttp, curl, and raw sockets where the
exact bytes on the wire are the point. Every test runs on asyncio's default loop and
on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.dnsserver import DnsServer
from proxy.server import Server
from tests.helpers import require_tool, resolver_yaml, route_address, running_server, until

pytestmark = pytest.mark.both_loops

APP1 = "app1.ns1.svc.cluster.local"
POD1 = "127.0.0.2"
POD2 = "127.0.0.3"
MB = 1024 * 1024
CHUNK = 256 * 1024
# The most sidelink's process may grow while 100 MB stream through it.
RSS_BUDGET = 40 * MB
IO_TIMEOUT = 10.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- upstream servers ---------------------------------------------------------------


class Pods:
    """One aiohttp app served on several loopback addresses sharing one port.

    Every request is tagged with the connection it came on (the peer address as the
    server sees it), so tests count upstream connections where they are made.
    """

    def __init__(self, app: web.Application, hosts: tuple[str, ...], **runner: Any) -> None:
        self.app = app
        self.hosts = hosts
        self.port = 0
        self.connections: set[tuple[str, tuple[str, int]]] = set()
        self.hits: Counter[str] = Counter()
        self.runner = web.AppRunner(app, access_log=None, **runner)
        app.middlewares.append(self._track)

    @web.middleware
    async def _track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        assert request.transport is not None
        host = request.transport.get_extra_info("sockname")[0]
        self.connections.add((host, request.transport.get_extra_info("peername")))
        self.hits[host] += 1
        return await handler(request)

    async def start(self) -> None:
        await self.runner.setup()
        for _ in range(20):
            first = web.TCPSite(self.runner, self.hosts[0], 0)
            await first.start()
            sites = [first]
            assert first._server is not None
            self.port = first._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            try:
                for host in self.hosts[1:]:
                    site = web.TCPSite(self.runner, host, self.port)
                    await site.start()
                    sites.append(site)
            except OSError:
                for site in sites:
                    await site.stop()
                continue
            return
        raise AssertionError(f"no common free port on {self.hosts}")


@contextlib.asynccontextmanager
async def pods(app: web.Application, *hosts: str, **runner: Any) -> AsyncIterator[Pods]:
    p = Pods(app, hosts or (POD1,), **runner)
    await p.start()
    try:
        yield p
    finally:
        await p.runner.cleanup()


def pod_of(request: web.Request) -> str:
    assert request.transport is not None
    return str(request.transport.get_extra_info("sockname")[0])


async def echo(request: web.Request) -> web.Response:
    """What the upstream saw: method, target, headers, body."""
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body.decode(errors="replace"),
            "pod": pod_of(request),
            "chunked": "chunked" in request.headers.get("Transfer-Encoding", ""),
        },
        headers={"X-Upstream": "yes"},
    )


def echo_app(**routes: Handler) -> web.Application:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_pod(handler: RawHandler, host: str = POD1) -> AsyncIterator[int]:
    """A hand-written upstream for framings aiohttp will not produce; yields its port."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(serve, host, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await server.wait_closed()


# --- sidelink config -------------------------------------------------------------------


def route(port: int, name: str = "app1", service: str = POD1, **settings: Any) -> dict[str, Any]:
    return {
        "name": name,
        "listen": "127.0.0.1:0",
        "service": service,
        "port": port,
        "protocol": "http",
        **settings,
    }


def config(*routes: dict[str, Any], dns: DnsServer | None = None) -> str:
    text = yaml.safe_dump({"routes": list(routes)})
    return text + (resolver_yaml(dns.port) if dns is not None else "")


def url(server: Server, path: str = "/", name: str | None = None) -> str:
    host, port = route_address(server, name)
    return f"http://{host}:{port}{path}"


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of the Prometheus exposition, as a scraper would read it."""
    body, _ = server.metrics.render(None)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels} in\n{body.decode()}")


# --- a raw HTTP client -----------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    head: bytes = b""

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


def _fields(lines: list[bytes]) -> list[tuple[str, str]]:
    out = []
    for line in lines:
        name, _, value = line.decode().partition(":")
        out.append((name.strip(), value.strip()))
    return out


async def read_head(reader: asyncio.StreamReader) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].split(b"\r\n")
    version, status, *_ = status_line.split(b" ", 2)
    assert version in (b"HTTP/1.1", b"HTTP/1.0"), status_line
    return Response(int(status), _fields(lines), head=head)


async def read_response(
    reader: asyncio.StreamReader, method: str = "GET", http10: bool = False
) -> Response:
    """One response, framed the way RFC 9112 section 6.3 says a client must read it."""
    async with asyncio.timeout(IO_TIMEOUT):
        r = await read_head(reader)
        while 100 <= r.status < 200 and r.status != 101:
            r = await read_head(reader)
        if method == "HEAD" or r.status in (204, 304):
            return r
        te = (r.header("transfer-encoding") or "").lower()
        length = r.header("content-length")
        if "chunked" in te:
            assert not http10, "chunked sent to an HTTP/1.0 client"
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    break
                parts.append(await reader.readexactly(size))
                assert await reader.readexactly(2) == b"\r\n"
            trailer_lines = []
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                trailer_lines.append(line[:-2])
            r.body = b"".join(parts)
            r.trailers = _fields(trailer_lines)
        elif length is not None:
            r.body = await reader.readexactly(int(length))
        else:
            r.body = await reader.read()  # until the close
        return r


@contextlib.asynccontextmanager
async def raw_client(
    server: Server, name: str | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(*route_address(server, name))
    try:
        yield reader, writer
    finally:
        writer.close()


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(IO_TIMEOUT):
        return await reader.read(1) == b""


def get(path: str = "/", *headers: str, method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: app1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- data -------------------------------------------------------------------------------


def chunks(total: int, seed: int = 1) -> Iterator[bytes]:
    """`total` bytes of incompressible data in CHUNK-sized pieces that all differ."""
    base = random.Random(seed).randbytes(CHUNK)
    for i in range(total // CHUNK):
        yield i.to_bytes(8, "big") + base[8:]


def digest(total: int, seed: int = 1) -> str:
    h = hashlib.sha256()
    for c in chunks(total, seed):
        h.update(c)
    return h.hexdigest()


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@contextlib.contextmanager
def peak_rss() -> Iterator[Callable[[], int]]:
    """The highest RSS seen while the block runs, sampled from a thread (not the loop)."""
    peak = rss()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.01):
            peak = max(peak, rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak
    finally:
        stop.set()
        thread.join()


@pytest.fixture(autouse=True)
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Anything sidelink lets escape to the loop's exception handler fails the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)
    assert not errors, errors


# --- real clients --------------------------------------------------------------------------


async def test_stdlib_http_client_keeps_one_connection_for_several_requests() -> None:
    async with pods(echo_app()) as up, running_server(config(route(up.port))) as server:
        host, port = route_address(server)

        def client() -> list[tuple[int, dict[str, str], bytes]]:
            conn = http.client.HTTPConnection(host, port, timeout=IO_TIMEOUT)
            out = []
            try:
                conn.request("GET", "/a?x=1", headers={"X-Trace": "t1"})
                sock = conn.sock
                for _ in range(2):
                    r = conn.getresponse()
                    out.append((r.status, dict(r.getheaders()), r.read()))
                    conn.request("POST", "/b", body=b"payload", headers={"X-Trace": "t2"})
                r = conn.getresponse()
                out.append((r.status, dict(r.getheaders()), r.read()))
                assert conn.sock is sock, "http.client had to reconnect"
            finally:
                conn.close()
            return out

        results = await asyncio.to_thread(client)

    assert [status for status, _, _ in results] == [200, 200, 200]
    seen = [json.loads(body) for _, _, body in results]
    assert [(s["method"], s["path"], s["body"]) for s in seen] == [
        ("GET", "/a?x=1", ""),
        ("POST", "/b", "payload"),
        ("POST", "/b", "payload"),
    ]
    assert ["X-Trace", "t1"] in seen[0]["headers"] and ["X-Trace", "t2"] in seen[1]["headers"]
    assert all(headers["X-Upstream"] == "yes" for _, headers, _ in results)
    assert all(headers["Content-Type"].startswith("application/json") for _, headers, _ in results)
    assert server.routes["app1"].stats.opened_downstream == 1
    assert len(up.connections) == 1


async def test_aiohttp_client_gets_status_headers_and_body() -> None:
    async def teapot(request: web.Request) -> web.Response:
        return web.Response(status=418, text="short and stout", headers={"X-Pot": "tea"})

    async with (
        pods(echo_app(**{"/teapot": teapot})) as up,
        running_server(config(route(up.port))) as server,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(url(server, "/teapot")) as r:
            assert (r.status, r.headers["X-Pot"], await r.text()) == (418, "tea", "short and stout")
        async with session.post(url(server, "/json?q=2"), json={"k": [1, 2]}) as r:
            assert r.status == 200 and r.headers["X-Upstream"] == "yes"
            seen = await r.json()
        assert (seen["method"], seen["path"], json.loads(seen["body"])) == (
            "POST",
            "/json?q=2",
            {"k": [1, 2]},
        )
        assert ["Content-Type", "application/json"] in seen["headers"]
        assert server.routes["app1"].stats.opened_downstream == 1


async def test_curl_gets_status_headers_and_body() -> None:
    curl = require_tool("curl")

    async def created(request: web.Request) -> web.Response:
        return web.Response(status=201, text="made " + await request.text(), headers={"X-Id": "7"})

    async with (
        pods(echo_app(**{"/things": created})) as up,
        running_server(config(route(up.port))) as server,
    ):
        proc = await asyncio.create_subprocess_exec(
            *(curl, "-sS", "-v", "--max-time", "10", "--data-binary", "widget"),
            *(url(server, "/things"), url(server, "/again?z=9")),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    verbose = err.decode()
    assert out.startswith(b"made widget")
    seen = json.loads(out[len(b"made widget") :])
    assert (seen["method"], seen["path"], seen["body"]) == ("POST", "/again?z=9", "widget")
    assert "< HTTP/1.1 201 Created" in verbose and "< X-Id: 7" in verbose
    assert re.search(r"Re-using existing connection|Reusing existing", verbose), verbose
    assert len(up.connections) == 1


# --- pooling and balancing ----------------------------------------------------------------


async def test_a_thousand_keep_alive_requests_use_a_handful_of_upstream_connections() -> None:
    clients, each = 10, 100
    async with pods(echo_app()) as up, running_server(config(route(up.port))) as server:

        async def client(i: int) -> list[int]:
            connector = aiohttp.TCPConnector(limit=1)
            async with aiohttp.ClientSession(connector=connector) as session:
                statuses = []
                for j in range(each):
                    async with session.get(url(server, f"/c{i}/{j}")) as r:
                        await r.read()
                        statuses.append(r.status)
                return statuses

        results = await asyncio.gather(*(client(i) for i in range(clients)))
        assert Counter(s for statuses in results for s in statuses) == {200: clients * each}
        assert up.hits[POD1] == clients * each
        # Never more upstream connections than requests in flight at once.
        assert 1 <= len(up.connections) <= clients, up.connections
        assert metric(server, "sidelink_connections_opened_total", side="upstream") <= clients
        assert metric(server, "sidelink_connections_opened_total", side="downstream") == clients
        assert metric(server, "sidelink_pool_idle_connections", route="app1") > 0


async def test_upstream_closing_idle_connections_never_costs_a_request() -> None:
    # aiohttp closes a keep-alive connection after 0.2 s idle; sidelink must notice
    # (or retry) rather than answer 502.
    async with (
        pods(echo_app(), keepalive_timeout=0.2) as up,
        running_server(config(route(up.port))) as server,
        aiohttp.ClientSession() as session,
    ):
        stats = server.routes["app1"].stats
        for i in range(4):
            async with session.get(url(server, f"/{i}")) as r:
                assert r.status == 200, await r.text()
            # The spacing is the stimulus, not a wait for a condition.
            await asyncio.sleep(0.3)
        assert len(up.connections) == 4
        assert stats.requests == {("GET", "200"): 4}
        await until(lambda: stats.pool_idle == 0, what="the closed idle connections to leave")


async def test_get_on_a_reused_connection_the_server_dropped_is_retried() -> None:
    # The race the idle test can only hope to hit, made certain: the server takes a
    # second request on a connection and closes without a byte of answer.
    connections = 0

    async def one_request_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.readuntil(b"\r\n\r\n")  # the next request: dropped

    async with (
        raw_pod(one_request_per_connection) as port,
        running_server(config(route(port))) as server,
        raw_client(server) as (reader, writer),
    ):
        for _ in range(3):
            writer.write(get("/"))
            r = await read_response(reader)
            assert (r.status, r.body) == (200, b"ok")
        assert connections >= 3
        assert metric(server, "sidelink_retries_total", route="app1") >= 2

        # A POST is not idempotent: the same failure is reported, not replayed.
        writer.write(get("/", "Content-Length: 1", method="POST") + b"x")
        r = await read_response(reader)
        assert r.status == 502 and r.header("sidelink-error") == "reset"


async def test_one_client_connection_is_balanced_per_request(dns: DnsServer) -> None:
    dns.set_a(APP1, [POD1, POD2], ttl=1)
    async with (
        pods(echo_app(), POD1, POD2) as up,
        running_server(config(route(up.port, service="app1"), dns=dns)) as server,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session,
    ):
        for i in range(200):
            async with session.get(url(server, f"/{i}")) as r:
                assert r.status == 200
                await r.read()
        assert server.routes["app1"].stats.opened_downstream == 1
    assert up.hits[POD1] + up.hits[POD2] == 200
    assert up.hits[POD1] >= 20 and up.hits[POD2] >= 20, up.hits


async def test_pool_repr_is_informative() -> None:
    gate = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(text="done")

    async with (
        pods(echo_app(**{"/held": held})) as up,
        running_server(config(route(up.port))) as server,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(url(server)) as r:
            await r.read()
        [endpoint] = server.routes["app1"].endpoints.all()
        pool = endpoint.pool
        assert pool is not None
        assert re.fullmatch(rf"<Pool app1 127\.0\.0\.2:{up.port} idle=1 active=0>", repr(pool))
        # While a request is out, its connection is active rather than idle.
        task = asyncio.ensure_future(session.get(url(server, "/held")))
        await until(lambda: pool.active == 1, what="the request to take the connection")
        assert re.fullmatch(rf"<Pool app1 127\.0\.0\.2:{up.port} idle=0 active=1>", repr(pool))
        gate.set()
        async with await task as r:
            assert await r.text() == "done"
        assert re.fullmatch(r"<Pool app1 \S+ idle=1 active=0>", repr(pool))


# --- big bodies ------------------------------------------------------------------------------


async def test_100_mb_upload_streams_with_either_framing() -> None:
    total = 100 * MB

    async def sink(request: web.Request) -> web.Response:
        h = hashlib.sha256()
        n = 0
        async for data in request.content.iter_any():
            h.update(data)
            n += len(data)
        chunked = "chunked" in request.headers.get("Transfer-Encoding", "")
        return web.json_response({"n": n, "sha256": h.hexdigest(), "chunked": chunked})

    async with (
        pods(echo_app(**{"/sink": sink})) as up,
        running_server(config(route(up.port))) as server,
    ):
        for chunked in (False, True):
            async with raw_client(server) as (reader, writer):
                framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
                before = rss()
                with peak_rss() as peak:
                    writer.write(get("/sink", framing, method="POST"))
                    for data in chunks(total):
                        writer.write(chunk_of(data) if chunked else data)
                        await writer.drain()
                    if chunked:
                        writer.write(b"0\r\n\r\n")
                    r = await read_response(reader)
                assert r.status == 200, r
                assert json.loads(r.body) == {"n": total, "sha256": digest(total), "chunked": chunked}
                print("RSS up", chunked, (peak() - before) // MB)
                assert peak() - before < RSS_BUDGET, (chunked, peak() - before)


def chunk_of(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_100_mb_download_streams_with_either_framing() -> None:
    total = 100 * MB

    async def source(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if request.query["framing"] == "chunked":
            response.enable_chunked_encoding()
        else:
            response.content_length = total
        await response.prepare(request)
        for data in chunks(total):
            await response.write(data)
        await response.write_eof()
        return response

    async with (
        pods(echo_app(**{"/source": source})) as up,
        running_server(config(route(up.port))) as server,
        aiohttp.ClientSession() as session,
    ):
        for framing in ("length", "chunked"):
            before = rss()
            with peak_rss() as peak:
                async with session.get(url(server, f"/source?framing={framing}")) as r:
                    assert r.status == 200
                    if framing == "chunked":
                        assert r.headers["Transfer-Encoding"] == "chunked"
                    else:
                        assert r.headers["Content-Length"] == str(total)
                    h = hashlib.sha256()
                    n = 0
                    async for data in r.content.iter_any():
                        h.update(data)
                        n += len(data)
            assert (n, h.hexdigest()) == (total, digest(total))
            print("RSS down", framing, (peak() - before) // MB)
            assert peak() - before < RSS_BUDGET, (framing, peak() - before)
