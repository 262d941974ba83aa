"""logging.access_log: one line per HTTP request and per TCP connection, off by default."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from helpers import route_address, running_server, until

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
