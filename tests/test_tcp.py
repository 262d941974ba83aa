"""TCP forwarding through sidelink in-process, against real upstream servers on loopback.

Upstreams are asyncio servers on 127.0.0.2, 127.0.0.3, ... sharing one port, standing in
for pod IPs behind a Service; DNS answers come from the in-process DNS server. Every test
runs on asyncio's default loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
import sys
import time
from typing import Any

import pytest
import yaml
from support.data import chunks
from support.inproc import no_connections, resolver_yaml, route_address, running_server
from support.metrics import metric
from support.pods import HANG_UPS, StreamPods, pod_of
from support.procs import rss
from support.wait import settled, until
from support.wire import closed, connect

from proxy.dnsserver import DnsServer
from proxy.flow import WRITE_HIGH_WATER
from proxy.server import Server
from proxy.tcp import TcpDownstream

pytestmark = [pytest.mark.both_loops, pytest.mark.usefixtures("loop_errors")]

APP1 = "app1.ns1.svc.cluster.local"
DEAD = "127.0.0.5"  # a pod IP nothing listens on: connects are refused
MB = 1024 * 1024
CHUNK = MB
# Kernel buffers of the test's own sockets in the slow-reader test; small, so the stall
# measures sidelink's buffering rather than the test's.
TEST_SOCKET_BUFFER = 64 * 1024
# The most one read by sidelink can return (asyncio's and uvloop's read size).
MAX_READ = 256 * 1024

# --- upstream servers ---------------------------------------------------------------


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()


async def who(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each line with the pod's address, so a client sees where it landed."""
    while line := await reader.readline():
        writer.write(f"{pod_of(writer)} {line.decode()}".encode())
        await writer.drain()


# --- sidelink -----------------------------------------------------------------------


def config(dns: DnsServer, *routes: dict[str, Any]) -> str:
    full = [
        {"listen": "127.0.0.1:0", "protocol": "tcp", "connect_timeout": "300ms", **r}
        for r in routes
    ]
    return resolver_yaml(dns.port) + yaml.safe_dump({"routes": full})


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str) -> str:
    writer.write(line.encode() + b"\n")
    return (await asyncio.wait_for(reader.readline(), 2.0)).decode().rstrip("\n")


def endpoint_states(server: Server, route: str) -> dict[str, str]:
    endpoints = server.routes[route].to_dict()["endpoints"]
    assert isinstance(endpoints, list)
    return {e["address"]: e["state"] for e in endpoints}


# --- data ---------------------------------------------------------------------------


async def drain_hash(reader: asyncio.StreamReader) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while data := await reader.read(CHUNK):
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


def held_by_a_process(local: tuple[str, int], remote: tuple[str, int]) -> bool:
    """Whether a process still has this IPv4 TCP socket open, per /proc/net/tcp.

    A socket its process closed may linger in the kernel (sending what it had queued) but
    then belongs to no one: its inode is 0.
    """

    def hex_address(address: tuple[str, int]) -> str:
        ip = int.from_bytes(socket.inet_aton(address[0]), sys.byteorder)
        return f"{ip:08X}:{address[1]:04X}"

    want = (hex_address(local), hex_address(remote))
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if (fields[1], fields[2]) == want and fields[9] != "0":
                return True
    return False


def stall_bound() -> int:
    """The most a fast writer can get accepted while the reader on the far side reads nothing.

    That is sidelink's own buffer (one high-water mark plus the read that crossed it), the
    kernel's autotuning limits for sidelink's receiving and sending sockets, the test's own
    small socket buffers (which the kernel doubles) and two chunks of the writer's stride.
    """
    with open("/proc/sys/net/ipv4/tcp_rmem") as f:
        rmem_max = int(f.read().split()[2])
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        wmem_max = int(f.read().split()[2])
    return WRITE_HIGH_WATER + MAX_READ + rmem_max + wmem_max + 4 * TEST_SOCKET_BUFFER + 2 * CHUNK


# --- tests --------------------------------------------------------------------------


