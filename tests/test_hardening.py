"""Permanent versions of the hardening campaign's best checks (issue 13), on real sockets.

- The smuggling battery: request shapes from the request-smuggling literature, each on a
  fresh connection with a canary request behind it. The upstream parses strictly and
  records; it must see nothing, or exactly the one request that was sent (its body
  intact), and the canary only as itself: never a request sidelink did not parse.
- Slowloris: 1,000 connections trickling a head that never ends, while four normal
  clients keep making keep-alive requests.
- A lowered fd limit: sidelink as a subprocess under RLIMIT_NOFILE 256 with more clients
  than it can hold; it stays up, its admin answers, it recovers, it does not spin.

sidelink runs in-process (both loops) except at the fd limit, which needs a process of
its own; upstreams listen on 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import wire
from support.hostile import StrictUpstream
from support.inproc import collector_as_served, no_connections, running_server
from support.metrics import Scrape
from support.pods import POD
from support.procs import Sidelink, clean_environ, free_port, require_tool
from support.replicas import quantile
from support.wait import until
from support.wire import closed_by_peer, get, raw_client

from proxy.server import Server

KIB = 1024
CANARY = get("/canary")
ANSWER_DEADLINE = 5.0


def config(port: int, **route: Any) -> str:
    full = {
        "name": "app1",
        "listen": "127.0.0.1:0",
        "protocol": "http",
        "service": POD,
        "port": port,
        "head_timeout": "2s",
        "request_timeout": "2s",
        "idle_timeout": "30s",
        **route,
    }
    return yaml.safe_dump({"routes": [full]})


async def responses(reader: asyncio.StreamReader, count: int) -> list[wire.Response]:
    """Up to `count` responses, fewer if sidelink closes first."""
    out = []
    for _ in range(count):
        try:
            out.append(await wire.read_response(reader, timeout=ANSWER_DEADLINE))
        except asyncio.IncompleteReadError as e:
            assert e.partial == b"", f"a response cut short: {e.partial[:200]!r}"
            break
    return out


async def served(server: Server) -> None:
    """A normal request on a fresh connection is answered 200."""
    async with raw_client(server) as (reader, writer):
        writer.write(get("/after"))
        response = await wire.read_response(reader, timeout=ANSWER_DEADLINE)
        assert response.status == 200, response


# --- 1. the smuggling battery ---------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A request as sent, sidelink's answer, and what the upstream may see of it.

    `forwarded`: the (method, target, body) the upstream must get, or None when sidelink
    must refuse it before anything goes upstream. `cut`: the refusal comes from the body,
    after the head went upstream, so the upstream may see that one request begun and
    broken off. `canary`: whether a canary rides behind it (after a request that ends
    the connection, or that sidelink cannot delimit, there is nothing to pipeline).
    """

    raw: bytes
    status: int
    forwarded: tuple[str, str, bytes] | None = None
    cut: bool = False
    canary: bool = True
    keep_alive: bool = True


def req(*lines: str | bytes, body: bytes = b"", method: str = "POST", target: str = "/s") -> bytes:
    """A head with Host: app1 and `lines` as written (str or raw bytes), then body."""
    head = [f"{method} {target} HTTP/1.1".encode(), b"Host: app1"]
    head += [line.encode() if isinstance(line, str) else line for line in lines]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: app1\r\n\r\n"
CHUNKED_SMUGGLED = b"0\r\n\r\n" + SMUGGLED
HELLO_CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"

