"""Reloads that must not hurt the traffic: big files, broken files, storms, and what they leave.

In process, servers on port 0: a reload parses off the event loop, any failure is counted
and survived (the file watcher applies the next good change), a reload storm under
traffic fails no request, and the series of routes a reload removed go away once their
connections have finished.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import aiohttp
import pytest
from aiohttp import web
from support.h2peers import H2Client, H2Pods
from support.inproc import resolver_yaml, route_address, serving
from support.metrics import Scrape
from support.pods import HANG_UPS, AppPods, StreamPods
from support.wait import until

from proxy import server as server_module
from proxy.config import Config, ConfigSource, Overrides
from proxy.dnsserver import DnsServer
from proxy.server import Server

POD = "127.0.0.2"
# Below config.py's 1 MiB cap, yet a quarter of a second of pure-Python YAML scanning.
BIG_COMMENT_BYTES = 900_000


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


def http_route(port: int, name: str = "app1", **settings: object) -> str:
    lines = [f"  - name: {name}", "    listen: 0", f"    service: {POD}", f"    port: {port}"]
    lines += ["    protocol: http", *(f"    {k}: {v}" for k, v in settings.items())]
    return "\n".join(lines) + "\n"


def tcp_route(name: str, service: str = POD, port: int = 9) -> str:
    return f"  - name: {name}\n    listen: 0\n    service: {service}\n    port: {port}\n"


def from_file(path: Path, source: type[ConfigSource] = ConfigSource) -> Server:
    """A server reading `path` (so it polls the file), admin on a free port."""
    src = source(str(path), overrides=Overrides(admin="127.0.0.1:0"))
    return Server(src.load(), src, environ={})


@contextlib.asynccontextmanager
async def app_pod() -> AsyncIterator[AppPods]:
    async with AppPods(_app(), POD) as pod:
        yield pod


def _app() -> web.Application:
    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    return app


def admin_url(server: Server, path: str) -> str:
    assert server.admin_address is not None
    return f"http://127.0.0.1:{server.admin_address[1]}{path}"


def route_url(server: Server, name: str = "app1") -> str:
    host, port = route_address(server, name)
    return f"http://{host}:{port}/"


# --- the parse is off the loop ----------------------------------------------------------


async def test_a_big_config_parses_while_traffic_and_healthz_keep_flowing(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "sidelink.yaml"
    async with app_pod() as pod:
        text = "routes:\n" + http_route(pod.port)
        cfg.write_text(text)
        async with serving(from_file(cfg)) as server, aiohttp.ClientSession() as client:
            assert (await (await client.get(route_url(server))).text()) == "hello"
            # Valid, under the size cap, and slow to parse: one big comment.
            big = text + "# " + "x" * BIG_COMMENT_BYTES + "\n"
            await asyncio.to_thread(cfg.write_text, big)
            answered = {"healthz": 0, "route": 0}
            reload = asyncio.ensure_future(server.reload())
            while not reload.done():
                async with client.get(admin_url(server, "/healthz")) as r:
                    assert r.status == 200
                if not reload.done():
                    answered["healthz"] += 1
                async with client.get(route_url(server)) as r:
                    assert r.status == 200
                if not reload.done():
                    answered["route"] += 1
            assert await reload
            # On the loop, the parse would have answered nothing until it was over.
            assert answered["healthz"] >= 3 and answered["route"] >= 3, answered
            assert server.metrics.config_reloads == {"ok": 1, "error": 0}


# --- any failure is counted and survived -----------------------------------------------


class Flaky(ConfigSource):
    """A config source whose next loads raise what is queued here (then read the file)."""

    failures: ClassVar[list[BaseException]] = []

    def load(self) -> Config:
        if Flaky.failures:
            raise Flaky.failures.pop(0)
        return super().load()


async def test_every_kind_of_reload_failure_is_counted_and_the_watcher_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RecursionError (what deep YAML raised), a MemoryError or a bug: counted, logged,
    survived; the next good change of the file is applied by the watcher."""
    monkeypatch.setattr(server_module, "CONFIG_POLL_INTERVAL", 0.01)
    monkeypatch.setattr(Flaky, "failures", [])
    cfg = tmp_path / "sidelink.yaml"
    cfg.write_text("routes:\n" + tcp_route("orders"))
    async with serving(from_file(cfg, Flaky)) as server:
        reloads = server.metrics.config_reloads
        for n, error in enumerate(
            (RecursionError("maximum recursion depth exceeded"), MemoryError(), KeyError("x")),
            start=1,
        ):
            Flaky.failures.append(error)
            text = "routes:\n" + tcp_route("orders") + f"# version {n}\n"
            await asyncio.to_thread(cfg.write_text, text)
            await until(lambda n=n: reloads["error"] == n, what=f"failure {n} to be counted")
            assert set(server.routes) == {"orders"}
        # SIGHUP still works, and so does the watcher.
        Flaky.failures.append(RecursionError())
        assert await server.reload() is False
        good = "routes:\n" + tcp_route("orders") + tcp_route("billing")
        await asyncio.to_thread(cfg.write_text, good)
        await until(lambda: set(server.routes) == {"orders", "billing"}, what="the good file")
        assert reloads == {"ok": 1, "error": 4}


