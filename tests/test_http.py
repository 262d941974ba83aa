"""HTTP forwarding through sidelink in-process, with real clients and real upstream servers.

Upstreams are aiohttp servers (or, for framings aiohttp will not produce, raw asyncio
servers) on 127.0.0.2, 127.0.0.3, ... standing in for pod IPs. Clients are the ones
applications use: the stdlib's http.client, aiohttp, curl, and raw sockets where the
exact bytes on the wire are the point. Every test runs on asyncio's default loop and
on uvloop.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import re
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from support.data import CHUNK, chunks, digest
from support.inproc import resolver_yaml, route_address, running_server, serving
from support.metrics import metric
from support.pods import HANG_UPS, AppHandler, AppPods, StreamHandler, StreamPods, pod_of
from support.procs import peak_rss, require_tool, rss
from support.wait import settled, until
from support.wire import (
    IO_TIMEOUT,
    chunk_of,
    closed_by_peer,
    connect,
    get,
    raw_client,
    read_head,
    read_response,
)

from proxy.config import ConfigSource, Overrides
from proxy.dnsserver import DnsServer
from proxy.server import Server

pytestmark = [pytest.mark.both_loops, pytest.mark.usefixtures("loop_errors")]

APP1 = "app1.ns1.svc.cluster.local"
POD1 = "127.0.0.2"
POD2 = "127.0.0.3"
MB = 1024 * 1024
# The most sidelink's process may grow while 100 MB stream through it.
RSS_BUDGET = 40 * MB
TEST_SOCKET_BUFFER = 64 * 1024
STALL_BOUND = 32 * MB

# --- upstream servers ---------------------------------------------------------------


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


def echo_app(**routes: AppHandler) -> web.Application:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def raw_pod(handler: StreamHandler) -> StreamPods:
    """A hand-written upstream for framings aiohttp will not produce (sidelink may hang up)."""
    return StreamPods(handler, POD1, tolerate=HANG_UPS)


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


# --- real clients --------------------------------------------------------------------------


async def test_stdlib_http_client_keeps_one_connection_for_several_requests() -> None:
    calls = [("GET", "/a?x=1", None), ("POST", "/b", b"payload"), ("DELETE", "/c", None)]
    async with AppPods(echo_app()) as up, running_server(config(route(up.port))) as server:
        host, port = route_address(server)

        def client() -> list[tuple[int, dict[str, str], bytes]]:
            conn = http.client.HTTPConnection(host, port, timeout=IO_TIMEOUT)
            out = []
            socks: list[object] = []
            try:
                for i, (method, path, body) in enumerate(calls):
                    conn.request(method, path, body=body, headers={"X-Trace": f"t{i}"})
                    r = conn.getresponse()
                    out.append((r.status, dict(r.getheaders()), r.read()))
                    socks.append(conn.sock)
            finally:
                conn.close()
            assert all(sock is socks[0] for sock in socks), "http.client had to reconnect"
            return out

        results = await asyncio.to_thread(client)

    assert [status for status, _, _ in results] == [200, 200, 200]
    seen = [json.loads(body) for _, _, body in results]
    assert [(s["method"], s["path"], s["body"].encode() or None) for s in seen] == calls
    assert all(["X-Trace", f"t{i}"] in s["headers"] for i, s in enumerate(seen))
    assert all(headers["X-Upstream"] == "yes" for _, headers, _ in results)
    assert all(headers["Content-Type"].startswith("application/json") for _, headers, _ in results)
    assert server.routes["app1"].stats.opened_downstream == 1
    assert len(up.connections) == 1


async def test_aiohttp_client_gets_status_headers_and_body() -> None:
    async def teapot(request: web.Request) -> web.Response:
        return web.Response(status=418, text="short and stout", headers={"X-Pot": "tea"})

    async with (
        AppPods(echo_app(**{"/teapot": teapot})) as up,
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
        AppPods(echo_app(**{"/things": created})) as up,
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
    async with AppPods(echo_app()) as up, running_server(config(route(up.port))) as server:

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
        AppPods(echo_app(), keepalive_timeout=0.2) as up,
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
        assert stats.requests == {(b"GET", 200): 4}
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
        raw_pod(one_request_per_connection) as up,
        running_server(config(route(up.port))) as server,
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
        AppPods(echo_app(), POD1, POD2) as up,
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
        AppPods(echo_app(**{"/held": held})) as up,
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
        AppPods(echo_app(**{"/sink": sink})) as up,
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
                assert json.loads(r.body) == {
                    "n": total,
                    "sha256": digest(total),
                    "chunked": chunked,
                }
                assert peak() - before < RSS_BUDGET, (chunked, peak() - before)


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
        AppPods(echo_app(**{"/source": source})) as up,
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
            assert peak() - before < RSS_BUDGET, (framing, peak() - before)


# --- framing ---------------------------------------------------------------------------------


async def test_chunked_response_trailers_reach_the_client() -> None:
    async def with_trailer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc123\r\n\r\n"
        )
        await writer.drain()
        await reader.read()

    async with (
        raw_pod(with_trailer) as up,
        running_server(config(route(up.port))) as server,
        raw_client(server) as (reader, writer),
    ):
        writer.write(get("/", "TE: trailers"))
        r = await read_response(reader)
    assert (r.status, r.header("transfer-encoding"), r.body) == (200, "chunked", b"hello world")
    assert r.header("trailer") == "X-Checksum"
    assert r.trailers == [("X-Checksum", "abc123")]


async def test_chunked_request_trailers_reach_the_upstream() -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readuntil(b"0\r\n")
        trailers = await reader.readuntil(b"\r\n\r\n")
        seen.append(head + body + trailers)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await reader.read()

    async with (
        raw_pod(record) as up,
        running_server(config(route(up.port))) as server,
        raw_client(server) as (reader, writer),
    ):
        writer.write(get("/", "Transfer-Encoding: chunked", method="POST"))
        # (Trailers about framing, routing or the connection stop here: RFC 9110 6.5.1.)
        writer.write(b"3\r\nabc\r\n0\r\nX-Sum: 9\r\nConnection: close\r\nHost: evil\r\n\r\n")
        r = await read_response(reader)
    assert r.status == 200
    [raw] = seen
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert rest == b"3\r\nabc\r\n0\r\nX-Sum: 9\r\n\r\n"


async def test_head_keeps_content_length_sends_no_body_and_reuses_the_connection() -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="x" * 1234)

    async with (
        AppPods(echo_app(**{"/page": page})) as up,
        running_server(config(route(up.port))) as server,
        raw_client(server) as (reader, writer),
    ):
        writer.write(get("/page", method="HEAD"))
        r = await read_response(reader, method="HEAD")
        assert (r.status, r.header("content-length"), r.body) == (200, "1234", b"")
        assert r.header("transfer-encoding") is None
        # Nothing follows the head: the next response starts right where it ended.
        writer.write(get("/page"))
        r = await read_response(reader)
        assert (r.status, r.body) == (200, b"x" * 1234)
        writer.write(get("/page", method="HEAD") + get("/page", method="HEAD"))
        for _ in range(2):
            r = await read_response(reader, method="HEAD")
            assert (r.status, r.header("content-length")) == (200, "1234")
        writer.write(get("/after"))
        r = await read_response(reader)
        assert json.loads(r.body)["path"] == "/after"
    assert server.routes["app1"].stats.opened_downstream == 1


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_status_is_forwarded_without_framing(status: int) -> None:
    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"ETag": '"v1"'})

    async with (
        AppPods(echo_app(**{"/empty": empty})) as up,
        running_server(config(route(up.port))) as server,
        raw_client(server) as (reader, writer),
    ):
        writer.write(get("/empty", 'If-None-Match: "v1"'))
        r = await read_response(reader)
        assert (r.status, r.header("etag"), r.body) == (status, '"v1"', b"")
        assert r.header("transfer-encoding") is None
        writer.write(get("/next"))
        r = await read_response(reader)
        assert (r.status, json.loads(r.body)["path"]) == (200, "/next")


async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A response with neither Content-Length nor chunked: the body ends at the close."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
    for i in range(3):
        writer.write(b"part %d;" % i)
        await writer.drain()


async def test_response_delimited_by_close_is_rechunked_for_http11() -> None:
    async with (
        raw_pod(until_close) as up,
        running_server(config(route(up.port))) as server,
        raw_client(server) as (reader, writer),
    ):
        for _ in range(2):  # the client connection stays usable
            writer.write(get("/"))
            r = await read_response(reader)
            assert (r.status, r.header("transfer-encoding")) == (200, "chunked")
            assert (r.body, r.header("content-type")) == (b"part 0;part 1;part 2;", "text/plain")
            assert r.header("connection") != "close"


async def test_response_delimited_by_close_is_sent_raw_to_http10_then_closed() -> None:
    async with (
        raw_pod(until_close) as up,
        running_server(config(route(up.port))) as server,
        raw_client(server) as (reader, writer),
    ):
        writer.write(get("/", "Connection: keep-alive", version="1.0"))
        r = await read_response(reader, http10=True)
    assert (r.status, r.body) == (200, b"part 0;part 1;part 2;")
    assert r.header("transfer-encoding") is None and r.header("content-length") is None


async def test_chunked_response_is_dechunked_for_http10() -> None:
    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(3):
            await response.write(b"piece %d;" % i)
        await response.write_eof()
        return response

    async with (
        AppPods(echo_app(**{"/streamed": streamed})) as up,
        running_server(config(route(up.port))) as server,
        raw_client(server) as (reader, writer),
    ):
        writer.write(get("/streamed", "Connection: keep-alive", version="1.0"))
        r = await read_response(reader, http10=True)
        assert (r.status, r.body) == (200, b"piece 0;piece 1;piece 2;")
        assert r.header("transfer-encoding") is None
        assert await closed_by_peer(reader)
        # The upstream connection was read to its end: it goes back to the pool.
        await until(lambda: server.routes["app1"].stats.pool_idle == 1, what="a pooled connection")


async def test_http10_client_keep_alive_only_when_asked() -> None:
    async with AppPods(echo_app()) as up, running_server(config(route(up.port))) as server:
        async with raw_client(server) as (reader, writer):
            for i in range(3):
                writer.write(get(f"/ka{i}", "Connection: keep-alive", version="1.0"))
                r = await read_response(reader, http10=True)
                assert (r.status, json.loads(r.body)["path"]) == (200, f"/ka{i}")
                assert (r.header("connection") or "").lower() == "keep-alive"
                assert r.header("transfer-encoding") is None
        async with raw_client(server) as (reader, writer):
            writer.write(get("/once", version="1.0"))
            r = await read_response(reader, http10=True)
            assert (r.status, json.loads(r.body)["path"]) == (200, "/once")
            assert (r.header("connection") or "").lower() == "close"
            assert await closed_by_peer(reader)
        assert server.routes["app1"].stats.opened_downstream == 2


async def test_answers_during_the_drain_say_connection_close() -> None:
    """Once SIGTERM has come, each answer on a keep-alive connection closes it, and says
    so: a client is never caught sending its next request as the drain closes the idle
    connection without a word (HTTP/2's GOAWAY, for HTTP/1)."""
    async with AppPods(echo_app()) as up:
        text = config(route(up.port)) + "shutdown:\n  drain_delay: 30s\n"
        async with running_server(text) as server, raw_client(server) as (reader, writer):
            writer.write(get("/before"))
            r = await read_response(reader)
            assert r.status == 200 and r.header("connection") is None
            server.shutdown()  # the drain's delay: still serving
            writer.write(get("/during"))
            r = await read_response(reader)
            assert (r.status, r.header("connection")) == (200, "close")
            assert await closed_by_peer(reader)
            async with raw_client(server) as (new_reader, new_writer):  # a new one too
                new_writer.write(get("/new"))
                r = await read_response(new_reader)
                assert (r.status, r.header("connection")) == (200, "close")
                assert await closed_by_peer(new_reader)


# --- Expect, Upgrade, pipelining --------------------------------------------------------------


async def sha_of_body(request: web.Request) -> web.Response:
    h = hashlib.sha256()
    n = 0
    async for data in request.content.iter_any():
        h.update(data)
        n += len(data)
    return web.json_response({"n": n, "sha256": h.hexdigest()}, status=201)


async def test_expect_100_continue_with_curl(tmp_path: Path) -> None:
    curl = require_tool("curl")
    total = 4 * MB
    upload = tmp_path / "upload.bin"
    with upload.open("wb") as f:
        for data in chunks(total, seed=3):
            f.write(data)
    async with (
        AppPods(echo_app(**{"/upload": sha_of_body})) as up,
        running_server(config(route(up.port))) as server,
    ):
        proc = await asyncio.create_subprocess_exec(
            *(curl, "-sS", "-v", "--max-time", "10", "-H", "Expect: 100-continue"),
            *("--data-binary", f"@{upload}", url(server, "/upload")),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "< HTTP/1.1 100 Continue" in err.decode(), err.decode()
    assert "< HTTP/1.1 201 Created" in err.decode()
    assert json.loads(out) == {"n": total, "sha256": digest(total, seed=3)}


async def test_expect_100_continue_with_a_raw_client() -> None:
    body = b"b" * 100_000
    async with (
        AppPods(echo_app(**{"/upload": sha_of_body})) as up,
        running_server(config(route(up.port))) as server,
        raw_client(server) as (reader, writer),
    ):
        for _ in range(2):
            writer.write(
                get(
                    "/upload",
                    "Expect: 100-continue",
                    f"Content-Length: {len(body)}",
                    method="POST",
                )
            )
            async with asyncio.timeout(IO_TIMEOUT):
                interim = await read_head(reader)
            assert interim.status == 100, interim
            writer.write(body)
            r = await read_response(reader)
            assert r.status == 201
            assert json.loads(r.body) == {
                "n": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }


async def test_websocket_echo_through_sidelink() -> None:
    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo: " + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    async with (
        AppPods(echo_app(**{"/ws": ws_echo})) as up,
        running_server(config(route(up.port))) as server,
        aiohttp.ClientSession() as session,
        session.ws_connect(url(server, "/ws")) as ws,
    ):
        await ws.send_str("hello")
        assert (await ws.receive(IO_TIMEOUT)).data == "echo: hello"
        payload = bytes(range(256)) * 1000
        await ws.send_bytes(payload)
        msg = await ws.receive(IO_TIMEOUT)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, payload[::-1])
        for i in range(20):
            await ws.send_str(f"m{i}")
        assert [(await ws.receive(IO_TIMEOUT)).data for _ in range(20)] == [
            f"echo: m{i}" for i in range(20)
        ]
        await ws.close()
        assert ws.close_code == aiohttp.WSCloseCode.OK
        # The tunnel's upstream connection is closed with it, never pooled.
        stats = server.routes["app1"].stats
        [endpoint] = server.routes["app1"].endpoints.all()
        await until(
            lambda: stats.active_upstream == 0 and stats.active_downstream == 0,
            what="both ends of the tunnel to close",
        )
        assert (endpoint.in_flight, stats.pool_idle) == (0, 0)
        assert re.fullmatch(r"<Pool app1 \S+ idle=0 active=0>", repr(endpoint.pool))


SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\n"
UPGRADE = get("/raw", "Connection: upgrade", "Upgrade: raw")


@pytest.mark.parametrize("first", ["client", "server"])
async def test_a_tunnel_passes_each_half_close_on(first: str) -> None:
    # After a 101 the pair is one byte pipe, as a tcp route is: an EOF from either side
    # reaches the other as a half-close, the other direction still flows, and both
    # connections close once both sides are done. (Before, the client's EOF stopped at
    # sidelink: the server waited for it, and both connections stayed up until
    # idle_timeout.)
    seen: list[bytes] = []

    async def pod(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(SWITCHED)
        if first == "server":
            writer.write(b"hello")
            writer.write_eof()
        seen.append(await reader.read())  # to the client's EOF
        if first == "client":
            writer.write(b"got " + seen[0])
            writer.write_eof()
        seen.append(await reader.read())  # (nothing after an EOF)
        writer.close()

    async with (
        raw_pod(pod) as up,
        running_server(config(route(up.port))) as server,
        raw_client(server) as (reader, writer),
    ):
        writer.write(UPGRADE)
        async with asyncio.timeout(IO_TIMEOUT):
            assert (await read_head(reader)).status == 101
            if first == "server":
                assert await reader.read() == b"hello"  # its EOF came through
            writer.write(b"ping")
            writer.write_eof()
            if first == "client":
                assert await reader.read() == b"got ping"
        stats = server.routes["app1"].stats
        await until(
            lambda: stats.active_upstream == 0 and stats.active_downstream == 0,
            what="both ends of the tunnel to close",
        )
    assert seen == [b"ping", b""]


async def test_pipelined_requests_are_answered_in_order() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)  # the first answer is the slowest; order must hold
        return web.Response(text=request.path_qs)

    async with (
        AppPods(echo_app(**{"/slow": slow})) as up,
        running_server(config(route(up.port))) as server,
        raw_client(server) as (reader, writer),
    ):
        post = get("/second", "Content-Length: 4", method="POST") + b"data"
        writer.write(get("/slow?n=1") + post + get("/third?x=3"))
        first = await read_response(reader)
        second = await read_response(reader)
        third = await read_response(reader)
    assert first.body == b"/slow?n=1"
    assert (json.loads(second.body)["path"], json.loads(second.body)["body"]) == ("/second", "data")
    assert json.loads(third.body)["path"] == "/third?x=3"
    assert server.routes["app1"].stats.opened_downstream == 1


