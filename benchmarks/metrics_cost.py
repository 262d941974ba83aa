"""``python -m benchmarks.metrics_cost``: what sidelink's per-request metrics cost.

Scenario 1 of the main benchmark (http keep-alive, ``wrk -t1 -c32`` on the http route,
the same nginx upstream, DNS name and sidelink config) through two sidelink processes
side by side: one as shipped, and one started with ``SIDELINK_BENCH_NO_METRICS=1``
(see ``proxy/metrics.py``: a benchmark-only switch that turns the per-request metric
work -- the request and connect duration histograms, the per-method/status and gRPC
status counts -- into no-ops). Every round runs both, the order alternating, and the
ratio is taken within each round, so both sides of it saw the same neighbours.

It prints, for each, req/s and sidelink's CPU per request (utime + stime from
``/proc/PID/stat`` around each wrk run, ÷ requests), the within-round ratios, and the
cost: ``1 - (req/s with metrics ÷ req/s without)``. The issue's target: at most 10% of
the rate. Afterwards both processes' ``/metrics`` are read: the switched-off one must
have counted no request and the other every one, or the run fails (exit 1).

Each round also runs ``benchmarks.inprocess`` (sidelink's own µs per request, no sockets)
once each way: the steadier figure on a shared machine, since what other work does to the
rate (and, less, to the CPU per request) barely reaches it; its best of the rounds, each
way, is what the metric work costs in sidelink's own code. A benchmark, not a test: no
figure passes or fails.

    .venv/bin/python -m benchmarks.metrics_cost                   # 6 rounds of 5 s: ~75 s
    .venv/bin/python -m benchmarks.metrics_cost --rounds 10 --duration 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import configs
from benchmarks.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, progress
from benchmarks.diagnose import SAMPLE_LINE
from benchmarks.load import LoadError, run_wrk, write_wrk_script
from benchmarks.procs import (
    BenchError,
    Process,
    answers_200,
    cpu_seconds,
    free_ports,
    http_get,
    load_average,
    machine_cpu_seconds,
    own_cpu_seconds,
    raise_nofile_limit,
    wait_until,
)
from benchmarks.scenarios import WARMUP_SECONDS, WRK_SCENARIOS
from benchmarks.servers import DNS_TTL, REPO, START_TIMEOUT, Lab
from benchmarks.tools import INSTALL_HINT, find_tools, git_revision, machine, versions
from proxy.dnsserver import ThreadedDnsServer

SWITCH = "SIDELINK_BENCH_NO_METRICS"
# The main benchmark's scenario 1: its connection count, and its default duration.
SCENARIO = next(s for s in WRK_SCENARIOS if s.key == "http_keepalive")
DEFAULT_ROUNDS = 6
DEFAULT_DURATION = 5
# benchmarks.inprocess: the best of this many batches of this many requests, each way, per
# round (the fastest batch is the one other work on the machine disturbed least).
INPROCESS_REQUESTS = 20_000
INPROCESS_BATCHES = 15
INPROCESS_TIMEOUT = 120.0
INPROCESS_LINE = re.compile(r"^best of \d+ batches of \d+: (\d+(?:\.\d+)?) µs", re.MULTILINE)
TARGET_COST = 0.10  # the issue's: metrics cost at most 10% of the rate
ON, OFF = "metrics on", "metrics off"
OUT = Path(__file__).resolve().parent / "out"


@dataclass
class Sidelink:
    name: str
    process: Process
    http_port: int
    admin_port: int


@dataclass(frozen=True)
class Run:
    rps: float
    cpu_us: float
    requests: int


def start_sidelink(
    lab: Lab, dns_port: int, upstream_port: int, name: str, metrics: bool
) -> Sidelink:
    """One sidelink with the main benchmark's config; ``metrics=False`` sets the switch.
    Either way the environment is set explicitly, so an exported switch cannot leak in."""
    http_port, tcp_port, admin_port = free_ports(3)
    slug = "on" if metrics else "off"
    path = lab.tmp / f"sidelink-{slug}.yaml"
    path.write_text(configs.sidelink(dns_port, upstream_port, http_port, tcp_port))
    env = environment(metrics)
    argv = [sys.executable, "-m", "proxy", "run", "-c", str(path)]
    argv += ["--admin", f"127.0.0.1:{admin_port}", "--log-level", "warning"]
    process = Process(f"sidelink-{slug}", argv, lab.tmp / f"sidelink-{slug}.log", REPO, env)
    process.start()
    try:
        what = f"sidelink ({name}) /readyz 200"
        wait_until(answers_200(admin_port, "/readyz"), START_TIMEOUT, what, process)
        what = f"sidelink ({name}) 127.0.0.1:{http_port} answering 200"
        wait_until(answers_200(http_port), START_TIMEOUT, what, process)
    except BenchError:
        process.stop()
        raise
    return Sidelink(name, process, http_port, admin_port)


def environment(metrics: bool) -> dict[str, str]:
    """This process's environment with the switch set (``metrics=False``) or surely unset."""
    env = {k: v for k, v in os.environ.items() if k != SWITCH}
    if not metrics:
        env[SWITCH] = "1"
    return env


