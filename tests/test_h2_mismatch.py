"""A pod that does not speak the client's HTTP version (``upstream_protocol: auto``):
the client gets sidelink's 502 at once, and the pod sees a bounded number of tries, not
a reconnect loop."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from support.h2peers import H2Client
from support.inproc import route_address, running_server
from support.wire import get, raw_client, read_response

from proxy.demo_h2 import H2Replica

pytestmark = pytest.mark.both_loops


def direct_route(port: int) -> str:
    return (
        "logging: {level: error}\n"
        "routes:\n"
        "  - name: app\n"
        "    listen: 127.0.0.1:0\n"
        "    protocol: http\n"
        "    service: 127.0.0.1\n"
        f"    port: {port}\n"
        "    connect_timeout: 500ms\n"
    )


class CountingPod:
    """An HTTP/1-only pod (aiohttp) that counts the connections it accepts."""

    def __init__(self) -> None:
        self.accepted = 0

    async def __aenter__(self) -> CountingPod:
        app = web.Application()

        async def hello(_: web.Request) -> web.Response:
            return web.Response(text="hi\n")

        app.router.add_get("/", hello)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        handler = self.runner.server
        assert handler is not None

        def factory() -> asyncio.Protocol:
            self.accepted += 1
            return handler()  # type: ignore[no-any-return]

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.runner.cleanup()


async def test_an_http2_request_to_an_http1_only_pod_is_a_quick_502() -> None:
    async with CountingPod() as pod, running_server(direct_route(pod.port)) as server:
        client = await H2Client.connect(route_address(server))
        try:
            answer = await asyncio.wait_for(client.request("GET", "/"), 5.0)
        finally:
            await client.close()
        assert answer.status == 502
        # The pod answered the preface with an HTTP/1.1 400: garbage, not a refused stream,
        # so the GET is not tried again (a response byte came).
        assert answer.header("sidelink-error") == "protocol"
        assert server.routes["app"].stats.errors["protocol"] == 1
        assert pod.accepted == 1
        await asyncio.sleep(0.5)
        assert pod.accepted == 1  # and no loop behind the answer
        async with raw_client(server) as (reader, writer):  # HTTP/1 beside it still works
            writer.write(get("/"))
            assert (await read_response(reader)).status == 200


async def test_an_http1_request_to_an_http2_only_pod_is_a_quick_502() -> None:
    pod = H2Replica("pod", "127.0.0.1", 0)
    await pod.start()
    try:
        assert pod.server is not None
        port = pod.server.sockets[0].getsockname()[1]
        async with running_server(direct_route(port)) as server:
            async with raw_client(server) as (reader, writer):
                writer.write(get("/"))
                answer = await asyncio.wait_for(read_response(reader), 5.0)
            assert answer.status == 502
            client = await H2Client.connect(route_address(server))
            try:
                assert (await client.request("GET", "/")).status == 200
            finally:
                await client.close()
    finally:
        await pod.stop()
