"""Interop: a real Prometheus scrapes sidelink's /metrics every second, and PromQL over
what it stored gives the traffic sent: the request count exactly, a p99 from the
duration buckets, and an answer to every query of the Grafana dashboard we ship.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from support import wire
from support.inproc import resolver_yaml, serving
from support.pods import AppPods
from support.procs import free_port, require_tool
from support.wait import until, until_sync

from proxy.config import Overrides, parse
from proxy.dnsserver import DnsServer
from proxy.server import Server

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana-dashboard.json"
POD = "127.0.0.2"
SERVICE = "app1"
# How long a test waits for Prometheus: to start, to scrape (every second).
PROMETHEUS_DEADLINE = 10.0
# What Grafana's own variables become in a query run here: windows that hold several
# 1 s scrapes.
GRAFANA_BUILTINS = {
    "__rate_interval": "30s",
    "__interval": "5s",
    "__interval_ms": "5000",
    "__range": "1m",
    "__range_s": "60",
    "__range_ms": "60000",
}


# --- Prometheus ----------------------------------------------------------------------------


class Prometheus:
    """A Prometheus server scraping `target` every second, queried over its HTTP API."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target

    def get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}{path}?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body: dict[str, Any] = json.load(r)
        except urllib.error.HTTPError as e:  # a bad query is a 400 with a JSON body
            body = json.load(e)
        return body

    async def answer(self, expr: str) -> dict[str, Any]:
        """The API's whole answer (status, data or error) to an instant query."""
        return await asyncio.to_thread(self.get, "/api/v1/query", query=expr)

    async def vector(self, expr: str) -> list[dict[str, Any]]:
        body = await self.answer(expr)
        assert body["status"] == "success", (expr, body)
        assert body["data"]["resultType"] == "vector", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, expr: str) -> float | None:
        """The value of a one-element vector (None when the vector is empty)."""
        result = await self.vector(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    async def scraped_after(self, moment: float, timeout: float = PROMETHEUS_DEADLINE) -> None:
        """Wait for a successful scrape of sidelink that began after `moment` (time.time())."""
        deadline = time.monotonic() + timeout
        while True:
            stamp = await self.value('timestamp(sidelink_build_info{job="sidelink"})')
            if stamp is not None and stamp > moment:
                return
            if time.monotonic() > deadline:
                targets = await asyncio.to_thread(self.get, "/api/v1/targets")
                raise AssertionError(f"no scrape after {moment} (last: {stamp}): {targets}")
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """One Prometheus for the module, scraping a fixed admin address that each test's
    sidelink listens on in turn. (Prometheus 2 applies a new scrape target only after its
    discovery manager's 5 s throttle: one server for every test pays it once.)"""
    binary = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    server = Prometheus(free_port(), ("127.0.0.1", free_port()))
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
        "scrape_configs:\n  - job_name: sidelink\n    static_configs:\n"
        f"      - targets: ['{server.target[0]}:{server.target[1]}']\n"
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{server.port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def ready() -> bool:
        assert proc.poll() is None, f"prometheus exited {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/-/ready", timeout=1):
                return True
        except OSError:
            return False

    try:
        until_sync(ready, PROMETHEUS_DEADLINE, "prometheus to be ready")
        yield server
        assert proc.poll() is None, "prometheus is still running"
    finally:
        proc.terminate()
        proc.wait(10)


# --- sidelink and its traffic ----------------------------------------------------------------


def pod_app() -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="missing")

    app = web.Application()
    app.router.add_get("/", ok)
    app.router.add_get("/missing", missing)
    return app


def route_config(dns: DnsServer, port: int) -> str:
    return resolver_yaml(dns.port) + (
        "routes:\n"
        f"  - {{name: app1, listen: '127.0.0.1:0', protocol: http, service: {SERVICE},"
        f" port: {port}}}\n"
    )


async def send(server: Server, ok: int, missing: int) -> None:
    """ok GETs answered 200 and missing answered 404, on one keep-alive connection."""
    async with wire.raw_client(server) as (reader, writer):
        for path, n, status in (("/", ok, 200), ("/missing", missing, 404)):
            for _ in range(n):
                writer.write(wire.get(path))
                assert (await wire.read_response(reader)).status == status


@contextlib.asynccontextmanager
async def scraped_sidelink(prom: Prometheus, dns: DnsServer) -> AsyncIterator[Server]:
    """sidelink with its admin server where Prometheus scrapes, once it has been scraped."""
    dns.set_a(f"{SERVICE}.ns1.svc.cluster.local", [POD], ttl=30)
    async with AppPods(pod_app(), POD) as pods:
        admin = f"{prom.target[0]}:{prom.target[1]}"
        config = parse(route_config(dns, pods.port), "test.yaml", overrides=Overrides(admin=admin))
        started = time.time()
        async with serving(Server(config, environ={})) as server:
            await until(lambda: server.routes["app1"].watch.resolved, 5.0, "the route to resolve")
            # The first scrape comes once Prometheus's scrape loop runs (up to ~6 s after it
            # started), then every second.
            await prom.scraped_after(started, timeout=PROMETHEUS_DEADLINE + 5)
            yield server


# --- the tests -------------------------------------------------------------------------------