SHAPES: dict[str, Shape] = {
    # --- baselines: the battery's harness itself
    "plain_get": Shape(req(method="GET", target="/plain"), 200, ("GET", "/plain", b"")),
    "content_length_body": Shape(
        req("Content-Length: 5", body=b"hello"), 200, ("POST", "/s", b"hello")
    ),
    "chunked_body": Shape(
        req("Transfer-Encoding: chunked", body=HELLO_CHUNKED), 200, ("POST", "/s", b"hello")
    ),
    # --- CL.TE and TE.CL
    "cl_te": Shape(
        req("Content-Length: 44", "Transfer-Encoding: chunked", body=CHUNKED_SMUGGLED), 400
    ),
    "te_cl": Shape(
        req("Transfer-Encoding: chunked", "Content-Length: 4", body=b"5c\r\n" + SMUGGLED), 400
    ),
    "cl_te_lowercase": Shape(
        req("content-length: 44", "transfer-encoding: chunked", body=CHUNKED_SMUGGLED), 400
    ),
    # --- TE.TE: an obfuscated Transfer-Encoding next to a Content-Length
    "te_xchunked_with_cl": Shape(
        req("Content-Length: 44", "Transfer-Encoding: xchunked", body=CHUNKED_SMUGGLED), 400
    ),
    "te_leading_space_with_cl": Shape(
        req("Content-Length: 44", "Transfer-Encoding:  chunked", body=CHUNKED_SMUGGLED), 400
    ),
    "te_chunked_identity_with_cl": Shape(
        req("Content-Length: 44", "Transfer-Encoding: chunked, identity", body=CHUNKED_SMUGGLED),
        400,
    ),
    "te_space_before_colon_with_cl": Shape(
        req("Content-Length: 44", "Transfer-Encoding : chunked", body=CHUNKED_SMUGGLED), 400
    ),
    "te_tab_before_colon_with_cl": Shape(
        req("Content-Length: 44", "Transfer-Encoding\t: chunked", body=CHUNKED_SMUGGLED), 400
    ),
    "te_uppercase_with_cl": Shape(
        req("Content-Length: 44", "Transfer-Encoding: CHUNKED", body=CHUNKED_SMUGGLED), 400
    ),
    "te_quoted_with_cl": Shape(
        req("Content-Length: 44", 'Transfer-Encoding: "chunked"', body=CHUNKED_SMUGGLED), 400
    ),
    "te_vertical_tab_with_cl": Shape(
        req("Content-Length: 44", b"Transfer-Encoding: \x0bchunked", body=CHUNKED_SMUGGLED),
        400,
    ),
    "te_obs_fold_with_cl": Shape(
        req("Content-Length: 44", "Transfer-Encoding:", " chunked", body=CHUNKED_SMUGGLED), 400
    ),
    "te_duplicate_with_cl": Shape(
        req(
            "Content-Length: 44",
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: x",
            body=CHUNKED_SMUGGLED,
        ),
        400,
    ),
    # --- TE.TE without a Content-Length: the final coding must be chunked
    "te_xchunked": Shape(req("Transfer-Encoding: xchunked", body=CHUNKED_SMUGGLED), 400),
    "te_identity": Shape(req("Transfer-Encoding: identity", body=CHUNKED_SMUGGLED), 400),
    "te_chunked_identity": Shape(
        req("Transfer-Encoding: chunked, identity", body=CHUNKED_SMUGGLED), 400
    ),
    "te_chunked_then_x": Shape(
        req("Transfer-Encoding: chunked", "Transfer-Encoding: x", body=CHUNKED_SMUGGLED), 400
    ),
    "te_x_then_chunked": Shape(
        # A coding before chunked: 501 (RFC 9112 6.1), never forwarded with it dropped.
        req("Transfer-Encoding: x", "Transfer-Encoding: chunked", body=HELLO_CHUNKED),
        501,
    ),
    "te_chunked_twice": Shape(
        req("Transfer-Encoding: chunked", "Transfer-Encoding: chunked", body=HELLO_CHUNKED), 400
    ),
    "te_space_before_colon": Shape(req("Transfer-Encoding : chunked", body=CHUNKED_SMUGGLED), 400),
    "te_leading_space": Shape(
        req("Transfer-Encoding:   chunked", body=HELLO_CHUNKED), 200, ("POST", "/s", b"hello")
    ),
    "te_uppercase": Shape(
        req("Transfer-Encoding: CHUNKED", body=HELLO_CHUNKED), 200, ("POST", "/s", b"hello")
    ),
    "te_underscore_name_with_cl": Shape(
        # Not a Transfer-Encoding at all: the body is the Content-Length's 5 bytes.
        req("Content-Length: 5", "Transfer_Encoding: chunked", body=b"hello"),
        200,
        ("POST", "/s", b"hello"),
    ),
    "te_on_http10": Shape(
        b"POST /s HTTP/1.0\r\nHost: app1\r\nTransfer-Encoding: chunked\r\n\r\n" + HELLO_CHUNKED,
        # RFC 9112 6.1: faulty framing, so processed and the connection closed after it.
        200,
        ("POST", "/s", b"hello"),
        keep_alive=False,
    ),
    # --- chunked bodies
    "chunk_extension": Shape(
        req("Transfer-Encoding: chunked", body=b"5;ext=1\r\nhello\r\n0;x=y\r\n\r\n"),
        200,
        ("POST", "/s", b"hello"),
    ),
    "chunk_extension_quoted_crlf": Shape(
        req(
            "Transfer-Encoding: chunked", body=b'5;a="x\r\n' + SMUGGLED + b'"\r\nhello\r\n0\r\n\r\n'
        ),
        400,
        cut=True,
    ),
    "chunk_size_oversized": Shape(
        req("Transfer-Encoding: chunked", body=b"ffffffffffffffffffff\r\nx\r\n0\r\n\r\n"),
        400,
        cut=True,
    ),
    "chunk_size_hex_prefix": Shape(
        req("Transfer-Encoding: chunked", body=b"0x5\r\nhello\r\n0\r\n\r\n"), 400, cut=True
    ),
    "chunk_size_negative": Shape(
        req("Transfer-Encoding: chunked", body=b"-5\r\nhello\r\n0\r\n\r\n"), 400, cut=True
    ),
    "chunk_size_trailing_space": Shape(
        req("Transfer-Encoding: chunked", body=b"5 \r\nhello\r\n0\r\n\r\n"), 400, cut=True
    ),
    "chunk_bare_lf": Shape(
        req("Transfer-Encoding: chunked", body=b"5\nhello\n0\n\n"), 400, cut=True
    ),
    "chunk_data_overlong": Shape(
        req("Transfer-Encoding: chunked", body=b"3\r\nhello" + SMUGGLED), 400, cut=True
    ),
    "chunk_trailer": Shape(
        req("Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"),
        200,
        ("POST", "/s", b"hello"),
    ),
    "chunk_trailer_obs_fold": Shape(
        req("Transfer-Encoding: chunked", body=b"0\r\nX-Sum: 1\r\n folded\r\n\r\n"),
        400,
        cut=True,
    ),
    # --- Content-Length
    "cl_plus": Shape(req("Content-Length: +5", body=b"hello"), 400),
    "cl_negative": Shape(req("Content-Length: -1", body=b"hello"), 400),
    "cl_hex": Shape(req("Content-Length: 0x5", body=b"hello"), 400),
    "cl_huge": Shape(req("Content-Length: 99999999999999999999", body=b"hello"), 400),
    "cl_trailing_garbage": Shape(req("Content-Length: 5a", body=b"hello"), 400),
    "cl_inner_space": Shape(req("Content-Length: 5 5", body=b"hello"), 400),
    "cl_list": Shape(req("Content-Length: 5, 5", body=b"hello"), 400),
    "cl_empty": Shape(req("Content-Length: ", body=b"hello"), 400),
    "cl_space_before_colon": Shape(req("Content-Length : 5", body=b"hello"), 400),
    "cl_obs_fold": Shape(req("Content-Length:", " 5", body=b"hello"), 400),
    "cl_nul": Shape(req(b"Content-Length: 5\x00", body=b"hello"), 400),
    "cl_two_differing": Shape(
        req("Content-Length: 5", "Content-Length: 44", body=b"hello" + SMUGGLED), 400
    ),
    "cl_two_equal": Shape(req("Content-Length: 5", "Content-Length: 5", body=b"hello"), 400),
    "cl_leading_spaces": Shape(
        req("Content-Length:    5", body=b"hello"), 200, ("POST", "/s", b"hello")
    ),
    "cl_leading_zeros": Shape(
        req("Content-Length: 0005", body=b"hello"), 200, ("POST", "/s", b"hello")
    ),
    "cl_on_get": Shape(
        req("Content-Length: 5", body=b"hello", method="GET"), 200, ("GET", "/s", b"hello")
    ),
    "cl_named_in_connection": Shape(
        # Dropping what Connection names must never drop the framing.
        req("Connection: content-length", f"Content-Length: {len(SMUGGLED)}", body=SMUGGLED),
        200,
        ("POST", "/s", SMUGGLED),
    ),
    "te_named_in_connection": Shape(
        req("Connection: transfer-encoding", "Transfer-Encoding: chunked", body=HELLO_CHUNKED),
        200,
        ("POST", "/s", b"hello"),
    ),
    "body_holding_a_request": Shape(
        req(f"Content-Length: {len(SMUGGLED)}", body=SMUGGLED), 200, ("POST", "/s", SMUGGLED)
    ),
    # --- header lines
    "obs_fold": Shape(req("X-Folded: a", " b", method="GET"), 400),
    "bare_lf_head": Shape(b"GET /s HTTP/1.1\nHost: app1\n\n", 400, canary=False),
    "bare_lf_header": Shape(b"GET /s HTTP/1.1\r\nHost: app1\nX-A: 1\r\n\r\n", 400),
    "bare_cr_in_value": Shape(req(b"X-A: a\rb", method="GET"), 400),
    "nul_in_value": Shape(req(b"X-A: a\x00b", method="GET"), 400),
    "nul_in_name": Shape(req(b"X-\x00A: b", method="GET"), 400),
    "header_without_colon": Shape(req("X-No-Colon", method="GET"), 400),
    "empty_header_name": Shape(req(": x", method="GET"), 400),
    "space_in_header_name": Shape(req("X A: b", method="GET"), 400),
    "host_twice": Shape(req("Host: evil.example", method="GET"), 400),
    "host_twice_equal": Shape(req("Host: app1", method="GET"), 400),
    "host_twice_case": Shape(req("HOST: evil.example", method="GET"), 400),
    "no_host_http11": Shape(b"GET /s HTTP/1.1\r\n\r\n", 400),
    "huge_head": Shape(req("X-Huge: " + "h" * (70 * KIB), method="GET"), 431),
    # --- request lines
    "absolute_form_other_host": Shape(req(method="GET", target="http://evil.example/s"), 400),
    "absolute_form_userinfo": Shape(req(method="GET", target="http://app1@evil.example/s"), 400),
    "absolute_form_https_other_host": Shape(
        req(method="GET", target="https://evil.example/s"), 400
    ),
    "absolute_form_own_host": Shape(
        req(method="GET", target="http://localhost/own?q=1"), 200, ("GET", "/own?q=1", b"")
    ),
    "connect": Shape(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 405),
    "http09": Shape(b"GET /s\r\n\r\n", 505),
    "http12": Shape(req(method="GET").replace(b"HTTP/1.1", b"HTTP/1.2", 1), 505),
    "http20": Shape(req(method="GET").replace(b"HTTP/1.1", b"HTTP/2.0", 1), 505),
    "http_lowercase": Shape(req(method="GET").replace(b"HTTP/1.1", b"http/1.1", 1), 400),
    "version_trailing_junk": Shape(req(method="GET").replace(b"HTTP/1.1", b"HTTP/1.1x", 1), 400),
    # llhttp reads this one; sidelink writes its own request line, so what goes upstream
    # is well-formed and means what sidelink understood.
    "double_space_in_request_line": Shape(
        b"GET  /s HTTP/1.1\r\nHost: app1\r\n\r\n", 200, ("GET", "/s", b"")
    ),
    "trailing_space_in_request_line": Shape(b"GET /s HTTP/1.1 \r\nHost: app1\r\n\r\n", 400),
    "tabs_in_request_line": Shape(b"GET\t/s\tHTTP/1.1\r\nHost: app1\r\n\r\n", 400),
    "lowercase_method": Shape(b"get /s HTTP/1.1\r\nHost: app1\r\n\r\n", 400),
    "leading_empty_line": Shape(
        b"\r\nGET /lead HTTP/1.1\r\nHost: app1\r\n\r\n", 200, ("GET", "/lead", b"")
    ),
    "space_in_target": Shape(b"GET /a b HTTP/1.1\r\nHost: app1\r\n\r\n", 400),
    "http10_closes": Shape(
        b"GET /ten HTTP/1.0\r\n\r\n", 200, ("GET", "/ten", b""), keep_alive=False
    ),
    "te_on_http10_keep_alive": Shape(
        b"POST /s HTTP/1.0\r\nHost: app1\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + HELLO_CHUNKED,
        200,
        ("POST", "/s", b"hello"),
        keep_alive=False,  # RFC 9112 6.1: its framing is faulty, closed after it
    ),
    "host_invalid_value": Shape(
        req(method="GET").replace(b"Host: app1", b"Host: app1 evil.example"),
        400,  # RFC 9112 3.2: a Host with an invalid value MUST get 400
    ),
    "http10_keep_alive": Shape(
        b"GET /ten HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 200, ("GET", "/ten", b"")
    ),
}


