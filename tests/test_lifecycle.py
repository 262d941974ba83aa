"""End to end: the `sidelink` command as a subprocess, driven by signals, files and the admin API.

Everything stays on loopback: the DNS server is an in-process ThreadedDnsServer on
127.0.0.1, the "pods" are echo servers on 127.0.0.2 and 127.0.0.3, and every config
names that DNS server, so nothing reaches the machine's own resolver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from support.inproc import resolver_yaml, serving
from support.metrics import Scrape
from support.pods import Client, EchoServer, ask_once
from support.procs import Sidelink, clean_environ, free_port, sidelink
from support.wait import until, until_sync

from proxy import __version__
from proxy import server as server_module
from proxy.config import ConfigSource, Overrides
from proxy.dnsserver import ThreadedDnsServer
from proxy.server import Server

POD_A = "127.0.0.2"
POD_B = "127.0.0.3"
APP1 = "app1.ns1.svc.cluster.local"
APP2 = "app2.ns1.svc.cluster.local"
ROUTE_FIELDS = {
    "name",
    "listen",
    "protocol",
    "service",
    "answered_name",
    "ttl_remaining",
    "last_resolved",
    "last_error",
    "source",
    "ready",
    "endpoints",
}
ENDPOINT_FIELDS = {"address", "port", "state", "in_flight"}
# Every version of a config file in the SIGHUP tests is padded to this size (see write_hidden).
PADDED_SIZE = 2048


# --- pods and clients ------------------------------------------------------------------


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# --- configs ---------------------------------------------------------------------------


def config_text(
    dns_port: int,
    routes: Sequence[tuple[str, int, str, int]],
    drain_delay: str = "0s",
    drain_timeout: str = "10s",
) -> str:
    """A config for (name, listen port, service, upstream port) tcp routes."""
    text = resolver_yaml(dns_port)
    text += f"shutdown:\n  drain_delay: {drain_delay}\n  drain_timeout: {drain_timeout}\n"
    text += "routes:\n"
    for name, listen, service, port in routes:
        text += (
            f"  - name: {name}\n"
            f'    listen: "127.0.0.1:{listen}"\n'
            f"    service: {service}\n"
            f"    port: {port}\n"
            "    protocol: tcp\n"
        )
    return text


def orders_route(
    tdns: ThreadedDnsServer,
    pod_a: EchoServer,
    cfg: Path,
    drain_delay: str = "0s",
    drain_timeout: str = "10s",
) -> int:
    """Write cfg with one tcp route, orders -> app1 (pod A); return its listen port."""
    tdns.set_a(APP1, [POD_A], ttl=30)
    listen = free_port()
    route = [("orders", listen, "app1", pod_a.port)]
    cfg.write_text(config_text(tdns.port, route, drain_delay, drain_timeout))
    return listen


def write_hidden(path: Path, text: str) -> None:
    """Change the file in a way the config-file poller cannot see.

    Same inode, same size (padded with a comment) and the old mtime put back: only
    a SIGHUP can then have applied the new content, which is what a test of SIGHUP
    must prove.
    """
    assert len(text) < PADDED_SIZE
    padded = text + "#" * (PADDED_SIZE - len(text) - 1) + "\n"
    before = path.stat() if path.exists() else None
    with path.open("r+" if before else "w", encoding="utf-8") as f:
        f.write(padded)
        f.truncate()
    if before is not None:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


# --- admin API -------------------------------------------------------------------------


def request(
    proc: Sidelink, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{proc.admin_port}{path}", method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def metric(proc: Sidelink, name: str, **labels: str) -> float | None:
    status, body = proc.get("/metrics")
    assert status == 200
    return Scrape(body).first(name, **labels)


def routes_by_name(proc: Sidelink) -> dict[str, dict[str, object]]:
    status, body = proc.get_json("/routes")
    assert status == 200
    routes = cast(list[dict[str, object]], body["routes"])
    return {cast(str, r["name"]): r for r in routes}


def in_flight(proc: Sidelink, route: str) -> list[object]:
    endpoints = cast(list[dict[str, object]], routes_by_name(proc)[route]["endpoints"])
    return [ep["in_flight"] for ep in endpoints]


def wait_ready(proc: Sidelink, timeout: float = 5.0) -> None:
    proc.wait_admin()
    until_sync(lambda: proc.get("/readyz")[0] == 200, timeout, "/readyz 200")


def wait_exit(proc: Sidelink, timeout: float) -> tuple[int, float]:
    """Exit code and the seconds it took."""
    started = time.monotonic()
    code = proc.wait(timeout)
    return code, time.monotonic() - started


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture
def tdns() -> Iterator[ThreadedDnsServer]:
    with ThreadedDnsServer() as server:
        yield server


@pytest.fixture
def pod_a() -> Iterator[EchoServer]:
    server = EchoServer(POD_A, b"A ")
    yield server
    server.close()


@pytest.fixture
def pod_b() -> Iterator[EchoServer]:
    server = EchoServer(POD_B, b"B ")
    yield server
    server.close()


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return tmp_path / "sidelink.yaml"


# --- readiness and the admin endpoints -------------------------------------------------


def test_readyz_waits_for_dns_and_routes_lists_every_field(
    tdns: ThreadedDnsServer, pod_a: EchoServer, cfg: Path
) -> None:
    listen = free_port()
    cfg.write_text(config_text(tdns.port, [("orders", listen, "app1", pod_a.port)]))
    with sidelink(["run", "-c", str(cfg)]) as proc:
        proc.wait_admin()
        assert proc.get("/healthz")[0] == 200
        # The first lookup gets NXDOMAIN: the route must say why it is not ready.
        until_sync(
            lambda: routes_by_name(proc)["orders"]["last_error"] is not None, 5, "a DNS failure"
        )
        status, body = proc.get_json("/readyz")
        assert status == 503
        assert body["ready"] is False
        reasons = cast(list[str], body["reasons"])
        assert any("orders" in r for r in reasons), reasons
        assert proc.get("/healthz")[0] == 200
        route = routes_by_name(proc)["orders"]
        assert route.keys() >= ROUTE_FIELDS
        assert route["ready"] is False
        assert route["endpoints"] == []

        tdns.set_a(APP1, [POD_A], ttl=30)
        until_sync(lambda: proc.get("/readyz")[0] == 200, 5, "/readyz 200")
        assert proc.get_json("/readyz") == (200, {"ready": True, "reasons": []})

        route = routes_by_name(proc)["orders"]
        assert route.keys() >= ROUTE_FIELDS
        assert route["name"] == "orders"
        assert route["listen"] == route["bound"] == f"127.0.0.1:{listen}"
        assert route["protocol"] == "tcp"
        assert route["service"] == "app1"
        assert route["answered_name"] == APP1 + "."
        assert route["source"] == "dns"
        assert route["ready"] is True
        assert route["last_error"] is None
        assert isinstance(route["last_resolved"], str)
        time.strptime(route["last_resolved"], "%Y-%m-%dT%H:%M:%SZ")
        assert isinstance(route["ttl_remaining"], int | float)
        assert 0 < route["ttl_remaining"] <= 30
        endpoints = cast(list[dict[str, object]], route["endpoints"])
        assert len(endpoints) == 1
        assert {k: endpoints[0].get(k) for k in ENDPOINT_FIELDS} == {
            "address": POD_A,
            "port": pod_a.port,
            "state": "active",
            "in_flight": 0,
        }

        client = Client(listen)
        assert client.ask() == "A ping\n"
        until_sync(lambda: in_flight(proc, "orders") == [1], 2, "in_flight 1 in /routes")
        client.close()


def test_metrics_openmetrics_and_read_only_admin(
    tdns: ThreadedDnsServer, pod_a: EchoServer, cfg: Path
) -> None:
    orders_route(tdns, pod_a, cfg)
    with sidelink(["run", "-c", str(cfg)]) as proc:
        wait_ready(proc)
        status, headers, raw = request(proc, "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        text = raw.decode()
        assert metric(proc, "sidelink_build_info", version=__version__) == 1
        lookups = metric(proc, "sidelink_dns_lookups_total", service="app1", result="ok")
        assert lookups is not None and lookups >= 1
        assert "\nprocess_cpu_seconds_total " in text
        assert "\nprocess_resident_memory_bytes " in text
        assert "\npython_info{" in text

        status, headers, raw = request(
            proc, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert status == 200
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert raw.endswith(b"# EOF\n")
        names = {f.name for f in openmetrics_families(raw.decode())}
        assert {"sidelink_build_info", "sidelink_dns_lookups", "process_cpu_seconds"} <= names

        for path in ("/metrics", "/healthz", "/readyz", "/routes"):
            assert request(proc, path, method="HEAD")[0] == 200, path
            for method in ("POST", "PUT", "DELETE"):
                assert request(proc, path, method=method)[0] == 405, (method, path)
        # Nothing changed state: still serving and ready.
        assert proc.get("/readyz")[0] == 200


# --- SIGTERM ---------------------------------------------------------------------------


def test_sigterm_drains_in_order(tdns: ThreadedDnsServer, pod_a: EchoServer, cfg: Path) -> None:
    listen = orders_route(tdns, pod_a, cfg, drain_delay="2s")
    with sidelink(["run", "-c", str(cfg)]) as proc:
        wait_ready(proc)
        held = Client(listen)
        assert held.ask("before") == "A before\n"

        proc.signal(signal.SIGTERM)
        until_sync(lambda: proc.get("/readyz")[0] == 503, 1, "/readyz 503 right after SIGTERM")
        _, body = proc.get_json("/readyz")
        assert any("drain" in r for r in cast(list[str], body["reasons"])), body
        assert proc.get("/healthz")[0] == 200
        # Within drain_delay the listener still takes new connections and serves them.
        assert ask_once(listen, "during delay") == "A during delay\n"

        until_sync(lambda: refused(listen), 4, "the listener to close after drain_delay")
        assert proc.proc.poll() is None, "exited with a connection still open"
        assert held.ask("after") == "A after\n"
        assert proc.get("/readyz")[0] == 503

        held.close()
        code, _ = wait_exit(proc, 3)
        assert code == 0, proc.stderr()


def test_sigterm_drain_timeout_closes_what_is_left(
    tdns: ThreadedDnsServer, pod_a: EchoServer, cfg: Path
) -> None:
    listen = orders_route(tdns, pod_a, cfg, drain_delay="500ms", drain_timeout="1s")
    with sidelink(["run", "-c", str(cfg)]) as proc:
        wait_ready(proc)
        held = Client(listen)
        assert held.ask() == "A ping\n"
        proc.signal(signal.SIGTERM)
        code, took = wait_exit(proc, 10)
        assert code == 0, proc.stderr()
        assert 1.5 <= took < 5, took
        assert held.closed_by_peer()
        held.close()
        assert "drain timeout" in proc.stderr()


def test_second_sigterm_exits_at_once(
    tdns: ThreadedDnsServer, pod_a: EchoServer, cfg: Path
) -> None:
    listen = orders_route(tdns, pod_a, cfg, drain_delay="30s", drain_timeout="30s")
    with sidelink(["run", "-c", str(cfg)]) as proc:
        wait_ready(proc)
        held = Client(listen)
        assert held.ask() == "A ping\n"
        proc.signal(signal.SIGTERM)
        # Signals of one kind do not queue: let the first be handled before the second.
        until_sync(lambda: proc.get("/readyz")[0] == 503, 2, "the first SIGTERM to register")
        proc.signal(signal.SIGTERM)
        code, took = wait_exit(proc, 10)
        assert code == 0, proc.stderr()
        assert took < 3, took
        assert held.closed_by_peer()
        held.close()


def test_sigterm_without_connections_exits_after_drain_delay(
    tdns: ThreadedDnsServer, pod_a: EchoServer, cfg: Path
) -> None:
    listen = orders_route(tdns, pod_a, cfg, drain_delay="500ms", drain_timeout="30s")
    with sidelink(["run", "-c", str(cfg)]) as proc:
        wait_ready(proc)
        assert ask_once(listen) == "A ping\n"
        proc.signal(signal.SIGTERM)
        code, took = wait_exit(proc, 10)
        assert code == 0, proc.stderr()
        assert 0.5 <= took < 3, took


# --- exit codes ------------------------------------------------------------------------


def test_exit_code_2_on_invalid_config(tdns: ThreadedDnsServer, cfg: Path) -> None:
    text = config_text(tdns.port, [("orders", free_port(), "app1", 80)])
    cfg.write_text(text.replace("port: 80", "port: 70000"))
    line = text.splitlines().index("    port: 80") + 1
    with sidelink(["run", "-c", str(cfg)]) as proc:
        assert proc.wait(10) == 2
        err = proc.stderr()
    assert f"sidelink.yaml:{line}: routes[0].port" in err, err
    assert "70000" in err
    assert "Traceback" not in err


def test_exit_code_2_on_missing_config_file(tmp_path: Path) -> None:
    with sidelink(["run", "-c", str(tmp_path / "nope.yaml")]) as proc:
        assert proc.wait(10) == 2
        assert "nope.yaml" in proc.stderr()


@pytest.mark.parametrize("taken_by", ["route", "admin"])
def test_exit_code_1_when_a_port_is_taken(
    tdns: ThreadedDnsServer, cfg: Path, taken_by: str
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        listen = port if taken_by == "route" else free_port()
        cfg.write_text(config_text(tdns.port, [("orders", listen, "app1", 80)]))
        if taken_by == "route":
            with sidelink(["run", "-c", str(cfg)]) as proc:
                code = proc.wait(10)
                err = proc.stderr()
        else:  # the helper picks a free admin port: run the command directly
            done = run_cli("run", "-c", str(cfg), "--admin", f"127.0.0.1:{port}")
            code, err = done.returncode, done.stderr
    assert code == 1, err
    assert str(port) in err, err
    assert "Traceback" not in err


def test_exit_code_0_on_sigint(tdns: ThreadedDnsServer, pod_a: EchoServer, cfg: Path) -> None:
    orders_route(tdns, pod_a, cfg)
    with sidelink(["run", "-c", str(cfg)]) as proc:
        wait_ready(proc)
        proc.signal(signal.SIGINT)
        assert proc.wait(5) == 0, proc.stderr()


# --- reload ----------------------------------------------------------------------------


def test_sighup_applies_a_new_route_and_keeps_open_connections(
    tdns: ThreadedDnsServer, pod_a: EchoServer, pod_b: EchoServer, cfg: Path
) -> None:
    tdns.set_a(APP1, [POD_A], ttl=30)
    tdns.set_a(APP2, [POD_B], ttl=30)
    orders, billing = free_port(), free_port()
    v1 = [("orders", orders, "app1", pod_a.port)]
    v2 = [*v1, ("billing", billing, "app2", pod_b.port)]
    write_hidden(cfg, config_text(tdns.port, v1))
    with sidelink(["run", "-c", str(cfg)]) as proc:
        wait_ready(proc)
        held = Client(orders)
        assert held.ask() == "A ping\n"

        write_hidden(cfg, config_text(tdns.port, v2))
        proc.signal(signal.SIGHUP)
        until_sync(lambda: "billing" in routes_by_name(proc), 5, "the new route")
        until_sync(lambda: proc.get("/readyz")[0] == 200, 5, "the new route to resolve")
        assert ask_once(billing) == "B ping\n"
        assert held.ask("still there") == "A still there\n"
        assert metric(proc, "sidelink_config_reloads_total", result="ok") == 1
        assert metric(proc, "sidelink_config_reloads_total", result="error") == 0
        assert (
            metric(proc, "sidelink_connections_opened_total", route="orders", side="downstream")
            == 1
        )

        # An invalid file is logged and ignored: both routes keep serving.
        broken = config_text(tdns.port, v2).replace(f"port: {pod_b.port}", "port: 70000")
        write_hidden(cfg, broken)
        proc.signal(signal.SIGHUP)
        until_sync(
            lambda: metric(proc, "sidelink_config_reloads_total", result="error") == 1,
            5,
            "the rejected reload to be counted",
        )
        assert metric(proc, "sidelink_config_reloads_total", result="ok") == 1
        assert set(routes_by_name(proc)) == {"orders", "billing"}
        assert ask_once(orders) == "A ping\n"
        assert ask_once(billing) == "B ping\n"
        assert held.ask("and still") == "A and still\n"
        assert proc.get("/readyz")[0] == 200

        held.close()
        proc.signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        err = proc.stderr()
    [rejected] = [line for line in err.splitlines() if "config reload rejected" in line]
    assert "routes[1].port" in rejected and "70000" in rejected, err  # one line, with all


def test_reload_that_cannot_bind_changes_nothing(
    tdns: ThreadedDnsServer, pod_a: EchoServer, pod_b: EchoServer, cfg: Path
) -> None:
    tdns.set_a(APP1, [POD_A], ttl=30)
    tdns.set_a(APP2, [POD_B], ttl=30)
    orders = free_port()
    write_hidden(cfg, config_text(tdns.port, [("orders", orders, "app1", pod_a.port)]))
    with socket.create_server(("127.0.0.1", 0)) as taken, sidelink(["run", "-c", str(cfg)]) as proc:
        wait_ready(proc)
        # orders would move to pod B, and a new route wants a port another process holds.
        billing = taken.getsockname()[1]
        v2 = [("orders", orders, "app2", pod_b.port), ("billing", billing, "app2", pod_b.port)]
        write_hidden(cfg, config_text(tdns.port, v2))
        proc.signal(signal.SIGHUP)
        until_sync(
            lambda: metric(proc, "sidelink_config_reloads_total", result="error") == 1,
            5,
            "the failed reload to be counted",
        )
        assert set(routes_by_name(proc)) == {"orders"}
        assert ask_once(orders) == "A ping\n", "a failed reload half-applied"
        assert proc.get("/readyz")[0] == 200

        # Once the port is free the same file applies whole.
        taken.close()
        proc.signal(signal.SIGHUP)
        until_sync(
            lambda: metric(proc, "sidelink_config_reloads_total", result="ok") == 1, 5, "reload"
        )
        until_sync(lambda: proc.get("/readyz")[0] == 200, 5, "the new routes to resolve")
        assert ask_once(orders) == "B ping\n"
        assert ask_once(billing) == "B ping\n"
        proc.signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        err = proc.stderr()
    assert "cannot listen" in err and str(billing) in err, err


def test_config_file_rewritten_in_place_is_picked_up(
    tdns: ThreadedDnsServer, pod_a: EchoServer, pod_b: EchoServer, cfg: Path
) -> None:
    tdns.set_a(APP1, [POD_A], ttl=30)
    tdns.set_a(APP2, [POD_B], ttl=30)
    orders, billing = free_port(), free_port()
    v1 = [("orders", orders, "app1", pod_a.port)]
    cfg.write_text(config_text(tdns.port, v1))
    with sidelink(["run", "-c", str(cfg)]) as proc:
        wait_ready(proc)
        held = Client(orders)
        assert held.ask() == "A ping\n"
        cfg.write_text(config_text(tdns.port, [*v1, ("billing", billing, "app2", pod_b.port)]))
        until_sync(lambda: "billing" in routes_by_name(proc), 3, "the change on disk")
        until_sync(lambda: proc.get("/readyz")[0] == 200, 3, "the new route to resolve")
        assert ask_once(billing) == "B ping\n"
        assert held.ask() == "A ping\n"
        held.close()


def test_configmap_symlink_swap_is_picked_up(
    tdns: ThreadedDnsServer, pod_a: EchoServer, pod_b: EchoServer, tmp_path: Path
) -> None:
    """The layout kubelet gives a mounted ConfigMap, updated the way kubelet updates it."""
    tdns.set_a(APP1, [POD_A], ttl=30)
    tdns.set_a(APP2, [POD_B], ttl=30)
    orders, billing = free_port(), free_port()
    v1 = [("orders", orders, "app1", pod_a.port)]
    mount = tmp_path / "config"
    (mount / "..2026_v1").mkdir(parents=True)
    (mount / "..2026_v1" / "sidelink.yaml").write_text(config_text(tdns.port, v1))
    (mount / "..data").symlink_to("..2026_v1")
    (mount / "sidelink.yaml").symlink_to("..data/sidelink.yaml")
    with sidelink(["run", "-c", str(mount / "sidelink.yaml")]) as proc:
        wait_ready(proc)
        held = Client(orders)
        assert held.ask() == "A ping\n"

        (mount / "..2026_v2").mkdir()
        (mount / "..2026_v2" / "sidelink.yaml").write_text(
            config_text(tdns.port, [*v1, ("billing", billing, "app2", pod_b.port)])
        )
        (mount / "..data_tmp").symlink_to("..2026_v2")
        os.replace(mount / "..data_tmp", mount / "..data")
        shutil.rmtree(mount / "..2026_v1")

        until_sync(lambda: "billing" in routes_by_name(proc), 3, "the ConfigMap update")
        until_sync(lambda: proc.get("/readyz")[0] == 200, 3, "the new route to resolve")
        assert ask_once(billing) == "B ping\n"
        assert held.ask() == "A ping\n"
        assert metric(proc, "sidelink_config_reloads_total", result="error") == 0
        held.close()


# --- in-process: orderings a subprocess cannot show without sleeping --------------------


def server_from_file(path: Path) -> contextlib.AbstractAsyncContextManager[Server]:
    """sidelink in this process reading `path` (so it polls the file), admin on a free port."""
    source = ConfigSource(str(path), overrides=Overrides(admin="127.0.0.1:0"))
    return serving(Server(source.load(), source, environ={}))


async def refused_async(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


# Sync tests running their own loop: the in-process server needs one, and these must not
# depend on how the suite parametrizes async tests.


def test_file_poller_does_not_repeat_a_sighup_reload(
    tdns: ThreadedDnsServer, cfg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Editing the file, then SIGHUP (the usual way) reloads once, not again on the next poll."""
    polls = 0
    real_signature = server_module._file_signature

    def counting_signature(path: str) -> tuple[str, int, int, int] | None:
        nonlocal polls
        polls += 1
        return real_signature(path)

    monkeypatch.setattr(server_module, "CONFIG_POLL_INTERVAL", 0.01)
    monkeypatch.setattr(server_module, "_file_signature", counting_signature)
    v1 = [("orders", free_port(), POD_A, 9)]
    cfg.write_text(config_text(tdns.port, v1))
    v2 = config_text(tdns.port, [*v1, ("billing", free_port(), POD_B, 9)])

    async def scenario() -> None:
        async with server_from_file(cfg) as server:
            await until(lambda: polls >= 1, what="the poller to take the file's signature")
            # No await between the write and reload(): the poller cannot see the change first.
            cfg.write_text(v2)  # noqa: ASYNC240
            assert await server.reload()  # what SIGHUP does
            seen = polls
            await until(lambda: polls >= seen + 3, what="the poller to look at the file again")
            assert server.metrics.config_reloads == {"ok": 1, "error": 0}
            assert set(server.routes) == {"orders", "billing"}

    asyncio.run(scenario())


