"""``sidelink top``: a live view of a running sidelink, read from its admin endpoints only.

Each frame scrapes ``/metrics`` and ``/routes`` and shows one row per route: requests (or
connections, for tcp) per second and their success rate over the last interval, p50/p99
of the request duration from the histogram buckets of that interval, the endpoints by
state, and where the addresses came from and how long ago. Rates need two scrapes, so
the first frame comes one interval after start (``--once`` prints that frame and exits).

The figures are computed from two scrapes by pure functions (:func:`route_rows`,
:func:`render`), so they are tested by feeding values; only :func:`run_top` does I/O.
"""

from __future__ import annotations

import calendar
import json
import math
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

DEFAULT_INTERVAL = 1.0
FETCH_TIMEOUT = 2.0
# Clear the screen and home the cursor (ANSI), so each frame replaces the last one.
CLEAR = "\x1b[H\x1b[2J"
COLUMNS = (
    "ROUTE",
    "PROTO",
    "LISTEN",
    "SERVICE",
    "RPS",
    "SUCCESS",
    "P50",
    "P99",
    "ENDPOINTS",
    "DNS",
)

_Labels = tuple[tuple[str, str], ...]


@dataclass
class Scrape:
    """One reading of /metrics and /routes, at ``at`` (monotonic seconds)."""

    at: float
    samples: dict[str, dict[_Labels, float]] = field(default_factory=dict)
    routes: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def parse(cls, at: float, exposition: str, routes_json: str) -> Scrape:
        samples: dict[str, dict[_Labels, float]] = {}
        for family in text_string_to_metric_families(exposition):
            for s in family.samples:
                labels = tuple(sorted(s.labels.items()))
                samples.setdefault(s.name, {})[labels] = float(s.value)
        body = json.loads(routes_json)
        routes = body.get("routes", []) if isinstance(body, dict) else []
        return cls(at, samples, [r for r in routes if isinstance(r, dict)])

    def total(
        self, name: str, route: str, keep: Callable[[dict[str, str]], bool] | None = None
    ) -> float:
        """The sum of ``name`` over the route's series (``keep`` filters on the other labels)."""
        out = 0.0
        for labels, value in self.samples.get(name, {}).items():
            d = dict(labels)
            if d.get("route") == route and (keep is None or keep(d)):
                out += value
        return out

    def buckets(self, name: str, route: str) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of a histogram's buckets, in order."""
        found = []
        for labels, value in self.samples.get(name + "_bucket", {}).items():
            d = dict(labels)
            if d.get("route") == route:
                found.append((float(d["le"]), value))
        return sorted(found)

    def version(self) -> str:
        for labels in self.samples.get("sidelink_build_info", {}):
            return dict(labels).get("version", "?")
        return "?"


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    protocol: str
    listen: str
    service: str
    rate: float | None  # requests (http) or connections (tcp) per second
    success: float | None  # 0..1 over the interval; None when nothing happened
    p50: float | None  # seconds
    p99: float | None
    endpoints: dict[str, int]  # state -> count
    dns: str  # "dns 3s ago", "env", "static", "hosts 1s ago", "never resolved"