@pytest.mark.both_loops
@pytest.mark.usefixtures("loop_errors")
@pytest.mark.parametrize(
    "name",
    list(SHAPES),
)
async def test_smuggling_shape_reaches_the_upstream_whole_or_not_at_all(name: str) -> None:
    shape = SHAPES[name]
    async with StrictUpstream() as up, running_server(config(up.port)) as server:
        before = Scrape.of(server)
        async with raw_client(server) as (reader, writer):
            writer.write(shape.raw + (CANARY if shape.canary else b""))
            wanted = 2 if shape.canary and shape.forwarded and shape.keep_alive else 1
            got = await responses(reader, wanted)
            assert [r.status for r in got][:1] == [shape.status], got
            if shape.forwarded is None or not shape.keep_alive:
                assert len(got) == 1 and got[0].close, got
                assert await closed_by_peer(reader, ANSWER_DEADLINE, reset=True)
            else:
                # The upstream's own answer, then the canary's, both on this connection.
                method, target, body = shape.forwarded
                assert got[0].body == f"{method} {target} {len(body)}".encode(), got
                if shape.canary:
                    assert [r.status for r in got] == [200, 200], got
                    assert got[1].body == b"GET /canary 0", got
        await served(server)
        # What reached the service: the one request as sent and the canary, or nothing.
        seen = [r.summary for r in up.requests]
        expected = [shape.forwarded] if shape.forwarded else []
        if shape.forwarded and shape.canary and shape.keep_alive:
            expected.append(("GET", "/canary", b""))
        expected.append(("GET", "/after", b""))
        assert seen == expected, (seen, up.partial)
        assert not up.violations, up.violations
        if not shape.cut:
            assert not up.partial, up.partial
        if shape.forwarded is None:
            assert (
                Scrape.of(server).get("sidelink_requests_total", code=str(shape.status))
                - (before.get("sidelink_requests_total", code=str(shape.status)))
                == 1
            )
        await no_connections(server)