def test_no_reload_once_shutdown_has_begun(tdns: ThreadedDnsServer, cfg: Path) -> None:
    """A SIGHUP or file change during the drain must not open new listeners."""
    orders, billing = free_port(), free_port()
    v1 = [("orders", orders, POD_A, 9)]
    cfg.write_text(config_text(tdns.port, v1, drain_delay="30s"))

    async def scenario() -> None:
        async with server_from_file(cfg) as server:
            server.shutdown()
            v2 = [*v1, ("billing", billing, POD_B, 9)]
            await asyncio.to_thread(cfg.write_text, config_text(tdns.port, v2, drain_delay="30s"))
            assert await server.reload() is False
            assert set(server.routes) == {"orders"}
            assert await refused_async(billing)
            assert server.metrics.config_reloads == {"ok": 0, "error": 0}

    asyncio.run(scenario())


# --- sidelink resolve ------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
        env=clean_environ(),
    )


def test_resolve_shows_names_tried_answer_addresses_and_ttl(
    tdns: ThreadedDnsServer, cfg: Path
) -> None:
    tdns.set_a(APP1, [POD_B, POD_A], ttl=42)
    cfg.write_text(config_text(tdns.port, []))
    done = run_cli("resolve", "app1.ns1", "--port", "8080", "-c", str(cfg))
    assert done.returncode == 0, done.stderr
    lines = [line.split(None, 1) for line in done.stdout.splitlines()]
    fields = [(key, value.strip()) for key, value in lines]
    assert ("tried:", "app1.ns1.ns1.svc.cluster.local.") in fields
    assert ("tried:", APP1 + ".") in fields
    tried = [v for k, v in fields if k == "tried:"]
    assert tried == ["app1.ns1.ns1.svc.cluster.local.", APP1 + "."]
    answered = [v for k, v in fields if k == "answered:"]
    assert len(answered) == 1 and answered[0].startswith(APP1 + ".")
    assert [v for k, v in fields if k == "address:"] == [f"{POD_A}:8080", f"{POD_B}:8080"]
    ttl = [v for k, v in fields if k == "ttl:"]
    assert len(ttl) == 1 and ttl[0].startswith("42s"), ttl
    assert ("headless:", "yes") in fields


