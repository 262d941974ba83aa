"""The admin listener as an operator and a hostile neighbour meet it, in process.

The index and /config, the build label, the start-up log; and the bounds: a cap on
connections, small heads, a head timeout that cuts a slowloris, /metrics rendered once
for a burst of scrapers, and malformed requests logged as one debug line each.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from support.inproc import running_server
from support.metrics import Scrape
from support.wire import closed, closed_by_peer, read_response

from proxy import __version__, admin, build
from proxy.server import Server

POD = "127.0.0.2"
# The admin's bounds, as SPEC.md's operator would expect them (and proxy.admin sets them).
MAX_CONNECTIONS = 64
MAX_FIELD_BYTES = 4096


def url(server: Server, path: str) -> str:
    assert server.admin_address is not None
    return f"http://127.0.0.1:{server.admin_address[1]}{path}"


async def admin_connection(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert server.admin_address is not None
    return await asyncio.open_connection("127.0.0.1", server.admin_address[1])


async def healthz_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
    return (await read_response(reader)).status


def tcp_routes(n: int) -> str:
    """A config of n named tcp routes on free ports."""
    return "routes:\n" + "".join(
        f"  - {{name: r{i}, listen: 0, service: {POD}, port: 9}}\n" for i in range(n)
    )


# --- what an operator reads -----------------------------------------------------------


async def test_index_lists_the_endpoints_and_config_shows_the_running_config() -> None:
    async with running_server(routes=["0=127.0.0.2:9/http"]) as server:
        async with aiohttp.ClientSession() as client:
            async with client.get(url(server, "/")) as r:
                assert r.status == 200
                index = await r.text()
            for path in ("/metrics", "/healthz", "/readyz", "/routes", "/config"):
                assert f"\n{path} " in index, index
            async with client.get(url(server, "/config")) as r:
                assert r.status == 200
                assert r.content_type == "application/json"
                shown = await r.json()
            label = "compiled" if build() == "compiled" else "python"
            assert shown == {
                "version": __version__,
                "build": label,
                "file": server.config.source,
                "config": json.loads(json.dumps(server.config.to_dict())),
            }
            assert shown["config"]["routes"][0]["service"] == "127.0.0.2"
            for path in ("/", "/config"):
                async with client.head(url(server, path)) as r:
                    assert r.status == 200, path
                async with client.post(url(server, path)) as r:
                    assert r.status == 405, path
        info = Scrape.of(server).first("sidelink_build_info", version=__version__, build=label)
        assert info == 1


async def test_the_start_up_log_names_each_listener_and_where_it_goes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidelink")
    async with running_server(routes=["0=127.0.0.2:9/tcp", "0=127.0.0.3:8080/http"]) as server:
        lines = [r.getMessage() for r in caplog.records if r.name == "sidelink.server"]
        for route in server.routes.values():
            assert route.bound is not None
            rc = route.config
            want = (
                f"listening: 127.0.0.1:{route.bound[1]} -> {rc.service}:{rc.port} "
                f"{rc.protocol} (route {rc.name})"
            )
            assert want in lines, lines
        # A pure Python install says so, once, with what to do about it.
        slow = [line for line in lines if "runs as pure Python" in line]
        assert len(slow) == (0 if build() == "compiled" else 1), lines
        if slow:
            assert "apt-get install gcc python3-dev" in slow[0]


# --- bounds -----------------------------------------------------------------------------


async def test_connections_beyond_the_cap_are_closed_at_once() -> None:
    assert admin.MAX_CONNECTIONS == MAX_CONNECTIONS
    async with running_server(routes=["0=127.0.0.2:9/tcp"]) as server:
        held = [await admin_connection(server) for _ in range(MAX_CONNECTIONS)]
        try:
            extra, extra_writer = await admin_connection(server)
            assert await closed_by_peer(extra, timeout=5, reset=True)
            await closed(extra_writer)
            # The connections within the cap still answer.
            assert await healthz_on(*held[0]) == 200
            _, writer = held.pop()
            await closed(writer)

            async def answers() -> bool:
                r, w = await admin_connection(server)
                try:
                    return await asyncio.wait_for(healthz_on(r, w), 5) == 200
                except (ConnectionError, asyncio.IncompleteReadError, AssertionError):
                    return False
                finally:
                    await closed(w)

            for _ in range(100):
                if await answers():
                    break
            else:
                raise AssertionError("a freed slot never served a new connection")
        finally:
            for _, writer in held:
                await closed(writer)


async def test_a_slow_or_silent_head_is_cut_after_the_head_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admin, "HEAD_TIMEOUT", 0.3)
    async with running_server(routes=["0=127.0.0.2:9/tcp"]) as server:
        silent, silent_writer = await admin_connection(server)
        slow, slow_writer = await admin_connection(server)
        head = b"GET /healthz HTTP/1.1\r\nHost: admin\r\nX-Pad: " + b"a" * 1000
        cut = False
        async with asyncio.timeout(10):
            for byte in head:  # a slowloris: one byte every 20 ms, never a whole head
                slow_writer.write(bytes([byte]))
                try:
                    data = await asyncio.wait_for(slow.read(1), 0.02)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    data = b""
                assert data == b"", data
                cut = True
                break
        assert cut, "the slow head was never cut"
        assert await closed_by_peer(silent, timeout=5, reset=True)
        for w in (silent_writer, slow_writer):
            await closed(w)
        # Kept alive after an answer, then idle: cut too.
        reader, writer = await admin_connection(server)
        assert await healthz_on(reader, writer) == 200
        assert await closed_by_peer(reader, timeout=5, reset=True)
        await closed(writer)


async def test_an_oversized_head_is_refused() -> None:
    assert admin.MAX_FIELD_BYTES == MAX_FIELD_BYTES
    async with running_server(routes=["0=127.0.0.2:9/tcp"]) as server:
        reader, writer = await admin_connection(server)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: admin\r\nX-Big: "
            + b"a" * (MAX_FIELD_BYTES + 100)
            + b"\r\n\r\n"
        )
        response = await read_response(reader)
        assert response.status in (400, 431), response.status
        await closed(writer)


async def test_malformed_requests_cost_one_debug_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="sidelink")
    async with running_server(routes=["0=127.0.0.2:9/tcp"]) as server:
        bad = [
            b"GET / HTTP/1.1\r\nHost admin\r\n\r\n",  # a header without a colon
            b"GET / HTTP/1.1\r\nHost: admin\r\nContent-Length: x\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\nHost: admin\r\n\r\n",
            b"GET / HTTP/9.9\r\nHost: admin\r\n\r\n",
        ] * 5
        for request in bad:
            reader, writer = await admin_connection(server)
            writer.write(request)
            assert (await read_response(reader)).status == 400
            await closed(writer)
        records = [r for r in caplog.records if r.name.startswith("sidelink.admin")]
        assert len(records) <= len(bad), [r.getMessage() for r in records]
        for record in records:
            assert record.levelno == logging.DEBUG, record.getMessage()
            assert record.exc_info is None, record.getMessage()
            assert "\n" not in record.getMessage(), record.getMessage()
        reader, writer = await admin_connection(server)
        assert await healthz_on(reader, writer) == 200
        await closed(writer)


async def test_a_burst_of_scrapes_shares_one_render_and_a_later_scrape_is_fresh() -> None:
    async with running_server(tcp_routes(300)) as server:
        metrics = server.metrics
        renders = 0

        class Counting:
            """A collector of nothing: each render of the registry calls it once."""

            def collect(self) -> list[object]:
                nonlocal renders
                renders += 1
                return []

        # (Counted in the registry, not by patching render: compiled, it cannot be.)
        metrics.registry.register(Counting())  # type: ignore[arg-type]
        async with aiohttp.ClientSession() as client:

            async def scrape() -> str:
                async with client.get(url(server, "/metrics")) as r:
                    assert r.status == 200
                    return await r.text()

            bodies = await asyncio.gather(*(scrape() for _ in range(8)))
            assert renders <= 2, renders
            assert len(set(bodies)) <= 2
            metrics.config_reloads["error"] += 7

            async def fresh() -> bool:
                body = await scrape()
                return Scrape(body).get("sidelink_config_reloads_total", result="error") == 7

            for _ in range(500):
                if await fresh():
                    break
            else:
                raise AssertionError("/metrics never showed the change")
            assert renders >= 2