# --- headers -------------------------------------------------------------------------------------


async def test_hop_by_hop_request_headers_stop_at_sidelink() -> None:
    async with (
        AppPods(echo_app()) as up,
        running_server(config(route(up.port))) as server,
        raw_client(server) as (reader, writer),
    ):
        writer.write(
            get(
                "/",
                "Connection: close, X-Drop",
                "X-Drop: 1",
                "Keep-Alive: timeout=5",
                "TE: trailers",
                "Proxy-Connection: keep-alive",
                "X-End-To-End: kept",
                "Accept: text/plain",
                "Cookie: a=b",
            )
        )
        r = await read_response(reader)
        assert r.header("connection") == "close"
        assert await closed_by_peer(reader)  # the client asked for close
    seen = {k.lower(): v for k, v in json.loads(r.body)["headers"]}
    for name in ("x-drop", "keep-alive", "te", "proxy-connection"):
        assert name not in seen, (name, seen)
    assert "close" not in seen.get("connection", "").lower()
    assert (seen["x-end-to-end"], seen["accept"], seen["cookie"]) == ("kept", "text/plain", "a=b")


async def test_connection_cannot_strip_the_request_framing() -> None:
    # Content-Length named in Connection must not be dropped: the upstream would take
    # the body for a second request (smuggling).
    async with (
        AppPods(echo_app()) as up,
        running_server(config(route(up.port))) as server,
        raw_client(server) as (reader, writer),
    ):
        smuggled = get("/smuggled")
        writer.write(
            get(
                "/", "Connection: content-length", f"Content-Length: {len(smuggled)}", method="POST"
            )
            + smuggled
        )
        r = await read_response(reader)
        assert r.status == 200
        seen = json.loads(r.body)
        assert (seen["path"], seen["body"].encode()) == ("/", smuggled)
        writer.write(get("/next"))
        r = await read_response(reader)
        assert json.loads(r.body)["path"] == "/next"
    assert up.hits[POD1] == 2