def quantile(
    q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> float | None:
    """The q-quantile of what was observed between two readings of cumulative buckets.

    As Prometheus' histogram_quantile: linear within the bucket the rank falls in; the
    +Inf bucket answers with the highest finite bound.
    """
    was = dict(before)
    counts = [(le, n - was.get(le, 0.0)) for le, n in after]
    if not counts or counts[-1][1] <= 0:
        return None
    rank = q * counts[-1][1]
    lower, below = 0.0, 0.0
    for le, n in counts:
        if n >= rank:
            if math.isinf(le):
                return lower
            inside = n - below
            return lower + (le - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = le, n
    return lower


def route_rows(before: Scrape, after: Scrape, wall_now: float) -> list[Row]:
    """One row per route of ``after``, its rates over the time between the two scrapes."""
    elapsed = max(after.at - before.at, 1e-9)
    rows = []
    for r in after.routes:
        name = str(r.get("name", "?"))
        protocol = str(r.get("protocol", "?"))
        if protocol == "http":
            metric = "sidelink_requests_total"
            total = after.total(metric, name) - before.total(metric, name)
            bad = after.total(metric, name, _failed) - before.total(metric, name, _failed)
            hist = "sidelink_request_duration_seconds"
            p50 = quantile(0.5, before.buckets(hist, name), after.buckets(hist, name))
            p99 = quantile(0.99, before.buckets(hist, name), after.buckets(hist, name))
        else:
            metric = "sidelink_connections_opened_total"
            total = after.total(metric, name, _downstream) - before.total(metric, name, _downstream)
            errors = "sidelink_upstream_errors_total"
            bad = min(total, after.total(errors, name) - before.total(errors, name))
            p50 = p99 = None
        states: dict[str, int] = {}
        for ep in r.get("endpoints") or []:
            state = str(ep.get("state", "?")) if isinstance(ep, dict) else "?"
            states[state] = states.get(state, 0) + 1
        rows.append(
            Row(
                name,
                protocol,
                str(r.get("listen", "")),
                _service(r),
                total / elapsed,
                (total - bad) / total if total > 0 else None,
                p50,
                p99,
                states,
                _dns(r, wall_now),
            )
        )
    return rows


def _failed(labels: dict[str, str]) -> bool:
    code = labels.get("code", "")
    return code == "reset" or (code.isdigit() and int(code) >= 500)


def _downstream(labels: dict[str, str]) -> bool:
    return labels.get("side") == "downstream"


def _service(route: dict[str, Any]) -> str:
    port = route.get("port")
    return f"{route.get('service', '?')}:{port}" if port is not None else str(route.get("service"))


def _dns(route: dict[str, Any], wall_now: float) -> str:
    source = str(route.get("source", "?"))
    last = route.get("last_resolved")
    if source in ("static", "env"):  # env: what Kubernetes' variables say, until DNS answers
        return source
    if not isinstance(last, str):
        return "never resolved"
    try:
        then = calendar.timegm(time.strptime(last, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return source
    age = f"{_age(max(0.0, wall_now - then))} ago"
    return f"{source} {age}" + (" (failing)" if route.get("last_error") else "")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


def _endpoints(states: dict[str, int]) -> str:
    if not states:
        return "none"
    order = ["active", "ejected", "draining"]
    keys = [k for k in order if k in states] + sorted(k for k in states if k not in order)
    return " ".join(f"{states[k]} {k}" for k in keys)


def render(rows: Iterable[Row], header: str) -> str:
    """The frame as text: a header line, then an aligned table."""
    table = [list(COLUMNS)]
    for row in rows:
        table.append(
            [
                row.name,
                row.protocol,
                row.listen,
                row.service,
                "-" if row.rate is None else f"{row.rate:.1f}",
                "-" if row.success is None else f"{row.success * 100:.2f}%",
                _ms(row.p50),
                _ms(row.p99),
                _endpoints(row.endpoints),
                row.dns,
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = [header, ""]
    for line in table:
        lines.append(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        )
    return "\n".join(lines) + "\n"


def fetch(admin: str, at: float) -> Scrape:
    """Scrape the admin server once. OSError (URLError included) when it cannot be reached."""
    base = f"http://{admin}"
    with urllib.request.urlopen(base + "/metrics", timeout=FETCH_TIMEOUT) as r:
        exposition = r.read().decode()
    with urllib.request.urlopen(base + "/routes", timeout=FETCH_TIMEOUT) as r:
        routes = r.read().decode()
    return Scrape.parse(at, exposition, routes)


def run_top(
    admin: str,
    *,
    once: bool = False,
    interval: float = DEFAULT_INTERVAL,
    out: TextIO = sys.stdout,
) -> int:
    """Show frames until interrupted (or one, with ``once``): 0, or 1 when unreachable once."""
    clear = CLEAR if out.isatty() else ""
    before: Scrape | None = None
    while True:
        started = time.monotonic()
        try:
            after = fetch(admin, started)
        except (OSError, ValueError) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            message = f"sidelink top: cannot read http://{admin}: {reason}\n"
            if once:
                sys.stderr.write(message)
                return 1
            out.write(clear + message)
            out.flush()
            before = None
        else:
            if before is not None:
                header = (
                    f"sidelink {after.version()} at http://{admin}  "
                    f"{time.strftime('%H:%M:%S')}  every {interval:g}s  "
                    f"({len(after.routes)} route(s); rates over the last "
                    f"{after.at - before.at:.1f}s)"
                )
                out.write(clear + render(route_rows(before, after, time.time()), header))
                out.flush()
                if once:
                    return 0
            before = after
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
