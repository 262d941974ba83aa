"""logging.access_log: one line per HTTP request and per TCP connection, off by default."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from support.h2peers import H2Client, H2Pods, StreamReset
from support.inproc import route_address, running_server, serving
from support.replicas import LINGER_ZERO
from support.wait import until

from proxy.config import ConfigSource, Overrides
from proxy.demo_h2 import H2Replica
from proxy.logs import JsonFormatter
from proxy.metrics import RESET_CODE
from proxy.server import Server

POD = "127.0.0.2"


@pytest.fixture
async def pod() -> AsyncIterator[int]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi", status=201 if request.path == "/made" else 200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, POD, 0)
    await site.start()
    assert site._server is not None
    yield int(site._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
    await runner.cleanup()


def config(port: int, access_log: bool) -> str:
    return (
        f"logging: {{access_log: {str(access_log).lower()}}}\n"
        "routes:\n"
        f"  - {{name: web, listen: 0, service: {POD}, port: {port}, protocol: http}}\n"
        f"  - {{name: raw, listen: 0, service: {POD}, port: {port}, protocol: tcp}}\n"
    )


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sidelink.access"]


async def test_one_line_per_request_and_per_connection(
    pod: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidelink.access")
    async with running_server(config(pod, access_log=True)) as server:
        host, port = route_address(server, "web")
        async with aiohttp.ClientSession() as session:
            for path, method in (("/a", "GET"), ("/made", "POST")):
                async with session.request(method, f"http://{host}:{port}{path}") as r:
                    await r.read()
        await until(lambda: len(access_lines(caplog)) == 2, what="two http lines")
        get, post = access_lines(caplog)
        assert get.startswith("http route=web ") and " GET /a status=200 " in get
        assert f"upstream={POD}:{pod}" in get
        assert " POST /made status=201 " in post

        reader, writer = await asyncio.open_connection(*route_address(server, "raw"))
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        await until(lambda: len(access_lines(caplog)) == 3, what="the tcp line")
        tcp = access_lines(caplog)[2]
        assert tcp.startswith("tcp route=raw ")
        assert f"bytes_out={len(answer)}" in tcp


async def test_off_by_default(pod: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidelink.access")
    async with running_server(config(pod, access_log=False)) as server:
        host, port = route_address(server, "web")
        async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/") as r:
            assert r.status == 200
        assert access_lines(caplog) == []


class Lines(logging.Handler):
    """The access lines, caught on their own logger: a reload reconfigures the root's handlers."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access() -> Iterator[Lines]:
    root, sidelink = logging.getLogger(), logging.getLogger("sidelink")
    saved = (list(root.handlers), root.level, sidelink.level)
    logger = logging.getLogger("sidelink.access")
    level = logger.level
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)
    # The reload called configure_logging: give the root logger back to pytest.
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    sidelink.setLevel(saved[2])


async def one_connection(server: Server, name: str) -> None:
    """One request on a new connection to route `name`, until sidelink has closed it."""
    reader, writer = await asyncio.open_connection(*route_address(server, name))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
    writer.close()
    route = server.routes[name]
    # The access line is written as the connection ends, so none can come after this.
    await until(lambda: not route.connections, what=f"{name}'s connection to close")


@pytest.mark.parametrize("name", ["web", "raw"])
async def test_a_reload_turns_the_access_log_on_and_off_for_kept_routes(
    pod: int, access: Lines, tmp_path: Path, name: str
) -> None:
    path = tmp_path / "sidelink.yaml"
    path.write_text(config(pod, access_log=False))
    source = ConfigSource(str(path), overrides=Overrides(admin="127.0.0.1:0"))
    async with serving(Server(source.load(), source, environ={})) as server:
        route = server.routes[name]
        await one_connection(server, name)
        assert access.lines == []

        path.write_text(config(pod, access_log=True))
        assert await server.reload()
        assert server.routes[name] is route  # unchanged, so kept with its listener
        await one_connection(server, name)
        await until(lambda: len(access.lines) == 1, what="one access line")
        assert access.lines[0].startswith(f"{route.config.protocol} route={name} ")

        path.write_text(config(pod, access_log=False))
        assert await server.reload()
        assert server.routes[name] is route
        await one_connection(server, name)
        assert len(access.lines) == 1


HTTP_KEYS = [
    "time",
    "route",
    "protocol",
    "method",
    "path",
    "status",
    "duration_seconds",
    "bytes_received",
    "bytes_sent",
    "endpoint",
    "retries",
    "error",
]
TCP_KEYS = [
    "time",
    "route",
    "protocol",
    "duration_seconds",
    "bytes_received",
    "bytes_sent",
    "endpoint",
    "error",
]


def json_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    formatter = JsonFormatter()
    records = [r for r in caplog.records if r.name == "sidelink.access"]
    return [json.loads(formatter.format(r)) for r in records]