async def test_hop_by_hop_response_headers_stop_at_sidelink() -> None:
    async def hoppy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\n"
                b"Keep-Alive: timeout=5, max=100\r\nX-Secret: s\r\nX-Kept: k\r\n"
                b"Content-Length: 2\r\n\r\nok"
            )

    async with (
        raw_pod(hoppy) as up,
        running_server(config(route(up.port))) as server,
        raw_client(server) as (reader, writer),
    ):
        writer.write(get("/"))
        r = await read_response(reader)
    assert (r.status, r.body, r.header("x-kept")) == (200, b"ok", "k")
    assert "keep-alive" not in r.names()
    assert "x-secret" not in r.names()
    assert r.header("connection") is None


async def test_host_header_auto_preserve_and_literal(dns: DnsServer) -> None:
    dns.set_a(APP1, [POD1], ttl=1)
    async with AppPods(echo_app()) as up:
        text = config(
            route(up.port, name="auto"),
            route(up.port, name="named", service="app1"),
            route(up.port, name="preserve", host="preserve"),
            route(up.port, name="literal", host="api.example.internal"),
            dns=dns,
        )
        async with running_server(text) as server:

            async def host_seen(name: str, *headers: str, target: str = "/") -> str | None:
                async with raw_client(server, name) as (reader, writer):
                    writer.write(get(target, *headers))
                    r = await read_response(reader)
                seen = {k.lower(): v for k, v in json.loads(r.body)["headers"]}
                return seen.get("host")

            assert await host_seen("auto") == f"127.0.0.2:{up.port}"
            assert await host_seen("named") == f"app1:{up.port}"
            assert await host_seen("preserve") == "app1"
            # An absolute-form target's authority, not the client's Host (RFC 9112 3.2.2).
            absolute = f"http://{POD1}:{up.port}/x"
            assert await host_seen("preserve", target=absolute) == f"{POD1}:{up.port}"
            assert await host_seen("literal") == "api.example.internal"