UPGRADE = req("Connection: Upgrade", "Upgrade: websocket", method="GET", target="/ws")
UPGRADE_WITH_BODY = req(
    "Connection: Upgrade", "Upgrade: websocket", "Content-Length: 5", body=b"hello", target="/ws"
)
# What sidelink refuses when it parses it itself: two Hosts, the second another one's.
REFUSED = b"GET /smuggled HTTP/1.1\r\nHost: app1\r\nHost: evil.example\r\n\r\n"


@pytest.mark.both_loops
@pytest.mark.usefixtures("loop_errors")
@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [
        pytest.param(UPGRADE + REFUSED, ("GET", "/ws", b""), id="no_body_then_refusable"),
        pytest.param(UPGRADE + CANARY, ("GET", "/ws", b""), id="no_body_then_canary"),
        pytest.param(
            UPGRADE_WITH_BODY + REFUSED, ("POST", "/ws", b"hello"), id="body_then_refusable"
        ),
    ],
)
async def test_a_declined_upgrade_smuggles_nothing_upstream(
    raw: bytes, forwarded: tuple[str, str, bytes]
) -> None:
    async with StrictUpstream() as up, running_server(config(up.port)) as server:
        async with raw_client(server) as (reader, writer):
            writer.write(raw)
            got = await responses(reader, 2)
            assert got[0].status == 200  # the upstream declined: no 101
        await served(server)
        # Only requests sidelink parsed and wrote itself: its Host, never the client's.
        assert not up.violations, up.violations
        assert [r.summary for r in up.requests][:1] == [forwarded]
        assert all(r.header("host") == f"{POD}:{up.port}" for r in up.requests), [
            (r.summary, r.headers) for r in up.requests
        ]


