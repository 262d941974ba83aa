"""/metrics is exact: a known traffic mix through sidelink, then every counter checked.

One sidelink in-process with a route per kind of traffic, each route's upstreams real
servers on their own loopback address, DNS from the in-process server:

    web       http to a DNS name: HTTP/1.1 answers (200, 404, HEAD, DELETE), a 504
              timeout, a 502 reset (a POST the upstream hangs up on), a GET it hangs up
              on at every attempt (retried twice, then 502), a 502 protocol (garbage
              instead of HTTP), and client refusals (400, 431, 405) that are counted only
              as answers
    dead      http to an address nothing listens on: connect refused on every attempt,
              retried on the only endpoint, then 503 no_endpoints
    nowhere   http to a name that never resolves (NXDOMAIN): 503 no_endpoints
    moving    http to a name whose only address is dead; the failed connects nudge a
              re-resolution, DNS now names a live pod (one change), the next request is 200
    h2        HTTP/2 (h2c, prior knowledge) to an h2c pod: 200s, 404, 201 for a POST with a
              body, a 504, a 502 reset before the answer, a reset after the head
              (code="reset"), and an idempotent GET reset before the answer (retried)
    grpc      gRPC through one channel to a grpcio pod: OK calls, an UNIMPLEMENTED from the
              pod, and a DEADLINE_EXCEEDED made by sidelink (request_timeout)
    tcp       L4 echo: three connections, bytes known
    tcpdead   L4 to an address nothing listens on

Then the exposition is parsed as Prometheus would parse it, and every sidelink_ counter
sample, every histogram count and the gauges that must have settled are compared, all
at once, with what the mix must have produced. Where a figure is not knowable in
advance (bytes on the wire, connections the pods accepted, DNS queries while a name
never resolves) it is compared with what the peers themselves counted.

A second test lints the exposition of a sidelink that served the same mix with
`promtool check metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import wire
from support.grpc_servers import Caller, GrpcPods
from support.h2peers import H2Client, H2Pods, PodConnection, StreamReset
from support.inproc import route_address, running_server
from support.pods import StreamPods
from support.procs import free_port, require_tool
from support.replicas import route_entry, routes_yaml
from support.wait import until

from proxy import __version__
from proxy.dnsserver import DnsServer
from proxy.metrics import BUILD_LABEL
from proxy.server import Server

pytestmark = pytest.mark.usefixtures("loop_errors")

WEB_POD = "127.0.0.2"
H2_POD = "127.0.0.3"
GRPC_POD = "127.0.0.4"
DEAD = "127.0.0.5"  # nothing listens here, on any port the test uses
TCP_POD = "127.0.0.6"
MOVING_DEAD = "127.0.0.7"  # where `moving` first resolves: refused
MOVING_POD = "127.0.0.8"  # where it resolves after the change
# Far above the test's run (the refresh comes at 3/4 of it): the only lookups of a name
# that resolves are the first and the one a failed connect nudges.
DNS_TTL = 60
KIB = 1024
ANSWER_DEADLINE = 5.0
SEARCH = "ns1.svc.cluster.local"
UPSTREAM_REASONS = (
    "connect_refused",
    "connect_timeout",
    "reset",
    "timeout",
    "no_endpoints",
    "protocol",
    "fd_limit",
)

Key = tuple[str, tuple[tuple[str, str], ...]]


# --- an HTTP/1.1 pod that tallies every byte --------------------------------------------


class WebPod:
    """Answers by path: /ok 200, /missing 404, /slow never, /reset hangs up after the
    request, /garbage answers something that is not HTTP. Counts bytes both ways."""

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.requests: list[tuple[str, str]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                self.bytes_in += len(e.partial)
                return
            self.bytes_in += len(head)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if length:
                self.bytes_in += len(await reader.readexactly(length))
            self.requests.append((method, target))
            if target == "/reset":
                return  # hang up without a byte of answer
            if target == "/slow":
                self.bytes_in += len(await reader.read())  # until sidelink gives up
                return
            if target == "/garbage":
                self._write(writer, b"this is not HTTP at all\r\n\r\n")
                self.bytes_in += len(await reader.read())
                return
            if target == "/missing":
                answer = b"HTTP/1.1 404 Not Found\r\ncontent-length: 7\r\n\r\n"
                body = b"missing"
            else:
                answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
                body = b"ok"
            self._write(writer, answer if method == "HEAD" else answer + body)
            await writer.drain()

    def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        self.bytes_out += len(data)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(64 * KIB):
        writer.write(data)
        await writer.drain()


# --- HTTP/2 peers that count the bytes they receive ----------------------------------------


class CountingH2Client(H2Client):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.bytes_received = 0

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        super().data_received(data)


class CountingPodConnection(PodConnection):
    def data_received(self, data: bytes) -> None:
        assert isinstance(self.pods, CountingH2Pods)
        self.pods.bytes_received += len(data)
        super().data_received(data)


class CountingH2Pods(H2Pods):
    def __init__(self, *hosts: str) -> None:
        super().__init__(*hosts)
        self.bytes_received = 0

    async def _listen(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: CountingPodConnection(self), host, port)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])


# --- sidelink's config ---------------------------------------------------------------------


def config(dns_port: int, ports: dict[str, int]) -> str:
    routes = [
        route_entry("web", "web", ports["web"], request_timeout="300ms"),
        route_entry("dead", DEAD, ports["dead"]),
        route_entry("nowhere", "nowhere", 80),
        route_entry("moving", "moving", ports["moving"]),
        route_entry("h2", H2_POD, ports["h2"], request_timeout="300ms"),
        route_entry("grpc", GRPC_POD, ports["grpc"], request_timeout="300ms"),
        route_entry("tcp", TCP_POD, ports["tcp"], protocol="tcp"),
        route_entry("tcpdead", DEAD, ports["tcpdead"], protocol="tcp"),
    ]
    return routes_yaml(dns_port, routes)


# --- the exposition, as samples ------------------------------------------------------------


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


def exposition(server: Server) -> str:
    body, _ = server.metrics.render(None)
    return body.decode()


def sidelink_samples(text: str) -> tuple[dict[Key, float], dict[str, str]]:
    """Every sidelink_ sample by (name, labels), and each family's type."""
    samples: dict[Key, float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("sidelink_"):
            continue
        types[family.name] = family.type
        for s in family.samples:
            k = key(s.name, **s.labels)
            assert k not in samples, f"sample {k} exposed twice"
            samples[k] = float(s.value)
    return samples, types


def diff(expected: dict[Key, float], actual: dict[Key, float]) -> list[str]:
    lines = []
    for k in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(k), actual.get(k)
        if want != got:
            labels = ",".join(f'{n}="{v}"' for n, v in k[1])
            lines.append(f"{k[0]}{{{labels}}}: expected {want}, got {got}")
    return lines


# --- clients -------------------------------------------------------------------------------


class Downstream:
    """HTTP/1.x on fresh connections to one route, counting connections and bytes read."""

    def __init__(self, server: Server, route: str) -> None:
        self.server = server
        self.route = route
        self.connections = 0
        self.bytes_read = 0

    @contextlib.asynccontextmanager
    async def connection(self) -> Any:
        self.connections += 1
        async with wire.raw_client(self.server, self.route) as conn:
            yield conn

    async def exchange(
        self, conn: wire.Connection, raw: bytes, method: str = "GET"
    ) -> wire.Response:
        reader, writer = conn
        writer.write(raw)
        response = await wire.read_response(reader, method, timeout=ANSWER_DEADLINE)
        self.bytes_read += len(response.head) + len(response.body)
        return response

    async def one(self, raw: bytes, method: str = "GET") -> wire.Response:
        """raw on a connection of its own; the connection is then closed by us."""
        async with self.connection() as conn:
            return await self.exchange(conn, raw, method)


# --- the traffic mix -----------------------------------------------------------------------


@dataclass
class Mix:
    """What the clients did and saw, per route."""

    answers: dict[str, Counter[tuple[str, str]]] = field(default_factory=dict)  # (method, code)
    grpc: Counter[str] = field(default_factory=Counter)  # grpc-status the caller got
    downstream: Counter[str] = field(default_factory=Counter)  # connections opened
    bytes_read: Counter[str] = field(default_factory=Counter)  # by the HTTP/1 and tcp clients
    bytes_sent: Counter[str] = field(default_factory=Counter)  # by the tcp clients
    h2_client_bytes: int = 0  # what the HTTP/2 client received, before it closed
    h2_reset_attempts: int = 0  # streams the pod got for the retried GET

    def answered(self, route: str, method: str, code: int | str) -> None:
        self.answers.setdefault(route, Counter())[(method, str(code))] += 1


async def http1_traffic(server: Server, mix: Mix) -> None:
    async def run(route: str, steps: list[tuple[bytes, str, int]], *, keep: bool) -> None:
        client = Downstream(server, route)
        if keep:
            async with client.connection() as conn:
                for raw, method, code in steps:
                    response = await client.exchange(conn, raw, method)
                    assert response.status == code, (raw[:60], response)
                    mix.answered(route, method, code)
        else:
            for raw, method, code in steps:
                response = await client.one(raw, method)
                assert response.status == code, (raw[:60], response)
                label = (
                    method if method in ("GET", "HEAD", "POST", "DELETE", "CONNECT") else "OTHER"
                )
                mix.answered(route, label, code)
        mix.downstream[route] += client.connections
        mix.bytes_read[route] += client.bytes_read

    # One keep-alive connection: every request on one pooled upstream connection.
    await run(
        "web",
        [
            *[(wire.get("/ok"), "GET", 200)] * 5,
            (wire.get("/ok", method="HEAD"), "HEAD", 200),
            *[(wire.get("/missing"), "GET", 404)] * 2,
            (wire.get("/ok", method="DELETE"), "DELETE", 200),
        ],
        keep=True,
    )
    # Each failure and refusal on a connection of its own.
    await run(
        "web",
        [
            (wire.get("/slow"), "GET", 504),  # request_timeout: the pooled connection goes
            (wire.post("/reset", b"pay once"), "POST", 502),  # not replayed
            # Idempotent, reset before any answer byte: sent again twice (`retries: 2`) on
            # a new connection to the only endpoint, then 502.
            (wire.get("/reset"), "GET", 502),
            (wire.get("/garbage"), "GET", 502),
            (b"GET /ok HTTP/1.1\r\n\r\n", "GET", 400),  # HTTP/1.1 without Host
            (wire.get("/ok", "X-Big: " + "y" * 70 * KIB, method="POST"), "POST", 431),
            (b"\x01\x02\x03 / HTTP/1.1\r\n\r\n", "OTHER", 400),
            (b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org\r\n\r\n", "CONNECT", 405),
        ],
        keep=False,
    )
    await run("dead", [(wire.get("/"), "GET", 503)] * 2, keep=False)
    await run("nowhere", [(wire.get("/"), "GET", 503)], keep=False)
    await run("moving", [(wire.get("/ok"), "GET", 503)], keep=False)


async def moving_traffic(server: Server, mix: Mix) -> None:
    """After the nudged re-resolution: the new address answers."""
    route = server.routes["moving"]
    port = route.config.port
    await until(
        lambda: route.watch.endpoints == ((MOVING_POD, port),),
        ANSWER_DEADLINE,
        "the failed connects to nudge a re-resolution to the new address",
    )
    client = Downstream(server, "moving")
    assert (await client.one(wire.get("/ok"))).status == 200
    mix.answered("moving", "GET", 200)
    mix.downstream["moving"] += client.connections
    mix.bytes_read["moving"] += client.bytes_read


async def h2_traffic(server: Server, h2_pods: H2Pods, mix: Mix) -> None:
    route = "h2"
    async with CountingH2Client.open(route_address(server, route)) as client:
        mix.downstream[route] += 1
        assert isinstance(client, CountingH2Client)

        async def call(method: str, path: str, body: bytes = b"") -> int | str:
            sid = client.start(method, path, end=not body)
            if body:
                await client.send(sid, body, end=True)
            try:
                response = await client.response(sid)
            except StreamReset:
                mix.answered(route, method, "reset")
                return "reset"
            mix.answered(route, method, response.status)
            return response.status

        for _ in range(4):
            assert await call("GET", "/") == 200
        assert await call("GET", "/status/404") == 404
        assert await call("POST", "/status/201", b"x" * 1000) == 201
        assert await call("GET", "/slow/1") == 504  # request_timeout 300ms
        assert await call("POST", "/reset/now/2") == 502  # reset before the answer: a POST
        assert await call("GET", "/reset/head/2") == "reset"  # cut after the head
        # An idempotent request reset before any answer byte: retried (`retries: 2`, so
        # three attempts on the only endpoint), then 502.
        assert await call("GET", "/reset/now/8") == 502
        mix.h2_reset_attempts = len(h2_pods.seen("/reset/now/8"))
        # A request the engine refuses as malformed (an uppercase field name, RFC 9113
        # 8.2.1): its stream is reset (PROTOCOL_ERROR), counted as HTTP/1.1 counts its 400.
        assert client.h2 is not None
        client.h2.config.validate_outbound_headers = False
        client.h2.config.normalize_outbound_headers = False
        malformed = client.start("GET", "/", [("Bad-Name", "x")])
        with pytest.raises(StreamReset):
            await client.response(malformed)
        mix.answered(route, "OTHER", 400)
        stats = server.routes[route].stats
        # Everything sidelink wrote to the client has arrived (before our close, after
        # which a write of sidelink's may never be read).
        with contextlib.suppress(AssertionError):
            await until(
                lambda: stats.bytes_to_downstream == client.bytes_received,
                2.0,
                "the bytes sent to arrive",
            )
        mix.h2_client_bytes = client.bytes_received


def grpc_calls(address: tuple[str, int], mix: Mix) -> None:
    """In a thread: grpcio blocks."""
    with Caller(address) as caller:
        for _ in range(3):
            assert caller.who() == GRPC_POD
            mix.grpc["0"] += 1
        assert caller.stream(3) == [GRPC_POD] * 3
        mix.grpc["0"] += 1
        with pytest.raises(grpc.RpcError) as unknown:
            caller.channel.unary_unary("/sidelink.test.Pod/NoSuchMethod")(b"", timeout=5)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
        mix.grpc["12"] += 1
        with pytest.raises(grpc.RpcError) as slow:
            caller.slow(2.0, timeout=5)  # sidelink's request_timeout (300ms) ends it first
        assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        mix.grpc["4"] += 1
    for _ in range(6):
        mix.answered("grpc", "POST", 200)  # gRPC answers are HTTP 200, sidelink's own too
    mix.downstream["grpc"] += 1  # one channel, one connection


async def tcp_traffic(server: Server, mix: Mix) -> None:
    for n in range(3):
        reader, writer = await asyncio.open_connection(*route_address(server, "tcp"))
        message = b"hello %d from the tcp client\n" % n
        writer.write(message)
        echoed = await asyncio.wait_for(reader.readexactly(len(message)), ANSWER_DEADLINE)
        assert echoed == message
        await wire.closed(writer)
        mix.downstream["tcp"] += 1
        mix.bytes_sent["tcp"] += len(message)
        mix.bytes_read["tcp"] += len(echoed)
    reader, writer = await asyncio.open_connection(*route_address(server, "tcpdead"))
    assert await wire.closed_by_peer(reader, ANSWER_DEADLINE, reset=True)
    await wire.closed(writer)
    mix.downstream["tcpdead"] += 1


async def run_mix(server: Server, h2_pods: H2Pods, grpc_address: tuple[str, int]) -> Mix:
    mix = Mix()
    await http1_traffic(server, mix)
    await moving_traffic(server, mix)
    await h2_traffic(server, h2_pods, mix)
    await asyncio.to_thread(grpc_calls, grpc_address, mix)
    await tcp_traffic(server, mix)
    return mix


# --- what /metrics must say ----------------------------------------------------------------

HTTP_ROUTES = ("web", "dead", "nowhere", "moving", "h2", "grpc")
TCP_ROUTES = ("tcp", "tcpdead")
# Per route: failures by reason, retries, upstream connections made and still open (idle
# in the pool, for HTTP/1; an HTTP/2 connection stays open with no stream on it).
ERRORS = {
    # the timeout; the POST the pod hung up on, and the GET it hung up on at each of its
    # three attempts (every failure is counted, as every failed connect is, retried past
    # or not); the garbage
    "web": {"timeout": 1, "reset": 4, "protocol": 1},
    # two requests, each: refused on the only endpoint, tried again twice, then 503
    "dead": {"connect_refused": 6, "no_endpoints": 2},
    "nowhere": {"no_endpoints": 1},
    "moving": {"connect_refused": 3, "no_endpoints": 1},
    # the timeout; the POST reset before its answer, the GET cut after its head, and the
    # GET reset before its answer on each of its three attempts (every failure is counted,
    # as every failed connect is, retried past or not)
    "h2": {"timeout": 1, "reset": 5},
    "grpc": {"timeout": 1},
    "tcp": {},
    "tcpdead": {"connect_refused": 3, "no_endpoints": 1},
}
RETRIES = {"web": 2, "dead": 4, "moving": 2, "h2": 2, "tcpdead": 2}
# web: the keep-alive one (then taken by /slow, and closed by its timeout), the POST
# /reset's, the GET /reset's three, /garbage's. h2 and grpc: one multiplexed connection each.
UPSTREAM_OPENED = {"web": 6, "moving": 1, "h2": 1, "grpc": 1, "tcp": 3}
UPSTREAM_OPEN_AT_END = {"moving": 1, "h2": 1, "grpc": 1}
POOL_IDLE_AT_END = {"moving": 1, "h2": 1, "grpc": 1}  # (each open one carries no stream)


def expected_samples(mix: Mix, nxdomain: int) -> dict[Key, float]:
    e: dict[Key, float] = {}

    def put(name: str, value: float, **labels: str) -> None:
        e[key(name, **labels)] = float(value)

    for route in (*HTTP_ROUTES, *TCP_ROUTES):
        answers = mix.answers.get(route, Counter())
        for (method, code), n in answers.items():
            put("sidelink_requests_total", n, route=route, method=method, code=code)
        put("sidelink_request_duration_seconds_count", answers.total(), route=route)
        opened = UPSTREAM_OPENED.get(route, 0)
        put("sidelink_upstream_connect_duration_seconds_count", opened, route=route)
        put(
            "sidelink_connections_opened_total",
            mix.downstream[route],
            route=route,
            side="downstream",
        )
        put("sidelink_connections_opened_total", opened, route=route, side="upstream")
        put("sidelink_connections_active", 0, route=route, side="downstream")
        put(
            "sidelink_connections_active",
            UPSTREAM_OPEN_AT_END.get(route, 0),
            route=route,
            side="upstream",
        )
        for reason in UPSTREAM_REASONS:
            n = ERRORS[route].get(reason, 0)
            put("sidelink_upstream_errors_total", n, route=route, reason=reason)
        put("sidelink_retries_total", RETRIES.get(route, 0), route=route)
        put("sidelink_retry_budget_exhausted_total", 0, route=route)
        put("sidelink_connections_shed_total", 0, route=route)
        put("sidelink_endpoint_ejections_total", 0, route=route)  # single endpoints: never
        put("sidelink_pool_idle_connections", POOL_IDLE_AT_END.get(route, 0), route=route)
        put("sidelink_streams_active", 0, route=route, side="downstream")
        put("sidelink_streams_active", 0, route=route, side="upstream")
    for status, n in mix.grpc.items():
        put("sidelink_grpc_responses_total", n, route="grpc", grpc_status=status)

    # DNS: `web` looked up once (the TTL outlives the test); `moving` once at start and
    # once when its failed connects nudged it, which found the new address; `nowhere`
    # as often as the server was asked (it never resolves: retried with backoff).
    lookups = {"web": {"ok": 1}, "moving": {"ok": 2}, "nowhere": {"nxdomain": nxdomain}}
    for service, results in lookups.items():
        for result in ("ok", "nxdomain", "error", "timeout"):
            put(
                "sidelink_dns_lookups_total", results.get(result, 0), service=service, result=result
            )
    for service, endpoints, changes in (("web", 1, 0), ("moving", 1, 1), ("nowhere", 0, 0)):
        put("sidelink_dns_endpoints", endpoints, service=service)
        put("sidelink_dns_changes_total", changes, service=service)

    put("sidelink_build_info", 1, version=__version__, build=BUILD_LABEL)
    put("sidelink_config_reloads_total", 0, result="ok")
    put("sidelink_config_reloads_total", 0, result="error")
    return e


def bytes_expected(
    mix: Mix, web: WebPod, moving: WebPod, h2_pods: CountingH2Pods
) -> dict[Key, float]:
    """Bytes on the wire, each direction as the receiving peer counted it."""
    truth = {
        "web": (web.bytes_in, mix.bytes_read["web"]),
        "dead": (0, mix.bytes_read["dead"]),
        "nowhere": (0, mix.bytes_read["nowhere"]),
        "moving": (moving.bytes_in, mix.bytes_read["moving"]),
        "h2": (h2_pods.bytes_received, mix.h2_client_bytes),
        "tcp": (mix.bytes_sent["tcp"], mix.bytes_read["tcp"]),
        "tcpdead": (0, 0),
    }
    e = {}
    for route, (up, down) in truth.items():
        e[key("sidelink_bytes_total", route=route, direction="to_upstream")] = float(up)
        e[key("sidelink_bytes_total", route=route, direction="to_downstream")] = float(down)
    return e


# SPEC's metrics table: each name, its type, its labels.
SPEC_METRICS = {
    "sidelink_requests": ("counter", {"route", "method", "code"}),
    "sidelink_grpc_responses": ("counter", {"route", "grpc_status"}),
    "sidelink_streams_active": ("gauge", {"route", "side"}),
    "sidelink_request_duration_seconds": ("histogram", {"route"}),
    "sidelink_upstream_connect_duration_seconds": ("histogram", {"route"}),
    "sidelink_connections_opened": ("counter", {"route", "side"}),
    "sidelink_connections_active": ("gauge", {"route", "side"}),
    "sidelink_bytes": ("counter", {"route", "direction"}),
    "sidelink_upstream_errors": ("counter", {"route", "reason"}),
    "sidelink_retries": ("counter", {"route"}),
    "sidelink_retry_budget_exhausted": ("counter", {"route"}),
    "sidelink_dns_lookups": ("counter", {"service", "result"}),
    "sidelink_dns_endpoints": ("gauge", {"service"}),
    "sidelink_dns_changes": ("counter", {"service"}),
    "sidelink_pool_idle_connections": ("gauge", {"route"}),
    "sidelink_endpoint_ejections": ("counter", {"route"}),
    "sidelink_config_reloads": ("counter", {"result"}),
    "sidelink_build_info": ("gauge", {"version"}),
}


def check_families(text: str) -> None:
    """Every metric of SPEC's table is there with its type and (at least) its labels."""
    seen: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        labels = {n for s in family.samples for n in s.labels} - {"le"}
        seen[family.name] = (family.type, labels)
    for name, (kind, labels) in SPEC_METRICS.items():
        assert name in seen, f"{name} missing from /metrics"
        got_kind, got_labels = seen[name]
        assert got_kind == kind, (name, got_kind)
        assert labels <= got_labels, (name, got_labels)


def check_histograms(text: str) -> None:
    """Buckets cumulative, +Inf equal to the count, the sum positive when anything was seen."""
    for family in text_string_to_metric_families(text):
        if family.type != "histogram" or not family.name.startswith("sidelink_"):
            continue
        by_route: dict[str, dict[str, Any]] = {}
        for s in family.samples:
            entry = by_route.setdefault(s.labels["route"], {"buckets": []})
            if s.name.endswith("_bucket"):
                entry["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                entry["count"] = s.value
            elif s.name.endswith("_sum"):
                entry["sum"] = s.value
        for route, entry in by_route.items():
            values = [v for _, v in sorted(entry["buckets"])]
            assert values == sorted(values), (family.name, route, values)
            assert values[-1] == entry["count"], (family.name, route)
            assert (entry["sum"] > 0) == (entry["count"] > 0), (family.name, route, entry)


def checked(samples: dict[Key, float]) -> dict[Key, float]:
    """What is compared: everything but bucket and sum samples (checked for shape) and
    the gRPC route's bytes (grpcio's own frames and pings: no peer here counts them)."""
    return {
        k: v
        for k, v in samples.items()
        if not k[0].endswith(("_bucket", "_sum"))
        and not (k[0] == "sidelink_bytes_total" and ("route", "grpc") in k[1])
    }


# --- the test ------------------------------------------------------------------------------


async def final_exposition(server: Server, dns: DnsServer) -> tuple[str, int]:
    """/metrics once nothing is in flight: every client gone, tcp upstreams closed, and no
    lookup of `nowhere` under way (the last name of its search list asked as often as the
    first, and counted); with the lookups the DNS server answered for it."""
    routes = server.routes

    def quiet() -> bool:
        return all(
            r.stats.active_downstream == 0 and not r.connections for r in routes.values()
        ) and all(routes[n].stats.active_upstream == 0 for n in TCP_ROUTES)

    await until(quiet, ANSWER_DEADLINE, "every connection to close")
    text, asked = "", 0
    for _ in range(200):
        first, last = dns.count(f"nowhere.{SEARCH}"), dns.count("nowhere")
        text = exposition(server)
        asked = last
        counted = sidelink_samples(text)[0].get(
            key("sidelink_dns_lookups_total", service="nowhere", result="nxdomain")
        )
        if first == last and counted == last:
            break
        await asyncio.sleep(0.01)
    return text, asked


@dataclass
class Served:
    """/metrics of a sidelink that has served the mix, and what it must say."""

    text: str
    samples: dict[Key, float]
    expected: dict[Key, float]
    attempts: dict[str, int]  # attempts of each retried GET, as its pod counted them
    accepted: dict[str, int]  # connections each route's pods accepted


async def serve_the_mix(dns: DnsServer) -> Served:
    web_pod, moving_pod = WebPod(), WebPod()
    dns.set_a(f"web.{SEARCH}", [WEB_POD], ttl=DNS_TTL)
    dns.set_a(f"moving.{SEARCH}", [MOVING_DEAD], ttl=DNS_TTL)
    async with (
        StreamPods(web_pod.serve, WEB_POD) as web_pods,
        StreamPods(moving_pod.serve, MOVING_POD) as moving_pods,
        StreamPods(echo, TCP_POD) as tcp_pods,
        CountingH2Pods(H2_POD) as h2_pods,
    ):
        with GrpcPods([GRPC_POD]) as grpc_pods:
            ports = {
                "web": web_pods.port,
                "dead": free_port(DEAD),
                "moving": moving_pods.port,
                "h2": h2_pods.port,
                "grpc": grpc_pods.port,
                "tcp": tcp_pods.port,
                "tcpdead": free_port(DEAD),
            }
            async with running_server(config(dns.port, ports)) as server:
                routes = server.routes
                await until(
                    lambda: all(
                        routes[n].watch.resolved for n in ("web", "moving", "h2", "grpc", "tcp")
                    ),
                    ANSWER_DEADLINE,
                    "the routes to resolve",
                )
                # `moving` resolved to its dead address; DNS now names the live one, which
                # sidelink learns only when a failed connect nudges it (the TTL is long).
                dns.set_a(f"moving.{SEARCH}", [MOVING_POD], ttl=DNS_TTL)
                mix = await run_mix(server, h2_pods, route_address(server, "grpc"))
                text, nxdomain = await final_exposition(server, dns)
                expected = expected_samples(mix, nxdomain)
                expected.update(bytes_expected(mix, web_pod, moving_pod, h2_pods))
                attempts = {
                    "web GET /reset": web_pod.requests.count(("GET", "/reset")),
                    "h2 GET /reset/now/8": mix.h2_reset_attempts,
                }
                accepted = {
                    route: sum(pods.accepted.values())
                    for route, pods in (
                        ("web", web_pods),
                        ("moving", moving_pods),
                        ("h2", h2_pods),
                        ("tcp", tcp_pods),
                    )
                }
                return Served(text, sidelink_samples(text)[0], expected, attempts, accepted)


async def test_every_counter_is_exact_after_a_known_traffic_mix(dns: DnsServer) -> None:
    served = await serve_the_mix(dns)
    check_families(served.text)
    check_histograms(served.text)
    problems = diff(served.expected, checked(served.samples))
    # `retries: 2` is at most two attempts after the first, as the pods saw them.
    problems += [
        f"{what}: 3 attempts expected, the pod got {n}"
        for what, n in served.attempts.items()
        if n != 3
    ]
    # The upstream connections sidelink counts are the ones its pods accepted.
    for route, n in served.accepted.items():
        opened = served.samples[
            key("sidelink_connections_opened_total", route=route, side="upstream")
        ]
        if opened != n:
            problems.append(
                f"{route}: {opened} upstream connections counted, the pods accepted {n}"
            )
    assert not problems, "\n".join(problems)
    grpc_bytes = [
        served.samples[key("sidelink_bytes_total", route="grpc", direction=d)]
        for d in ("to_upstream", "to_downstream")
    ]
    assert min(grpc_bytes) > 0, grpc_bytes


async def test_promtool_finds_no_problem_in_the_exposition(dns: DnsServer) -> None:
    """The text exposition of a sidelink that has served the mix (every family with
    samples) passes `promtool check metrics`: its format and its lints."""
    promtool = require_tool("promtool")
    served = await serve_the_mix(dns)
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(served.text.encode()), 30)
    assert (proc.returncode, out.decode(), err.decode()) == (0, "", ""), served.text
