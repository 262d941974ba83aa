"""HTTP/2 through sidelink: interop with real clients, and the behaviour SPEC promises.

sidelink runs in-process (the SIGTERM test runs the command) in front of the h2c pods of
support.h2peers on 127.0.0.2, 127.0.0.3, 127.0.0.4 (the in-process DNS server answers the
service with them), or aiohttp pods where the upstream speaks HTTP/1.1. The clients are
curl --http2-prior-knowledge, nghttp, h2load, and an `h2`-library client where the test
needs a hand on single streams: resets, windows, trailers, GOAWAY.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import hpack
import pytest
import yaml
from aiohttp import web
from support import wire
from support.data import CHUNK, digest
from support.h2peers import (
    CANCEL,
    INTERNAL_ERROR,
    NO_ERROR,
    H2Client,
    H2Pods,
    H2Response,
    StreamReset,
)
from support.inproc import resolver_yaml, route_address, running_server
from support.metrics import Scrape, metric
from support.pods import AppPods, pod_of
from support.procs import Sidelink, free_port, peak_rss, require_tool
from support.wait import settled, until, until_sync

from proxy.dnsserver import DnsServer
from proxy.server import Server

pytestmark = pytest.mark.usefixtures("loop_errors")

APP1 = "app1.ns1.svc.cluster.local"
POD1, POD2, POD3 = "127.0.0.2", "127.0.0.3", "127.0.0.4"
THREE = (POD1, POD2, POD3)
MB = 1024 * 1024
# A response far larger than every window on its way (sidelink's, the client's).
BIG = 48 * MB
# The most of it that may leave the pod while the client reads none of it.
STALL_BOUND = 16 * MB
# The most sidelink's process (this one) may grow meanwhile.
RSS_BUDGET = 40 * MB
TOOL_TIMEOUT = 30.0


# --- sidelink in front of the pods ---------------------------------------------------------


def config(port: int, *, service: str = POD1, dns: DnsServer | None = None, **route: Any) -> str:
    full = {
        "name": "app1",
        "listen": "127.0.0.1:0",
        "service": service,
        "port": port,
        "protocol": "http",
        **route,
    }
    text = yaml.safe_dump({"routes": [full]})
    return text + (resolver_yaml(dns.port) if dns is not None else "")


@contextlib.asynccontextmanager
async def proxied(
    port: int, dns: DnsServer | None = None, hosts: tuple[str, ...] = (POD1,), **route: Any
) -> AsyncIterator[Server]:
    """sidelink in front of `hosts` on port: one static IP, or several in DNS."""
    if dns is not None:
        dns.set_a(APP1, list(hosts), ttl=30)
        text = config(port, service="app1", dns=dns, **route)
    else:
        text = config(port, service=hosts[0], **route)
    async with running_server(text) as server:
        yield server


@contextlib.asynccontextmanager
async def one_pod() -> AsyncIterator[tuple[H2Pods, Server, H2Client]]:
    """An h2c pod on POD1, sidelink in front of it, and an HTTP/2 client of sidelink's."""
    async with (
        H2Pods(POD1) as pods,
        proxied(pods.port) as server,
        H2Client.open(route_address(server)) as client,
    ):
        yield pods, server, client


def url(server: Server, path: str = "/") -> str:
    host, port = route_address(server)
    return f"http://{host}:{port}{path}"


def streams_active(server: Server, side: str) -> float:
    return metric(server, "sidelink_streams_active", route="app1", side=side)


