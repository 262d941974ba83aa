"""HTTP/2's pure rules (request fields upstream, sidelink's answers, the preface), the
multiplexed StreamPool, and p2c's tie-break that spreads sequential calls evenly."""

from __future__ import annotations

from collections import Counter

import pytest
from ngh2 import NeverIndexedHeader
from ngh2.types import Header

from proxy.config import PoolConfig
from proxy.endpoints import EndpointSet
from proxy.errors import (
    BodyStalled,
    ConnectRefused,
    MethodNotAllowed,
    NoEndpoints,
    ProxyError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.http import heads
from proxy.http.h2 import PREFACE, sniff
from proxy.metrics import RouteStats
from proxy.pool import Multiplexed, StreamPool

AUTO = heads.HostRule("app1-service.ns", 8080, "auto")
PRESERVE = heads.HostRule("app1-service.ns", 8080, "preserve")


def request(*extra: Header, authority: bytes = b"localhost:8081") -> heads.H2Request:
    fields = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/pkg.Svc/Call"),
        (b":authority", authority),
        *extra,
    ]
    return heads.h2_request(fields, AUTO)


def test_request_fields_go_on_in_their_order_with_the_authority_rewritten() -> None:
    req = request((b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"x-a", b"1"))
    assert req.method == b"POST"
    assert req.path == b"/pkg.Svc/Call"
    assert req.authority == b"app1-service.ns:8080"  # host: auto, the service as written
    assert req.grpc
    assert req.fields == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/pkg.Svc/Call"),
        (b":authority", b"app1-service.ns:8080"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"x-a", b"1"),
    ]


def test_a_missing_authority_goes_first_and_a_host_field_is_folded_into_it() -> None:
    fields = [(b":method", b"GET"), (b":path", b"/"), (b"host", b"h"), (b"x-a", b"1")]
    req = heads.h2_request(fields, PRESERVE)
    assert req.fields == [
        (b":authority", b"h"),
        (b":method", b"GET"),
        (b":path", b"/"),
        (b"x-a", b"1"),
    ]


def test_never_indexed_fields_stay_never_indexed() -> None:
    # RFC 7541 6.2.3: an intermediary forwards a never-indexed field with the same
    # representation (ngh2 hands it over as NeverIndexedHeader, and takes it so too).
    secret = NeverIndexedHeader(b"authorization", b"Bearer x")
    req = request(secret, (b"x-a", b"1"))
    [kept] = [f for f in req.fields if f[0] == b"authorization"]
    assert type(kept) is NeverIndexedHeader
    assert kept == secret


@pytest.mark.parametrize(
    ("fields", "authority"),
    [
        ([(b":authority", b"client.example")], b"client.example"),
        ([(b"host", b"from-host")], b"from-host"),  # a host field folds into :authority
        ([(b":authority", b"a"), (b"host", b"b")], b"a"),
        ([], b"app1-service.ns:8080"),  # neither: the service
    ],
)
def test_host_preserve_passes_the_clients_authority(
    fields: list[tuple[bytes, bytes]], authority: bytes
) -> None:
    base = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
    req = heads.h2_request([*base, *fields], PRESERVE)
    assert dict(req.fields)[b":authority"] == authority
    assert b"host" not in dict(req.fields)


def test_a_literal_host_setting_wins() -> None:
    rule = heads.HostRule("svc", 80, "api.internal")
    req = heads.h2_request([(b":method", b"GET"), (b":authority", b"x"), (b":path", b"/")], rule)
    assert dict(req.fields)[b":authority"] == b"api.internal"


def test_grpc_is_told_by_content_type_prefix_only() -> None:
    assert request((b"content-type", b"application/grpc+proto")).grpc
    assert not request((b"content-type", b"application/json")).grpc
    assert not request((b"x-content-type", b"application/grpc")).grpc


@pytest.mark.parametrize(
    ("error", "grpc_status"),
    [
        (NoEndpoints("none"), b"14"),
        (ConnectRefused("refused"), b"14"),
        (UpstreamReset("reset"), b"14"),
        (UpstreamTimeout("slow"), b"4"),
        (BodyStalled("idle"), b"4"),
        (MethodNotAllowed("no"), b"12"),
    ],
)
def test_grpc_answers_are_trailers_only_with_the_status_and_reason(
    error: ProxyError, grpc_status: bytes
) -> None:
    fields = dict(heads.grpc_answer(error))
    assert fields[b":status"] == b"200"
    assert fields[b"content-type"] == b"application/grpc"
    assert fields[b"grpc-status"] == grpc_status
    assert fields[b"sidelink-error"] == error.reason.encode()


def test_grpc_message_is_percent_encoded_utf8() -> None:
    assert heads.grpc_message("plain text: ok") == b"plain text: ok"
    assert heads.grpc_message("50% é\n") == b"50%25 %C3%A9%0A"


