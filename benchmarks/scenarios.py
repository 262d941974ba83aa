"""The scenarios, run for every target in interleaved rounds, and their raw samples.

Within a round each scenario runs once per target before the next scenario starts
(A B C D, A B C D, ...), and the target order rotates each round, so slow drift of
the machine (page cache, frequency, a neighbour) spreads over all targets alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.h2 import (
    GrpcResult,
    IdleH2Connections,
    run_grpc_client,
    run_h2load,
)
from benchmarks.load import (
    IdleConnections,
    LoadError,
    RunResult,
    run_curl_bulk,
    run_wrk,
)
from benchmarks.procs import cpu_seconds, rss_bytes
from benchmarks.servers import DIRECT, REPO, Lab, Target

IDLE_CONNECTIONS = 1000
# Pause before a memory reading so the proxy has finished reacting to what just happened.
SETTLE_SECONDS = 0.5
WARMUP_SECONDS = 1
MIB = 1024 * 1024


@dataclass(frozen=True)
class WrkScenario:
    key: str
    title: str
    connections: int
    tcp: bool  # through the tcp route/frontend instead of the http one
    headers: tuple[str, ...] = ()
    measure_cpu: bool = False


WRK_SCENARIOS = (
    WrkScenario("http_keepalive", "http keep-alive, 32 connections", 32, False, measure_cpu=True),
    WrkScenario("http_one_conn", "http keep-alive, 1 connection", 1, False),
    WrkScenario(
        "http_new_conn", "http, new connection per request", 32, False, ("Connection: close",)
    ),
    WrkScenario(
        "tcp_keepalive", "tcp route, keep-alive request/response, 32 connections", 32, True
    ),
)
BULK_SCENARIOS = (("bulk_http", False), ("bulk_tcp", True))


@dataclass(frozen=True)
class H2Scenario:
    key: str
    title: str
    connections: int
    streams: int  # h2load -m: requests in flight on each connection


# h2load at the h2c front end (prior knowledge); every run also measures the proxy's CPU.
H2_SCENARIOS = (
    H2Scenario("h2_m1", "h2c, 10 connections x 1 stream", 10, 1),
    H2Scenario("h2_m100", "h2c, 10 connections x 100 streams", 10, 100),
)
# gRPC unary calls in flight on one channel (one HTTP/2 connection): one at a time for the
# latency a proxy adds, ten for throughput (the grpcio servers are then the bottleneck).
GRPC_SCENARIOS = (("grpc_unary_x1", 1), ("grpc_unary_x10", 10))
GRPC_KEYS = tuple(key for key, _ in GRPC_SCENARIOS)
IDLE_H2_SCENARIO = "idle_h2_connections"


@dataclass
class Sample:
    values: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    round: int = 0  # the round it was taken in (0: before the rounds)


@dataclass
class Results:
    # scenario -> target -> one sample per round
    samples: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    round: int = 0  # the round now running; each sample added is stamped with it

    def add(self, scenario: str, target: str, sample: Sample) -> None:
        sample.round = self.round
        self.samples.setdefault(scenario, {}).setdefault(target, []).append(sample)


class Runner:
    def __init__(
        self,
        lab: Lab,
        script: Path,
        duration: int,
        rounds: int,
        progress: Callable[[str], None],
        *,
        h1: bool = True,
        h2: bool = False,
    ) -> None:
        self.h1 = h1
        self.h2 = h2
        self.lab = lab
        self.script = script
        self.duration = duration
        self.rounds = rounds
        self.progress = progress
        self.results = Results()
        self._reported_dead: set[str] = set()

    @property
    def proxies(self) -> list[Target]:
        return [t for t in self.lab.targets if t.process is not None]

    def run_all(self) -> Results:
        self.startup()
        self.memory("rss_idle_mib")
        if self.h1:
            self.idle_connections()
        if self.h2:
            self.idle_h2_connections()
        self.warm_up()
        for number in range(self.rounds):
            shift = number % len(self.lab.targets)
            order = self.lab.targets[shift:] + self.lab.targets[:shift]
            self.results.round = number + 1
            self.progress(f"round {number + 1}/{self.rounds}: {' '.join(t.name for t in order)}")
            if self.h1:
                for scenario in WRK_SCENARIOS:
                    for target in order:
                        self.wrk(scenario, target)
                for key, tcp in BULK_SCENARIOS:
                    for target in order:
                        self.bulk(key, tcp, target)
            if self.h2:
                for h2_scenario in H2_SCENARIOS:
                    for target in order:
                        self.h2load(h2_scenario, target)
                for key, concurrency in GRPC_SCENARIOS:
                    for target in order:
                        self.grpc(key, concurrency, target)
        self.results.round = 0
        self.memory("rss_after_mib")
        return self.results

    def startup(self) -> None:
        for target in self.proxies:
            if target.startup_s is not None:
                sample = Sample(values={"startup_ms": target.startup_s * 1000})
                self.results.add("startup", target.name, sample)

    def memory(self, metric: str) -> None:
        time.sleep(SETTLE_SECONDS)
        for target in self.proxies:
            if self._alive(target, "memory"):
                rss = rss_bytes(target.pids()) / MIB
                self.results.add("memory", target.name, Sample(values={metric: rss}))
                self.progress(f"  {metric:<16} {target.name:<9} {rss:8.1f} MiB")

    def idle_connections(self) -> None:
        for target in self.proxies:
            if not self._alive(target, "idle connections"):
                continue
            holder = IdleConnections(target.http_port, IDLE_CONNECTIONS)
            try:
                holder.open()
                opened = holder.opened
                time.sleep(SETTLE_SECONDS)
                rss = rss_bytes(target.pids()) / MIB if self._alive(target, "idle") else None
            finally:
                holder.close()
            sample = Sample(errors={"idle_failed": holder.failed} if holder.failed else {})
            if rss is not None:
                sample.values["rss_1k_idle_mib"] = rss
            sample.values["idle_opened"] = opened
            self.results.add("idle_connections", target.name, sample)
            line = f"  1k idle conns   {target.name:<9} {rss or 0:8.1f} MiB"
            line += f"  opened {opened}"
            if holder.failed:
                line += f", failed {holder.failed} (first: {holder.first_error})"
                self.results.notes.append(
                    f"{target.name}: {holder.failed} of {IDLE_CONNECTIONS} idle connections"
                    f" failed (first: {holder.first_error})"
                )
            self.progress(line)

    def idle_h2_connections(self) -> None:
        """As idle_connections, over HTTP/2: each connection made one GET / on stream 1."""
        for target in self.proxies:
            if target.h2_port is None or not self._alive(target, "idle HTTP/2 connections"):
                continue
            holder = IdleH2Connections(target.h2_port, IDLE_CONNECTIONS)
            # The baseline for KiB per connection: after the HTTP/1.1 idle connections (in
            # --suite all) the heap may hold their freed memory, reused here.
            before = rss_bytes(target.pids()) / MIB
            try:
                holder.open()
                opened = holder.opened
                time.sleep(SETTLE_SECONDS)
                rss = rss_bytes(target.pids()) / MIB if self._alive(target, "idle h2") else None
            finally:
                holder.close()
            sample = Sample(errors={"idle_failed": holder.failed} if holder.failed else {})
            if rss is not None:
                sample.values["rss_1k_idle_h2_mib"] = rss
                sample.values["rss_before_mib"] = before
            sample.values["idle_opened"] = opened
            self.results.add(IDLE_H2_SCENARIO, target.name, sample)
            line = f"  1k idle h2      {target.name:<9} {rss or 0:8.1f} MiB  opened {opened}"
            if holder.failed:
                line += f", failed {holder.failed} (first: {holder.first_error})"
                self.results.notes.append(
                    f"{target.name}: {holder.failed} of {IDLE_CONNECTIONS} idle HTTP/2"
                    f" connections failed (first: {holder.first_error})"
                )
            self.progress(line)

    def warm_up(self) -> None:
        """Fill connection pools and caches before anything is measured."""
        if self.h2:
            self._warm_up_h2()
        if not self.h1:
            return
        self.progress(f"warm-up: {WARMUP_SECONDS}s of wrk per proxy http route")
        for target in self.proxies:
            # Only http: a tcp route has no pool to fill.
            if self._alive(target, "warm-up"):
                try:
                    run_wrk(
                        self.lab.tools.wrk,
                        self.script,
                        target.http_port,
                        connections=32,
                        duration=WARMUP_SECONDS,
                    )
                except LoadError as e:
                    self.results.notes.append(f"{target.name}: warm-up failed: {e}")
        # Reads the bulk file once so every target is served from the page cache.
        direct = self.lab.target(DIRECT).http_port
        run_curl_bulk(self.lab.tools.curl, direct, self.lab.bulk_path, self.lab.bulk_bytes)

    def _warm_up_h2(self) -> None:
        self.progress(f"warm-up: {WARMUP_SECONDS}s of h2load -m100 per proxy h2c front end")
        assert self.lab.tools.h2load is not None
        for target in self.proxies:
            if target.h2_port is None or not self._alive(target, "h2 warm-up"):
                continue
            try:
                run_h2load(
                    self.lab.tools.h2load,
                    target.h2_host,
                    target.h2_port,
                    connections=10,
                    streams=100,
                    duration=WARMUP_SECONDS,
                    log_file=self.lab.tmp / "h2load-warmup.log",
                )
            except LoadError as e:
                self.results.notes.append(f"{target.name}: h2 warm-up failed: {e}")

    def h2load(self, scenario: H2Scenario, target: Target) -> None:
        if target.h2_port is None or not self._alive(target, scenario.key):
            return
        assert self.lab.tools.h2load is not None
        proxied = target.process is not None
        cpu_pids = target.pids() if proxied else self.lab.upstream_pids("h2")
        cpu_before = cpu_seconds(cpu_pids)
        try:
            result = run_h2load(
                self.lab.tools.h2load,
                target.h2_host,
                target.h2_port,
                connections=scenario.connections,
                streams=scenario.streams,
                duration=self.duration,
                log_file=self.lab.tmp / f"h2load-{scenario.key}-{target.name}.log",
            )
        except LoadError as e:
            self.results.add(scenario.key, target.name, Sample(errors={"h2load_failed": 1}))
            self.results.notes.append(f"{target.name} {scenario.key}: {e}")
            self.progress(f"  {scenario.key:<16} {target.name:<9} h2load failed: {e}")
            return
        sample = Sample(errors=dict(result.errors))
        if result.requests:
            sample.values.update(
                rps=result.rps,
                p50_us=result.p50_us,
                p99_us=result.p99_us,
                requests=result.requests,
            )
            if self._alive(target, scenario.key):
                used = cpu_seconds(cpu_pids) - cpu_before
                metric = "cpu_us_per_req" if proxied else "upstream_cpu_us_per_req"
                sample.values[metric] = used / result.requests * 1e6
        self.results.add(scenario.key, target.name, sample)
        self.progress(_h2_line(scenario.key, target.name, result, sample))

    def grpc(self, key: str, concurrency: int, target: Target) -> None:
        if target.grpc_port is None or not self._alive(target, key):
            return
        proxied = target.process is not None
        cpu_pids = target.pids() if proxied else self.lab.upstream_pids("grpc")
        cpu_before = cpu_seconds(cpu_pids)
        try:
            result = run_grpc_client(
                target.grpc_host,
                target.grpc_port,
                concurrency=concurrency,
                duration=self.duration,
                cwd=REPO,
            )
        except LoadError as e:
            self.results.add(key, target.name, Sample(errors={"grpc_client_failed": 1}))
            self.results.notes.append(f"{target.name} {key}: {e}")
            self.progress(f"  {key:<16} {target.name:<9} client failed: {e}")
            return
        sample = Sample(errors=dict(result.errors))
        if result.calls:
            sample.values.update(
                rps=result.rps, p50_us=result.p50_us, p99_us=result.p99_us, requests=result.calls
            )
            if self._alive(target, key):
                used = cpu_seconds(cpu_pids) - cpu_before
                metric = "cpu_us_per_req" if proxied else "upstream_cpu_us_per_req"
                sample.values[metric] = used / result.calls * 1e6
        self.results.add(key, target.name, sample)
        self.progress(_h2_line(key, target.name, result, sample))

    def wrk(self, scenario: WrkScenario, target: Target) -> None:
        port = target.tcp_port if scenario.tcp else target.http_port
        if port is None or not self._alive(target, scenario.key):
            return
        cpu_pids = target.pids() if target.process is not None else self._upstream_pids()
        cpu_before = cpu_seconds(cpu_pids) if scenario.measure_cpu else 0.0
        try:
            result = run_wrk(
                self.lab.tools.wrk,
                self.script,
                port,
                connections=scenario.connections,
                duration=self.duration,
                headers=scenario.headers,
            )
        except LoadError as e:
            self.results.add(scenario.key, target.name, Sample(errors={"wrk_failed": 1}))
            self.results.notes.append(f"{target.name} {scenario.key}: {e}")
            self.progress(f"  {scenario.key:<16} {target.name:<9} wrk failed: {e}")
            return
        sample = Sample(
            values={
                "rps": result.rps,
                "p50_us": result.p50_us,
                "p99_us": result.p99_us,
                "requests": result.requests,
            },
            errors={kind: n for kind, n in result.errors.items() if n},
        )
        if scenario.measure_cpu and result.requests and self._alive(target, scenario.key):
            used = cpu_seconds(cpu_pids) - cpu_before
            # Direct: the upstream's own cost, kept apart from the proxies' figure.
            metric = "cpu_us_per_req" if target.process is not None else "upstream_cpu_us_per_req"
            sample.values[metric] = used / result.requests * 1e6
        self.results.add(scenario.key, target.name, sample)
        self.progress(_wrk_line(scenario.key, target.name, result))

    def bulk(self, key: str, tcp: bool, target: Target) -> None:
        port = target.tcp_port if tcp else target.http_port
        if port is None or not self._alive(target, key):
            return
        try:
            result = run_curl_bulk(
                self.lab.tools.curl, port, self.lab.bulk_path, self.lab.bulk_bytes
            )
        except LoadError as e:
            self.results.add(key, target.name, Sample(errors={"curl_failed": 1}))
            self.results.notes.append(f"{target.name} {key}: {e}")
            return
        if result.error:
            self.results.add(key, target.name, Sample(errors={"bulk_failed": 1}))
            self.results.notes.append(f"{target.name} {key}: {result.error}")
            self.progress(f"  {key:<16} {target.name:<9} FAILED: {result.error}")
            return
        self.results.add(key, target.name, Sample(values={"mb_per_s": result.mb_per_s}))
        self.progress(f"  {key:<16} {target.name:<9} {result.mb_per_s:10.0f} MB/s")

    def _upstream_pids(self) -> list[int]:
        return self.lab.upstream.tree() if self.lab.upstream is not None else []

    def _alive(self, target: Target, what: str) -> bool:
        if target.process is None or target.process.alive:
            return True
        if target.name not in self._reported_dead:
            self._reported_dead.add(target.name)
            self.results.notes.append(
                f"{target.name} died (noticed before {what}); log tail:\n"
                f"{target.process.log_tail()}"
            )
            self.progress(f"  {target.name} is not running any more; skipping it")
        return False


def _wrk_line(key: str, name: str, result: RunResult) -> str:
    line = (
        f"  {key:<16} {name:<9} {result.rps:10.0f} req/s"
        f"  p50 {result.p50_us / 1000:7.2f} ms  p99 {result.p99_us / 1000:7.2f} ms"
    )
    if result.error_count:
        shown = ", ".join(f"{kind} {n}" for kind, n in result.errors.items() if n)
        line += f"  errors: {shown}"
    return line


def _h2_line(key: str, name: str, result: RunResult | GrpcResult, sample: Sample) -> str:
    line = (
        f"  {key:<16} {name:<9} {result.rps:10.0f} req/s"
        f"  p50 {result.p50_us / 1000:7.2f} ms  p99 {result.p99_us / 1000:7.2f} ms"
    )
    cpu = sample.values.get("cpu_us_per_req", sample.values.get("upstream_cpu_us_per_req"))
    if cpu is not None:
        line += f"  cpu {cpu:5.1f} µs/req"
    if result.errors:
        shown = ", ".join(f"{kind} {n}" for kind, n in result.errors.items() if n)
        line += f"  errors: {shown}"
    return line