async def run(*argv: str, stdin: bytes | None = None) -> tuple[int, bytes, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(TOOL_TIMEOUT):
        out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out, err.decode(errors="replace")


def json_documents(text: bytes) -> list[dict[str, Any]]:
    """Several JSON objects written one after another (nghttp prints bodies back to back)."""
    decoder = json.JSONDecoder()
    s, at, out = text.decode(), 0, []
    while at < len(s):
        while at < len(s) and s[at].isspace():
            at += 1
        if at == len(s):
            break
        doc, at = decoder.raw_decode(s, at)
        out.append(doc)
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- real clients: curl, nghttp, h2load --------------------------------------------------------


async def test_curl_http2_prior_knowledge_and_http11_share_the_port(tmp_path: Path) -> None:
    curl = require_tool("curl")
    payload = os.urandom(200_000)
    (tmp_path / "body").write_bytes(payload)
    async with H2Pods(POD1) as pods, proxied(pods.port) as server:
        code, out, err = await run(
            curl, "-sS", "-v", "--http2-prior-knowledge", url(server, "/g?q=1")
        )
        assert code == 0, err
        assert "< HTTP/2 200" in err, err
        seen = json.loads(out)
        assert (seen["protocol"], seen["method"], seen["path"]) == ("h2", "GET", "/g?q=1")

        code, out, err = await run(
            *(curl, "-sS", "-v", "--http2-prior-knowledge"),
            *("--data-binary", f"@{tmp_path / 'body'}", url(server, "/post")),
        )
        assert code == 0, err
        assert "< HTTP/2 200" in err, err
        seen = json.loads(out)
        assert (seen["protocol"], seen["method"]) == ("h2", "POST")
        assert (seen["body_bytes"], seen["body_sha256"]) == (len(payload), sha(payload))

        # HTTP/1.1 on the same port; `upstream_protocol: auto` sends it upstream as HTTP/1.1.
        code, out, err = await run(curl, "-sS", "-v", "--http1.1", url(server, "/one"))
        assert code == 0, err
        assert "< HTTP/1.1 200" in err, err
        assert json.loads(out)["protocol"] == "http/1.1"
        code, out, err = await run(
            curl, "-sS", "--http1.1", "--data-binary", f"@{tmp_path / 'body'}", url(server, "/p1")
        )
        assert code == 0, err
        assert json.loads(out)["body_sha256"] == sha(payload)
    assert metric(server, "sidelink_requests_total", route="app1", method="POST", code="200") == 2


async def test_nghttp_get_and_post_multiplexed_on_one_connection(tmp_path: Path) -> None:
    nghttp = require_tool("nghttp")
    payload = os.urandom(300_000)
    (tmp_path / "body").write_bytes(payload)
    async with H2Pods(POD1) as pods, proxied(pods.port) as server:
        code, out, err = await run(nghttp, url(server, "/a"), url(server, "/b"), url(server, "/c"))
        assert code == 0, err
        docs = json_documents(out)
        assert sorted(d["path"] for d in docs) == ["/a", "/b", "/c"]
        assert {d["protocol"] for d in docs} == {"h2"}
        # nghttp opened one connection for the three
        assert server.routes["app1"].stats.opened_downstream == 1

        code, out, err = await run(nghttp, "-v", "-d", str(tmp_path / "body"), url(server, "/up"))
        assert code == 0, err
        assert re.search(r"recv \(stream_id=\d+\) :status: 200", out.decode(errors="replace"))
        seen = [s for s in pods.requests if s.path == "/up"]
        assert len(seen) == 1
        assert (seen[0].method, seen[0].body_bytes) == ("POST", len(payload))
        assert seen[0].body_sha256.hexdigest() == sha(payload)


async def test_h2load_through_sidelink_spreads_over_three_pods(dns: DnsServer) -> None:
    h2load = require_tool("h2load")
    async with H2Pods(*THREE) as pods, proxied(pods.port, dns, THREE) as server:
        code, out, err = await run(h2load, "-c4", "-m10", "-n2000", url(server, "/load"))
        text = out.decode()
        assert code == 0, text + err
        assert "2000 succeeded, 0 failed, 0 errored, 0 timeout" in text, text
        assert "status codes: 2000 2xx, 0 3xx, 0 4xx, 0 5xx" in text, text
        assert sum(pods.hits.values()) == 2000, pods.hits
        assert all(pods.hits[p] >= 2000 * 0.15 for p in THREE), pods.hits
        assert server.routes["app1"].stats.opened_downstream == 4
        assert (
            metric(server, "sidelink_requests_total", route="app1", method="GET", code="200")
            == 2000
        )
        await until(
            lambda: streams_active(server, "downstream") == 0, 5, "downstream streams to close"
        )
        assert streams_active(server, "upstream") == 0


# --- per-stream balancing and pooling ------------------------------------------------------------


async def test_streams_of_one_connection_are_balanced_over_three_pods(dns: DnsServer) -> None:
    async with (
        H2Pods(*THREE) as pods,
        proxied(pods.port, dns, THREE) as server,
        H2Client.open(route_address(server)) as client,
    ):
        answered: Counter[str] = Counter()
        for batch in range(3):
            responses = await asyncio.gather(
                *(client.request("GET", f"/b{batch}/{i}") for i in range(20))
            )
            for r in responses:
                assert r.status == 200
                assert r.header("x-pod") == r.json()["pod"]
                answered[r.json()["pod"]] += 1
        assert sum(answered.values()) == 60
        assert all(answered[p] >= 8 for p in THREE), answered
        assert server.routes["app1"].stats.opened_downstream == 1
        # Multiplexed: one pooled upstream connection per pod carried all its streams.
        assert dict(pods.accepted) == {p: 1 for p in THREE}, pods.accepted


@pytest.mark.parametrize(("per_connection", "server_limit"), [(2, 100), (100, 3)])
async def test_upstream_streams_per_connection_are_limited(
    per_connection: int, server_limit: int
) -> None:
    """min(http2.max_streams_per_connection, the pod's MAX_CONCURRENT_STREAMS) streams on a
    connection at once; more connections open when they are full."""
    limit = min(per_connection, server_limit)
    held = 10
    async with (
        H2Pods(POD1, max_concurrent_streams=server_limit) as pods,
        proxied(pods.port, http2={"max_streams_per_connection": per_connection}) as server,
        H2Client.open(route_address(server)) as client,
    ):
        sids = [client.start("GET", f"/hold/m/{i}") for i in range(held)]
        await until(lambda: pods.holding == held, 5, f"{held} streams held at the pod")
        assert pods.max_open() <= limit, [c.max_open for c in pods.conns]
        assert pods.accepted[POD1] >= math.ceil(held / limit), pods.conns
        assert streams_active(server, "downstream") == held
        assert streams_active(server, "upstream") == held
        pods.release("m")
        for sid in sids:
            assert (await client.response(sid)).status == 200
        print(f"streams refused past the pod's limit: {dict(pods.over_limit)}")
        await until(lambda: streams_active(server, "upstream") == 0, 5, "upstream streams closed")


async def test_a_pod_with_a_low_stream_limit_fails_no_burst_on_a_fresh_pool() -> None:
    """A burst on a new connection, before the pod's SETTINGS came, overshoots its limit
    of 2 and is refused; those go again on connections that start at the limit the pod
    said (as the pool remembers it), so each request gets its answer."""
    async with (
        H2Pods(POD1, max_concurrent_streams=2, settings_delay=0.05) as pods,
        proxied(pods.port) as server,
        H2Client.open(route_address(server)) as client,
    ):
        sids = [client.start("GET", f"/slow/0.2/{i}") for i in range(20)]
        statuses = [(await client.response(sid)).status for sid in sids]
        assert statuses == [200] * 20, statuses
        assert pods.max_open() <= 2
        print(f"refused past the pod's limit: {dict(pods.over_limit)}; {dict(pods.accepted)}")


# --- trailers and resets ----------------------------------------------------------------------


@pytest.mark.both_loops
async def test_trailers_pass_both_ways() -> None:
    async with one_pod() as (pods, _server, client):
        r = await client.request(
            "POST",
            "/trailers",
            headers=[("te", "trailers")],
            body=b"with trailers " * 1000,
            trailers=[("x-client-trailer", "c1"), ("x-checksum", "abc")],
        )
        assert r.status == 200
        (seen,) = pods.seen("/trailers")
        assert seen.trailers == [("x-client-trailer", "c1"), ("x-checksum", "abc")]
        assert seen.body_bytes == len(b"with trailers " * 1000)
        assert r.trailer("x-pod-trailer") == POD1
        assert r.trailer("x-echo-trailers") == "x-client-trailer=c1;x-checksum=abc"
        assert r.json()["pod"] == POD1

        r = await client.request("GET", "/trailers/get")
        assert (r.status, r.trailer("x-pod-trailer")) == (200, POD1)


async def test_a_never_indexed_field_reaches_the_pod_never_indexed() -> None:
    # RFC 7541 6.2.3: an intermediary keeps a never-indexed field never-indexed, so that
    # no HPACK table on the way holds a secret. (A field of the client's own choosing:
    # both engines never index authorization whatever they are given.)
    async with one_pod() as (pods, _server, client):
        secret = hpack.NeverIndexedHeaderTuple("x-api-key", "s3cret")
        r = await client.request("GET", "/", headers=[secret, ("x-plain", "1")])
        assert r.status == 200
        (seen,) = pods.seen("/")
        assert (seen.header("x-api-key"), seen.header("x-plain")) == ("s3cret", "1")
        assert seen.never_indexed == ["x-api-key"]


@pytest.mark.both_loops
async def test_client_reset_resets_the_upstream_stream() -> None:
    async with one_pod() as (pods, server, client):
        sid = client.start("GET", "/hold/r")
        await until(lambda: pods.held("r") == 1, 5, "the stream held at the pod")
        assert streams_active(server, "downstream") == 1
        assert streams_active(server, "upstream") == 1
        (seen,) = pods.seen("/hold/r")
        client.reset(sid, CANCEL)
        await until(lambda: seen.reset_by_peer is not None, 5, "the pod's stream to be reset")
        print(f"the pod's stream was reset with code {seen.reset_by_peer}")
        assert pods.held("r") == 0
        await until(lambda: streams_active(server, "upstream") == 0, 5, "upstream stream closed")
        assert streams_active(server, "downstream") == 0
        # The connection, and the pod's, go on.
        r = await client.request("GET", "/after")
        assert (r.status, r.json()["connection"]) == (200, seen.connection)


async def test_an_upstream_connection_without_streams_counts_as_idle_in_the_pool() -> None:
    async with one_pod() as (pods, server, client):
        assert metric(server, "sidelink_pool_idle_connections", route="app1") == 0  # none yet
        sid = client.start("GET", "/hold/i")
        await until(lambda: pods.held("i") == 1, 5, "the stream held at the pod")
        assert metric(server, "sidelink_pool_idle_connections", route="app1") == 0  # busy
        pods.release("i")
        assert (await client.response(sid)).status == 200
        await until(lambda: streams_active(server, "upstream") == 0, 5, "the stream to end")
        assert metric(server, "sidelink_pool_idle_connections", route="app1") == 1


@pytest.mark.both_loops
@pytest.mark.parametrize("stage", ["head", "body"])
async def test_upstream_reset_resets_the_client_stream(stage: str) -> None:
    async with one_pod() as (pods, server, client):
        with pytest.raises(StreamReset) as reset:
            await client.request("GET", f"/reset/{stage}/{INTERNAL_ERROR}")
        assert not reset.value.refused
        print(f"client stream reset with {reset.value.code}")
        assert (
            metric(server, "sidelink_requests_total", route="app1", method="GET", code="reset") == 1
        )
        r = await client.request("GET", "/after")
        assert r.status == 200
        assert len(pods.seen(f"/reset/{stage}/{INTERNAL_ERROR}")) == 1  # never replayed


async def test_upstream_reset_before_any_answer_fails_the_post() -> None:
    """A POST reset before its answer began: never replayed; the client's stream is reset,
    or answered 502 with the reason."""
    async with one_pod() as (pods, _server, client):
        try:
            r = await client.request("POST", f"/reset/now/{INTERNAL_ERROR}", body=b"once")
        except StreamReset as e:
            assert not e.refused
        else:
            assert r.status == 502, r
            assert r.header("sidelink-error"), r.headers
        assert len(pods.seen(f"/reset/now/{INTERNAL_ERROR}")) == 1
        assert (await client.request("GET", "/after")).status == 200


@pytest.mark.parametrize("part", ["head", "body"])
async def test_a_malformed_answer_is_the_upstreams_protocol_error(part: str) -> None:
    """A pod that breaks HTTP/2's rules (a second :status; fewer bytes than its
    content-length) is counted and told as `protocol`: the engine reset that stream, not
    the pod. Before its answer began the client gets a 502 saying so."""
    async with one_pod() as (_pods, server, client):
        if part == "head":
            r = await client.request("GET", "/malformed/head")
            assert (r.status, r.header("sidelink-error")) == (502, "protocol"), r
        else:  # (the head it had queued goes with the reset that ends the stream)
            with pytest.raises(StreamReset):
                await client.request("GET", "/malformed/body")
        errors = metric(server, "sidelink_upstream_errors_total", route="app1", reason="protocol")
        assert errors == 1
        assert metric(server, "sidelink_upstream_errors_total", route="app1", reason="reset") == 0
        assert (await client.request("GET", "/after")).status == 200


# --- GOAWAY and refused streams -----------------------------------------------------------------


@pytest.mark.both_loops
async def test_upstream_goaway_lets_its_streams_finish_and_new_ones_take_a_new_connection() -> None:
    async with one_pod() as (pods, _server, client):
        held = [client.start("GET", f"/hold/g/{i}") for i in range(3)]
        await until(lambda: pods.held("g") == 3, 5, "three streams held at the pod")
        first = pods.conns[0].number
        assert pods.goaway(POD1) == 1
        # New streams while the old connection drains: a new connection carries them.
        for i in range(5):
            r = await client.request("GET", f"/new/{i}")
            assert r.status == 200
            assert r.json()["connection"] != first, r.json()
        assert pods.accepted[POD1] == 2
        pods.release("g")
        for sid in held:
            r = await client.response(sid)
            assert (r.status, r.json()["connection"]) == (200, first)
        assert sum(pods.ignored.values()) == 0
        await until(lambda: pods.conns[first].closed, 5, "the old connection to close")
        assert client.goaways == []


async def test_a_pod_leaving_dns_has_its_idle_connection_closed(dns: DnsServer) -> None:
    # A pod out of the Service may still run (its readiness failed): its idle HTTP/2
    # connection closes, and the calls go on on the pod that stays.
    async with (
        H2Pods(POD1, POD2) as pods,
        proxied(pods.port, dns, hosts=(POD1, POD2)) as server,
        H2Client.open(route_address(server)) as client,
    ):
        for _ in range(8):
            assert (await client.request("GET", "/")).status == 200
        assert pods.live(POD1) and pods.live(POD2)
        dns.set_a(APP1, [POD1], ttl=30)
        server.routes["app1"].watch.nudge()
        await until(lambda: not pods.live(POD2), 5, "the leaving pod's connection closed")
        for _ in range(4):
            r = await client.request("GET", "/")
            assert (r.status, r.json()["pod"]) == (200, POD1)
        assert len(pods.live(POD1)) == 1


async def test_upstream_goaways_under_load_fail_no_request(dns: DnsServer) -> None:
    """Every pod connection says GOAWAY after 10 streams (the streams sent past it are
    ignored, so refused): 300 requests on one client connection, none failed, each
    processed exactly once."""
    async with (
        H2Pods(*THREE) as pods,
        proxied(pods.port, dns, THREE) as server,
        H2Client.open(route_address(server)) as client,
    ):
        pods.goaway_after = dict.fromkeys(THREE, 10)
        gate = asyncio.Semaphore(20)

        async def one(i: int) -> int:
            async with gate:
                return (await client.request("POST", f"/load/{i}", body=b"%d" % i)).status

        statuses = await asyncio.gather(*(one(i) for i in range(300)))
        assert Counter(statuses) == {200: 300}
        assert sum(pods.hits.values()) == 300, pods.hits
        assert sorted(s.path for s in pods.requests) == sorted(f"/load/{i}" for i in range(300))
        assert len(pods.goaways_sent) >= 25
        print(f"GOAWAYs: {len(pods.goaways_sent)}, streams ignored past them: {dict(pods.ignored)}")
        assert sum(pods.accepted.values()) >= 30


async def test_posts_above_the_last_stream_id_are_retried_on_another_pod(dns: DnsServer) -> None:
    async with (
        H2Pods(*THREE) as pods,
        proxied(pods.port, dns, THREE, balance="round_robin") as server,
        H2Client.open(route_address(server)) as client,
    ):
        pods.goaway_after = {POD1: 1}  # POD1's connections take one stream each
        bodies = [os.urandom(20_000) for _ in range(12)]
        responses = await asyncio.gather(
            *(client.request("POST", f"/once/{i}", body=b) for i, b in enumerate(bodies))
        )
        for i, (r, b) in enumerate(zip(responses, bodies, strict=True)):
            assert r.status == 200, (i, r)
            assert (r.json()["path"], r.json()["body_sha256"]) == (f"/once/{i}", sha(b))
        assert pods.ignored[POD1] >= 1, (pods.ignored, pods.conns)
        assert sum(pods.hits.values()) == 12  # none processed twice


async def test_bridged_posts_above_the_last_stream_id_go_again_whole(dns: DnsServer) -> None:
    """upstream_protocol http2: an HTTP/1 POST whose stream a pod ignored past its GOAWAY
    is opened again elsewhere with its whole body, and processed once."""
    async with (
        H2Pods(*THREE) as pods,
        proxied(pods.port, dns, THREE, balance="round_robin", upstream_protocol="http2") as server,
        aiohttp.ClientSession() as session,
    ):
        pods.goaway_after = {POD1: 1}  # POD1's connections take one stream each
        bodies = [os.urandom(20_000) for _ in range(12)]

        async def one(i: int, body: bytes) -> tuple[int, Any]:
            async with session.post(url(server, f"/once/{i}"), data=body) as r:
                return r.status, await r.json(content_type=None)

        answers = await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
        for i, ((status, seen), body) in enumerate(zip(answers, bodies, strict=True)):
            assert status == 200, (i, status, seen)
            assert (seen["path"], seen["body_sha256"]) == (f"/once/{i}", sha(body))
        assert pods.ignored[POD1] >= 1, (pods.ignored, pods.conns)
        assert sum(pods.hits.values()) == 12  # none processed twice


async def test_refused_posts_are_retried_on_another_pod(dns: DnsServer) -> None:
    async with (
        H2Pods(*THREE) as pods,
        proxied(pods.port, dns, THREE, balance="round_robin") as server,
        H2Client.open(route_address(server)) as client,
    ):
        pods.refuse.add(POD1)
        bodies = [os.urandom(20_000) for _ in range(12)]
        responses = await asyncio.gather(
            *(client.request("POST", f"/r/{i}", body=b) for i, b in enumerate(bodies))
        )
        for i, (r, b) in enumerate(zip(responses, bodies, strict=True)):
            assert r.status == 200, (i, r)
            assert r.json()["pod"] in (POD2, POD3)
            assert (r.json()["path"], r.json()["body_sha256"]) == (f"/r/{i}", sha(b))
        assert pods.refused[POD1] >= 1
        assert pods.hits[POD1] == 0
        assert sum(pods.hits.values()) == 12
        assert (
            metric(server, "sidelink_requests_total", route="app1", method="POST", code="200") == 12
        )


# --- flow control per stream ----------------------------------------------------------------------


@pytest.mark.both_loops
async def test_a_stream_the_client_does_not_read_stalls_only_itself() -> None:
    async with one_pod() as (pods, server, client):
        with peak_rss() as peak:
            before = peak()
            slow = client.start("GET", f"/big/{BIG}", keep=False, read=False)
            await until(lambda: pods.seen(f"/big/{BIG}"), 5, "the big response to begin")
            (seen,) = pods.seen(f"/big/{BIG}")
            sent = await settled(lambda: seen.sent)
            # Another stream on the same connection, to the same pod, runs to its end.
            r = await client.request("GET", f"/big/{32 * CHUNK}", keep=False, timeout=20)
            assert (r.status, r.body_sha256) == (200, digest(32 * CHUNK))
            grown = peak() - before
        print(f"stalled: the pod sent {sent} bytes, the client got {client.received(slow)}")
        assert sent <= STALL_BOUND, f"{sent} bytes left the pod for a stream nobody reads"
        assert grown <= RSS_BUDGET, f"RSS grew {grown / MB:.1f} MB"
        assert seen.sent == sent  # still stalled
        client.resume(slow)
        r = await client.response(slow, timeout=60)
        assert (r.status, r.body_bytes, r.body_sha256) == (200, BIG, digest(BIG))
        assert server.routes["app1"].stats.opened_downstream == 1


async def test_a_stream_the_pod_does_not_read_stalls_only_itself() -> None:
    async with one_pod() as (pods, _server, client):
        stuck = client.start("POST", "/stall-upload", end=False)
        upload = asyncio.ensure_future(client.send(stuck, b"u" * BIG))
        try:
            await until(lambda: pods.seen("/stall-upload"), 5, "the upload to begin")
            (seen,) = pods.seen("/stall-upload")
            await settled(lambda: client.streams[stuck].sent)
            payload = os.urandom(4 * MB)
            r = await client.request("POST", "/other", body=payload, timeout=20)
            assert (r.status, r.json()["body_sha256"]) == (200, sha(payload))
            sent = client.streams[stuck].sent
            print(f"stalled upload: the client sent {sent}, the pod got {seen.body_bytes}")
            assert sent <= STALL_BOUND
            assert not upload.done()
        finally:
            upload.cancel()
        client.reset(stuck)
        await until(
            lambda: seen.reset_by_peer is not None, 5, "the stalled upload reset at the pod"
        )


# --- across versions ------------------------------------------------------------------------------


async def _h1_echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if request.path == "/stream":
        response = web.StreamResponse(headers={"X-Upstream": "aiohttp"})
        await response.prepare(request)
        for i in range(64):
            await response.write(b"%06d" % i * 2048)
        await response.write_eof()
        return response
    return web.json_response(
        {
            "version": f"{request.version.major}.{request.version.minor}",
            "method": request.method,
            "path": request.path_qs,
            "host": request.host,
            "headers": [[k.lower(), v] for k, v in request.headers.items()],
            "body_sha256": sha(body),
            "pod": pod_of(request),
        },
        headers={"X-Upstream": "aiohttp"},
    )


@pytest.mark.both_loops
async def test_http2_client_to_an_http1_upstream() -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _h1_echo)
    payload = os.urandom(100_000)
    async with (
        AppPods(app, POD1) as up,
        proxied(up.port, upstream_protocol="http1") as server,
        H2Client.open(route_address(server)) as client,
    ):
        r = await client.request("GET", "/a?x=1", headers=[("x-trace", "t1")])
        assert (r.status, r.header("x-upstream")) == (200, "aiohttp")
        seen = r.json()
        assert (seen["version"], seen["method"], seen["path"]) == ("1.1", "GET", "/a?x=1")
        assert ["x-trace", "t1"] in seen["headers"]
        assert seen["host"], seen

        r = await client.request("POST", "/b", body=payload)
        assert r.status == 200
        assert (r.json()["method"], r.json()["body_sha256"]) == ("POST", sha(payload))

        r = await client.request("GET", "/stream")
        assert r.status == 200
        assert r.body == b"".join(b"%06d" % i * 2048 for i in range(64))
        assert client.errors == []
    assert up.hits[POD1] == 3