async def test_prometheus_counts_every_request_and_has_a_p99(
    prometheus: Prometheus, dns: DnsServer
) -> None:
    prom = prometheus
    async with scraped_sidelink(prom, dns) as server:
        # Two batches with a scrape after each: the counter grows between two samples, so
        # rate() has something to say.
        await send(server, ok=15, missing=5)
        await prom.scraped_after(time.time())
        await send(server, ok=16, missing=4)
        await prom.scraped_after(time.time())

        assert await prom.value("sum(sidelink_requests_total)") == 40
        by_code = {
            r["metric"]["code"]: float(r["value"][1])
            for r in await prom.vector('sum by (code) (sidelink_requests_total{route="app1"})')
        }
        assert by_code == {"200": 31, "404": 9}
        assert await prom.value("sum(sidelink_request_duration_seconds_count)") == 40
        p99 = await prom.value(
            "histogram_quantile(0.99, sum by (le)"
            " (rate(sidelink_request_duration_seconds_bucket[30s])))"
        )
        assert p99 is not None and math.isfinite(p99), p99
        assert 0 < p99 <= 30, p99  # within the buckets (the last finite bound is 30 s)

        info = await prom.vector("sidelink_build_info")
        assert [r["metric"]["version"] for r in info] == ["0.1.0"]
        assert info[0]["metric"]["build"] in ("compiled", "python")
        lookups = 'sidelink_dns_lookups_total{service="app1",result="ok"}'
        assert (await prom.value(lookups) or 0) >= 1
        assert (
            await prom.value('sidelink_connections_opened_total{route="app1",side="downstream"}')
            == 2
        )


def exported_names(server: Server) -> set[str]:
    """The sample names sidelink's /metrics has or will have (a labelled family without
    samples yet, as sidelink_grpc_responses_total before any gRPC call, is exported too)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    body, _ = server.metrics.render(None)
    return {
        family.name + suffix
        for family in text_string_to_metric_families(body.decode())
        for suffix in suffixes.get(family.type, ("",))
    }


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows' nested panels included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets") or ():
                if target.get("expr"):
                    found.append((str(panel.get("title", "")), str(target["expr"])))
            walk(panel.get("panels") or [])

    walk(dashboard.get("panels") or [])
    for row in dashboard.get("rows") or ():  # the old schema's rows
        walk(row.get("panels") or [])
    return found


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variables ($name, ${name}, ${name:format}, [[name]]) replaced by values."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        assert name in values, f"no value for the Grafana variable ${name} in {expr!r}"
        return values[name]

    pattern = r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)"
    return re.sub(pattern, value, expr)


def variable_values(dashboard: dict[str, Any], admin: tuple[str, int]) -> dict[str, str]:
    """A concrete value for each of the dashboard's template variables (the ones
    sidelink's labels and this Prometheus give), and for Grafana's built-in ones."""
    concrete = {
        "route": "app1",
        "service": SERVICE,
        "job": "sidelink",
        "instance": f"{admin[0]}:{admin[1]}",
    }
    values = dict(GRAFANA_BUILTINS)
    for variable in (dashboard.get("templating") or {}).get("list") or ():
        name = variable["name"]
        if variable.get("type") == "datasource":
            values[name] = "prometheus"
        elif variable.get("type") == "interval":
            values[name] = "30s"
        else:
            # A label the dashboard filters on: the one value this sidelink has, or any
            # value (a variable used with =~, as Grafana's multi-value ones are).
            values[name] = concrete.get(name, ".+")
    return values


async def test_every_query_of_the_grafana_dashboard_runs(
    prometheus: Prometheus, dns: DnsServer
) -> None:
    """Each panel's PromQL, its variables filled in, is accepted and evaluated by
    Prometheus; every sidelink_ metric it names is one sidelink exports."""
    assert DASHBOARD.exists(), f"{DASHBOARD} is missing"
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert queries, "the dashboard has no queries"
    prom = prometheus
    async with scraped_sidelink(prom, dns) as server:
        await send(server, ok=10, missing=2)
        await prom.scraped_after(time.time())
        await send(server, ok=10, missing=2)
        await prom.scraped_after(time.time())
        assert server.admin_address is not None
        values = variable_values(dashboard, server.admin_address[:2])
        exported = exported_names(server)
        failures = []
        for title, expr in queries:
            query = substitute(expr, values)
            body = await prom.answer(query)
            if body["status"] != "success":
                failures.append(f"{title!r}: {query}: {body.get('error')}")
            unknown = set(re.findall(r"\bsidelink_\w+", query)) - exported
            if unknown:
                failures.append(f"{title!r}: {query}: no such metric {sorted(unknown)}")
        assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("rate(x[$__rate_interval])", "rate(x[30s])"),
        ('a{route=~"$route"} / b{route="${route}"}', 'a{route=~"app1"} / b{route="app1"}'),
        ('a{route=~"${route:regex}"}[[__range]]', 'a{route=~"app1"}1m'),
    ],
)
def test_grafana_variables_are_substituted(expr: str, expected: str) -> None:
    values = {**GRAFANA_BUILTINS, "route": "app1"}
    assert substitute(expr, values) == expected