async def test_100_mb_echo_keeps_every_byte_in_both_directions(dns: DnsServer) -> None:
    total = 100 * MB
    received_by_upstream = hashlib.sha256()

    async def hashing_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK):
            received_by_upstream.update(data)
            writer.write(data)
            await writer.drain()

    async with StreamPods(hashing_echo) as p:
        dns.set_a(APP1, ["127.0.0.2"], ttl=1)
        async with running_server(config(dns, {"service": "app1", "port": p.port})) as server:
            reader, writer = await connect(server)
            sent = hashlib.sha256()

            async def send() -> None:
                for chunk in chunks(total, size=CHUNK):
                    sent.update(chunk)
                    writer.write(chunk)
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            n, digest = await asyncio.wait_for(drain_hash(reader), 30)
            await sender
            await closed(writer)

            assert n == total
            assert received_by_upstream.hexdigest() == sent.hexdigest()
            assert digest == sent.hexdigest()
            await no_connections(server, "app1", upstream=True)
            stats = server.routes["app1"].stats
            assert stats.bytes_to_upstream == stats.bytes_to_downstream == total
    assert not p.errors


async def test_client_half_close_upstream_still_replies(dns: DnsServer) -> None:
    upstream_saw_eof = asyncio.Event()

    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # everything, up to the client's EOF
        upstream_saw_eof.set()
        writer.write(b"reply to " + request)
        await writer.drain()

    async with StreamPods(reply_after_eof) as p:
        dns.set_a(APP1, ["127.0.0.2"], ttl=1)
        async with running_server(config(dns, {"service": "app1", "port": p.port})) as server:
            reader, writer = await connect(server)
            # Written at once, likely before sidelink has its upstream connection.
            writer.write(b"request")
            writer.write_eof()
            await asyncio.wait_for(upstream_saw_eof.wait(), 2.0)
            # read() returns at EOF: the reply came, then the upstream's close came through.
            assert await asyncio.wait_for(reader.read(), 2.0) == b"reply to request"
            assert reader.at_eof()
            await closed(writer)
            await no_connections(server, "app1", upstream=True)
    assert not p.errors


async def test_upstream_half_close_client_still_sends(dns: DnsServer) -> None:
    late = asyncio.Future[bytes]()

    async def banner_then_listen(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"banner")
        writer.write_eof()
        late.set_result(await reader.read())

    async with StreamPods(banner_then_listen) as p:
        dns.set_a(APP1, ["127.0.0.2"], ttl=1)
        async with running_server(config(dns, {"service": "app1", "port": p.port})) as server:
            reader, writer = await connect(server)
            assert await asyncio.wait_for(reader.read(), 2.0) == b"banner"
            assert reader.at_eof()
            # The client's own direction is still open after the upstream's EOF.
            writer.write(b"late data")
            await writer.drain()
            assert not late.done()
            writer.write_eof()
            assert await asyncio.wait_for(late, 2.0) == b"late data"
            await no_connections(server, "app1", upstream=True)
            await closed(writer)
    assert not p.errors


async def test_client_half_closes_before_sending_anything(dns: DnsServer) -> None:
    """An EOF that arrives while sidelink is still connecting upstream is not a hang-up."""

    async def reply_to_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.read() == b""
        writer.write(b"nothing asked, nothing to say")

    async with StreamPods(reply_to_eof) as p:
        dns.set_a(APP1, ["127.0.0.2"], ttl=1)
        async with running_server(config(dns, {"service": "app1", "port": p.port})) as server:
            reader, writer = await connect(server)
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), 2.0)
            assert answer == b"nothing asked, nothing to say"
            await closed(writer)
            await no_connections(server, "app1", upstream=True)
            assert p.accepted["127.0.0.2"] == 1
    assert not p.errors