@pytest.mark.both_loops
async def test_http11_client_to_an_http2_upstream() -> None:
    async with (
        H2Pods(POD1) as pods,
        proxied(pods.port, upstream_protocol="http2") as server,
        wire.raw_client(server) as (reader, writer),
    ):
        writer.write(wire.get("/one?x=1", "X-Trace: t1", "Connection: keep-alive"))
        r = await wire.read_response(reader)
        assert (r.status, r.header("x-pod")) == (200, POD1)
        seen = json.loads(r.body)
        assert (seen["protocol"], seen["method"], seen["path"]) == ("h2", "GET", "/one?x=1")
        assert ["x-trace", "t1"] in seen["headers"]
        assert seen["authority"], seen

        payload = os.urandom(150_000)
        writer.write(wire.post("/two", payload))
        r = await wire.read_response(reader)
        assert r.status == 200
        assert json.loads(r.body)["body_sha256"] == sha(payload)

        writer.write(
            wire.get("/three", "Transfer-Encoding: chunked", method="POST")
            + wire.chunk_of(payload[:70_000])
            + wire.chunk_of(payload[70_000:])
            + b"0\r\n\r\n"
        )
        r = await wire.read_response(reader)
        assert r.status == 200
        assert json.loads(r.body)["body_sha256"] == sha(payload)

        writer.write(wire.get("/trailers", "TE: trailers"))
        r = await wire.read_response(reader)
        assert r.status == 200
        assert json.loads(r.body)["path"] == "/trailers"

    assert [s.protocol for s in pods.requests] == ["h2"] * 4
    names = {k for s in pods.requests for k, _ in s.headers}
    assert not names & {"connection", "keep-alive", "transfer-encoding", "host", "upgrade"}, names
    assert server.routes["app1"].stats.opened_downstream == 1