def test_resolve_unknown_name_exits_1_with_the_names_tried(
    tdns: ThreadedDnsServer, cfg: Path
) -> None:
    cfg.write_text(config_text(tdns.port, []))
    done = run_cli("resolve", "nope", "-c", str(cfg))
    assert done.returncode == 1, done.stdout + done.stderr
    tried = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("tried:")]
    assert tried == [
        "nope.ns1.svc.cluster.local.",
        "nope.svc.cluster.local.",
        "nope.cluster.local.",
        "nope.",
    ]
    assert "Traceback" not in done.stderr
    # Every name went to our DNS server, none anywhere else.
    assert {name for name, _ in tdns.queries} >= set(tried)


# --- logging ---------------------------------------------------------------------------


def test_json_log_format_makes_every_stderr_line_json(
    tdns: ThreadedDnsServer, pod_a: EchoServer, cfg: Path
) -> None:
    listen, dead = free_port(), free_port()
    v1 = [("orders", listen, "app1", pod_a.port)]
    write_hidden(cfg, config_text(tdns.port, v1))
    with sidelink(["run", "-c", str(cfg), "--log-format", "json", "--log-level", "debug"]) as proc:
        proc.wait_admin()
        # Logs of many kinds: DNS failures, a refused upstream, a rejected reload, shutdown.
        until_sync(
            lambda: routes_by_name(proc)["orders"]["last_error"] is not None, 5, "a DNS failure"
        )
        tdns.set_a(APP1, [POD_A], ttl=30)
        until_sync(lambda: proc.get("/readyz")[0] == 200, 5, "/readyz 200")
        assert ask_once(listen) == "A ping\n"
        write_hidden(cfg, config_text(tdns.port, v1).replace("tcp", "carrier-pigeon"))
        proc.signal(signal.SIGHUP)
        until_sync(
            lambda: metric(proc, "sidelink_config_reloads_total", result="error") == 1,
            5,
            "the rejected reload",
        )
        write_hidden(cfg, config_text(tdns.port, [("orders", listen, "app1", dead)]))
        proc.signal(signal.SIGHUP)
        until_sync(
            lambda: metric(proc, "sidelink_config_reloads_total", result="ok") == 1, 5, "reload"
        )
        client = Client(listen)
        assert client.closed_by_peer()  # nothing listens on `dead`
        client.close()
        # A request line over aiohttp's limit makes it log an error of its own.
        assert request(proc, "/" + "a" * 10_000)[0] in (400, 414)
        proc.signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        err = proc.stderr()
    lines = err.splitlines()
    assert len(lines) >= 5, err
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"not JSON: {line!r}\n--- stderr ---\n{err}")
        assert isinstance(entry, dict)
        assert {"time", "level", "message"} <= entry.keys(), entry
    messages = "\n".join(json.loads(line)["message"] for line in lines)
    assert "carrier-pigeon" in messages