def inprocess(metrics: bool) -> float:
    """``benchmarks.inprocess``: sidelink's own µs per HTTP request, metrics on or off."""
    argv = [sys.executable, "-m", "benchmarks.inprocess", "--requests", str(INPROCESS_REQUESTS)]
    argv += ["--batches", str(INPROCESS_BATCHES)]
    try:
        done = subprocess.run(
            argv,
            cwd=REPO,
            env=environment(metrics),
            capture_output=True,
            text=True,
            check=False,
            timeout=INPROCESS_TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{' '.join(argv)} did not finish") from e
    match = INPROCESS_LINE.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise BenchError(f"{' '.join(argv)} failed (exit {done.returncode}):\n{done.stderr}")
    return float(match.group(1))


def measure(
    wrk: str, script: Path, targets: list[Sidelink], rounds: int, duration: int
) -> tuple[dict[str, list[Run]], dict[str, list[float]]]:
    """Per target, one wrk run and one in-process run per round; the order alternates
    (on off, off on, ...)."""
    for target in targets:
        run_wrk(
            wrk, script, target.http_port, connections=SCENARIO.connections, duration=WARMUP_SECONDS
        )
    samples: dict[str, list[Run]] = {t.name: [] for t in targets}
    own: dict[str, list[float]] = {t.name: [] for t in targets}
    for number in range(rounds):
        shift = number % len(targets)
        order = targets[shift:] + targets[:shift]
        for target in order:
            if not target.process.alive:
                raise BenchError(f"sidelink ({target.name}) died:\n{target.process.log_tail()}")
            pids = target.process.tree()
            before = cpu_seconds(pids)
            result = run_wrk(
                wrk,
                script,
                target.http_port,
                connections=SCENARIO.connections,
                duration=duration,
                headers=SCENARIO.headers,
            )
            used = cpu_seconds(pids) - before
            if result.error_count:
                raise BenchError(f"sidelink ({target.name}): wrk saw errors: {result.errors}")
            cpu_us = used / result.requests * 1e6 if result.requests else 0.0
            samples[target.name].append(Run(result.rps, cpu_us, result.requests))
            progress(
                f"  round {number + 1} {target.name:<11} {result.rps:9,.0f} req/s"
                f"  {cpu_us:5.1f} µs CPU per request  (load {load_average():.2f})"
            )
        for target in order:
            us = inprocess(target.name == ON)
            own[target.name].append(us)
            progress(f"  round {number + 1} {target.name:<11} in-process {us:6.2f} µs/request")
    return samples, own


def counted(admin_port: int) -> dict[str, float]:
    """sidelink's own count of the requests and their timings, summed over labels."""
    answer = http_get(admin_port, "/metrics", timeout=5.0)
    if answer is None or answer[0] != 200:
        raise BenchError(f"/metrics on 127.0.0.1:{admin_port} did not answer 200")
    totals = dict.fromkeys(
        ("sidelink_requests_total", "sidelink_request_duration_seconds_count"), 0.0
    )
    for line in answer[1].decode(errors="replace").splitlines():
        match = SAMPLE_LINE.match(line)
        if match is not None and match.group(1) in totals:
            totals[match.group(1)] += float(match.group(3))
    return totals


def check_switch(targets: list[Sidelink], samples: dict[str, list[Run]]) -> list[str]:
    """The switch switched: the off process counted nothing, the on one at least every
    measured request (plus warm-up and readiness requests). Returns lines for the report."""
    lines = []
    for target in targets:
        totals = counted(target.admin_port)
        measured = sum(run.requests for run in samples[target.name])
        requests = totals["sidelink_requests_total"]
        timed = totals["sidelink_request_duration_seconds_count"]
        lines.append(
            f"{target.name}: sidelink_requests_total {requests:,.0f},"
            f" sidelink_request_duration_seconds_count {timed:,.0f}"
            f" (wrk counted {measured:,} in the measured runs)"
        )
        if target.name == OFF and (requests or timed):
            raise BenchError(f"{SWITCH}=1 did not switch the metrics off: {lines[-1]}")
        if target.name == ON and min(requests, timed) < measured:
            raise BenchError(f"sidelink with metrics counted fewer requests: {lines[-1]}")
    return lines


def summary(samples: dict[str, list[Run]], own: dict[str, list[float]]) -> dict[str, Any]:
    on, off = samples[ON], samples[OFF]
    rate_ratios = [a.rps / b.rps for a, b in zip(on, off, strict=True)]
    cpu_ratios = [a.cpu_us / b.cpu_us for a, b in zip(on, off, strict=True) if b.cpu_us]
    return {
        "rps": {name: [run.rps for run in runs] for name, runs in samples.items()},
        "cpu_us_per_req": {name: [run.cpu_us for run in runs] for name, runs in samples.items()},
        "rate_ratio_on_off": rate_ratios,
        "cpu_ratio_on_off": cpu_ratios,
        "cost": 1 - statistics.median(rate_ratios),
        "inprocess_us_per_req": own,
        "inprocess_best_on_off": min(own[ON]) / min(own[OFF]),
    }


def table(samples: dict[str, list[Run]], figures: dict[str, Any]) -> str:
    def spread(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    rate, cpu = figures["rate_ratio_on_off"], figures["cpu_ratio_on_off"]
    lines = [
        "| sidelink | req/s ↑ median (min-max) | CPU µs/request ↓ median (min-max) |",
        "|---|---|---|",
    ]
    for name in samples:
        lines.append(
            f"| {name} | {spread(figures['rps'][name], ',.0f')}"
            f" | {spread(figures['cpu_us_per_req'][name], '.1f')} |"
        )
    lines.append(
        f"| on ÷ off, within each round | {spread(rate, '.3f')}x | {spread(cpu, '.3f')}x |"
    )
    own = figures["inprocess_us_per_req"]
    lines += [
        "",
        "| `benchmarks.inprocess` (no sockets), best batch | µs/request ↓ best of rounds"
        " | median (min-max) |",
        "|---|---|---|",
        *(f"| {name} | {min(own[name]):.2f} | {spread(own[name], '.2f')} |" for name in (ON, OFF)),
        f"| on ÷ off (best of each) | {figures['inprocess_best_on_off']:.3f}x | |",
    ]
    cost = figures["cost"]
    verdict = "within" if cost <= TARGET_COST else "over"
    lines += [
        "",
        f"Cost of the metrics: {cost:.1%} of the rate (1 - median on÷off; per round"
        f" {1 - max(rate):.1%} to {1 - min(rate):.1%}), {verdict} the target of"
        f" ≤ {TARGET_COST:.0%}; CPU per request {statistics.median(cpu) - 1:+.1%} (median"
        f" on÷off); sidelink's own work per request in-process"
        f" {figures['inprocess_best_on_off'] - 1:+.1%} (best of each).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.rounds < 1 or args.duration < 1:
        print("--rounds and --duration must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    tools, missing = find_tools(need_haproxy=False, h2=False)
    if tools is None or tools.wrk is None:
        print(f"missing tool(s): {', '.join(missing)}; install with: {INSTALL_HINT}")
        return EXIT_USAGE
    nofile = raise_nofile_limit()
    tmp = Path(tempfile.mkdtemp(prefix="sidelink-metrics-cost-"))
    lab = Lab(tools, tmp, (), 1024 * 1024, nofile)  # the nginx upstream only
    targets: list[Sidelink] = []
    started = datetime.now(UTC)
    load_at_start = load_average()
    busy_before, _ = machine_cpu_seconds()
    own_before = own_cpu_seconds()
    clock = time.monotonic()
    try:
        lab.start()
        upstream_port = lab.target("direct").http_port
        lab.dns = dns = ThreadedDnsServer()  # lab.stop() stops it
        dns.start()
        dns.set_a(f"{configs.DNS_SERVICE}.{configs.DNS_DOMAIN}", ["127.0.0.1"], ttl=DNS_TTL)
        for name, metrics in ((ON, True), (OFF, False)):
            targets.append(start_sidelink(lab, dns.port, upstream_port, name, metrics))
        progress(
            f"metrics cost: {args.rounds} round(s) of {args.duration}s, wrk -t1"
            f" -c{SCENARIO.connections} keep-alive on the http route; {OFF}: {SWITCH}=1"
        )
        samples, own = measure(
            tools.wrk, write_wrk_script(tmp), targets, args.rounds, args.duration
        )
        checks = check_switch(targets, samples)
    except (BenchError, LoadError) as e:
        print(f"metrics cost benchmark failed: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for target in targets:
            target.process.stop()
        lab.stop()
        if args.keep_tmp:
            progress(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - clock
    busy_after, _ = machine_cpu_seconds()
    other = max((busy_after - busy_before) - (own_cpu_seconds() - own_before), 0.0) / elapsed
    load_at_end = load_average()
    figures = summary(samples, own)
    m = machine()
    command = " ".join(["python -m benchmarks.metrics_cost", *argv])
    document = "\n".join(
        [
            "# sidelink: the cost of its metrics",
            "",
            f"- date: {started:%Y-%m-%d %H:%M UTC}; command: `{command}`; took {elapsed:.0f}s",
            f"- machine: {m['cpu']}, {m['cores']} cores, {m['kernel']}, {m['python']};"
            f" sidelink revision {git_revision(REPO)}",
            f"- method: {args.rounds} round(s), each one {args.duration}s wrk run per sidelink"
            f" (-t1 -c{SCENARIO.connections}, keep-alive, the http route) and one"
            f" `benchmarks.inprocess --requests {INPROCESS_REQUESTS} --batches"
            f" {INPROCESS_BATCHES}` (its best batch) each way, order"
            f" alternating; {OFF} = `{SWITCH}=1`",
            f"- machine load: load average {load_at_start:.2f} at the start, {load_at_end:.2f}"
            f" at the end; other work during the run {other:.2f} of {m['cores']} cores",
            "",
            table(samples, figures),
            "",
            "sidelink's own count afterwards (the switch switched):",
            "",
            *(f"- {line}" for line in checks),
            "",
        ]
    )
    print()
    print(document)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics_cost.md").write_text(document)
    payload = {
        "date": f"{started:%Y-%m-%d %H:%M UTC}",
        "command": command,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "machine": m,
        "versions": versions(tools),
        "revision": git_revision(REPO),
        "load_average": {"start": load_at_start, "end": load_at_end},
        "other_work_cores": round(other, 2),
        **figures,
        "checks": checks,
    }
    (out / "metrics_cost.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    progress(f"wrote {out / 'metrics_cost.md'} and {out / 'metrics_cost.json'}")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.metrics_cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help=f"rounds (default {DEFAULT_ROUNDS})"
    )
    parser.add_argument(
        "--duration",
        type=int,
        default=DEFAULT_DURATION,
        help=f"seconds per wrk run (default {DEFAULT_DURATION})",
    )
    parser.add_argument("--out", default=str(OUT), help="output folder (default benchmarks/out)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    return parser


if __name__ == "__main__":
    sys.exit(main())