async def test_idle_timeout_lets_go_of_a_client_that_stopped_reading(dns: DnsServer) -> None:
    """The client reads nothing, so the transfer stalls and the connection goes idle.

    After the idle timeout sidelink must really let go of the socket, not wait forever to
    flush bytes to a client that does not read.
    """
    total = 64 * MB
    upstream_done = asyncio.Event()

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for chunk in chunks(total, size=CHUNK):
                writer.write(chunk)
                await writer.drain()
        finally:
            upstream_done.set()

    # sidelink lets go of the upstream mid-write: the source's write fails, as it should.
    async with StreamPods(source, tolerate=HANG_UPS) as p:
        dns.set_a(APP1, ["127.0.0.2"], ttl=1)
        route = {"service": "app1", "port": p.port, "idle_timeout": "300ms"}
        async with running_server(config(dns, route)) as server:
            reader, writer = await connect(server, sockopt=(socket.SO_RCVBUF, TEST_SOCKET_BUFFER))
            sidelink_side = (route_address(server), writer.get_extra_info("sockname"))
            await until(lambda: server.routes["app1"].stats.bytes_to_downstream > 0)
            assert held_by_a_process(*sidelink_side)
            await no_connections(server, "app1", upstream=True)
            await until(
                lambda: not held_by_a_process(*sidelink_side),
                2.0,
                "sidelink to close its socket to the stalled client",
            )
            # The upstream is let go too (a reset or an EOF, not a stall forever).
            await asyncio.wait_for(upstream_done.wait(), 2.0)
            got = 0
            with contextlib.suppress(ConnectionResetError):
                while data := await asyncio.wait_for(reader.read(CHUNK), 2.0):
                    got += len(data)
            assert got < total
            writer.close()


@pytest.mark.parametrize("direction", ["download", "upload"])
async def test_slow_reader_keeps_buffering_bounded(dns: DnsServer, direction: str) -> None:
    """A reader that stops reading stalls the writer on the far side, not sidelink's memory.

    The test's own sockets get small kernel buffers so that what the writer gets accepted
    is mostly what sidelink holds (its two sockets' kernel buffers plus its own).
    """
    total = 200 * MB
    progress = 0  # bytes the fast writer got accepted so far
    expected = hashlib.sha256()
    upstream_reads = asyncio.Event()
    upstream_got: asyncio.Future[tuple[int, str]] = asyncio.Future()

    async def fast_writer(writer: asyncio.StreamWriter) -> None:
        nonlocal progress
        for chunk in chunks(total, seed=7, size=CHUNK):
            expected.update(chunk)
            writer.write(chunk)
            await writer.drain()
            progress += len(chunk)

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if direction == "download":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, TEST_SOCKET_BUFFER)
            await fast_writer(writer)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TEST_SOCKET_BUFFER)
            await upstream_reads.wait()
            upstream_got.set_result(await drain_hash(reader))

    async with StreamPods(upstream) as p:
        dns.set_a(APP1, ["127.0.0.2"], ttl=1)
        async with running_server(config(dns, {"service": "app1", "port": p.port})) as server:
            before = rss()
            option = socket.SO_RCVBUF if direction == "download" else socket.SO_SNDBUF
            reader, writer = await connect(server, sockopt=(option, TEST_SOCKET_BUFFER))
            sender = asyncio.create_task(fast_writer(writer)) if direction == "upload" else None

            route = server.routes["app1"]
            await until(lambda: route.connections, 2.0, "the connection")
            (conn,) = route.connections
            assert isinstance(conn, TcpDownstream)
            await until(lambda: conn.upstream is not None, 2.0, "the upstream connection")
            assert conn.upstream is not None
            fast, slow = (conn.upstream, conn) if direction == "download" else (conn, conn.upstream)
            # sidelink stops reading from the fast side ...
            await until(lambda: fast.flow is not None and fast.flow.read_paused, 10.0)
            stalled_at = await settled(lambda: progress)
            grown = rss() - before
            # Typically about 5 MB; kernel autotuning of sidelink's two sockets can add more
            # under load, so the bound is what sidelink may hold at most.
            bound = stall_bound()
            assert 0 < stalled_at < bound, (
                f"{stalled_at / MB:.1f} MB accepted by a stalled path (bound {bound / MB:.1f} MB)"
            )
            assert grown < 64 * MB, f"RSS grew {grown / MB:.1f} MB with a stalled reader"
            assert fast.flow is not None and fast.flow.read_paused
            # ... and holds about one high-water mark (plus the read that crossed it).
            assert slow.transport is not None
            assert slow.transport.get_write_buffer_size() <= WRITE_HIGH_WATER + MAX_READ

            if direction == "download":
                n, digest = await asyncio.wait_for(drain_hash(reader), 30)
            else:
                assert sender is not None
                upstream_reads.set()
                await asyncio.wait_for(sender, 30)
                writer.write_eof()
                n, digest = await asyncio.wait_for(upstream_got, 30)
            assert n == total
            assert digest == expected.hexdigest()
            await closed(writer)
    assert not p.errors


