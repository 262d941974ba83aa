"""Every metric sidelink exports, defined once, here.

The forwarders update plain integers on per-route and per-service stats objects
(an attribute add costs far less than a locked prometheus-client child), and one
collector turns them into metric families when Prometheus scrapes.

Benchmark-only switch, never for production: ``SIDELINK_BENCH_NO_METRICS=1`` in the
environment, read once at import, turns the per-request metric work into no-ops
(``Histogram.observe``, so the request and upstream-connect durations, and
``RouteStats.count_request``/``count_grpc``), so that ``python -m benchmarks.metrics_cost``
can measure what that work costs. The plain integer counters (connections, bytes, errors,
retries) still count, but ``sidelink_requests_total``, ``sidelink_grpc_responses_total``
and both duration histograms stay empty, which breaks every dashboard and alert built on
them; sidelink logs a WARNING at start when it is set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    exposition,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import exposition as openmetrics

from proxy import __version__, build
from proxy.errors import UPSTREAM_ERRORS

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# SIDELINK_BENCH_NO_METRICS (see above): per-request metric work off, for benchmarks only.
NO_METRICS: Final = os.environ.get("SIDELINK_BENCH_NO_METRICS", "") not in ("", "0")
UPSTREAM_ERROR_REASONS: Final = tuple(error.reason for error in UPSTREAM_ERRORS)
# The code counted for a response cut short by an upstream failure after its head was
# sent (the client never got it whole): `code="reset"`.
RESET_CODE: Final = -1
# sidelink_build_info{build}: the hot path compiled with mypyc, or plain Python.
BUILD_LABEL: Final = "compiled" if build() == "compiled" else "python"
DNS_RESULTS: Final = ("ok", "nxdomain", "error", "timeout")
# Methods counted under their own label (requests are counted by the method as sent).
METHOD_LABELS: Final = {
    m: m.decode()
    for m in (
        b"GET",
        b"HEAD",
        b"POST",
        b"PUT",
        b"DELETE",
        b"PATCH",
        b"OPTIONS",
        b"TRACE",
        b"CONNECT",
    )
}


class Histogram:
    """A single-threaded histogram: a bucket found and two adds per observation."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        if NO_METRICS:
            return
        # The first bucket the value fits (what bisect_left finds): a scan from the
        # smallest, which compiled is a loop over floats, where a call to bisect costs
        # more than the dozen compares (most values fit one of the first few).
        i = 0
        for bound in self.bounds:
            if value <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.total += value

    def observations(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        out = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


def _no_idle_multiplexed() -> int:
    """RouteStats.idle_multiplexed until a route sets its own."""
    return 0


class RouteStats:
    """The live figures of one route; forwarders hold a reference and add to it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counted: dict[int, dict[bytes, int]] = {}  # status -> method -> count
        self.request_duration = Histogram()
        self.connect_duration = Histogram()
        self.opened_downstream = 0
        self.opened_upstream = 0
        self.active_downstream = 0
        self.active_upstream = 0
        self.bytes_to_upstream = 0
        self.bytes_to_downstream = 0
        self.errors = dict.fromkeys(UPSTREAM_ERROR_REASONS, 0)
        self.retries = 0
        self.retry_budget_exhausted = 0
        self.shed = 0  # downstream connections closed at once: the process was at its fd limit
        self.pool_idle = 0  # idle HTTP/1 connections, kept by their pools
        # HTTP/2 connections carrying no stream, counted when asked (set by the route).
        self.idle_multiplexed: Callable[[], int] = _no_idle_multiplexed
        self.ejections = 0
        self.grpc: dict[int, int] = {}  # grpc-status sent downstream -> count
        self.streams_downstream = 0  # HTTP/2 streams open now
        self.streams_upstream = 0

    def count_request(self, method: bytes, code: int) -> None:
        if NO_METRICS:
            return
        # (By status, then method: two lookups of keys hashed already, where a (method,
        # status) key is a tuple made and hashed per request.)
        methods = self.counted.get(code)
        if methods is None:
            methods = self.counted[code] = {}
        methods[method] = methods.get(method, 0) + 1

    @property
    def requests(self) -> dict[tuple[bytes, int], int]:
        """(method, status) -> count."""
        return {
            (method, code): n
            for code, methods in self.counted.items()
            for method, n in methods.items()
        }

    def count_grpc(self, status: int) -> None:
        if NO_METRICS:
            return
        grpc = self.grpc
        grpc[status] = grpc.get(status, 0) + 1


class ServiceStats:
    def __init__(self, name: str) -> None:
        self.name = name
        self.lookups = dict.fromkeys(DNS_RESULTS, 0)
        # Endpoints by the port looked up: a service watched for two ports (a number's A
        # records, a name's SRV records) is two answers, and the gauge the larger.
        self.by_port: dict[int | str, int] = {}
        self.changes = 0

    @property
    def endpoints(self) -> int:
        return max(self.by_port.values(), default=0)


class Metrics:
    """Owns a registry (one per server, so tests can run several in one process)."""

    def __init__(self) -> None:
        self.routes: dict[str, RouteStats] = {}
        self.services: dict[str, ServiceStats] = {}
        self.config_reloads = {"ok": 0, "error": 0}
        self.registry = CollectorRegistry(auto_describe=False)
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.registry.register(_Collector(self))

    def route(self, name: str) -> RouteStats:
        stats = self.routes.get(name)
        if stats is None:
            stats = self.routes[name] = RouteStats(name)
        return stats

    def service(self, name: str) -> ServiceStats:
        stats = self.services.get(name)
        if stats is None:
            stats = self.services[name] = ServiceStats(name)
        return stats

    def retain(self, routes: Collection[str], services: Collection[str]) -> None:
        """Forget the stats of every route and service not named (their series go too)."""
        for name in [n for n in self.routes if n not in routes]:
            del self.routes[name]
        for name in [n for n in self.services if n not in services]:
            del self.services[name]

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type, OpenMetrics when the client asks."""
        if accept and "application/openmetrics-text" in accept:
            body: bytes = openmetrics.generate_latest(self.registry)  # type: ignore[no-untyped-call]
            return body, openmetrics.CONTENT_TYPE_LATEST
        return exposition.generate_latest(self.registry), exposition.CONTENT_TYPE_LATEST


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        routes = list(self.metrics.routes.values())
        services = list(self.metrics.services.values())

        def per_route(
            family: CounterMetricFamily | GaugeMetricFamily,
            value: Callable[[RouteStats], float],
        ) -> CounterMetricFamily | GaugeMetricFamily:
            for r in routes:
                family.add_metric([r.name], value(r))
            return family

        requests = CounterMetricFamily(
            "sidelink_requests",
            "HTTP requests answered downstream, by status sent (proxy-made errors included)",
            labels=["route", "method", "code"],
        )
        for r in routes:
            for code, methods in r.counted.items():
                by_label: dict[str, int] = {}
                for method, n in methods.items():
                    label = METHOD_LABELS.get(method, "OTHER")
                    by_label[label] = by_label.get(label, 0) + n
                shown = "reset" if code == RESET_CODE else str(code)
                for label, n in by_label.items():
                    requests.add_metric([r.name, label, shown], n)
        yield requests

        for name, doc, attr in (
            (
                "sidelink_request_duration_seconds",
                "Request head read downstream to response head received (or error sent)",
                "request_duration",
            ),
            (
                "sidelink_upstream_connect_duration_seconds",
                "Time to establish an upstream connection",
                "connect_duration",
            ),
        ):
            hist = HistogramMetricFamily(name, doc, labels=["route"])
            for r in routes:
                h: Histogram = getattr(r, attr)
                hist.add_metric([r.name], h.buckets(), h.total)
            yield hist

        opened = CounterMetricFamily(
            "sidelink_connections_opened",
            "Connections opened, downstream (accepted) and upstream (made)",
            labels=["route", "side"],
        )
        active = GaugeMetricFamily(
            "sidelink_connections_active", "Connections open now", labels=["route", "side"]
        )
        transferred = CounterMetricFamily(
            "sidelink_bytes", "Bytes forwarded", labels=["route", "direction"]
        )
        errors = CounterMetricFamily(
            "sidelink_upstream_errors", "Upstream failures by reason", labels=["route", "reason"]
        )
        for r in routes:
            opened.add_metric([r.name, "downstream"], r.opened_downstream)
            opened.add_metric([r.name, "upstream"], r.opened_upstream)
            active.add_metric([r.name, "downstream"], r.active_downstream)
            active.add_metric([r.name, "upstream"], r.active_upstream)
            transferred.add_metric([r.name, "to_upstream"], r.bytes_to_upstream)
            transferred.add_metric([r.name, "to_downstream"], r.bytes_to_downstream)
            for reason, n in r.errors.items():
                errors.add_metric([r.name, reason], n)
        yield from (opened, active, transferred, errors)

        grpc = CounterMetricFamily(
            "sidelink_grpc_responses",
            "gRPC answers by the grpc-status sent downstream (proxy-made ones included)",
            labels=["route", "grpc_status"],
        )
        streams = GaugeMetricFamily(
            "sidelink_streams_active", "HTTP/2 streams open now", labels=["route", "side"]
        )
        for r in routes:
            for status, n in sorted(r.grpc.items()):
                grpc.add_metric([r.name, str(status)], n)
            streams.add_metric([r.name, "downstream"], r.streams_downstream)
            streams.add_metric([r.name, "upstream"], r.streams_upstream)
        yield from (grpc, streams)

        yield per_route(
            CounterMetricFamily(
                "sidelink_retries", "Requests or connects retried", labels=["route"]
            ),
            lambda r: r.retries,
        )
        yield per_route(
            CounterMetricFamily(
                "sidelink_connections_shed",
                "Downstream connections closed at once: the process was at its fd limit",
                labels=["route"],
            ),
            lambda r: r.shed,
        )
        yield per_route(
            CounterMetricFamily(
                "sidelink_retry_budget_exhausted",
                "Retries that were safe but not made: the retry budget was spent",
                labels=["route"],
            ),
            lambda r: r.retry_budget_exhausted,
        )
        yield per_route(
            GaugeMetricFamily(
                "sidelink_pool_idle_connections",
                "Idle pooled upstream connections",
                labels=["route"],
            ),
            lambda r: r.pool_idle + r.idle_multiplexed(),
        )
        yield per_route(
            CounterMetricFamily(
                "sidelink_endpoint_ejections", "Endpoints ejected after failures", labels=["route"]
            ),
            lambda r: r.ejections,
        )

        lookups = CounterMetricFamily(
            "sidelink_dns_lookups", "DNS lookups by result", labels=["service", "result"]
        )
        endpoints = GaugeMetricFamily(
            "sidelink_dns_endpoints", "Endpoints the service resolves to now", labels=["service"]
        )
        changes = CounterMetricFamily(
            "sidelink_dns_changes", "Changes of a service's endpoint set", labels=["service"]
        )
        for s in services:
            for result, n in s.lookups.items():
                lookups.add_metric([s.name, result], n)
            endpoints.add_metric([s.name], s.endpoints)
            changes.add_metric([s.name], s.changes)
        yield from (lookups, endpoints, changes)

        reloads = CounterMetricFamily(
            "sidelink_config_reloads", "Config reloads by result", labels=["result"]
        )
        for result, n in self.metrics.config_reloads.items():
            reloads.add_metric([result], n)
        yield reloads

        info = GaugeMetricFamily(
            "sidelink_build_info", "Build information", labels=["version", "build"]
        )
        info.add_metric([__version__, BUILD_LABEL], 1)
        yield info