async def test_json_lines_have_every_field_as_its_own_key(
    pod: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidelink.access")
    async with running_server(config(pod, access_log=True)) as server:
        host, port = route_address(server, "web")
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://{host}:{port}/made?x=1", data=b"12345") as r,
        ):
            body = await r.read()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /two HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")  # refused by sidelink
        assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
        writer.close()
        await until(lambda: len(json_lines(caplog)) == 2, what="two http lines")
        post, refused = json_lines(caplog)
        assert list(post) == HTTP_KEYS
        assert {k: post[k] for k in HTTP_KEYS[1:6]} == {
            "route": "web",
            "protocol": "http",
            "method": "POST",
            "path": "/made?x=1",
            "status": 201,
        }
        assert post["bytes_received"] == 5  # the request body forwarded
        assert isinstance(post["bytes_sent"], int) and post["bytes_sent"] > len(body)
        assert post["endpoint"] == f"{POD}:{pod}"
        assert (post["retries"], post["error"]) == (0, None)
        assert 0 < float(post["duration_seconds"]) < 5  # type: ignore[arg-type]
        assert str(post["time"]).endswith("Z")
        assert {k: refused[k] for k in ("method", "path", "status", "endpoint", "error")} == {
            "method": "GET",
            "path": "/two",
            "status": 400,
            "endpoint": None,
            "error": "bad_request",
        }

        # Too malformed to have a method or a target: those are null, not made up.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"\x01\x02\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
        writer.close()
        await until(lambda: len(json_lines(caplog)) == 3, what="the garbage's line")
        garbage = json_lines(caplog)[2]
        assert {k: garbage[k] for k in ("method", "path", "status", "error")} == {
            "method": None,
            "path": None,
            "status": 400,
            "error": "bad_request",
        }

        reader, writer = await asyncio.open_connection(*route_address(server, "raw"))
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        await until(lambda: len(json_lines(caplog)) == 4, what="the tcp line")
        tcp = json_lines(caplog)[3]
        assert list(tcp) == TCP_KEYS
        assert (tcp["route"], tcp["protocol"], tcp["bytes_sent"]) == ("raw", "tcp", len(answer))
        assert tcp["endpoint"] == f"{POD}:{pod}"
        assert tcp["error"] is None


async def test_an_http2_stream_gets_its_own_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidelink.access")
    pod = H2Replica("pod", POD, 0)
    await pod.start()
    try:
        assert pod.server is not None
        port = pod.server.sockets[0].getsockname()[1]
        async with running_server(config(port, access_log=True)) as server:
            client = await H2Client.connect(route_address(server, "web"))
            try:
                for path in ("/one", "/two"):
                    assert (await client.request("GET", path)).status == 200
            finally:
                await client.close()
            await until(lambda: len(access_lines(caplog)) == 2, what="one line per stream")
        one, two = access_lines(caplog)
        assert " GET /one status=200 " in one and f"upstream={POD}:{port}" in one
        assert " GET /two status=200 " in two
    finally:
        await pod.stop()


async def test_sidelinks_own_answers_are_logged_with_their_retries_and_bytes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing listens on the pod: each request fails to connect twice (retries: 1), and
    sidelink answers 503 itself, over HTTP/1.1 and over HTTP/2."""
    caplog.set_level(logging.INFO, logger="sidelink.access")
    dead = "127.0.0.5"
    text = (
        "logging: {access_log: true}\n"
        "routes:\n"
        f"  - {{name: web, listen: 0, service: {dead}, port: 9, protocol: http, retries: 1}}\n"
    )
    async with running_server(text) as server:
        host, port = route_address(server, "web")
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /h1 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        h1_answer = await reader.read()
        writer.close()
        async with H2Client.open(route_address(server, "web")) as client:
            h2_answer = await client.request("GET", "/h2")
        await until(lambda: len(json_lines(caplog)) == 2, what="two http lines")
        retried = server.routes["web"].stats.retries
    h1, h2 = json_lines(caplog)
    assert h1_answer.startswith(b"HTTP/1.1 503 ")
    assert {k: h1[k] for k in ("path", "status", "retries", "error")} == {
        "path": "/h1",
        "status": 503,
        "retries": 1,  # as sidelink_retries_total counts it
        "error": "no_endpoints",
    }
    assert h1["bytes_sent"] == len(h1_answer)
    assert h2_answer.status == 503 and h2_answer.body
    assert {k: h2[k] for k in ("path", "status", "retries", "error")} == {
        "path": "/h2",
        "status": 503,
        "retries": 1,
        "error": "no_endpoints",
    }
    assert h2["bytes_sent"] == len(h2_answer.body)  # as for every stream: what DATA carried
    assert retried == 2  # one per request


async def test_a_request_its_client_gave_up_on_is_counted_as_a_reset_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The pod holds both answers; one client resets its HTTP/2 stream (a cancelled call),
    the other closes its HTTP/1.1 connection: neither got its answer, each is one line and
    one request with code reset, and the log says which of them the client ended."""
    caplog.set_level(logging.INFO, logger="sidelink.access")
    async with H2Pods(POD) as pods:
        text = (
            "logging: {access_log: true}\n"
            "routes:\n"
            f"  - {{name: web, listen: 0, service: {POD}, port: {pods.port}, protocol: http,"
            " upstream_protocol: http2}\n"
        )
        async with (
            running_server(text) as server,
            H2Client.open(route_address(server, "web")) as client,
        ):
            requests = await give_up_on_both(server, pods, client, caplog)
    by_path = {line["path"]: line for line in json_lines(caplog)}
    # (No status was sent: null, the field's type kept; error says what happened.)
    assert {p: (v["status"], v["error"]) for p, v in by_path.items()} == {
        "/hold/h2": (None, "downstream_reset"),
        "/hold/h1": (None, "downstream_closed"),
    }
    assert requests == {(b"GET", RESET_CODE): 2}