@pytest.mark.both_loops
async def test_http11_request_head_goes_to_an_http2_upstream_before_its_body() -> None:
    """Expect: 100-continue: the client sends its body only once answered, so the stream
    opens upstream with the head (the server may answer 100, or refuse the body)."""
    payload = os.urandom(100_000)
    async with (
        H2Pods(POD1) as pods,
        proxied(pods.port, upstream_protocol="http2") as server,
        wire.raw_client(server) as (reader, writer),
    ):
        head = f"Content-Length: {len(payload)}"
        writer.write(wire.get("/upload", head, "Expect: 100-continue", method="POST"))
        await until(lambda: len(pods.requests) == 1, 5, "the request head at the pod")
        seen = pods.requests[0]
        assert (seen.method, seen.path, seen.complete) == ("POST", "/upload", False)
        assert ["expect", "100-continue"] in [list(h) for h in seen.headers]
        writer.write(payload)
        r = await wire.read_response(reader)
        assert r.status == 200
        assert json.loads(r.body)["body_sha256"] == sha(payload)


@pytest.mark.parametrize("sized", [False, True])
async def test_a_grpc_answer_cut_mid_body_ends_unavailable_unless_its_length_was_said(
    sized: bool,
) -> None:
    """The pod resets a gRPC call's stream after some of its answer: the call ends with
    sidelink's grpc-status 14 in trailers, except when the answer declared a content-length
    (trailers after fewer bytes would make it malformed, and the client drop them): reset."""
    async with (
        H2Pods(POD1) as pods,
        proxied(pods.port) as server,
        H2Client.open(route_address(server)) as client,
    ):
        path = "/reset/body/2" + ("?sized" if sized else "")
        grpc = [("content-type", "application/grpc"), ("te", "trailers")]
        if sized:
            with pytest.raises(StreamReset):
                await client.request("POST", path, headers=grpc, body=b"")
        else:
            r = await client.request("POST", path, headers=grpc, body=b"")
            assert (r.status, r.trailer("grpc-status")) == (200, "14")
            assert r.trailer("sidelink-error") == "reset"
        assert client.errors == []
        assert server.routes["app1"].stats.grpc == ({} if sized else {14: 1})