async def test_refused_endpoint_is_retried_elsewhere_and_ejected(dns: DnsServer) -> None:
    async with StreamPods(echo, "127.0.0.2") as p:
        dns.set_a(APP1, ["127.0.0.2", DEAD], ttl=1)
        async with running_server(config(dns, {"service": "app1", "port": p.port})) as server:
            route = server.routes["app1"]
            await until(lambda: len(route.endpoints) == 2, 2.0, "both endpoints")

            async def one(i: int) -> str:
                reader, writer = await connect(server)
                try:
                    return await ask(reader, writer, f"ping {i}")
                finally:
                    await closed(writer)

            # Concurrent, so p2c sends some to the idle (dead) endpoint while the other is busy.
            answers = await asyncio.gather(*(one(i) for i in range(20)))
            assert answers == [f"ping {i}" for i in range(20)]
            assert p.accepted["127.0.0.2"] == 20

            refused = metric(
                server, "sidelink_upstream_errors_total", route="app1", reason="connect_refused"
            )
            retries = metric(server, "sidelink_retries_total", route="app1")
            assert refused >= 1
            # Each refused connect was retried on the live endpoint, none ran out of them.
            assert retries == refused
            assert route.stats.errors["no_endpoints"] == 0
            assert metric(server, "sidelink_endpoint_ejections_total", route="app1") >= 1
            assert endpoint_states(server, "app1") == {"127.0.0.2": "active", DEAD: "ejected"}
            assert repr(route.endpoints) == (
                "<EndpointSet app1 active=1 ejected=1 draining=0 balance=p2c>"
            )
    assert not p.errors


async def test_every_endpoint_refusing_closes_the_client(dns: DnsServer) -> None:
    async with StreamPods(echo) as p:
        # An IP literal skips DNS: one endpoint, and nothing listens on it.
        routes = {"name": "dead", "service": DEAD, "port": p.port}
        async with running_server(config(dns, routes)) as server:
            reader, writer = await connect(server)
            writer.write(b"lost")
            with contextlib.suppress(ConnectionResetError):  # unread bytes: maybe a reset
                assert await asyncio.wait_for(reader.read(), 2.0) == b""
            await closed(writer)
            await no_connections(server, "dead", upstream=True)
            stats = server.routes["dead"].stats
            assert stats.errors["connect_refused"] == 3  # the only endpoint, tried 3 times
            assert stats.errors["no_endpoints"] == 1
            assert stats.opened_upstream == 0
            assert stats.bytes_to_upstream == 0
            # One endpoint of one is never ejected (max_ejected_percent: at least one stays).
            assert endpoint_states(server, "dead") == {DEAD: "active"}
            assert stats.ejections == 0