async def give_up_on_both(
    server: Server, pods: H2Pods, client: H2Client, caplog: pytest.LogCaptureFixture
) -> dict[tuple[bytes, int], int]:
    """Two held requests, each left by its client: their counts once logged."""
    sid = client.start("GET", "/hold/h2")
    await until(lambda: pods.held("h2") == 1, what="the HTTP/2 request at the pod")
    client.reset(sid)
    _, writer = await asyncio.open_connection(*route_address(server, "web"))
    writer.write(b"GET /hold/h1 HTTP/1.1\r\nHost: web\r\n\r\n")
    await until(lambda: pods.held("h1") == 1, what="the HTTP/1.1 request at the pod")
    # Gone (a reset; a FIN alone is a half-close, and the answer would still go to it).
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    writer.close()
    await until(lambda: len(json_lines(caplog)) == 2, what="a line for each")
    pods.release("h1")
    pods.release("h2")
    return server.routes["web"].stats.requests


async def test_an_http2_body_short_of_its_content_length_is_a_400(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The engine resets a stream whose body ends short of its content-length (malformed,
    RFC 9113 8.1.1), which the client did not reset: counted as HTTP/1.1's 400 would be."""
    caplog.set_level(logging.INFO, logger="sidelink.access")
    async with (
        H2Pods(POD) as pods,
        running_server(config(pods.port, access_log=True)) as server,
        H2Client.open(route_address(server, "web")) as client,
    ):
        sid = client.start("POST", "/hold/body", [("content-length", "10")], end=False)
        await client.send(sid, b"12345", end=True)
        with pytest.raises(StreamReset):
            await client.response(sid)
        await until(lambda: len(json_lines(caplog)) == 1, what="its line")
        pods.release("body")
        requests = server.routes["web"].stats.requests
    [line] = json_lines(caplog)
    assert (line["method"], line["status"], line["error"]) == ("POST", 400, "bad_request")
    assert requests == {(b"POST", 400): 1}


async def test_an_answer_the_upstream_cut_short_keeps_its_status_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The metric counts it as code="reset"; the log line keeps the status that was sent,
    and says reset in error. (Before, its status was the string "reset", in a field that
    is a number on every other line: a typed log store refuses such a line.)"""
    caplog.set_level(logging.INFO, logger="sidelink.access")

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..")
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(cut, POD, 0)
    port = upstream.sockets[0].getsockname()[1]
    text = (
        "logging: {access_log: true}\n"
        f"routes:\n  - {{name: web, listen: 0, service: {POD}, port: {port}, protocol: http}}\n"
    )
    async with upstream, running_server(text) as server:
        host, listen = route_address(server, "web")
        reader, writer = await asyncio.open_connection(host, listen)
        writer.write(b"GET /cut HTTP/1.1\r\nHost: web\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200 OK\r\n")  # then the close
        writer.close()
        await until(lambda: json_lines(caplog), what="the access line")
        requests = server.routes["web"].stats.requests
    [line] = json_lines(caplog)
    assert (line["path"], line["status"], line["error"]) == ("/cut", 200, "reset")
    assert requests == {(b"GET", RESET_CODE): 1}


async def test_a_reload_that_removes_a_route_says_so(
    pod: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # (An added or moved route was logged, "listening: ..."; a removed one said nothing.)
    caplog.set_level(logging.INFO, logger="sidelink.server")
    path = tmp_path / "sidelink.yaml"
    path.write_text(config(pod, access_log=False))
    source = ConfigSource(str(path), overrides=Overrides(admin="127.0.0.1:0"))
    async with serving(Server(source.load(), source, environ={})) as server:
        host, port = route_address(server, "raw")
        path.write_text(config(pod, access_log=False).split("  - {name: raw")[0])
        assert await server.reload()
        assert list(server.routes) == ["web"]
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed:")]
    assert removed == [
        f"removed: {host}:{port} -> {POD}:{pod} tcp (route raw) (0 connection(s) left to finish)"
    ]