# --- sidelink's own answers ------------------------------------------------------------------


async def test_proxy_made_errors_carry_status_and_reason() -> None:
    closed = free_port(POD1)
    async with (
        running_server(config(closed, service=POD1)) as server,
        H2Client.open(route_address(server)) as client,
    ):
        r = await client.request("GET", "/nobody")
        assert r.status in (502, 503), r
        assert r.header("sidelink-error"), r.headers
    async with (
        H2Pods(POD1) as pods,
        proxied(pods.port, request_timeout="300ms") as server,
        H2Client.open(route_address(server)) as client,
    ):
        r = await client.request("GET", "/slow/3")
        assert (r.status, r.header("sidelink-error")) == (504, "timeout"), r
        assert (await client.request("GET", "/fine")).status == 200


# --- an nginx upstream ------------------------------------------------------------------------


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  keepalive_requests {keepalive_requests};
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  server {{
    listen {host}:{port} http2;
    location / {{ return 200 "nginx $request_method $uri $server_protocol\\n"; }}
  }}
}}
"""


@contextlib.asynccontextmanager
async def nginx_h2c(tmp_path: Path, keepalive_requests: int = 1000) -> AsyncIterator[int]:
    """nginx with an h2c (prior knowledge) listener on POD1: its port. After
    `keepalive_requests` streams on a connection it says GOAWAY, finishes the streams
    below it and closes the connection (1000 is nginx's default)."""
    nginx = require_tool("nginx")
    port = free_port(POD1)
    conf = tmp_path / "nginx.conf"
    text = NGINX_CONF.format(
        dir=tmp_path, host=POD1, port=port, keepalive_requests=keepalive_requests
    )
    conf.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        nginx, "-c", str(conf), "-p", str(tmp_path), stderr=asyncio.subprocess.PIPE
    )
    try:

        async def listening() -> bool:
            try:
                _, w = await asyncio.open_connection(POD1, port)
            except OSError:
                return False
            w.close()
            return True

        deadline = time.monotonic() + 5
        while not await listening():
            assert time.monotonic() < deadline, "nginx did not start"
            await asyncio.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        await proc.wait()


