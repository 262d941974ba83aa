"""``python -m benchmarks.floor``: what a new connection per request costs at the bottom.

Scenario 3 of the main benchmark (``wrk -t1 -c32 -H "Connection: close"``) against
sidelink and HAProxy, and in the same interleaved rounds against two bare uvloop
servers that show where the floor of an asyncio-Protocol process is:

- **close**: answers every request with a fixed 100-byte response and
  ``connection: close``, then closes. No proxying: uvloop's accept, one read, one
  write and the close, and nothing else.
- **forward**: accepts, writes a fixed request to a pooled keep-alive connection to
  the same nginx upstream, relays the response (``Connection: close``) and closes.
  A proxy with none of sidelink's work: no parser, no header rewrite, no metrics.

For each target it prints req/s and the proxy's CPU per connection (utime + stime
from ``/proc/PID/stat`` around each wrk run, ÷ connections served), and both as
ratios to HAProxy's figure in the same round. CPU per connection is the steadier
figure on a shared machine. A benchmark, not a test: nothing passes or fails.

    .venv/bin/python -m benchmarks.floor                   # 5 rounds of 4 s
    .venv/bin/python -m benchmarks.floor --rounds 9 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop

from benchmarks import configs
from benchmarks.cli import progress
from benchmarks.load import LoadError, run_wrk, write_wrk_script
from benchmarks.procs import (
    BenchError,
    Process,
    answers_200,
    cpu_seconds,
    free_ports,
    load_average,
    machine_cpu_seconds,
    own_cpu_seconds,
    raise_nofile_limit,
    wait_until,
)
from benchmarks.servers import REPO, START_TIMEOUT, Lab, Target
from benchmarks.tools import INSTALL_HINT, find_tools

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

CONNECTIONS = 32
HEADERS = ("Connection: close",)
WARMUP_SECONDS = 1
FLOORS = ("close", "forward")
BODY = configs.SMALL_BODY.encode()
ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
    b"connection: close\r\n\r\n%s" % (len(BODY), BODY)
)
UPSTREAM_REQUEST = b"GET / HTTP/1.1\r\nhost: bench-upstream\r\n\r\n"
END_OF_HEAD = b"\r\n\r\n"


# --- the bare servers (run as child processes: python -m benchmarks.floor serve ...) --------


class CloseServer(asyncio.Protocol):
    """Answer the first complete request head, then close."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if END_OF_HEAD in data and self.transport is not None:
            self.transport.write(ANSWER)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to the upstream; idle ones wait in ``pool``."""

    def __init__(self, pool: list[UpstreamConnection]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: asyncio.Transport | None = None
        self.buffer = b""
        self.expected = -1  # bytes of the whole response, once its head has arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, client: asyncio.Transport) -> None:
        self.client = client
        assert self.transport is not None
        self.transport.write(UPSTREAM_REQUEST)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        if self.expected < 0:
            end = buffer.find(END_OF_HEAD)
            if end < 0:
                self.buffer = buffer
                return
            length = 0
            for line in buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.expected = end + len(END_OF_HEAD) + length
        if len(buffer) < self.expected:
            self.buffer = buffer
            return
        self.buffer, self.expected = b"", -1
        client, self.client = self.client, None
        self.pool.append(self)
        if client is not None:
            client.write(buffer.replace(b"Connection: keep-alive", b"Connection: close", 1))
            client.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.close()


class ForwardServer(asyncio.Protocol):
    """Send a fixed request over a pooled upstream connection; the relay closes us."""

    def __init__(self, pool: list[UpstreamConnection], upstream_port: int) -> None:
        self.pool = pool
        self.upstream_port = upstream_port
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if END_OF_HEAD not in data or self.transport is None:
            return
        if self.pool:
            self.pool.pop().send(self.transport)
        else:
            asyncio.get_running_loop().create_task(self._connect(self.transport))

    async def _connect(self, client: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(
            lambda: UpstreamConnection(self.pool), "127.0.0.1", self.upstream_port
        )
        upstream.send(client)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(kind: str, port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    pool: list[UpstreamConnection] = []
    if kind == "close":
        await loop.create_server(CloseServer, "127.0.0.1", port, backlog=1024)
    else:
        await loop.create_server(
            lambda: ForwardServer(pool, upstream_port), "127.0.0.1", port, backlog=1024
        )
    gc.collect()
    gc.freeze()  # as sidelink does after its start-up
    await asyncio.Event().wait()


def run_server(kind: str, port: int, upstream_port: int) -> int:
    uvloop.run(serve(kind, port, upstream_port))
    return EXIT_OK


# --- the measurement -----------------------------------------------------------------------


def start_floor(lab: Lab, kind: str, upstream_port: int) -> tuple[Target, Process]:
    (port,) = free_ports(1)
    argv = [sys.executable, "-m", "benchmarks.floor", "serve", kind, str(port), str(upstream_port)]
    process = Process(f"floor-{kind}", argv, lab.tmp / f"floor-{kind}.log", cwd=REPO)
    process.start()
    try:
        wait_until(answers_200(port), START_TIMEOUT, f"the bare {kind} server", process)
    except BenchError:
        process.stop()
        raise
    return Target(f"bare {kind}", port, None, process), process


def measure(
    wrk: str, script: Path, targets: list[Target], rounds: int, duration: int
) -> dict[str, list[tuple[float, float]]]:
    """Per target, one (req/s, CPU µs per connection) per round, in rotating order."""
    for target in targets:
        run_wrk(wrk, script, target.http_port, connections=CONNECTIONS, duration=WARMUP_SECONDS)
        run_wrk(
            wrk,
            script,
            target.http_port,
            connections=CONNECTIONS,
            duration=WARMUP_SECONDS,
            headers=HEADERS,
        )
    samples: dict[str, list[tuple[float, float]]] = {t.name: [] for t in targets}
    for number in range(rounds):
        shift = number % len(targets)
        for target in targets[shift:] + targets[:shift]:
            pids = target.pids()
            before = cpu_seconds(pids)
            result = run_wrk(
                wrk,
                script,
                target.http_port,
                connections=CONNECTIONS,
                duration=duration,
                headers=HEADERS,
            )
            used = cpu_seconds(pids) - before
            if result.error_count:
                raise BenchError(f"{target.name}: wrk saw errors: {result.errors}")
            cpu_us = used / result.requests * 1e6 if result.requests else 0.0
            samples[target.name].append((result.rps, cpu_us))
            progress(
                f"  round {number + 1} {target.name:<12} {result.rps:9,.0f} req/s"
                f"  {cpu_us:5.1f} µs CPU per connection"
            )
    return samples


def table(samples: dict[str, list[tuple[float, float]]], reference: str) -> str:
    ref = samples.get(reference)
    lines = [
        f"| target | req/s ↑ (median, min-max) | ÷ {reference} | CPU µs/connection ↓ "
        f"| ÷ {reference} |",
        "|---|---|---|---|---|",
    ]
    for name, rows in samples.items():
        rps = [r for r, _ in rows]
        cpu = [c for _, c in rows]
        ratio = cpu_ratio = "—"
        if ref is not None and name != reference:
            # Ratios within each round: both sides saw the same neighbours.
            ratio = (
                f"{statistics.median(r / x for (r, _), (x, _) in zip(rows, ref, strict=True)):.2f}x"
            )
            cpu_ratio = (
                f"{statistics.median(c / y for (_, c), (_, y) in zip(rows, ref, strict=True)):.2f}x"
            )
        lines.append(
            f"| {name} | {statistics.median(rps):,.0f} ({min(rps):,.0f}-{max(rps):,.0f}) "
            f"| {ratio} | {statistics.median(cpu):.1f} ({min(cpu):.1f}-{max(cpu):.1f}) "
            f"| {cpu_ratio} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        kind, port, upstream_port = argv[1], int(argv[2]), int(argv[3])
        return run_server(kind, port, upstream_port)
    args = _parser().parse_args(argv)
    proxies = tuple(p for p in ("sidelink", "haproxy") if p in args.proxies.split(","))
    if not proxies or set(args.proxies.split(",")) - {"sidelink", "haproxy"}:
        print("--proxies: choose from sidelink,haproxy", file=sys.stderr)
        return EXIT_USAGE
    if args.rounds < 1 or args.duration < 1:
        print("--rounds and --duration must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    tools, missing = find_tools(need_haproxy="haproxy" in proxies)
    if tools is None:
        print(f"missing tool(s): {', '.join(missing)}; install with: {INSTALL_HINT}")
        return EXIT_USAGE
    nofile = raise_nofile_limit()
    tmp = Path(tempfile.mkdtemp(prefix="sidelink-floor-"))
    lab = Lab(tools, tmp, proxies, 1024 * 1024, nofile)
    floors: list[Process] = []
    load_at_start = load_average()
    busy_before, _ = machine_cpu_seconds()
    own_before = own_cpu_seconds()
    clock = time.monotonic()
    try:
        lab.start()
        if lab.failed:
            for name, why in lab.failed.items():
                print(f"{name} failed to start: {why}", file=sys.stderr)
            return EXIT_FAILURE
        upstream_port = lab.target("direct").http_port
        targets = [t for t in lab.targets if t.process is not None]
        for kind in FLOORS:
            target, process = start_floor(lab, kind, upstream_port)
            floors.append(process)
            targets.append(target)
        progress(
            f"floor: {args.rounds} round(s) of {args.duration}s, wrk -t1 -c{CONNECTIONS}"
            f' -H "Connection: close"; targets: {", ".join(t.name for t in targets)}'
        )
        samples = measure(tools.wrk, write_wrk_script(tmp), targets, args.rounds, args.duration)
    except (BenchError, LoadError) as e:
        print(f"floor benchmark failed: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for process in floors:
            process.stop()
        lab.stop()
        if args.keep_tmp:
            progress(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - clock
    busy_after, _ = machine_cpu_seconds()
    other = (busy_after - busy_before) - (own_cpu_seconds() - own_before)
    reference = "haproxy" if "haproxy" in proxies else targets[0].name
    print()
    print(table(samples, reference))
    print()
    print(
        f"load average {load_at_start:.2f} at the start; other work during the run: "
        f"{max(other, 0.0) / elapsed:.2f} cores (the proxies' own CPU is not in it)"
    )
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.floor", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (default 4)")
    parser.add_argument("--proxies", default="sidelink,haproxy", help="subset of sidelink,haproxy")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    return parser


if __name__ == "__main__":
    sys.exit(main())