async def test_a_reload_of_the_resolver_alone_keeps_every_route_and_its_connections(
    dns: DnsServer, tmp_path: Path
) -> None:
    # The resolver changes in place: routes are unchanged and keep their idle keep-alive
    # connections (before, a new resolver made every route a changed one, and they were
    # closed under clients that could be sending their next request). The new settings
    # apply: here a second DNS server, which answers otherwise.
    dns.set_a(APP1, [POD1], ttl=60)
    async with AppPods(echo_app(), POD1, "127.0.0.3") as up, DnsServer() as other:
        other.set_a(APP1, ["127.0.0.3"], ttl=60)
        path = tmp_path / "sidelink.yaml"
        routes = yaml.safe_dump({"routes": [route(up.port, service="app1")]})
        path.write_text(routes + resolver_yaml(dns.port))
        source = ConfigSource(str(path), overrides=Overrides(admin="127.0.0.1:0"))
        async with (
            serving(Server(source.load(), source, environ={})) as server,
            raw_client(server) as (reader, writer),
        ):
            kept = server.routes["app1"]
            # (listen: 0, as written; bound: the port the kernel gave.)
            shown, bound = kept.to_dict(), route_address(server)
            assert (shown["listen"], shown["bound"]) == ("127.0.0.1:0", f"{bound[0]}:{bound[1]}")
            writer.write(get("/a"))
            assert (await read_response(reader)).status == 200
            path.write_text(routes + resolver_yaml(other.port, stale_ttl="1m"))
            assert await server.reload()
            assert server.routes["app1"] is kept
            await until(
                lambda: [ep.host for ep in kept.endpoints.endpoints] == ["127.0.0.3"],
                what="the new nameserver's answer",
            )
            writer.write(get("/b"))  # the idle keep-alive connection still serves
            r = await read_response(reader)
            assert (r.status, json.loads(r.body)["path"]) == (200, "/b")
            assert kept.stats.opened_downstream == 1
            assert up.hits == {POD1: 1, "127.0.0.3": 1}


