"""Clients that break off, stall or bend the protocol: each costs them, never sidelink.

sidelink in-process on real sockets, hand-written upstreams on 127.0.0.2; every test on
asyncio's default loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import yaml
from support.inproc import no_connections, running_server
from support.metrics import metric
from support.pods import HANG_UPS, StreamPods
from support.wait import until
from support.wire import closed_by_peer, connect, get, raw_client, read_response

from proxy import fds
from proxy.fds import FdBudget, open_fds

pytestmark = [pytest.mark.both_loops, pytest.mark.usefixtures("loop_errors")]

POD = "127.0.0.2"
HEAD_TIMEOUT = 0.5
IDLE_TIMEOUT = 30.0  # far above every wait below: a connection still held is seen as such


def config(port: int, **route: Any) -> str:
    full = {
        "name": "app1",
        "listen": "127.0.0.1:0",
        "protocol": "http",
        "service": POD,
        "port": port,
        "head_timeout": f"{HEAD_TIMEOUT}s",
        "idle_timeout": f"{IDLE_TIMEOUT}s",
        **route,
    }
    return yaml.safe_dump({"routes": [full]})


class Upstream(StreamPods):
    """Reads one request head, then what the test says; records what it got."""

    def __init__(self) -> None:
        super().__init__(self.serve, POD, tolerate=HANG_UPS)
        self.received: list[bytes] = []
        self.eof = asyncio.Event()
        self.answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        self.answer_after = 0  # bytes of body to read before answering

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.received.append(head)
                if self.answer_after:
                    self.received.append(await reader.readexactly(self.answer_after))
                writer.write(self.answer)
                await writer.drain()
        finally:
            self.eof.set()  # sidelink closed its side (cleanly or not)


async def test_a_client_half_closing_mid_body_frees_both_sides_at_once() -> None:
    async with Upstream() as up, running_server(config(up.port)) as server:
        up.answer_after = 1_000_000  # never: the body never comes whole
        reader, writer = await connect(server)
        writer.write(get("/upload", "Content-Length: 100", method="POST") + b"x" * 10)
        await until(lambda: up.received, what="the request upstream")
        started = time.monotonic()
        writer.write_eof()  # the rest of the body can never come now
        assert await closed_by_peer(reader, timeout=5.0, reset=True)
        await asyncio.wait_for(up.eof.wait(), 5.0)  # the upstream's copy is cut too
        await no_connections(server)
        assert time.monotonic() - started < IDLE_TIMEOUT / 10
        writer.close()
        # Others are still served.
        up.answer_after = 0
        async with raw_client(server) as (reader, writer):
            writer.write(get("/"))
            assert (await read_response(reader)).status == 200


async def test_a_connection_that_sends_nothing_is_closed_after_head_timeout() -> None:
    async with Upstream() as up, running_server(config(up.port)) as server:
        started = time.monotonic()
        reader, writer = await connect(server)
        assert await closed_by_peer(reader, timeout=HEAD_TIMEOUT * 10)
        waited = time.monotonic() - started
        assert HEAD_TIMEOUT * 0.8 < waited < IDLE_TIMEOUT / 10
        assert up.received == []
        writer.close()
        await no_connections(server)


async def test_an_upgrade_request_with_a_body_declined_by_the_upstream_keeps_its_body() -> None:
    async with Upstream() as up, running_server(config(up.port)) as server:
        up.answer_after = 5
        async with raw_client(server) as (reader, writer):
            writer.write(
                get("/ws", "Upgrade: websocket", "Connection: upgrade", "Content-Length: 5")
                + b"hello"
            )
            response = await asyncio.wait_for(read_response(reader), 5.0)
            assert response.status == 200 and response.body == b"ok"
        assert up.received[1] == b"hello"


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host (RFC 9112 3.2)
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505),
        (b"GET /\r\n\r\n", 505),  # no version: HTTP/0.9
    ],
)
async def test_requests_sidelink_will_not_forward(request_line: bytes, status: int) -> None:
    async with Upstream() as up, running_server(config(up.port)) as server:
        async with raw_client(server) as (reader, writer):
            writer.write(request_line)
            response = await asyncio.wait_for(read_response(reader), 5.0)
            assert response.status == status
        assert up.received == []


async def test_http10_without_host_is_served() -> None:
    async with (
        Upstream() as up,
        running_server(config(up.port)) as server,
        raw_client(server) as (reader, writer),
    ):
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader, http10=True), 5.0)
        assert response.status == 200


async def test_half_closed_after_a_whole_request_still_gets_its_answer() -> None:
    async with Upstream() as up, running_server(config(up.port)) as server:
        reader, writer = await connect(server)
        writer.write(get("/"))
        writer.write_eof()
        response = await asyncio.wait_for(read_response(reader), 5.0)
        assert response.status == 200
        assert await closed_by_peer(reader)
        writer.close()


@pytest.fixture
def small_fd_budget(monkeypatch: pytest.MonkeyPatch) -> FdBudget:
    """This process's fd budget as if its limit were 100 descriptors above what it holds."""
    base = open_fds()
    budget = FdBudget(base + 100, base)
    monkeypatch.setattr(fds, "_process", budget)
    return budget


async def test_at_the_fd_budget_new_connections_are_shed_and_the_admin_answers(
    small_fd_budget: FdBudget,
) -> None:
    budget = small_fd_budget
    async with Upstream() as up, running_server(config(up.port)) as server:
        admitted = []
        for _ in range(budget.downstream_cap):
            admitted.append(await connect(server))
        await until(lambda: budget.used == budget.downstream_cap, what="every client counted")
        # One more: shed at once (closed before any work), the others untouched.
        reader, writer = await connect(server)
        assert await closed_by_peer(reader, timeout=5.0, reset=True)
        writer.close()
        assert budget.shed == 1
        assert metric(server, "sidelink_connections_shed_total", route="app1") == 1
        assert server.admin_address is not None
        admin = await asyncio.open_connection(*server.admin_address)
        admin[1].write(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
        assert (await read_response(admin[0])).status == 200
        admin[1].close()
        # A client already in is still served (its upstream connect fits in the reserve).
        reader, writer = admitted[0]
        writer.write(get("/"))
        assert (await asyncio.wait_for(read_response(reader), 5.0)).status == 200
        for _, w in admitted:
            w.close()
        await no_connections(server)
        # Room again: served as ever.
        async with raw_client(server) as (reader, writer):
            writer.write(get("/"))
            assert (await read_response(reader)).status == 200
        assert budget.shed == 1


async def test_an_upstream_connect_beyond_the_reserve_fails_as_fd_limit(
    small_fd_budget: FdBudget,
) -> None:
    budget = small_fd_budget
    async with Upstream() as up, running_server(config(up.port)) as server:
        async with raw_client(server) as (reader, writer):
            await until(lambda: budget.used == 1, what="the client counted")
            budget.used = budget.upstream_cap  # every descriptor of the reserve taken elsewhere
            writer.write(get("/"))
            response = await asyncio.wait_for(read_response(reader), 5.0)
        assert response.status == 503 and response.header("sidelink-error") == "fd_limit"
        route = server.routes["app1"]
        assert route.stats.errors["fd_limit"] == 1
        assert [ep.state for ep in route.endpoints.all()] == ["active"]  # not the pod's fault
        budget.used -= budget.upstream_cap - 1