def test_plain_http2_errors_carry_status_length_and_reason() -> None:
    fields, body = heads.h2_error(NoEndpoints("app1 has no endpoints"))
    as_dict = dict(fields)
    assert as_dict[b":status"] == b"503"
    assert as_dict[b"sidelink-error"] == b"no_endpoints"
    assert int(as_dict[b"content-length"]) == len(body)
    assert body == b"503 Service Unavailable: app1 has no endpoints\n"


@pytest.mark.parametrize("cut", range(len(PREFACE) + 1))
def test_the_preface_is_told_however_it_is_cut(cut: int) -> None:
    assert sniff(PREFACE[:cut]) is (True if cut == len(PREFACE) else None)
    assert sniff(PREFACE + b"\x00\x00") is True
    assert sniff(b"PRI * HTTP/1.1\r\n") is False
    assert sniff(b"POST / HTTP/1.1\r\n") is False


# --- StreamPool ----------------------------------------------------------------------


class Mux(Multiplexed):
    """The little a StreamPool reads of a multiplexed connection."""

    def __init__(self, created: float, room: int = 2) -> None:
        self.created = created
        self.idle_since = created
        self.closed = False
        self.retired = False
        self.streams = 0
        self.limit = room

    def room(self) -> int:
        return 0 if self.retired or self.closed else self.limit - self.streams

    def busy(self) -> bool:
        return self.streams > 0

    def retire(self) -> None:
        self.retired = True

    def close(self) -> None:
        self.closed = True


def make_pool(**config: float) -> StreamPool:
    return StreamPool("app1", ("127.0.0.2", 80), PoolConfig(**config))  # type: ignore[arg-type]


def test_a_stream_goes_on_the_first_connection_with_room() -> None:
    pool = make_pool()
    a, b = Mux(0.0), Mux(0.0)
    pool.add(a)
    pool.add(b)
    assert pool.get(1.0) is a
    a.streams = 2
    assert pool.get(1.0) is b
    b.streams = 2
    assert pool.get(1.0) is None  # all full: the caller makes another


def test_past_its_lifetime_a_connection_is_retired_not_handed_out() -> None:
    pool = make_pool(max_lifetime=10.0)
    old, young = Mux(0.0), Mux(5.0)
    pool.add(old)
    pool.add(young)
    assert pool.get(11.0) is young
    assert old.retired
    assert not old.closed  # its streams finish first
    assert pool.conns == [young]


def test_sweep_closes_only_idle_connections_past_their_time() -> None:
    pool = make_pool(idle_timeout=5.0, max_lifetime=100.0)
    idle, busy, fresh = Mux(0.0), Mux(0.0), Mux(4.0)
    busy.streams = 1
    for conn in (idle, busy, fresh):
        pool.add(conn)
    pool.sweep(6.0)
    assert idle.closed
    assert not busy.closed
    assert not fresh.closed
    assert pool.conns == [busy, fresh]
    pool.retire_all()
    assert busy.retired and fresh.retired
    assert pool.conns == []


def test_an_endpoint_leaving_dns_retires_its_multiplexed_connections() -> None:
    # The idle one closes (retired, a connection closes once it carries no stream), the
    # busy one finishes its streams; neither takes a new one. The staying endpoint's stay.
    eps = EndpointSet("app1", "p2c", RouteStats("app1"))
    a, b = ("127.0.0.2", 80), ("127.0.0.3", 80)
    eps.update([a, b])
    pools = {}
    for ep in eps.all():
        ep.streams = pools[ep.address] = make_pool()
    kept, idle, busy = Mux(0.0), Mux(0.0), Mux(0.0)
    busy.streams = 1
    pools[a].add(kept)
    pools[b].add(idle)
    pools[b].add(busy)
    [leaving] = [ep for ep in eps.all() if ep.address == b]
    eps.acquire(leaving)  # (a stream in flight: it drains rather than going at once)

    eps.update([a])
    assert idle.retired and busy.retired
    assert pools[b].conns == []  # nothing left to hand out
    assert not kept.retired and pools[a].conns == [kept]

    # A connection made for it while it drained (a connect under way) goes when it is reaped.
    late = Mux(1.0)
    pools[b].add(late)
    eps.release(leaving)
    assert late.retired and pools[b].conns == []


# --- p2c's tie-break --------------------------------------------------------------


def test_sequential_picks_spread_evenly_over_equal_endpoints() -> None:
    eps = EndpointSet("app1", "p2c", RouteStats("app1"))
    eps.update([("127.0.0.2", 80), ("127.0.0.3", 80), ("127.0.0.4", 80)])
    counts: Counter[str] = Counter()
    for _ in range(600):
        ep = eps.pick()
        assert ep is not None
        counts[ep.host] += 1
    # At random (the two picks' tie going either way) a third each would often be off by
    # 10%; going to the one picked longer ago keeps every share close to 200.
    assert all(180 <= n <= 220 for n in counts.values()), counts


def test_load_still_beats_the_tie_break() -> None:
    eps = EndpointSet("app1", "p2c", RouteStats("app1"))
    eps.update([("127.0.0.2", 80), ("127.0.0.3", 80)])
    busy, idle = eps.endpoints
    busy.in_flight = 3
    assert all(eps.pick() is idle for _ in range(50))