# --- metrics ------------------------------------------------------------------------------------


async def test_metrics_after_traffic() -> None:
    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="nope")

    async with (
        AppPods(echo_app(**{"/missing": missing})) as up,
        running_server(config(route(up.port))) as server,
        aiohttp.ClientSession() as session,
    ):
        for _ in range(5):
            async with session.get(url(server, "/")) as r:
                await r.read()
        for _ in range(2):
            async with session.post(url(server, "/"), data=b"z" * 1000) as r:
                await r.read()
        async with session.get(url(server, "/missing")) as r:
            assert r.status == 404
            await r.read()

        def value(name: str, **labels: str) -> float:
            return metric(server, name, route="app1", **labels)

        assert value("sidelink_requests_total", method="GET", code="200") == 5
        assert value("sidelink_requests_total", method="POST", code="200") == 2
        assert value("sidelink_requests_total", method="GET", code="404") == 1
        assert value("sidelink_request_duration_seconds_count") == 8
        assert value("sidelink_request_duration_seconds_sum") > 0
        assert value("sidelink_bytes_total", direction="to_upstream") > 2000
        assert value("sidelink_bytes_total", direction="to_downstream") > 8 * 100
        assert value("sidelink_connections_opened_total", side="upstream") == 1
        assert value("sidelink_connections_opened_total", side="downstream") == 1
        assert value("sidelink_connections_active", side="downstream") == 1
        assert value("sidelink_upstream_connect_duration_seconds_count") == 1
        assert value("sidelink_pool_idle_connections") == 1
        assert value("sidelink_upstream_errors_total", reason="reset") == 0


async def test_a_client_that_stops_reading_stalls_the_upstream() -> None:
    total = 100 * MB
    written = 0

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, TEST_SOCKET_BUFFER
        )
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for data in chunks(total):
            writer.write(data)
            await writer.drain()
            written += len(data)
        await reader.read()

    async with raw_pod(source) as up, running_server(config(route(up.port))) as server:
        reader, writer = await connect(server, sockopt=(socket.SO_RCVBUF, TEST_SOCKET_BUFFER))
        writer.write(get("/"))
        stalled = await settled(lambda: written)
        assert stalled < STALL_BOUND, f"{stalled} bytes went out to a client reading nothing"
        # Reading resumes the flow, and nothing was lost or reordered while it stood still.
        head = await read_head(reader)
        assert head.header("content-length") == str(total)
        expected = chunks(total)
        async with asyncio.timeout(IO_TIMEOUT):
            for _ in range(STALL_BOUND // CHUNK + 8):
                assert await reader.readexactly(CHUNK) == next(expected)
        assert written > stalled
        writer.close()
