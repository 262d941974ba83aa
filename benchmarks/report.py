"""From raw samples to the results table: medians, sidelink's ratios, error counts."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from benchmarks.scenarios import (
    IDLE_CONNECTIONS,
    IDLE_H2_SCENARIO,
    Results,
    Sample,
)
from benchmarks.servers import DIRECT

SIDELINK = "sidelink"
RATIO_AGAINST = ("haproxy", "nginx")
TCP_SCENARIOS = frozenset({"tcp_keepalive", "bulk_tcp"})
PROXY_ONLY = frozenset({"startup", "memory", "idle_connections", IDLE_H2_SCENARIO})
# Rows shown whether or not their scenario ran in this suite.
ALWAYS = frozenset({"startup", "memory"})
ADDED_LATENCY = "added_p50_us"
PER_IDLE_CONNECTION = "kib_per_idle_connection"
PER_IDLE_H2_CONNECTION = "kib_per_idle_h2_connection"
# A per-connection row's metric -> the RSS metric held with the idle connections.
PER_IDLE = {
    PER_IDLE_CONNECTION: "rss_1k_idle_mib",
    PER_IDLE_H2_CONNECTION: "rss_1k_idle_h2_mib",
}


@dataclass(frozen=True)
class Row:
    scenario: str
    metric: str
    label: str
    unit: str
    higher_is_better: bool
    decimals: int = 0
    scale: float = 1.0  # displayed value = median * scale
    shows_errors: bool = False  # the first row of a load scenario carries its error counts


ROWS = (
    Row("http_keepalive", "rps", "1 http keep-alive x32: throughput", "req/s", True, 0, 1, True),
    Row("http_keepalive", "p50_us", "1 http keep-alive x32: latency p50", "ms", False, 2, 1e-3),
    Row("http_keepalive", "p99_us", "1 http keep-alive x32: latency p99", "ms", False, 2, 1e-3),
    Row("http_one_conn", "p50_us", "2 http 1 connection: latency p50", "µs", False, 0, 1, True),
    Row("http_one_conn", "p99_us", "2 http 1 connection: latency p99", "µs", False),
    Row("http_one_conn", ADDED_LATENCY, "2 http 1 connection: added latency p50", "µs", False),
    Row("http_one_conn", "rps", "2 http 1 connection: throughput", "req/s", True),
    Row("http_new_conn", "rps", "3 http new connection per request x32", "req/s", True, 0, 1, True),
    Row("http_new_conn", "p99_us", "3 http new connection per request: p99", "ms", False, 2, 1e-3),
    Row(
        "tcp_keepalive",
        "rps",
        "4 tcp keep-alive req/resp x32: throughput",
        "req/s",
        True,
        0,
        1,
        True,
    ),
    Row("tcp_keepalive", "p50_us", "4 tcp keep-alive req/resp x32: p50", "ms", False, 2, 1e-3),
    Row("tcp_keepalive", "p99_us", "4 tcp keep-alive req/resp x32: p99", "ms", False, 2, 1e-3),
    Row("bulk_http", "mb_per_s", "5 bulk http {bulk} download", "MB/s", True, 0, 1, True),
    Row("bulk_tcp", "mb_per_s", "5 bulk tcp {bulk} download", "MB/s", True, 0, 1, True),
    Row("http_keepalive", "cpu_us_per_req", "6 proxy CPU per request (scenario 1)", "µs", False, 1),
    Row("memory", "rss_idle_mib", "7 RSS idle after startup", "MiB", False, 1),
    Row(
        "idle_connections",
        "rss_1k_idle_mib",
        f"7 RSS with {IDLE_CONNECTIONS:,} idle keep-alive connections",
        "MiB",
        False,
        1,
        1,
        True,
    ),
    Row(
        "idle_connections",
        PER_IDLE_CONNECTION,
        "7 memory per idle keep-alive connection",
        "KiB",
        False,
        1,
    ),
    Row("memory", "rss_after_mib", "7 RSS idle after the whole run", "MiB", False, 1),
    Row("startup", "startup_ms", "7 startup: process start → ready", "ms", False),
    Row(
        "h2_m1",
        "rps",
        "8 h2c x10 connections, 1 stream each: throughput",
        "req/s",
        True,
        0,
        1,
        True,
    ),
    Row("h2_m1", "p50_us", "8 h2c -c10 -m1: latency p50", "ms", False, 2, 1e-3),
    Row("h2_m1", "p99_us", "8 h2c -c10 -m1: latency p99", "ms", False, 2, 1e-3),
    Row("h2_m1", "cpu_us_per_req", "8 h2c -c10 -m1: proxy CPU per request", "µs", False, 1),
    Row(
        "h2_m100",
        "rps",
        "9 h2c x10 connections, 100 streams each: throughput",
        "req/s",
        True,
        0,
        1,
        True,
    ),
    Row("h2_m100", "p50_us", "9 h2c -c10 -m100: latency p50", "ms", False, 2, 1e-3),
    Row("h2_m100", "p99_us", "9 h2c -c10 -m100: latency p99", "ms", False, 2, 1e-3),
    Row("h2_m100", "cpu_us_per_req", "9 h2c -c10 -m100: proxy CPU per request", "µs", False, 1),
    Row(
        "grpc_unary_x1",
        "p50_us",
        "10 gRPC unary, 1 call at a time: latency p50",
        "µs",
        False,
        0,
        1,
        True,
    ),
    Row("grpc_unary_x1", "p99_us", "10 gRPC unary, 1 call at a time: latency p99", "µs", False),
    Row(
        "grpc_unary_x1", ADDED_LATENCY, "10 gRPC unary, 1 at a time: added latency p50", "µs", False
    ),
    Row("grpc_unary_x1", "rps", "10 gRPC unary, 1 call at a time: throughput", "calls/s", True),
    Row(
        "grpc_unary_x10",
        "rps",
        "10 gRPC unary, 10 calls on one channel: throughput",
        "calls/s",
        True,
        0,
        1,
        True,
    ),
    Row("grpc_unary_x10", "p99_us", "10 gRPC unary x10: latency p99", "ms", False, 2, 1e-3),
    Row(
        "grpc_unary_x10", "cpu_us_per_req", "10 gRPC unary x10: proxy CPU per call", "µs", False, 1
    ),
    Row(
        IDLE_H2_SCENARIO,
        "rss_1k_idle_h2_mib",
        f"11 RSS with {IDLE_CONNECTIONS:,} idle HTTP/2 connections",
        "MiB",
        False,
        1,
        1,
        True,
    ),
    Row(
        IDLE_H2_SCENARIO,
        PER_IDLE_H2_CONNECTION,
        "11 memory per idle HTTP/2 connection",
        "KiB",
        False,
        1,
    ),
)


def _all_values(samples: list[Sample], metric: str) -> list[float]:
    return [s.values[metric] for s in samples if metric in s.values]


def median(samples: list[Sample], metric: str) -> float | None:
    values = _all_values(samples, metric)
    return statistics.median(values) if values else None


def spread_line(rows: list[TableRow], scenario: str, metric: str) -> str:
    """ "name min-max, ..., sidelink ÷ other by round r1 r2 ..." for one row: how far
    apart the rounds were."""
    for row in rows:
        if row.spec.scenario == scenario and row.spec.metric == metric:
            d = row.spec.decimals
            parts = [f"{name} {lo:,.{d}f}-{hi:,.{d}f}" for name, (lo, hi) in row.spread.items()]
            parts += [
                f"{SIDELINK} ÷ {other} by round " + " ".join(f"{r:.2f}x" for r in ratios)
                for other, ratios in row.by_round.items()
                if ratios
            ]
            return ", ".join(parts)
    return ""


def error_totals(samples: list[Sample]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for sample in samples:
        for kind, n in sample.errors.items():
            totals[kind] = totals.get(kind, 0) + n
    return totals


@dataclass
class TableRow:
    spec: Row
    label: str
    values: dict[str, float | None]
    cells: dict[str, str]
    ratios: dict[str, float | None]
    errors: dict[str, dict[str, int]] | None
    spread: dict[str, tuple[float, float]]  # min and max over rounds, displayed units
    by_round: dict[str, list[float]]  # other -> sidelink ÷ other within each round

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.spec.scenario,
            "metric": self.spec.metric,
            "label": self.label,
            "unit": self.spec.unit,
            "better": "higher" if self.spec.higher_is_better else "lower",
            "values": self.values,
            "min_max": self.spread,
            "ratios": {f"{SIDELINK}/{other}": r for other, r in self.ratios.items()},
            "ratios_by_round": {f"{SIDELINK}/{other}": r for other, r in self.by_round.items()},
            "errors": self.errors,
        }


def build_rows(
    results: Results,
    columns: list[str],
    *,
    no_tcp: set[str],
    failed: set[str],
    bulk: str,
    unsupported: dict[str, set[str]] | None = None,
) -> list[TableRow]:
    """One row per ROWS entry whose scenario ran; ``bulk`` names the bulk body size in labels
    ("1 GiB"); ``unsupported``: scenario -> the targets that cannot run it here ("n/a")."""
    na = {scenario: set(no_tcp) for scenario in TCP_SCENARIOS}
    for scenario, names in (unsupported or {}).items():
        na.setdefault(scenario, set()).update(names)
    rows = []
    for spec in ROWS:
        if spec.scenario not in ALWAYS and spec.scenario not in results.samples:
            continue  # not part of this run's suite
        per_target = results.samples.get(spec.scenario, {})
        values: dict[str, float | None] = {}
        cells: dict[str, str] = {}
        for name in columns:
            value = _value(results, spec, name)
            values[name] = None if value is None else value * spec.scale
            cells[name] = _cell(
                spec,
                name=name,
                value=values[name],
                per_target=per_target,
                na=na.get(spec.scenario, set()),
                failed=failed,
            )
        others = [o for o in RATIO_AGAINST if SIDELINK in columns and o in columns]
        by_round = {other: _within_rounds(per_target, spec.metric, other) for other in others}
        # (A figure made of several measures, as added latency or memory per connection,
        # has no sample of its own per round: its ratio is of the figures.)
        ratios = {
            other: statistics.median(by_round[other])
            if by_round[other]
            else _ratio(values.get(SIDELINK), values.get(other))
            for other in others
        }
        errors = None
        if spec.shows_errors:
            errors = {
                name: error_totals(per_target[name]) for name in columns if name in per_target
            }
        spread = {
            name: (min(found) * spec.scale, max(found) * spec.scale)
            for name in columns
            if (found := _all_values(per_target.get(name, []), spec.metric))
        }
        label = spec.label.format(bulk=bulk)
        rows.append(TableRow(spec, label, values, cells, ratios, errors, spread, by_round))
    return rows


def _within_rounds(per_target: dict[str, list[Sample]], metric: str, other: str) -> list[float]:
    """sidelink ÷ ``other`` within each round both were measured in, round by round. The
    table's ratio is their median: each pair saw the same minutes of the host, whose speed
    drifts over a run more than the proxies differ."""
    mine = {s.round: s.values[metric] for s in per_target.get(SIDELINK, []) if metric in s.values}
    theirs = {s.round: s.values[metric] for s in per_target.get(other, []) if metric in s.values}
    return [mine[r] / theirs[r] for r in sorted(mine) if theirs.get(r)]


def _value(results: Results, spec: Row, name: str) -> float | None:
    per_target = results.samples.get(spec.scenario, {})
    if spec.metric == ADDED_LATENCY:
        if name == DIRECT or name not in per_target or DIRECT not in per_target:
            return None
        proxied, direct = median(per_target[name], "p50_us"), median(per_target[DIRECT], "p50_us")
        return None if proxied is None or direct is None else proxied - direct
    if spec.metric in PER_IDLE:
        held = median(per_target.get(name, []), PER_IDLE[spec.metric])
        opened = median(per_target.get(name, []), "idle_opened")
        if spec.metric == PER_IDLE_H2_CONNECTION:
            idle = median(per_target.get(name, []), "rss_before_mib")
        else:
            idle = median(results.samples.get("memory", {}).get(name, []), "rss_idle_mib")
        if held is None or idle is None or not opened:
            return None
        return (held - idle) * 1024 / opened
    return median(per_target[name], spec.metric) if name in per_target else None


def _cell(
    spec: Row,
    *,
    name: str,
    value: float | None,
    per_target: dict[str, list[Sample]],
    na: set[str],
    failed: set[str],
) -> str:
    if name in failed:
        return "failed to start"
    if value is not None:
        return f"{value:,.{spec.decimals}f}"
    if name in na:
        return "n/a"
    samples = per_target.get(name, [])
    if samples and all(s.errors and not s.values for s in samples):
        return "error"  # it ran, and every attempt failed
    return "—"


def _ratio(sidelink: float | None, other: float | None) -> float | None:
    if sidelink is None or other is None or other == 0:
        return None
    return sidelink / other


def markdown(rows: list[TableRow], columns: list[str]) -> str:
    ratio_heads = [
        f"{SIDELINK} ÷ {other}" for other in RATIO_AGAINST if rows and other in rows[0].ratios
    ]
    error_head = "errors (" + " · ".join(columns) + ")"
    head = ["scenario", "unit", *columns, *ratio_heads, error_head]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for row in rows:
        arrow = "↑" if row.spec.higher_is_better else "↓"
        ratios = [
            "—" if r is None else f"{r:.2f}x"
            for other, r in row.ratios.items()
            if f"{SIDELINK} ÷ {other}" in ratio_heads
        ]
        errors = ""
        if row.errors is not None:
            errors = " · ".join(
                str(sum(row.errors[name].values())) if name in row.errors else "-"
                for name in columns
            )
        cells = [row.cells[name] for name in columns]
        lines.append(
            "| "
            + " | ".join([row.label, f"{row.spec.unit} {arrow}", *cells, *ratios, errors])
            + " |"
        )
    return "\n".join(lines) + "\n"


def error_details(results: Results) -> list[str]:
    """One line per scenario and target that saw errors, by kind."""
    lines = []
    for scenario, per_target in results.samples.items():
        for name, samples in per_target.items():
            totals = error_totals(samples)
            if totals:
                kinds = ", ".join(f"{kind} {n:,}" for kind, n in sorted(totals.items()))
                lines.append(f"{name} · {scenario}: {kinds} (over {len(samples)} run(s))")
    return lines


def samples_json(results: Results) -> dict[str, dict[str, list[dict[str, Any]]]]:
    return {
        scenario: {
            name: [{"values": s.values, "errors": s.errors} for s in samples]
            for name, samples in per_target.items()
        }
        for scenario, per_target in results.samples.items()
    }