async def test_nginx_h2c_upstream(tmp_path: Path) -> None:
    """nginx speaks only HTTP/2 on an `http2` listener: HTTP/2 requests reach it as such."""
    curl = require_tool("curl")
    async with nginx_h2c(tmp_path) as port, proxied(port) as server:
        for path in ("/x", "/y"):
            code, out, err = await run(curl, "-sS", "--http2-prior-knowledge", url(server, path))
            assert code == 0, err
            assert out == f"nginx GET {path} HTTP/2.0\n".encode(), out
        assert server.routes["app1"].stats.opened_upstream == 1


async def test_nginx_closing_its_connections_after_keepalive_requests_fails_no_post(
    tmp_path: Path,
) -> None:
    """nginx's GOAWAY after `keepalive_requests`, under 40 POSTs at a time: the streams
    past it are refused and go again on a new connection, and the connection closes
    once its last stream is answered (before: that close was an exception out of the
    engine, "Connection is terminating", that took the connection and its streams down)."""
    async with (
        nginx_h2c(tmp_path, keepalive_requests=50) as port,
        proxied(port) as server,
        H2Client.open(route_address(server)) as client,
    ):
        gate = asyncio.Semaphore(40)

        async def one(i: int) -> H2Response:
            async with gate:
                return await client.request("POST", f"/p/{i}", body=b"x" * 1000)

        responses = await asyncio.gather(*(one(i) for i in range(1000)))
        assert Counter(r.status for r in responses) == {200: 1000}
        assert all(
            r.body == f"nginx POST /p/{i} HTTP/2.0\n".encode() for i, r in enumerate(responses)
        )
        opened = server.routes["app1"].stats.opened_upstream
        assert opened >= 1000 // 50, opened  # nginx did close them: the test saw GOAWAYs
        errors = Scrape.of(server).get("sidelink_upstream_errors_total", route="app1")
        assert errors == 0, [
            x
            for x in Scrape.of(server).samples
            if x[0] == "sidelink_upstream_errors_total" and x[2]
        ]