@pytest.mark.both_loops
@pytest.mark.usefixtures("loop_errors")
async def test_a_transfer_coding_before_chunked_is_kept_or_refused() -> None:
    raw = req("Transfer-Encoding: gzip, chunked", body=HELLO_CHUNKED)
    async with StrictUpstream() as up, running_server(config(up.port)) as server:
        async with raw_client(server) as (reader, writer):
            writer.write(raw)
            (response,) = await responses(reader, 1)
        assert not up.violations, up.violations
        if response.status == 501:
            assert up.requests == []
        else:
            assert response.status == 200
            (seen,) = up.requests
            assert "gzip" in (seen.header("transfer-encoding") or ""), seen.headers


# --- 2. slowloris -------------------------------------------------------------------------

SLOW_CONNECTIONS = 1000
SLOW_INTERVAL = 0.25  # a byte per connection every 250 ms: 4,000 bytes a second in all
HEAD_TIMEOUT = 2.0
NORMAL_CLIENTS = 4
NORMAL_PACE = 0.01  # each normal client asks every 10 ms: a load, not a saturation
# Normal requests timed before the attack, a baseline for the same clients on the same
# loop and host in the same minute.
BASELINE_REQUESTS = 400
# The most CPU the loop may spend in one turn (between two wake-ups of a watcher that
# sleeps 1 ms) while 1,000 slow connections are accepted, held and cut: a blocking
# timeout sweep, a byte-at-a-time parse that re-scans the head, or a collection that walks
# the whole heap takes tens of ms there. CPU, not wall time, so that what other processes
# take of the machine (the attacker's among them) is not counted: with the other core
# busy, the normal clients' p99 went from 7-14 ms to 25-31 ms under asyncio, the longest
# turn stayed at 12 ms. Longest turns seen here: 10-14 ms under asyncio, 3-6 ms under
# uvloop; 51-73 ms with the test process's heap not frozen (a full collection).
MAX_TURN = 0.025
TESTS = Path(__file__).parent