async def test_deeply_nested_yaml_is_counted_and_the_next_good_file_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "CONFIG_POLL_INTERVAL", 0.01)
    cfg = tmp_path / "sidelink.yaml"
    cfg.write_text("routes:\n" + tcp_route("orders"))
    async with serving(from_file(cfg)) as server:
        reloads = server.metrics.config_reloads
        # (Each file swapped in whole, as a ConfigMap update does: a poll that caught a
        # file half written would count one more error.)
        await asyncio.to_thread(replace_text, cfg, "[" * 100_000)
        await until(lambda: reloads["error"] == 1, what="the nested file to be counted")
        assert set(server.routes) == {"orders"}
        good = "routes:\n" + tcp_route("orders") + tcp_route("billing")
        await asyncio.to_thread(replace_text, cfg, good)
        await until(lambda: set(server.routes) == {"orders", "billing"}, what="the good file")
        assert reloads == {"ok": 1, "error": 1}
        assert Scrape.of(server).get("sidelink_config_reloads_total", result="error") == 1


def replace_text(path: Path, text: str) -> None:
    """Write ``path`` whole at once (a new file renamed over it)."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    fresh.replace(path)


# --- a storm under traffic --------------------------------------------------------------


async def test_fifty_reloads_under_traffic_fail_no_request(tmp_path: Path) -> None:
    """50 reloads (what 50 SIGHUPs do), each adding or removing a route and changing the
    log level, while four clients send requests through an http route: none fails."""
    cfg = tmp_path / "sidelink.yaml"
    async with app_pod() as pod:
        kept = http_route(pod.port)
        versions = [
            "logging:\n  level: info\nroutes:\n" + kept,
            "logging:\n  level: warning\nroutes:\n" + kept + tcp_route("extra"),
        ]
        cfg.write_text(versions[0])
        async with serving(from_file(cfg)) as server, aiohttp.ClientSession() as client:
            url = route_url(server)
            done = asyncio.Event()
            outcomes: list[object] = []

            async def traffic() -> None:
                while not done.is_set():
                    try:
                        async with client.get(url) as r:
                            outcomes.append(r.status if await r.text() == "hello" else "body")
                    except aiohttp.ClientError as e:
                        outcomes.append(repr(e))

            clients = [asyncio.ensure_future(traffic()) for _ in range(4)]
            try:
                await until(lambda: len(outcomes) >= 20, what="traffic to flow")
                for n in range(50):
                    await asyncio.to_thread(cfg.write_text, versions[(n + 1) % 2])
                    assert await server.reload(), n
                    before = len(outcomes)
                    await until(lambda b=before: len(outcomes) > b, what="a request after it")
            finally:
                done.set()
                await asyncio.gather(*clients)
            failed = [o for o in outcomes if o != 200]
            assert not failed, f"{len(failed)} of {len(outcomes)} failed: {failed[:5]}"
            assert server.metrics.config_reloads == {"ok": 50, "error": 0}


# --- what a removed route leaves behind ----------------------------------------------


def sidelink_series(server: Server) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every sidelink_* series by name and labels (values left out)."""
    return {
        (name, tuple(sorted(labels.items())))
        for name, labels, _ in Scrape.of(server).samples
        if name.startswith("sidelink_")
    }


def label_values(server: Server, label: str) -> set[str]:
    return {dict(labels)[label] for _, labels in sidelink_series(server) if label in dict(labels)}