async def test_http1_posts_bridged_to_an_nginx_closing_after_keepalive_requests_all_pass(
    tmp_path: Path,
) -> None:
    """upstream_protocol http2: HTTP/1 POSTs carried as HTTP/2 streams to nginx, which says
    GOAWAY every 50 streams: those it refused go again, whatever the method."""
    async with (
        nginx_h2c(tmp_path, keepalive_requests=50) as port,
        proxied(port, upstream_protocol="http2") as server,
        aiohttp.ClientSession() as session,
    ):
        gate = asyncio.Semaphore(40)

        async def one(i: int) -> tuple[int, bytes]:
            async with gate, session.post(url(server, f"/b/{i}"), data=b"x" * 1000) as r:
                return r.status, await r.read()

        answers = await asyncio.gather(*(one(i) for i in range(1000)))
        assert Counter(status for status, _ in answers) == {200: 1000}
        assert all(
            body == f"nginx POST /b/{i} HTTP/2.0\n".encode() for i, (_, body) in enumerate(answers)
        )


# --- SIGTERM ------------------------------------------------------------------------------------


async def test_sigterm_sends_goaway_and_lets_a_stream_finish(tmp_path: Path) -> None:
    async with H2Pods(POD1) as pods:
        listen = free_port()
        cfg = tmp_path / "sidelink.yaml"
        cfg.write_text(
            config(pods.port, listen=f"127.0.0.1:{listen}")
            + "shutdown:\n  drain_delay: 200ms\n  drain_timeout: 10s\n"
        )
        proc = Sidelink(["run", "-c", str(cfg), "--log-level", "warning"])
        try:
            await asyncio.to_thread(proc.wait_admin)
            await asyncio.to_thread(
                until_sync, lambda: proc.get("/readyz")[0] == 200, 5, "sidelink ready"
            )
            async with H2Client.open(("127.0.0.1", listen)) as client:
                sid = client.start("GET", "/hold/drain")
                await until(lambda: pods.held("drain") == 1, 5, "the stream held at the pod")
                proc.signal(signal.SIGTERM)
                goaway = await client.wait_goaway(5)
                assert goaway.error_code == NO_ERROR, goaway
                assert proc.proc.poll() is None
                pods.release("drain")
                r = await client.response(sid)
                assert (r.status, r.json()["path"]) == (200, "/hold/drain")
                assert all(g.last_stream_id >= sid for g in client.goaways), client.goaways
                assert all(g.error_code == NO_ERROR for g in client.goaways), client.goaways
            code = await asyncio.to_thread(proc.wait, 10)
            assert code == 0, proc.stderr()
        finally:
            proc.close()
