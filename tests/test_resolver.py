"""The resolver against real DNS answers from the in-process server over loopback.

Every Resolver here is given the test server as its only nameserver: the machine's
own resolv.conf nameserver must never see a query from the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.metrics import Scrape
from support.wait import until

from proxy.config import ResolverConfig
from proxy.dnsserver import DnsServer
from proxy.metrics import Metrics
from proxy.resolver import Address, DnsError, Resolver, Watch, parse_hosts

SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")
NAMESPACE_ENV = {"POD_NAMESPACE": "ns1"}


def make_resolver(
    dns: DnsServer,
    *,
    search: tuple[str, ...] = SEARCH,
    ndots: int = 5,
    min_ttl: float = 1.0,
    max_ttl: float = 60.0,
    stale_ttl: float = 30.0,
    environ: Mapping[str, str] = NAMESPACE_ENV,
    hosts: str = "/nonexistent/hosts",
) -> Resolver:
    config = ResolverConfig(
        nameservers=(("127.0.0.1", dns.port),),
        search=search,
        ndots=ndots,
        timeout=0.3,
        min_ttl=min_ttl,
        max_ttl=max_ttl,
        stale_ttl=stale_ttl,
    )
    # No test reads the machine's /etc/hosts unless it says so: a developer's entries stay out.
    return Resolver(config, Metrics(), environ=dict(environ), hosts_path=hosts)


OpenWatch = Callable[[Resolver, str, int | str], Watch]


@pytest.fixture
async def watch() -> AsyncIterator[OpenWatch]:
    """Opens watches and releases every one of them after the test."""
    opened: list[tuple[Resolver, Watch]] = []

    def open_watch(resolver: Resolver, service: str, port: int | str) -> Watch:
        w = resolver.watch(service, port)
        opened.append((resolver, w))
        return w

    yield open_watch
    for resolver, w in opened:
        resolver.release(w)
    await asyncio.sleep(0)  # let the cancelled refresh tasks finish


@dataclass
class Seen:
    at: float
    name: str
    rdtype: str
    ttl_remaining: float | None


@dataclass
class QueryClock:
    """Timestamps each query the server receives, and what the watch had left of its TTL."""

    dns: DnsServer
    watch: Watch | None = None
    seen: list[Seen] = field(default_factory=list)

    async def run(self) -> None:
        done = len(self.dns.queries)
        while True:
            # The server answers on this loop, so a short poll stamps each query
            # within a few milliseconds of its arrival.
            await asyncio.sleep(0.002)
            for name, rdtype in self.dns.queries[done:]:
                left = self.watch.ttl_remaining if self.watch else None
                self.seen.append(Seen(time.monotonic(), name, rdtype, left))
            done = len(self.dns.queries)

    def times(self, name: str, rdtype: str = "A") -> list[float]:
        return [s.at for s in self.seen if s.name == name and s.rdtype == rdtype]


@contextlib.asynccontextmanager
async def query_clock(dns: DnsServer, watch: Watch | None = None) -> AsyncIterator[QueryClock]:
    clock = QueryClock(dns, watch)
    task = asyncio.create_task(clock.run())
    try:
        yield clock
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def intervals(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def lookups(resolver: Resolver, service: str) -> dict[str, int]:
    return dict(resolver.metrics.service(service).lookups)


# --- search list and ndots ----------------------------------------------------------


@pytest.mark.both_loops
async def test_short_name_is_expanded_once_then_the_answered_name_is_queried(
    dns: DnsServer, watch: OpenWatch
) -> None:
    first = "app1-service.namespace-a.ns1.svc.cluster.local."
    answering = "app1-service.namespace-a.svc.cluster.local."
    dns.set_a(answering, ["10.0.0.1"], ttl=1)
    resolver = make_resolver(dns)

    resolution = await resolver.lookup("app1-service.namespace-a", 80)
    assert resolution.names_tried == (first, answering)
    assert resolution.answered_name == answering
    assert resolution.endpoints == (("10.0.0.1", 80),)
    assert resolution.source == "dns"
    # The search candidate that failed was asked once, and NXDOMAIN ends it: no AAAA.
    assert dns.queries == [(first, "A"), (answering, "A")]

    w = watch(resolver, "app1-service.namespace-a", 80)
    assert await w.wait_resolved(2.0)
    assert w.answered_name == answering
    first_queries = dns.count(first, "A")
    after_expansion = dns.count(answering, "A")
    await until(lambda: dns.count(answering, "A") >= after_expansion + 2, 4.0, "two refreshes")
    assert dns.count(first, "A") == first_queries, dns.queries
    assert {name for name, _ in dns.queries[-2:]} == {answering}


async def test_name_with_ndots_dots_is_tried_as_absolute_first(dns: DnsServer) -> None:
    dns.set_a("api.example.test.", ["10.0.0.7"])
    dns.set_a("api.example.test.ns1.svc.cluster.local.", ["10.9.9.9"])
    resolver = make_resolver(dns, ndots=2)

    resolution = await resolver.lookup("api.example.test", 443)
    assert resolution.names_tried == ("api.example.test.",)
    assert resolution.endpoints == (("10.0.0.7", 443),)

    # Absolute first, but the search list still follows when it is NXDOMAIN.
    assert resolver.candidates("db.example.other") == [
        "db.example.other.",
        "db.example.other.ns1.svc.cluster.local.",
        "db.example.other.svc.cluster.local.",
        "db.example.other.cluster.local.",
    ]
    # One dot fewer than ndots: the search list goes first.
    assert resolver.candidates("example.test")[0] == "example.test.ns1.svc.cluster.local."
    assert resolver.candidates("example.test")[-1] == "example.test."


async def test_ndots_5_expands_a_four_dot_name_first(dns: DnsServer) -> None:
    # The Kubernetes default: even svc.ns.svc.cluster.local goes through the list first.
    resolver = make_resolver(dns, ndots=5)
    assert resolver.candidates("app.ns1.svc.cluster.local")[0] == (
        "app.ns1.svc.cluster.local.ns1.svc.cluster.local."
    )
    assert resolver.candidates("a.b.c.d.e.f")[0] == "a.b.c.d.e.f."


async def test_trailing_dot_name_is_only_tried_as_is(dns: DnsServer) -> None:
    resolver = make_resolver(dns)
    assert resolver.candidates("app1-service.namespace-a.") == ["app1-service.namespace-a."]

    with pytest.raises(DnsError) as caught:
        await resolver.lookup("app1-service.namespace-a.", 80)
    assert caught.value.result == "nxdomain"
    assert caught.value.names_tried == ("app1-service.namespace-a.",)
    assert dns.queries == [("app1-service.namespace-a.", "A")]

    dns.set_a("app1-service.namespace-a.", ["10.0.0.3"])
    resolution = await resolver.lookup("app1-service.namespace-a.", 80)
    assert resolution.names_tried == ("app1-service.namespace-a.",)
    assert resolution.endpoints == (("10.0.0.3", 80),)


# --- TTL: refresh ahead, clamping ---------------------------------------------------


async def test_watch_refreshes_ahead_of_a_one_second_ttl(dns: DnsServer, watch: OpenWatch) -> None:
    name = "app.ns1.svc.cluster.local."
    dns.set_a(name, ["10.0.0.1"], ttl=1)
    resolver = make_resolver(dns)
    w = watch(resolver, "app", 80)
    assert await w.wait_resolved(2.0)
    assert w.ttl == 1.0

    async with query_clock(dns, w) as clock:
        changed = time.monotonic()
        dns.set_a(name, ["10.0.0.2"], ttl=1)
        await until(lambda: w.endpoints == (("10.0.0.2", 80),), 2.0, "the new address")
        assert time.monotonic() - changed <= 2.0
        await until(lambda: time.monotonic() - changed >= 2.5, 3.0, "a 2.5 s window")

    times = clock.times(name)
    gaps = intervals(times)
    # REFRESH_AT is 0.75 of the TTL: about three lookups in 2.5 s, never one per
    # TTL (that would be at expiry), and never hammering the server either.
    assert 3 <= len(times) <= 4, times
    assert all(0.6 <= gap <= 0.9 for gap in gaps), gaps
    # Each refresh went out while the current answer still had time left.
    for seen in clock.seen:
        assert seen.ttl_remaining is not None
        assert seen.ttl_remaining >= 0.15, clock.seen


async def test_ttl_zero_is_clamped_up_to_min_ttl(dns: DnsServer) -> None:
    dns.set_a("zero.ns1.svc.cluster.local.", ["10.0.0.1"], ttl=0)
    resolver = make_resolver(dns, min_ttl=2.0)
    resolution = await resolver.lookup("zero", 80)
    assert resolution.ttl == 2.0
    assert resolution.record_ttl == 0


async def test_long_ttl_is_clamped_down_to_max_ttl(dns: DnsServer, watch: OpenWatch) -> None:
    dns.set_a("long.ns1.svc.cluster.local.", ["10.0.0.1"], ttl=3600)
    resolver = make_resolver(dns, max_ttl=60.0)
    resolution = await resolver.lookup("long", 80)
    assert resolution.ttl == 60.0
    assert resolution.record_ttl == 3600

    w = watch(resolver, "long", 80)
    assert await w.wait_resolved(2.0)
    assert w.ttl == 60.0
    assert w.ttl_remaining is not None
    assert 59.0 < w.ttl_remaining <= 60.0


# --- failures: stale answers, server errors -----------------------------------------


async def test_stale_answer_serves_while_dns_is_down_then_expires(
    dns: DnsServer, watch: OpenWatch
) -> None:
    dns.set_a("app.ns1.svc.cluster.local.", ["10.0.0.1", "10.0.0.2"], ttl=1)
    resolver = make_resolver(dns, stale_ttl=1.5)
    w = watch(resolver, "app", 80)
    good = (("10.0.0.1", 80), ("10.0.0.2", 80))
    await until(lambda: w.endpoints == good, 2.0, "the first answer")
    history: list[tuple[float, tuple[Address, ...]]] = []
    w.subscribe(lambda endpoints: history.append((time.monotonic(), endpoints)))
    assert w.ttl_remaining is not None
    expires = time.monotonic() + w.ttl_remaining  # of the last good answer, for good

    await dns.stop()
    await until(lambda: w.last_error is not None, 3.0, "a failed refresh")
    assert "timed out" in (w.last_error or "")
    assert lookups(resolver, "app")["timeout"] >= 1

    # Past the TTL the last good answer still serves.
    await until(lambda: w.ttl_remaining == 0.0, 2.0, "the TTL to run out")
    assert w.endpoints == good
    assert w.source == "dns"

    await until(lambda: w.endpoints == (), 4.0, "stale_ttl to run out")
    dropped = history[-1][0]
    assert dropped >= expires + 1.5 - 0.02, "dropped before stale_ttl had passed"
    assert [endpoints for _, endpoints in history] == [good, ()]
    assert resolver.metrics.service("app").endpoints == 0

    await dns.start()
    await until(lambda: w.endpoints == good, 8.0, "recovery once DNS is back")
    assert w.last_error is None
    assert w.source == "dns"
    assert w.ttl_remaining is not None
    assert w.ttl_remaining > 0


async def test_servfail_refused_and_drop_results(dns: DnsServer) -> None:
    dns.set_a("app.ns1.svc.cluster.local.", ["10.0.0.1"])
    resolver = make_resolver(dns)

    for mode, result in (("servfail", "error"), ("refused", "error"), ("drop", "timeout")):
        dns.set_failure(None, mode)
        with pytest.raises(DnsError) as caught:
            await resolver.lookup("app", 80)
        assert caught.value.result == result, mode
        # A server failure is not NXDOMAIN: the search list stops at the first name.
        assert caught.value.names_tried == ("app.ns1.svc.cluster.local.",)

    assert lookups(resolver, "app") == {"ok": 0, "nxdomain": 0, "error": 2, "timeout": 1}
    dns.set_failure(None, None)
    assert (await resolver.lookup("app", 80)).endpoints == (("10.0.0.1", 80),)


async def test_a_silent_first_nameserver_is_passed_over() -> None:
    # resolv.conf's semantics: the timeout is each server's, and the next one is asked.
    # (Before, the whole lookup had one timeout, spent on the first server: a node whose
    # first resolver was down never resolved anything.)
    async with DnsServer() as dead, DnsServer() as alive:
        dead.set_failure(None, "drop")
        alive.set_a("app.ns1.svc.cluster.local.", ["10.0.0.1"])
        config = ResolverConfig(
            nameservers=(("127.0.0.1", dead.port), ("127.0.0.1", alive.port)),
            search=SEARCH,
            ndots=5,
            timeout=0.3,
        )
        resolver = Resolver(config, Metrics(), environ={}, hosts_path="/nonexistent/hosts")
        assert (await resolver.lookup("app", 80)).endpoints == (("10.0.0.1", 80),)
        assert dead.queries and alive.queries
        alive.set_failure(None, "drop")
        with pytest.raises(DnsError) as caught:
            await resolver.lookup("app", 80)
        assert caught.value.result == "timeout"
        # Each server was asked again in a second round (a lost datagram is survived).
        assert len(alive.queries) >= 3


async def test_a_cname_loop_is_named_as_such(dns: DnsServer) -> None:
    dns.set_cname("a.ns1.svc.cluster.local", "b.ns1.svc.cluster.local")
    dns.set_cname("b.ns1.svc.cluster.local", "a.ns1.svc.cluster.local")
    resolver = make_resolver(dns)
    with pytest.raises(DnsError) as caught:
        await resolver.lookup("a", 80)
    assert caught.value.result == "error"
    assert "CNAME loop: a.ns1.svc.cluster.local. -> b.ns1.svc.cluster.local. -> a." in str(
        caught.value
    )


async def test_servfail_without_a_loop_still_says_every_nameserver_failed(dns: DnsServer) -> None:
    dns.set_a("app.ns1.svc.cluster.local", ["10.0.0.1"])
    dns.set_failure(None, "servfail")
    resolver = make_resolver(dns)
    with pytest.raises(DnsError) as caught:
        await resolver.lookup("app", 80)
    assert "every nameserver failed" in str(caught.value)


# --- NXDOMAIN and empty answers -----------------------------------------------------


async def test_name_that_never_existed_is_nxdomain(dns: DnsServer) -> None:
    resolver = make_resolver(dns)
    with pytest.raises(DnsError) as caught:
        await resolver.lookup("ghost", 80)
    assert caught.value.result == "nxdomain"
    assert caught.value.names_tried == (
        "ghost.ns1.svc.cluster.local.",
        "ghost.svc.cluster.local.",
        "ghost.cluster.local.",
        "ghost.",
    )
    assert "NXDOMAIN" in str(caught.value)
    assert lookups(resolver, "ghost") == {"ok": 0, "nxdomain": 1, "error": 0, "timeout": 0}


async def test_name_that_disappears_keeps_its_last_good_answer(
    dns: DnsServer, watch: OpenWatch
) -> None:
    name = "app.ns1.svc.cluster.local."
    dns.set_a(name, ["10.0.0.1"], ttl=1)
    resolver = make_resolver(dns)
    w = watch(resolver, "app", 80)
    await until(lambda: w.endpoints == (("10.0.0.1", 80),), 2.0, "the first answer")

    dns.remove(name)
    await until(lambda: w.last_error is not None, 3.0, "the NXDOMAIN")
    assert "NXDOMAIN" in (w.last_error or "")
    await until(lambda: w.ttl_remaining == 0.0, 2.0, "the TTL to run out")
    assert w.endpoints == (("10.0.0.1", 80),)
    assert w.resolved
    assert lookups(resolver, "app")["nxdomain"] >= 1

    # Back under another search domain: the whole list is expanded again.
    dns.set_a("app.svc.cluster.local.", ["10.0.0.5"], ttl=1)
    await until(lambda: w.endpoints == (("10.0.0.5", 80),), 6.0, "the name coming back")
    assert w.answered_name == "app.svc.cluster.local."
    assert w.last_error is None


async def test_empty_answer_is_a_failure(dns: DnsServer, watch: OpenWatch) -> None:
    # The name exists (it has an SRV record) but has neither A nor AAAA.
    dns.set_srv("empty.ns1.svc.cluster.local.", [(0, 0, 80, "x.example.")])
    resolver = make_resolver(dns)
    with pytest.raises(DnsError) as caught:
        await resolver.lookup("empty", 80)
    assert caught.value.result == "nxdomain"
    assert "no addresses" in str(caught.value)
    assert ("empty.ns1.svc.cluster.local.", "AAAA") in dns.queries

    # A watched name whose addresses vanish keeps serving the last good ones.
    dns.set_a("app.ns1.svc.cluster.local.", ["10.0.0.1"], ttl=1)
    w = watch(resolver, "app", 80)
    await until(lambda: w.endpoints == (("10.0.0.1", 80),), 2.0, "the first answer")
    dns.set_srv("app.ns1.svc.cluster.local.", [(0, 0, 80, "x.example.")])
    dns.set_a("app.ns1.svc.cluster.local.", [])
    await until(lambda: w.last_error is not None, 3.0, "the empty answer")
    assert "no addresses" in (w.last_error or "")
    assert w.endpoints == (("10.0.0.1", 80),)


# --- answer shapes ------------------------------------------------------------------


async def test_cname_chain_is_followed_with_the_smallest_ttl(dns: DnsServer) -> None:
    dns.set_cname("web.ns1.svc.cluster.local.", "web-v2.ns1.svc.cluster.local.", ttl=30)
    dns.set_cname("web-v2.ns1.svc.cluster.local.", "pods.example.", ttl=7)
    dns.set_a("pods.example.", ["10.0.0.1"], ttl=20)
    resolver = make_resolver(dns)
    resolution = await resolver.lookup("web", 80)
    assert resolution.endpoints == (("10.0.0.1", 80),)
    assert resolution.answered_name == "web.ns1.svc.cluster.local."
    assert resolution.ttl == 7.0
    assert resolution.record_ttl == 7


async def test_aaaa_is_used_when_there_is_no_a(dns: DnsServer) -> None:
    dns.set_aaaa("v6.ns1.svc.cluster.local.", ["fd00::2", "fd00::1"])
    resolver = make_resolver(dns)
    resolution = await resolver.lookup("v6", 8080)
    assert resolution.endpoints == (("fd00::1", 8080), ("fd00::2", 8080))
    assert dns.queries == [
        ("v6.ns1.svc.cluster.local.", "A"),
        ("v6.ns1.svc.cluster.local.", "AAAA"),
    ]


@pytest.mark.both_loops
@pytest.mark.parametrize("literal", ["10.1.2.3", "fd00::7"])
async def test_ip_literal_is_static_and_never_queried(
    dns: DnsServer, watch: OpenWatch, literal: str
) -> None:
    resolver = make_resolver(dns)
    resolution = await resolver.lookup(literal, 80)
    assert resolution.source == "static"
    assert resolution.endpoints == ((literal, 80),)
    assert not resolution.headless

    w = watch(resolver, literal, 80)
    assert w.resolved
    assert w.source == "static"
    assert w.endpoints == ((literal, 80),)
    assert w.ttl_remaining is None
    # A lookup through the same loop gives a (wrongly) started refresh task its turns.
    dns.set_a("app.ns1.svc.cluster.local.", ["10.0.0.1"])
    await resolver.lookup("app", 80)
    assert dns.queries == [("app.ns1.svc.cluster.local.", "A")]


async def test_several_a_records_are_several_endpoints(dns: DnsServer) -> None:
    dns.set_a("headless.ns1.svc.cluster.local.", ["10.0.0.3", "10.0.0.1", "10.0.0.2"])
    dns.set_a("clusterip.ns1.svc.cluster.local.", ["10.96.0.10"])
    resolver = make_resolver(dns)

    headless = await resolver.lookup("headless", 6379)
    assert headless.endpoints == (("10.0.0.1", 6379), ("10.0.0.2", 6379), ("10.0.0.3", 6379))
    assert headless.headless

    clusterip = await resolver.lookup("clusterip", 6379)
    assert clusterip.endpoints == (("10.96.0.10", 6379),)
    assert not clusterip.headless


# --- SRV ----------------------------------------------------------------------------


async def test_port_name_looks_up_srv_with_search_expansion(dns: DnsServer) -> None:
    dns.set_srv(
        "_http._tcp.web.svc.cluster.local.",
        [
            (0, 50, 8081, "pod-b.web.svc.cluster.local."),
            (0, 50, 8080, "pod-a.web.svc.cluster.local."),
            # Two targets sharing an address and port make one endpoint.
            (0, 50, 8080, "pod-a-alias.web.svc.cluster.local."),
        ],
    )
    dns.set_a("pod-a.web.svc.cluster.local.", ["10.0.1.1"])
    dns.set_a("pod-a-alias.web.svc.cluster.local.", ["10.0.1.1"])
    dns.set_a("pod-b.web.svc.cluster.local.", ["10.0.1.2"])
    resolver = make_resolver(dns)

    resolution = await resolver.lookup("web", "http")
    # (The names as queried: an operator checks them with dig.)
    assert resolution.names_tried == (
        "_http._tcp.web.ns1.svc.cluster.local.",
        "_http._tcp.web.svc.cluster.local.",
    )
    assert resolution.answered_name == "web.svc.cluster.local."
    assert resolution.endpoints == (("10.0.1.1", 8080), ("10.0.1.2", 8081))
    assert resolution.headless
    assert dns.queries == [
        ("_http._tcp.web.ns1.svc.cluster.local.", "SRV"),
        ("_http._tcp.web.svc.cluster.local.", "SRV"),
    ], "the targets' addresses come from the additional section"


async def test_srv_target_missing_from_additional_is_looked_up(dns: DnsServer) -> None:
    # A target that is an alias gets no glue from the server, so the resolver asks.
    dns.set_srv("_grpc._tcp.api.ns1.svc.cluster.local.", [(0, 0, 9000, "alias.example.")], ttl=30)
    dns.set_cname("alias.example.", "real.example.", ttl=4)
    dns.set_a("real.example.", ["10.0.2.1"], ttl=30)
    resolver = make_resolver(dns)

    resolution = await resolver.lookup("api", "grpc")
    assert resolution.endpoints == (("10.0.2.1", 9000),)
    assert resolution.ttl == 4.0
    assert dns.count("alias.example.", "A") == 1


async def test_srv_falls_back_to_the_next_priority_and_skips_port_0(dns: DnsServer) -> None:
    # RFC 2782: the lowest priority whose targets have an address. (Before, a priority-0
    # target with no address made the whole answer NXDOMAIN, and a port-0 target was an
    # endpoint that could never be connected to.)
    dns.set_srv(
        "_grpc._tcp.api.ns1.svc.cluster.local.",
        [(0, 50, 9000, "gone.example."), (0, 50, 0, "zero.example."), (10, 50, 9001, "b.example.")],
    )
    dns.set_a("zero.example.", ["10.0.2.9"])
    dns.set_a("b.example.", ["10.0.2.2"])
    resolver = make_resolver(dns)
    resolution = await resolver.lookup("api", "grpc")
    assert resolution.endpoints == (("10.0.2.2", 9001),)
    assert dns.count("zero.example.", "A") == 0


async def test_one_service_watched_for_two_ports_is_one_gauge_the_larger(
    dns: DnsServer, watch: OpenWatch
) -> None:
    # (Before, sidelink_dns_endpoints was whichever of the two lookups had ended last.)
    dns.set_a("web.ns1.svc.cluster.local.", ["10.0.1.1", "10.0.1.2"], ttl=1)
    targets = [(0, 50, 8080, f"p{i}.example.") for i in range(3)]
    dns.set_srv("_http._tcp.web.ns1.svc.cluster.local.", targets, ttl=1)
    for i in range(3):
        dns.set_a(f"p{i}.example.", [f"10.0.2.{i}"], ttl=1)
    resolver = make_resolver(dns)
    stats = resolver.metrics.service("web")
    by_number = watch(resolver, "web", 80)
    by_name = watch(resolver, "web", "http")
    await until(lambda: len(by_number.endpoints) == 2 and len(by_name.endpoints) == 3)
    for _ in range(3):  # refreshes of both, in either order
        await asyncio.sleep(0.8)
        assert stats.endpoints == 3
    resolver.release(by_name)
    assert stats.endpoints == 2


async def test_srv_port_name_watch_refreshes_the_answered_srv_name(
    dns: DnsServer, watch: OpenWatch
) -> None:
    srv = "_http._tcp.web.svc.cluster.local."
    dns.set_srv(srv, [(0, 0, 8080, "pod-a.web.svc.cluster.local.")], ttl=1)
    dns.set_a("pod-a.web.svc.cluster.local.", ["10.0.1.1"], ttl=1)
    resolver = make_resolver(dns)
    w = watch(resolver, "web", "http")
    await until(lambda: w.endpoints == (("10.0.1.1", 8080),), 2.0, "the SRV answer")
    expanded = dns.count("_http._tcp.web.ns1.svc.cluster.local.", "SRV")
    refreshes = dns.count(srv, "SRV")

    dns.set_srv(srv, [(0, 0, 9090, "pod-a.web.svc.cluster.local.")], ttl=1)
    await until(lambda: w.endpoints == (("10.0.1.1", 9090),), 2.0, "the new SRV port")
    assert dns.count(srv, "SRV") > refreshes
    assert dns.count("_http._tcp.web.ns1.svc.cluster.local.", "SRV") == expanded


# --- early re-resolution ------------------------------------------------------------


async def test_nudge_re_resolves_early_but_at_most_once_a_second(
    dns: DnsServer, watch: OpenWatch
) -> None:
    name = "app.ns1.svc.cluster.local."
    dns.set_a(name, ["10.0.0.1"], ttl=30)
    resolver = make_resolver(dns)
    w = watch(resolver, "app", 80)
    assert await w.wait_resolved(2.0)
    before = dns.count(name, "A")

    async with query_clock(dns) as clock:
        start = time.monotonic()
        # A burst of nudges, as from a flapping endpoint, for over two seconds.
        while time.monotonic() - start < 2.2:
            w.nudge()
            await asyncio.sleep(0.05)  # pacing the nudges, not waiting for anything
        # The last nudges of the burst are served by one more lookup.
        await until(lambda: len(clock.times(name)) >= 3, 1.5, "the rate-limited lookups")
        burst = clock.times(name)
        # Once a second has passed since the last lookup, a nudge is served at once.
        await asyncio.sleep(burst[-1] + 1.1 - time.monotonic())  # waiting out the limit
        nudged = time.monotonic()
        w.nudge()
        await until(lambda: len(clock.times(name)) > len(burst), 0.5, "the prompt lookup")
        prompt = clock.times(name)[len(burst) :]

    # Far earlier than the scheduled refresh (0.75 * 30 s), at most once a second.
    assert burst[0] - start < 1.2, burst
    assert len(burst) == 3, burst
    gaps = intervals(burst)
    assert all(gap >= 0.95 for gap in gaps), gaps
    assert len(prompt) == 1
    assert prompt[0] - nudged < 0.2
    assert dns.count(name, "A") == before + 4
    # Every lookup found the answer unchanged: no spurious changes.
    assert resolver.metrics.service("app").changes == 0


# --- Kubernetes service environment variables ---------------------------------------

REDIS_ENV = {
    "POD_NAMESPACE": "ns1",
    "REDIS_SERVICE_HOST": "127.0.0.9",
    "REDIS_SERVICE_PORT": "6379",
    "REDIS_SERVICE_PORT_REDIS_TLS": "6380",
}


@pytest.mark.parametrize("failure", ["nxdomain", "servfail"])
async def test_env_fallback_until_dns_answers(
    dns: DnsServer, watch: OpenWatch, failure: str
) -> None:
    if failure == "servfail":
        dns.set_failure(None, "servfail")
    resolver = make_resolver(dns, environ=REDIS_ENV)
    w = watch(resolver, "redis", 6379)
    assert w.source == "env"
    assert w.endpoints == (("127.0.0.9", 6379),)
    assert w.resolved
    await until(lambda: sum(lookups(resolver, "redis").values()) >= 1, 2.0, "a DNS attempt")
    assert w.source == "env"
    assert w.endpoints == (("127.0.0.9", 6379),)
    assert w.ttl_remaining is None

    dns.set_failure(None, None)
    dns.set_a("redis.ns1.svc.cluster.local.", ["10.0.0.5"])
    await until(lambda: w.source == "dns", 5.0, "DNS to take over")
    assert w.endpoints == (("10.0.0.5", 6379),)
    assert w.answered_name == "redis.ns1.svc.cluster.local."


async def test_env_is_only_for_the_own_namespace_and_named_ports(
    dns: DnsServer, watch: OpenWatch
) -> None:
    resolver = make_resolver(dns, environ=REDIS_ENV)
    assert resolver.namespace == "ns1"
    assert resolver.env_endpoints("redis.ns1", 6379) == (("127.0.0.9", 6379),)
    assert resolver.env_endpoints("redis.ns1.svc.cluster.local", 6379) == (("127.0.0.9", 6379),)
    assert resolver.env_endpoints("redis.other", 6379) == ()
    assert resolver.env_endpoints("redis", "redis-tls") == (("127.0.0.9", 6380),)
    assert resolver.env_endpoints("redis", "metrics") == ()

    other = watch(resolver, "redis.other", 6379)
    assert other.source == "dns"
    assert other.endpoints == ()
    assert not other.resolved

    named = watch(resolver, "redis", "redis-tls")
    assert named.source == "env"
    assert named.endpoints == (("127.0.0.9", 6380),)


async def test_namespace_falls_back_to_the_search_list(dns: DnsServer) -> None:
    search = ("team-b.svc.cluster.local", "svc.cluster.local")
    # Without $POD_NAMESPACE (and outside a pod) the first <ns>.svc.* domain tells.
    assert make_resolver(dns, search=search, environ={}).namespace == "team-b"
    assert make_resolver(dns, search=search).namespace == "ns1"


# --- metrics and reprs --------------------------------------------------------------


async def test_dns_metrics_carry_the_service_label(dns: DnsServer, watch: OpenWatch) -> None:
    name = "app.ns1.svc.cluster.local."
    dns.set_a(name, ["10.0.0.1", "10.0.0.2"], ttl=1)
    resolver = make_resolver(dns)
    w = watch(resolver, "app", 80)
    await until(lambda: len(w.endpoints) == 2, 2.0, "the first answer")
    dns.set_a(name, ["10.0.0.1", "10.0.0.2", "10.0.0.3"], ttl=1)
    await until(lambda: len(w.endpoints) == 3, 2.0, "the change")
    with pytest.raises(DnsError):
        await resolver.lookup("ghost", 80)

    body, content_type = resolver.metrics.render(None)
    assert content_type.startswith("text/plain")
    samples = {
        (name, tuple(sorted(labels.items()))): value
        for name, labels, value in Scrape(body.decode()).samples
    }
    ok = samples[("sidelink_dns_lookups_total", (("result", "ok"), ("service", "app")))]
    assert ok >= 2
    assert samples[("sidelink_dns_lookups_total", (("result", "nxdomain"), ("service", "ghost")))]
    assert samples[("sidelink_dns_endpoints", (("service", "app"),))] == 3
    assert samples[("sidelink_dns_changes_total", (("service", "app"),))] == 1


async def test_reprs_are_informative(dns: DnsServer, watch: OpenWatch) -> None:
    dns.set_a("app.ns1.svc.cluster.local.", ["10.0.0.1", "10.0.0.2"])
    resolver = make_resolver(dns)
    assert repr(resolver) == (
        f"<Resolver nameservers=[127.0.0.1:{dns.port}] "
        "search=[ns1.svc.cluster.local. svc.cluster.local. cluster.local.] ndots=5>"
    )
    w = watch(resolver, "app", 80)
    assert repr(w) == "<Watch app:80 source=dns endpoints=0 answered=None>"
    await until(lambda: len(w.endpoints) == 2, 2.0, "the answer")
    assert repr(w) == ("<Watch app:80 source=dns endpoints=2 answered=app.ns1.svc.cluster.local.>")


# --- /etc/hosts first, as libc's "hosts: files dns" ----------------------------------


HOSTS = """\
# comments and blank lines are skipped