async def test_series_of_removed_routes_and_services_go_once_their_connections_do(
    tmp_path: Path, dns: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 routes in and out again: /metrics back to its size; a removed route with a
    connection open keeps its series until that connection closes."""
    monkeypatch.setattr(server_module, "RETIRED_SWEEP_INTERVAL", 0.02)
    async with asyncio.timeout(30):
        await _series_scenario(tmp_path, dns)


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An upstream that keeps each connection until the client ends it."""
    await reader.read()
    writer.close()


async def _series_scenario(tmp_path: Path, dns: DnsServer) -> None:
    dns.set_a("kept.ns1.svc.cluster.local", [POD], ttl=30)
    async with StreamPods(hold, POD, tolerate=HANG_UPS) as pod:
        await _series_with_pod(tmp_path, dns, pod.port)


async def _series_with_pod(tmp_path: Path, dns: DnsServer, port: int) -> None:
    cfg = tmp_path / "sidelink.yaml"
    small = resolver_yaml(dns.port) + "routes:\n" + tcp_route("orders", "kept", port)
    many = small + "".join(tcp_route(f"r{i}", POD, port) for i in range(490))
    many += "".join(tcp_route(f"d{i}", f"svc{i}") for i in range(10))
    cfg.write_text(small)
    async with serving(from_file(cfg)) as server:
        await until(lambda: server.routes["orders"].watch.resolved, what="kept to resolve")
        before = sidelink_series(server)
        size_before = len(Scrape.of(server).text)

        cfg.write_text(many)
        assert await server.reload()
        await until(
            lambda: {f"svc{i}" for i in range(10)} <= label_values(server, "service"),
            what="the new services to be looked up",
        )
        assert len(label_values(server, "route")) == 501
        # A connection open on a route about to go: its series stay while it lives.
        _, writer = await asyncio.open_connection(*route_address(server, "r7"))
        stats = server.metrics.routes["r7"]
        await until(lambda: stats.active_downstream == 1, what="the connection to be accepted")

        cfg.write_text(small)
        assert await server.reload()
        assert label_values(server, "route") == {"orders", "r7"}
        assert label_values(server, "service") == {"kept"}
        writer.close()
        await until(lambda: not server.retired, what="the retired route to finish")
        await until(lambda: "r7" not in label_values(server, "route"), what="r7's series to go")
        after = sidelink_series(server)
        assert after == before, (after - before, before - after)
        # The same series; only digits of counters (reloads, lookups) may differ.
        assert abs(len(Scrape.of(server).text) - size_before) < 200


def two_routes(port: int) -> tuple[str, str]:
    """Two http routes to POD:port, app1 and other (a reload takes app1 away)."""
    route, other = (
        f"  - name: {name}\n    listen: 0\n    service: {POD}\n    port: {port}\n"
        "    protocol: http\n"
        for name in ("app1", "other")
    )
    return route, other


async def test_a_retired_route_closes_its_upstream_connections_once_their_streams_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload removes a route while a stream of it is in flight: the stream finishes,
    and then its upstream connection closes (it stayed open, idle, for as long as the pod
    lived: only the idle ones were closed when the route went)."""
    monkeypatch.setattr(server_module, "RETIRED_SWEEP_INTERVAL", 0.02)
    async with H2Pods(POD) as pods:
        cfg = tmp_path / "sidelink.yaml"
        route, other = two_routes(pods.port)
        cfg.write_text("routes:\n" + route + other)
        async with serving(from_file(cfg)) as server:
            async with H2Client.open(route_address(server, "app1")) as client:
                sid = client.start("GET", "/hold/r")
                await until(lambda: pods.held("r") == 1, what="the stream held at the pod")
                cfg.write_text("routes:\n" + other)
                assert await server.reload()
                assert len(pods.live()) == 1  # busy: it stays for its stream
                pods.release("r")
                assert (await client.response(sid)).status == 200
                await until(lambda: not pods.live(), what="the upstream connection to close")
            await until(lambda: not server.retired, what="the retired route to finish")


async def test_a_retired_route_closes_the_http1_connection_its_last_request_gave_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with HTTP/1.1: the upstream connection of a request in flight at the
    reload goes back to the retired route's pool, and is closed once the route's last
    client has gone (before, it stayed open until the pod's keep-alive timeout)."""
    monkeypatch.setattr(server_module, "RETIRED_SWEEP_INTERVAL", 0.02)
    release = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/held", held)
    async with AppPods(app, POD) as pod:
        live = pod.runner.server
        assert live is not None
        cfg = tmp_path / "sidelink.yaml"
        route, other = two_routes(pod.port)
        cfg.write_text("routes:\n" + route + other)
        async with serving(from_file(cfg)) as server, aiohttp.ClientSession() as session:
            answer = asyncio.ensure_future(session.get(route_url(server) + "held"))
            await until(lambda: len(live.connections) == 1, what="the request at the pod")
            cfg.write_text("routes:\n" + other)
            assert await server.reload()
            release.set()
            async with await answer as r:
                assert (r.status, await r.text()) == (200, "late")
            await session.close()
            await until(lambda: not server.retired, what="the retired route to finish")
            await until(lambda: not live.connections, what="its upstream connection to close")