async def test_dns_change_moves_new_connections_and_keeps_old_ones(dns: DnsServer) -> None:
    async with StreamPods(who, "127.0.0.2", "127.0.0.3") as p:
        dns.set_a(APP1, ["127.0.0.2"], ttl=1)
        async with running_server(config(dns, {"service": "app1", "port": p.port})) as server:
            route = server.routes["app1"]
            old_reader, old_writer = await connect(server)
            assert await ask(old_reader, old_writer, "before") == "127.0.0.2 before"

            dns.set_a(APP1, ["127.0.0.3"], ttl=1)
            changed = time.monotonic()
            landed = ""
            while landed != "127.0.0.3 probe":
                assert time.monotonic() - changed < 2.0, "new connections still go to 127.0.0.2"
                reader, writer = await connect(server)
                landed = await ask(reader, writer, "probe")
                await closed(writer)
                await asyncio.sleep(0.02)  # pacing the probes, not waiting on a condition

            # The old connection is untouched; its endpoint drains instead of vanishing.
            assert await ask(old_reader, old_writer, "after") == "127.0.0.2 after"
            assert endpoint_states(server, "app1") == {
                "127.0.0.3": "active",
                "127.0.0.2": "draining",
            }
            assert repr(route.endpoints) == (
                "<EndpointSet app1 active=1 ejected=0 draining=1 balance=p2c>"
            )
            for i in range(3):
                reader, writer = await connect(server)
                assert await ask(reader, writer, f"new {i}") == f"127.0.0.3 new {i}"
                await closed(writer)

            await closed(old_writer)
            await until(lambda: "127.0.0.2" not in endpoint_states(server, "app1"), 2.0)
    assert not p.errors


async def test_idle_connection_is_closed_and_chatty_one_is_kept(dns: DnsServer) -> None:
    async with StreamPods(echo) as p:
        dns.set_a(APP1, ["127.0.0.2"], ttl=1)
        route = {"service": "app1", "port": p.port, "idle_timeout": "300ms"}
        async with running_server(config(dns, route)) as server:

            async def idle() -> float:
                reader, writer = await connect(server)
                assert await ask(reader, writer, "hello") == "hello"
                started = time.monotonic()
                assert await asyncio.wait_for(reader.read(), 1.0) == b""
                await closed(writer)
                return time.monotonic() - started

            async def chatty() -> None:
                reader, writer = await connect(server)
                started = time.monotonic()
                i = 0
                while time.monotonic() - started < 1.2:
                    assert await ask(reader, writer, f"chat {i}") == f"chat {i}"
                    i += 1
                    await asyncio.sleep(0.1)  # the traffic's own pace
                await closed(writer)

            idle_for, _ = await asyncio.gather(idle(), chatty())
            assert 0.2 < idle_for < 1.0
            await no_connections(server, "app1", upstream=True)
    assert not p.errors


async def test_name_that_never_resolves_closes_promptly(dns: DnsServer) -> None:
    async with StreamPods(echo) as p:
        dns.set_a(APP1, ["127.0.0.2"], ttl=1)
        text = config(
            dns,
            {"name": "ghost", "service": "ghost", "port": p.port},
            {"service": "app1", "port": p.port},
        )
        async with running_server(text) as server:
            started = time.monotonic()
            silent_reader, silent_writer = await connect(server, "ghost")
            talking_reader, talking_writer = await connect(server, "ghost")
            talking_writer.write(b"anyone there?")
            assert await asyncio.wait_for(silent_reader.read(), 2.0) == b""
            # sidelink never read the bytes sent, so the kernel may answer with a reset.
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(talking_reader.read(), 2.0) == b""
            assert time.monotonic() - started < 0.3 + 0.5
            for w in (silent_writer, talking_writer):
                await closed(w)

            await no_connections(server, "ghost", upstream=True)
            errors = metric(
                server, "sidelink_upstream_errors_total", route="ghost", reason="no_endpoints"
            )
            assert errors == 2
            assert server.routes["ghost"].stats.opened_upstream == 0
            # Bytes sidelink took from the client but never forwarded are not "forwarded".
            assert (
                metric(server, "sidelink_bytes_total", route="ghost", direction="to_upstream") == 0
            )
            (not_ready,) = server.readiness()
            assert not_ready.startswith("route ghost:")
            # The other route is unaffected.
            reader, writer = await connect(server, "app1")
            assert await ask(reader, writer, "still here") == "still here"
            await closed(writer)
    assert not p.errors