async def cpu_per_turn(stop: asyncio.Event, turns: list[float]) -> None:
    """The CPU this thread (the loop's) spends between two wake-ups of this watcher: the
    longest is the longest the loop went without turning, less what other processes took."""
    while not stop.is_set():
        before = time.thread_time()
        await asyncio.sleep(0.001)
        turns.append(time.thread_time() - before)


async def normal_client(server: Server, stop: asyncio.Event, latencies: list[float]) -> None:
    async with raw_client(server) as (reader, writer):
        while not stop.is_set():
            started = time.perf_counter()
            writer.write(get("/normal"))
            response = await wire.read_response(reader, timeout=ANSWER_DEADLINE)
            latencies.append(time.perf_counter() - started)
            assert response.status == 200, response
            await asyncio.sleep(NORMAL_PACE)


@pytest.mark.both_loops
@pytest.mark.usefixtures("loop_errors")
async def test_slowloris_is_cut_by_head_timeout_while_normal_clients_stay_fast() -> None:
    with collector_as_served():
        await slowloris_against_normal_clients()


async def slowloris_against_normal_clients() -> None:
    async with StrictUpstream() as up, running_server(config(up.port)) as server:
        route = server.routes["app1"]
        before = Scrape.of(server)
        latencies: list[float] = []
        turns: list[float] = []
        stop = asyncio.Event()
        clients = [
            asyncio.ensure_future(normal_client(server, stop, latencies))
            for _ in range(NORMAL_CLIENTS)
        ]
        clients.append(asyncio.ensure_future(cpu_per_turn(stop, turns)))
        await until(lambda: len(latencies) >= BASELINE_REQUESTS, 10 * ANSWER_DEADLINE, "baseline")
        warm, calm = len(latencies), max(turns)
        turns.clear()
        baseline = quantile(latencies[4 * NORMAL_CLIENTS : warm], 0.99)
        attacker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "support.hostile",
            "slowloris",
            str(route.bound[1] if route.bound else 0),
            str(SLOW_CONNECTIONS),
            f"--interval={SLOW_INTERVAL}",
            f"--hold={HEAD_TIMEOUT * 3}",
            cwd=TESTS,
            stdout=subprocess.PIPE,
        )
        try:
            assert attacker.stdout is not None
            async with asyncio.timeout(20):
                connected = json.loads(await attacker.stdout.readline())["connected"]
                assert connected == SLOW_CONNECTIONS
                # Every slow connection is held at once (plus the normal clients).
                await until(
                    lambda: route.stats.active_downstream >= SLOW_CONNECTIONS + NORMAL_CLIENTS,
                    HEAD_TIMEOUT,
                    "the slow connections accepted",
                )
                results = json.loads(await attacker.stdout.readline())["results"]
                assert await attacker.wait() == 0
        finally:
            if attacker.returncode is None:
                attacker.kill()
                await attacker.wait()
        stop.set()
        await asyncio.gather(*clients)
        during = sorted(latencies[warm:])
        p99 = quantile(during, 0.99)
        outcomes: dict[str, int] = {}
        for r in results:
            outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        after = sorted(r["after"] for r in results)
        print(
            f"slowloris: {outcomes}, cut after {after[0]:.2f}-{after[-1]:.2f} s; normal "
            f"requests before it: p99 {baseline * 1e3:.2f} ms; during it: {len(during)}, "
            f"p50 {statistics.median(during) * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, "
            f"max {during[-1] * 1e3:.2f} ms; longest turn of the loop {calm * 1e3:.1f} ms "
            f"before, {max(turns) * 1e3:.1f} ms during it (CPU)"
        )
        # Every slow connection was cut by head_timeout (2 s from its first byte; the
        # timeouts are swept every 100 ms), none before it and none held on.
        assert set(outcomes) <= {"408", "close", "reset"}, outcomes
        assert outcomes.get("408", 0) >= SLOW_CONNECTIONS * 0.9, outcomes
        assert after[0] > HEAD_TIMEOUT * 0.9 and after[-1] < HEAD_TIMEOUT + 1.5, (
            after[0],
            after[-1],
        )
        grew = Scrape.of(server).get("sidelink_requests_total", code="408") - before.get(
            "sidelink_requests_total", code="408"
        )
        assert grew == SLOW_CONNECTIONS
        assert len(during) > 100, len(during)
        assert max(turns) < MAX_TURN, sorted(turns)[-10:]
        await no_connections(server)
        await served(server)