127.0.0.1   localhost
::1         localhost ip6-localhost
10.0.0.7    Pinned.NS1.svc.cluster.local pinned   # an alias, any case
fe80::1%lo0 linklocal
not-an-ip   broken
10.0.0.8
"""


async def test_the_hosts_file_answers_before_dns(
    dns: DnsServer, watch: OpenWatch, tmp_path: Path
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    dns.set_a("pinned.ns1.svc.cluster.local.", ["10.9.9.9"])
    resolver = make_resolver(dns, hosts=str(hosts))

    local = await resolver.lookup("localhost", 8080)
    assert (local.source, local.endpoints, local.answered_name) == (
        "hosts",
        (("127.0.0.1", 8080),),  # IPv4 first, as an A answer comes before AAAA
        "localhost",
    )
    assert (await resolver.lookup("ip6-localhost", 80)).endpoints == (("::1", 80),)
    assert (await resolver.lookup("PINNED.", 80)).endpoints == (("10.0.0.7", 80),)
    assert (await resolver.lookup("linklocal", 80)).endpoints == (("fe80::1", 80),)
    assert dns.queries == [], "the hosts file answered: no DNS query"

    # The name as written only (no search list), and a port name (SRV) is DNS's.
    w = watch(resolver, "localhost", 80)
    await until(lambda: w.resolved)
    assert (w.source, w.endpoints, w.ttl_remaining) == ("hosts", (("127.0.0.1", 80),), None)
    with pytest.raises(DnsError):
        await resolver.lookup("broken", 80)
    assert dns.queries, "a name the hosts file lacks goes to DNS"


async def test_a_hosts_file_change_is_seen(dns: DnsServer, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("10.0.0.1 app\n")
    dns.set_a("app.ns1.svc.cluster.local.", ["10.0.0.2"])
    resolver = make_resolver(dns, hosts=str(hosts))
    assert (await resolver.lookup("app", 80)).endpoints == (("10.0.0.1", 80),)
    hosts.write_text("10.0.0.3 app other\n")
    assert (await resolver.lookup("app", 80)).endpoints == (("10.0.0.3", 80),)
    hosts.unlink()
    found = await resolver.lookup("app", 80)
    assert (found.source, found.endpoints) == ("dns", (("10.0.0.2", 80),))


def test_parse_hosts() -> None:
    assert parse_hosts(HOSTS) == {
        "localhost": ("127.0.0.1", "::1"),
        "ip6-localhost": ("::1",),
        "pinned.ns1.svc.cluster.local": ("10.0.0.7",),
        "pinned": ("10.0.0.7",),
        "linklocal": ("fe80::1",),
    }