async def test_connection_metrics(dns: DnsServer) -> None:
    sent = 123_457
    reply = 98_765
    upstream_got: asyncio.Future[int] = asyncio.Future()

    async def sink_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while data := await reader.read(CHUNK):
            n += len(data)
        upstream_got.set_result(n)
        writer.write(b"r" * reply)
        await writer.drain()

    async with StreamPods(sink_then_reply) as p:
        dns.set_a(APP1, ["127.0.0.2"], ttl=1)
        routes = {"name": "m1", "service": "app1", "port": p.port}
        async with running_server(config(dns, routes)) as server:

            def value(name: str, **labels: str) -> float:
                return metric(server, name, route="m1", **labels)

            reader, writer = await connect(server)
            writer.write(b"s" * sent)
            await until(lambda: value("sidelink_connections_active", side="upstream") == 1)
            assert value("sidelink_connections_active", side="downstream") == 1
            writer.write_eof()
            assert await asyncio.wait_for(upstream_got, 2.0) == sent
            assert len(await asyncio.wait_for(reader.read(), 2.0)) == reply
            await closed(writer)
            await no_connections(server, "m1", upstream=True)

            assert value("sidelink_connections_opened_total", side="downstream") == 1
            assert value("sidelink_connections_opened_total", side="upstream") == 1
            assert value("sidelink_connections_active", side="downstream") == 0
            assert value("sidelink_connections_active", side="upstream") == 0
            assert value("sidelink_bytes_total", direction="to_upstream") == sent
            assert value("sidelink_bytes_total", direction="to_downstream") == reply
            assert value("sidelink_upstream_connect_duration_seconds_count") == 1
            for reason in ("connect_refused", "connect_timeout", "reset", "no_endpoints"):
                assert value("sidelink_upstream_errors_total", reason=reason) == 0
    assert not p.errors


async def test_upstream_reset_is_counted_and_closes_the_client(dns: DnsServer) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        sock = writer.get_extra_info("socket")
        # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    async with StreamPods(reset) as p:
        dns.set_a(APP1, ["127.0.0.2"], ttl=1)
        async with running_server(config(dns, {"service": "app1", "port": p.port})) as server:
            reader, writer = await connect(server)
            writer.write(b"hello\n")
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 2.0) == b""
            await closed(writer)
            await no_connections(server, "app1", upstream=True)
            assert server.routes["app1"].stats.errors["reset"] == 1


async def test_server_speaks_first(dns: DnsServer) -> None:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 ready\n")
        await echo(reader, writer)

    async with StreamPods(greet) as p:
        dns.set_a(APP1, ["127.0.0.2"], ttl=1)
        async with running_server(config(dns, {"service": "app1", "port": p.port})) as server:
            reader, writer = await connect(server)
            assert await asyncio.wait_for(reader.readline(), 2.0) == b"220 ready\n"
            assert await ask(reader, writer, "EHLO") == "EHLO"
            await closed(writer)
    assert not p.errors


async def test_reprs_are_informative(dns: DnsServer) -> None:
    async with StreamPods(who, "127.0.0.2", "127.0.0.3") as p:
        dns.set_a(APP1, ["127.0.0.2", "127.0.0.3"], ttl=1)
        async with running_server(config(dns, {"service": "app1", "port": p.port})) as server:
            route = server.routes["app1"]
            reader, writer = await connect(server)
            landed = (await ask(reader, writer, "x")).split()[0]

            port = route_address(server)[1]
            assert repr(route) == (
                f"<Route app1 127.0.0.1:{port} -> app1:{p.port}/tcp connections=1>"
            )
            assert repr(route.endpoints) == (
                "<EndpointSet app1 active=2 ejected=0 draining=0 balance=p2c>"
            )
            (conn,) = route.connections
            host, port = writer.get_extra_info("sockname")
            assert repr(conn) == (
                f"<TcpDownstream app1 {host}:{port} -> "
                f"<Endpoint {landed}:{p.port} active in_flight=1>>"
            )
            await closed(writer)
            await no_connections(server, "app1", upstream=True)
            assert repr(route).endswith("connections=0>")
            assert re.fullmatch(
                r"<Endpoint 127\.0\.0\.[23]:\d+ active in_flight=0>",
                repr(next(iter(route.endpoints.all()))),
            )
    assert not p.errors