# --- 3. at a lowered fd limit -------------------------------------------------------------

NOFILE = 256
IDLE_CLIENTS = 400  # far more than 256 fds can hold
# CPU sidelink may use in LIMIT_WINDOW seconds at the limit with nothing to do: a loop
# retrying accept() without pause takes the whole window.
LIMIT_WINDOW = 2.0
CPU_BOUND = 0.2


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def ask(port: int, path: str, timeout: float = 2.0) -> int | None:
    """GET path on a fresh connection: the status, or None when it is not answered."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(get(path))
                return (await wire.read_response(reader)).status
            finally:
                await wire.closed(writer)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None


class LimitedSidelink(Sidelink):
    """sidelink as a subprocess started under `prlimit --nofile=N:N` (the limit from exec on,
    so that whatever sidelink reads of it at start-up is the lowered one)."""

    def __init__(self, args: list[str], nofile: int) -> None:
        prlimit = require_tool("prlimit")
        self.admin_port = free_port()
        argv = [prlimit, f"--nofile={nofile}:{nofile}", sys.executable, "-m", "proxy", *args]
        self.proc = subprocess.Popen(
            [*argv, "--admin", f"127.0.0.1:{self.admin_port}"],
            env=clean_environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@contextlib.asynccontextmanager
async def at_the_fd_limit(tmp_path: Path) -> Any:
    """sidelink under RLIMIT_NOFILE 256 with an established client, then 400 more clients.

    Yields (sidelink, route port, the established client's connection, the idle ones) once
    every idle client is either held by sidelink or was closed by it (shed, or never
    accepted): sidelink can take no more.
    """
    async with StrictUpstream() as up:
        port = free_port()
        path = tmp_path / "sidelink.yaml"
        path.write_text(
            config(up.port, listen=f"127.0.0.1:{port}", head_timeout="60s", idle_timeout="60s")
        )
        proc = LimitedSidelink(["run", "-c", str(path), "--log-level", "error"], NOFILE)
        idle: list[wire.Connection] = []
        watchers: list[asyncio.Task[bytes]] = []
        try:
            await asyncio.to_thread(proc.wait_admin)
            pid = proc.proc.pid
            assert resource.prlimit(pid, resource.RLIMIT_NOFILE) == (NOFILE, NOFILE)
            established = await asyncio.open_connection("127.0.0.1", port)
            established[1].write(get("/before"))
            assert (await wire.read_response(established[0])).status == 200
            base = fd_count(pid)
            for _ in range(IDLE_CLIENTS):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                idle.append((reader, writer))
                watchers.append(asyncio.ensure_future(reader.read(1)))

            def full() -> bool:
                shed = sum(1 for w in watchers if w.done())
                return fd_count(pid) - base + shed >= IDLE_CLIENTS

            await until(full, 10, "every idle client held or shed")
            held = fd_count(pid) - base
            print(f"at the fd limit: {fd_count(pid)} fds open, {held} idle clients held")
            assert held < IDLE_CLIENTS  # the limit was reached: some could not be held
            yield proc, port, established, idle
        finally:
            for watcher in watchers:
                watcher.cancel()
            for _, writer in idle:
                writer.transport.abort()
            proc.close()


@pytest.mark.usefixtures("loop_errors")
async def test_at_the_fd_limit_sidelink_stays_up_does_not_spin_and_recovers(
    tmp_path: Path,
) -> None:
    async with at_the_fd_limit(tmp_path) as (proc, port, established, idle):
        pid = proc.proc.pid
        cpu = cpu_seconds(pid)
        await asyncio.sleep(LIMIT_WINDOW)  # the measurement window (not a wait for a condition)
        spent = cpu_seconds(pid) - cpu
        print(f"at the fd limit: {spent:.2f} s CPU in {LIMIT_WINDOW} s")
        assert proc.proc.poll() is None, proc.stderr()
        assert spent < CPU_BOUND, f"{spent:.2f} s of CPU in {LIMIT_WINDOW} s at the fd limit"
        assert fd_count(pid) <= NOFILE
        # The clients go: sidelink serves new ones again.
        for _, writer in idle:
            writer.transport.abort()
        idle.clear()
        await until(lambda: fd_count(pid) < NOFILE // 2, 10, "the idle clients' fds freed")

        async def recovered() -> bool:
            return await ask(port, "/recovered") == 200

        deadline = time.monotonic() + 10
        while not await recovered():
            assert time.monotonic() < deadline, "no request served after the clients left"
            await asyncio.sleep(0.05)
        assert await ask(proc.admin_port, "/healthz") == 200
        established[1].write(get("/still"))
        assert (await wire.read_response(established[0])).status == 200
        await wire.closed(established[1])
        assert proc.proc.poll() is None


@pytest.mark.usefixtures("loop_errors")
async def test_at_the_fd_limit_the_admin_still_answers(tmp_path: Path) -> None:
    """Issue 13 defect 2: the admin keeps a reserve of fds, and established clients come
    before new ones (fails on 7beb2c3, before the fd budget: /healthz goes unanswered)."""
    async with at_the_fd_limit(tmp_path) as (proc, _port, established, _idle):
        assert await ask(proc.admin_port, "/healthz") == 200
        assert await ask(proc.admin_port, "/metrics") == 200
        # An established client is not the one to fail.
        established[1].write(get("/established"))
        assert (await wire.read_response(established[0], timeout=2)).status == 200
        await wire.closed(established[1])
