"""Tests for the in-process authoritative DNS server used by the demo and tests.

Everything talks to a real server on 127.0.0.1 through dnspython's clients,
so these also pin down what sidelink's resolver will see on the wire.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from proxy.dnsserver import DnsServer, ThreadedDnsServer

TIMEOUT = 1.0
# Short enough to keep "drop" tests fast, long enough for a loaded CI box
# to answer a query that is expected to succeed.
DROP_TIMEOUT = 0.3


@pytest.fixture
def server(dns: DnsServer) -> DnsServer:
    """The suite's in-process DNS server (conftest's `dns`), under the name these tests use."""
    return dns


async def ask(
    server: DnsServer,
    name: str,
    rdtype: str = "A",
    *,
    tcp: bool = False,
    timeout: float = TIMEOUT,
    payload: int | None = None,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0 if payload else None, payload=payload)
    if tcp:
        return await dns.asyncquery.tcp(query, server.host, port=server.port, timeout=timeout)
    return await dns.asyncquery.udp(query, server.host, port=server.port, timeout=timeout)


def resolver_for(server: DnsServer) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = TIMEOUT
    return resolver


def addresses(response: dns.message.Message, name: str, rdtype: str = "A") -> set[str]:
    rrset = response.find_rrset(
        response.answer,
        dns.name.from_text(name),
        dns.rdataclass.IN,
        dns.rdatatype.from_text(rdtype),
    )
    return {rdata.to_text() for rdata in rrset}


def soa_minimum(response: dns.message.Message) -> int:
    [soa] = response.authority
    assert soa.rdtype == dns.rdatatype.SOA
    return int(soa[0].minimum)


async def test_a_record_is_authoritative_with_ttl(server: DnsServer) -> None:
    server.set_a("web.example", ["10.0.0.1"], ttl=42)

    answer = await resolver_for(server).resolve("web.example.", "A")

    assert answer.rrset is not None
    assert answer.rrset.ttl == 42
    assert [rdata.to_text() for rdata in answer.rrset] == ["10.0.0.1"]
    assert answer.response.flags & dns.flags.AA
    assert server.address == f"127.0.0.1:{server.port}"
    assert server.port != 0


async def test_several_a_records(server: DnsServer) -> None:
    server.set_a("web.example", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])

    response = await ask(server, "web.example")

    assert addresses(response, "web.example.") == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}


async def test_record_change_is_visible_on_next_query(server: DnsServer) -> None:
    server.set_a("web.example", ["10.0.0.1"])
    assert addresses(await ask(server, "web.example"), "web.example.") == {"10.0.0.1"}

    server.set_a("web.example", ["10.0.0.2", "10.0.0.3"])
    assert addresses(await ask(server, "web.example"), "web.example.") == {
        "10.0.0.2",
        "10.0.0.3",
    }

    server.set_a("web.example", [])
    assert (await ask(server, "web.example")).rcode() == dns.rcode.NXDOMAIN


async def test_names_are_case_insensitive_and_may_be_relative(server: DnsServer) -> None:
    server.set_a("Web.EXAMPLE", ["10.0.0.1"])

    response = await ask(server, "wEb.example.")

    assert addresses(response, "web.example.") == {"10.0.0.1"}
    assert server.count("WEB.example.") == 1
    server.remove("web.Example.")
    assert (await ask(server, "web.example")).rcode() == dns.rcode.NXDOMAIN


async def test_cname_chain_is_followed_within_server_data(server: DnsServer) -> None:
    server.set_cname("api.example", "lb.example")
    server.set_cname("lb.example", "pool.example.")
    server.set_a("pool.example", ["10.0.0.7"])

    answer = await resolver_for(server).resolve("api.example.", "A")

    assert answer.canonical_name == dns.name.from_text("pool.example.")
    assert [rdata.to_text() for rdata in answer] == ["10.0.0.7"]
    kinds = [(rrset.name.to_text(), rrset.rdtype) for rrset in answer.response.answer]
    assert kinds == [
        ("api.example.", dns.rdatatype.CNAME),
        ("lb.example.", dns.rdatatype.CNAME),
        ("pool.example.", dns.rdatatype.A),
    ]

    # Asking for the CNAME itself must not chase it.
    response = await ask(server, "api.example", "CNAME")
    assert [rrset.rdtype for rrset in response.answer] == [dns.rdatatype.CNAME]
    assert addresses(response, "api.example.", "CNAME") == {"lb.example."}


async def test_cname_edge_cases(server: DnsServer) -> None:
    server.set_cname("dangling.example", "nowhere.example")
    response = await ask(server, "dangling.example")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert len(response.answer) == 1
    assert soa_minimum(response) == 5

    server.set_cname("ping.example", "pong.example")
    server.set_cname("pong.example", "ping.example")
    response = await ask(server, "ping.example")
    assert response.rcode() == dns.rcode.NOERROR
    assert len(response.answer) == 2

    for hop in range(12):
        server.set_cname(f"c{hop}.example", f"c{hop + 1}.example")
    server.set_a("c12.example", ["10.0.0.1"])
    response = await ask(server, "c0.example")
    assert len(response.answer) == 8
    assert all(rrset.rdtype == dns.rdatatype.CNAME for rrset in response.answer)

    # Setting an address on an alias replaces the alias, and vice versa.
    server.set_a("ping.example", ["10.0.0.9"])
    assert addresses(await ask(server, "ping.example"), "ping.example.") == {"10.0.0.9"}
    server.set_cname("ping.example", "c12.example")
    response = await ask(server, "ping.example")
    assert addresses(response, "c12.example.") == {"10.0.0.1"}
    assert addresses(response, "ping.example.", "CNAME") == {"c12.example."}


async def test_aaaa(server: DnsServer) -> None:
    server.set_aaaa("web.example", ["fd00::1", "fd00::2"], ttl=7)

    answer = await resolver_for(server).resolve("web.example.", "AAAA")

    assert answer.rrset is not None
    assert answer.rrset.ttl == 7
    assert {rdata.to_text() for rdata in answer} == {"fd00::1", "fd00::2"}


async def test_srv_carries_target_addresses_in_additional(server: DnsServer) -> None:
    server.set_srv(
        "_http._tcp.api.example",
        [(10, 60, 8080, "a.api.example"), (10, 40, 8081, "b.api.example."), (20, 0, 80, "x.ext")],
    )
    server.set_a("a.api.example", ["10.0.0.1"])
    server.set_a("b.api.example", ["10.0.0.2"])
    server.set_aaaa("b.api.example", ["fd00::2"])

    response = await ask(server, "_http._tcp.api.example", "SRV")

    assert addresses(response, "_http._tcp.api.example.", "SRV") == {
        "10 60 8080 a.api.example.",
        "10 40 8081 b.api.example.",
        "20 0 80 x.ext.",
    }
    glue = {
        (rrset.name.to_text(), rrset.rdtype, rrset[0].to_text()) for rrset in response.additional
    }
    assert glue == {
        ("a.api.example.", dns.rdatatype.A, "10.0.0.1"),
        ("b.api.example.", dns.rdatatype.A, "10.0.0.2"),
        ("b.api.example.", dns.rdatatype.AAAA, "fd00::2"),
    }


async def test_nxdomain_versus_nodata(server: DnsServer) -> None:
    server.set_srv("_grpc._tcp.svc.example", [(0, 0, 9000, "svc.example")])

    missing = await ask(server, "missing.example")
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert missing.flags & dns.flags.AA
    assert missing.answer == []
    assert soa_minimum(missing) == 5

    nodata = await ask(server, "_grpc._tcp.svc.example", "A")
    assert nodata.rcode() == dns.rcode.NOERROR
    assert nodata.answer == []
    assert soa_minimum(nodata) == 5

    # A parent of an existing name exists too (empty non-terminal).
    ent = await ask(server, "_tcp.svc.example", "A")
    assert ent.rcode() == dns.rcode.NOERROR
    assert ent.answer == []

    resolver = resolver_for(server)
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("missing.example.", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("_grpc._tcp.svc.example.", "A")


async def test_servfail_and_refused_modes(server: DnsServer) -> None:
    server.set_a("web.example", ["10.0.0.1"])
    server.set_a("other.example", ["10.0.0.2"])

    server.set_failure("web.example", "servfail")
    assert (await ask(server, "web.example")).rcode() == dns.rcode.SERVFAIL
    assert (await ask(server, "other.example")).rcode() == dns.rcode.NOERROR
    with pytest.raises(dns.resolver.NoNameservers):
        await resolver_for(server).resolve("web.example.", "A")

    server.set_failure(None, "refused")
    assert (await ask(server, "other.example")).rcode() == dns.rcode.REFUSED
    # A per-name failure wins over the every-query one.
    assert (await ask(server, "web.example")).rcode() == dns.rcode.SERVFAIL

    server.set_failure(None, None)
    server.set_failure("web.example", None)
    assert addresses(await ask(server, "web.example"), "web.example.") == {"10.0.0.1"}

    with pytest.raises(ValueError, match="unknown failure mode"):
        server.set_failure(None, "explode")


async def test_drop_mode_makes_the_client_time_out(server: DnsServer) -> None:
    server.set_a("web.example", ["10.0.0.1"])
    server.set_failure("web.example", "drop")

    with pytest.raises(dns.exception.Timeout):
        await ask(server, "web.example", timeout=DROP_TIMEOUT)
    # The query did arrive; it was deliberately left unanswered.
    assert server.count("web.example") == 1

    server.set_failure("web.example", None)
    assert addresses(await ask(server, "web.example"), "web.example.") == {"10.0.0.1"}


async def test_large_udp_answer_is_truncated_and_tcp_has_it_all(server: DnsServer) -> None:
    many = {f"10.0.1.{i}" for i in range(1, 61)}
    server.set_a("big.example", sorted(many))

    truncated = await ask(server, "big.example")
    assert truncated.flags & dns.flags.TC
    assert len(truncated.to_wire()) <= 512

    assert addresses(await ask(server, "big.example", tcp=True), "big.example.") == many

    # A client offering a big EDNS buffer gets everything over UDP.
    edns = await ask(server, "big.example", payload=4096)
    assert not edns.flags & dns.flags.TC
    assert addresses(edns, "big.example.") == many

    # The stub resolver retries over TCP on its own.
    answer = await resolver_for(server).resolve("big.example.", "A")
    assert {rdata.to_text() for rdata in answer} == many


async def test_tcp_serves_several_queries_per_connection(server: DnsServer) -> None:
    server.set_a("one.example", ["10.0.0.1"])
    server.set_a("two.example", ["10.0.0.2"])
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        queries = [dns.message.make_query(name, "A") for name in ("one.example", "two.example")]
        # Pipelined on purpose: both frames are sent before reading.
        writer.write(b"".join(query.to_wire(prepend_length=True) for query in queries))
        await writer.drain()
        for query, expected in zip(queries, ("10.0.0.1", "10.0.0.2"), strict=True):
            async with asyncio.timeout(TIMEOUT):
                size = int.from_bytes(await reader.readexactly(2), "big")
                response = dns.message.from_wire(await reader.readexactly(size))
            assert response.id == query.id
            assert [rdata.to_text() for rdata in response.answer[0]] == [expected]
    finally:
        writer.close()
        await writer.wait_closed()


async def test_stop_then_start_rebinds_the_same_port(server: DnsServer) -> None:
    server.set_a("web.example", ["10.0.0.1"])
    port = server.port

    await server.stop()
    assert not server.running
    with pytest.raises(OSError):
        await ask(server, "web.example", tcp=True)

    await server.start()
    assert server.port == port
    assert addresses(await ask(server, "web.example"), "web.example.") == {"10.0.0.1"}
    assert addresses(await ask(server, "web.example", tcp=True), "web.example.") == {"10.0.0.1"}


async def test_stop_closes_idle_tcp_connections(server: DnsServer) -> None:
    _, writer = await asyncio.open_connection(server.host, server.port)
    try:
        async with asyncio.timeout(TIMEOUT):
            await server.stop()
    finally:
        writer.close()


async def test_query_log_and_count(server: DnsServer) -> None:
    server.set_a("web.example", ["10.0.0.1"])

    await ask(server, "web.example")
    await ask(server, "WEB.example", "AAAA")
    await ask(server, "web.example", tcp=True)
    await ask(server, "missing.example")

    assert server.queries == [
        ("web.example.", "A"),
        ("web.example.", "AAAA"),
        ("web.example.", "A"),
        ("missing.example.", "A"),
    ]
    assert server.count("web.example") == 2
    assert server.count("web.example", "aaaa") == 1
    assert server.count("missing.example.") == 1
    assert server.count("web.example", "SRV") == 0


async def test_invalid_records_are_rejected(server: DnsServer) -> None:
    with pytest.raises(ValueError, match="invalid A data 'not-an-ip'"):
        server.set_a("web.example", ["not-an-ip"])
    with pytest.raises(ValueError, match="invalid AAAA data"):
        server.set_aaaa("web.example", ["10.0.0.1"])
    with pytest.raises(TypeError):
        server.set_a("web.example", "10.0.0.1")
    with pytest.raises(ValueError, match="TTL"):
        server.set_a("web.example", ["10.0.0.1"], ttl=-1)
    with pytest.raises(ValueError, match="70000"):
        server.set_srv("_x._tcp.example", [(0, 0, 70000, "web.example")])
    assert server.count("web.example") == 0
    assert (await ask(server, "web.example")).rcode() == dns.rcode.NXDOMAIN


async def test_garbage_does_not_kill_the_server(
    server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy.dnsserver")
    server.set_a("web.example", ["10.0.0.1"])
    response_packet = dns.message.make_response(dns.message.make_query("web.example", "A"))
    garbage = [
        b"",
        b"\x00",
        b"\xff" * 11,
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www",  # truncated question
        bytes(range(256)),
        response_packet.to_wire(),
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for packet in garbage:
            sock.sendto(packet, (server.host, server.port))

    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        # A garbage frame must not desynchronise the rest of the stream.
        query = dns.message.make_query("web.example", "A")
        writer.write(b"\x00\x05hello" + query.to_wire(prepend_length=True))
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            size = int.from_bytes(await reader.readexactly(2), "big")
            response = dns.message.from_wire(await reader.readexactly(size))
        assert response.id == query.id
    finally:
        writer.close()
        await writer.wait_closed()
    # A client hanging up mid-frame is not an error either.
    _, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"\x00")
    writer.close()
    await writer.wait_closed()

    assert addresses(await ask(server, "web.example"), "web.example.") == {"10.0.0.1"}
    assert any("malformed" in record.getMessage() for record in caplog.records)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_threaded_server_from_sync_code() -> None:
    with ThreadedDnsServer() as server:
        server.set_a("web.example", ["10.0.0.1"], ttl=12)
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [server.host]
        resolver.port = server.port
        resolver.lifetime = TIMEOUT

        answer = resolver.resolve("web.example.", "A")
        assert answer.rrset is not None
        assert answer.rrset.ttl == 12
        assert [rdata.to_text() for rdata in answer] == ["10.0.0.1"]

        # Changes from this thread are seen by the server thread at once.
        server.set_a("web.example", ["10.0.0.2"])
        query = dns.message.make_query("web.example", "A")
        tcp_response = dns.query.tcp(query, server.host, port=server.port, timeout=TIMEOUT)
        assert [rdata.to_text() for rdata in tcp_response.answer[0]] == ["10.0.0.2"]

        server.set_failure("web.example", "drop")
        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(query, server.host, port=server.port, timeout=DROP_TIMEOUT)
        server.set_failure("web.example", None)

        port = server.port
        server.stop()
        assert not server.running
        server.start()
        assert server.port == port
        assert resolver.resolve("web.example.", "A")[0].to_text() == "10.0.0.2"
        assert server.count("web.example") == 4
    assert not server.running


async def test_udp_port_collision_retries_with_a_fresh_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    real_endpoint = loop.create_datagram_endpoint
    calls = 0

    async def flaky_endpoint(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return await real_endpoint(*args, **kwargs)

    monkeypatch.setattr(loop, "create_datagram_endpoint", flaky_endpoint)
    async with DnsServer() as server:
        server.set_a("web.example", ["10.0.0.1"])
        assert calls >= 2  # (a real collision may add one more)
        assert addresses(await ask(server, "web.example", tcp=True), "web.example.") == {"10.0.0.1"}
        assert addresses(await ask(server, "web.example"), "web.example.") == {"10.0.0.1"}


async def test_explicit_port_in_use_fails_loudly(server: DnsServer) -> None:
    clash = DnsServer(port=server.port)
    with pytest.raises(OSError):
        await clash.start()
    assert not clash.running
    # The failed attempt must not have disturbed the running server.
    server.set_a("web.example", ["10.0.0.1"])
    assert addresses(await ask(server, "web.example"), "web.example.") == {"10.0.0.1"}
