"""``python -m benchmarks.soak``: sidelink under steady load for minutes while its pods churn.

sidelink (``python -m proxy run``) in front of three replica servers on 127.0.0.2-4,
found through the in-process DNS server (``proxy.dnsserver.ThreadedDnsServer``) by a
search-list name. Every ``--rotate`` seconds one replica is replaced the way a rollout
does it: a new one starts on the next free loopback address, DNS swaps the old address
for the new one, and the old replica is stopped two TTLs later, once sidelink has drained
it. Meanwhile a steady load runs: wrk (``-t1 -c16``, as fast as it goes) when it is
installed and no ``--rps`` is given, else an asyncio client pacing ``--rps`` requests a
second over 16 keep-alive connections. Every ``--sample`` seconds sidelink's RSS, open
fds and request counters are read (``/proc/PID``, ``/metrics``); at the end a table
and one summary line. A benchmark, not a test: nothing passes or fails on a number.

    .venv/bin/python -m benchmarks.soak                    # 10 minutes, wrk
    .venv/bin/python -m benchmarks.soak --minutes 2 --rps 2000
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.cli import progress
from benchmarks.load import LoadError, RunResult, read_answer, run_wrk, write_wrk_script
from benchmarks.procs import (
    BenchError,
    Process,
    free_ports,
    http_get,
    raise_nofile_limit,
    rss_bytes,
    wait_until,
)
from benchmarks.servers import REPO, START_TIMEOUT
from benchmarks.tools import which
from proxy.dnsserver import ThreadedDnsServer

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DOMAIN = "soak.svc.cluster.local"
SERVICE = "soak-upstream"
DNS_TTL = 2  # seconds: a swap reaches sidelink within a TTL (it refreshes ahead of expiry)
REPLICAS = 3
# Loopback "pod IPs" a replica may take, in turn (127.0.0.2-4 first).
ADDRESSES = tuple(f"127.0.0.{n}" for n in range(2, 42))
CONNECTIONS = 16
MIB = 1024 * 1024
END_OF_HEAD = b"\r\n\r\n"


# --- a replica (run as a child process: python -m benchmarks.soak replica HOST PORT) ---------


class Replica(asyncio.Protocol):
    """Answers every request head with a small keep-alive 200 naming its address."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        heads = self.buffer.count(END_OF_HEAD)
        if heads and self.transport is not None:
            self.buffer = self.buffer[self.buffer.rindex(END_OF_HEAD) + 4 :]
            self.transport.write(self.answer * heads)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def run_replica(host: str, port: int) -> int:
    body = f"replica {host}\n".encode()
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Replica(answer), host, port, reuse_address=True, backlog=1024
        )
        async with server:
            await server.serve_forever()

    uvloop.run(serve())
    return EXIT_OK


# --- the lab ---------------------------------------------------------------------------------


def answers(host: str, port: int) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def sidelink_config(dns_port: int, listen_port: int, replica_port: int) -> str:
    return (
        "resolver:\n"
        f'  nameservers: ["127.0.0.1:{dns_port}"]\n'
        f"  search: [{DOMAIN}]\n"
        "  ndots: 5\n"
        "  min_ttl: 1s\n"
        "logging:\n"
        "  level: warning\n"
        "shutdown:\n"
        "  drain_delay: 0s\n"
        "  drain_timeout: 2s\n"
        "routes:\n"
        "  - name: soak\n"
        f'    listen: "127.0.0.1:{listen_port}"\n'
        f"    service: {SERVICE}\n"
        f"    port: {replica_port}\n"
        "    protocol: http\n"
    )


@dataclass
class Sample:
    elapsed: float
    rss: int
    fds: int
    requests: float  # sidelink_requests_total, every code
    failed: float  # of those, not 2xx
    upstream_errors: float
    endpoints: float


@dataclass
class Soak:
    tmp: Path
    port: int = 0  # the replicas' common port
    dns: ThreadedDnsServer | None = None
    sidelink: Process | None = None
    listen_port: int = 0
    admin_port: int = 0
    replicas: dict[str, Process] = field(default_factory=dict)  # address -> process
    retiring: list[tuple[float, Process]] = field(default_factory=list)  # stop at, process
    replaced: int = 0
    _next: int = 0

    @property
    def name(self) -> str:
        return f"{SERVICE}.{DOMAIN}"

    def start(self) -> None:
        self.port, self.listen_port, self.admin_port = free_ports(3)
        for _ in range(REPLICAS):
            self._start_replica(self._next_address())
        self.dns = ThreadedDnsServer()
        self.dns.start()
        self.dns.set_a(self.name, list(self.replicas), ttl=DNS_TTL)
        path = self.tmp / "sidelink.yaml"
        path.write_text(sidelink_config(self.dns.port, self.listen_port, self.port))
        argv = [sys.executable, "-m", "proxy", "run", "-c", str(path)]
        argv += ["--admin", f"127.0.0.1:{self.admin_port}"]
        self.sidelink = Process("sidelink", argv, self.tmp / "sidelink.log", cwd=REPO)
        self.sidelink.start()
        wait_until(
            lambda: (http_get(self.admin_port, "/readyz") or (0,))[0] == 200,
            START_TIMEOUT,
            "sidelink /readyz 200",
            self.sidelink,
        )
        wait_until(
            lambda: (http_get(self.listen_port) or (0,))[0] == 200,
            START_TIMEOUT,
            "a request through sidelink",
            self.sidelink,
        )

    def stop(self) -> None:
        if self.sidelink is not None:
            self.sidelink.stop()
        for process in [*self.replicas.values(), *(p for _, p in self.retiring)]:
            process.stop()
        self.replicas.clear()
        self.retiring.clear()
        if self.dns is not None:
            self.dns.stop()
            self.dns = None

    def _next_address(self) -> str:
        for _ in ADDRESSES:
            address = ADDRESSES[self._next % len(ADDRESSES)]
            self._next += 1
            busy = {p.name.split()[-1] for _, p in self.retiring}
            if address not in self.replicas and address not in busy:
                return address
        raise BenchError("no free loopback address for a new replica")

    def _start_replica(self, address: str) -> None:
        argv = [sys.executable, "-m", "benchmarks.soak", "replica", address, str(self.port)]
        log = self.tmp / f"replica-{address}.log"
        process = Process(f"replica {address}", argv, log, cwd=REPO)
        process.start()
        wait_until(
            lambda: answers(address, self.port), START_TIMEOUT, f"replica {address}", process
        )
        self.replicas[address] = process

    def rotate(self, now: float) -> str:
        """A rollout step: the oldest replica out of DNS (stopped later), a new one in."""
        assert self.dns is not None
        new = self._next_address()
        self._start_replica(new)
        old = next(iter(self.replicas))
        self.retiring.append((now + 2 * DNS_TTL + 2, self.replicas.pop(old)))
        self.dns.set_a(self.name, list(self.replicas), ttl=DNS_TTL)
        self.replaced += 1
        return f"{old} -> {new}"

    def retire(self, now: float) -> None:
        for item in [r for r in self.retiring if r[0] <= now]:
            item[1].stop()
            self.retiring.remove(item)

    def sample(self, elapsed: float) -> Sample:
        assert self.sidelink is not None
        pid = self.sidelink.pid
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        got = http_get(self.admin_port, "/metrics")
        if got is None or got[0] != 200:
            raise BenchError(f"sidelink /metrics did not answer:\n{self.sidelink.log_tail()}")
        requests = failed = errors = endpoints = 0.0
        for family in text_string_to_metric_families(got[1].decode()):
            for s in family.samples:
                if s.name == "sidelink_requests_total":
                    requests += s.value
                    if not s.labels.get("code", "").startswith("2"):
                        failed += s.value
                elif s.name == "sidelink_upstream_errors_total":
                    errors += s.value
                elif s.name == "sidelink_dns_endpoints":
                    endpoints += s.value
        return Sample(elapsed, rss_bytes([pid]), fds, requests, failed, errors, endpoints)


# --- load ------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    first_error: str = ""
    how: str = ""


class PacedClient:
    """``rps`` GETs a second in all over CONNECTIONS keep-alive connections, each on its own
    schedule; a failed request counts as an error and its connection is made anew."""

    def __init__(self, port: int, rps: int, seconds: float) -> None:
        self.port = port
        self.interval = CONNECTIONS / rps
        self.seconds = seconds
        self.result = LoadResult(how=f"asyncio client, {rps} req/s over {CONNECTIONS} connections")

    def run(self) -> None:
        asyncio.run(self._all())

    async def _all(self) -> None:
        end = time.monotonic() + self.seconds
        await asyncio.gather(*(self._one(end, i / CONNECTIONS) for i in range(CONNECTIONS)))

    async def _one(self, end: float, phase: float) -> None:
        request = b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n"
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        due = time.monotonic() + phase * self.interval
        while due < end:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            due += self.interval
            try:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", self.port)
                reader, writer = conn
                writer.write(request)
                async with asyncio.timeout(5):
                    status = await read_answer(reader)
                if status != 200:
                    raise ValueError(f"status {status}")
                self.result.requests += 1
            except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as e:
                self.result.errors += 1
                self.result.first_error = self.result.first_error or repr(e)
                if conn is not None:
                    conn[1].transport.abort()
                conn = None
        if conn is not None:
            conn[1].close()


def start_load(
    wrk: str | None, tmp: Path, port: int, rps: int, seconds: float
) -> tuple[threading.Thread, Callable[[], LoadResult]]:
    """The load in a thread of its own: (thread, a function giving its result when done)."""
    if wrk is not None and rps == 0:
        box: dict[str, RunResult | Exception] = {}
        script = write_wrk_script(tmp)

        def run() -> None:
            try:
                box["result"] = run_wrk(
                    wrk, script, port, connections=CONNECTIONS, duration=int(seconds)
                )
            except LoadError as e:
                box["result"] = e

        def result() -> LoadResult:
            got = box.get("result")
            if not isinstance(got, RunResult):
                raise BenchError(f"wrk failed: {got}")
            errors = ", ".join(f"{k} {v}" for k, v in got.errors.items() if v)
            return LoadResult(
                got.requests,
                got.error_count,
                errors,
                f"wrk -t1 -c{CONNECTIONS}, as fast as it goes",
            )

        thread = threading.Thread(target=run, daemon=True)
    else:
        client = PacedClient(port, rps or 1000, seconds)
        thread = threading.Thread(target=client.run, daemon=True)

        def result() -> LoadResult:
            return client.result

    thread.start()
    return thread, result


# --- report ----------------------------------------------------------------------------------


def table(samples: list[Sample]) -> str:
    lines = [
        f"{'t (s)':>7} {'requests':>11} {'req/s':>8} {'not 2xx':>8} {'up errors':>9} "
        f"{'endpoints':>9} {'RSS MiB':>8} {'fds':>5}"
    ]
    previous: Sample | None = None
    for s in samples:
        rate = 0.0
        if previous is not None and s.elapsed > previous.elapsed:
            rate = (s.requests - previous.requests) / (s.elapsed - previous.elapsed)
        lines.append(
            f"{s.elapsed:7.0f} {s.requests:11.0f} {rate:8.0f} {s.failed:8.0f} "
            f"{s.upstream_errors:9.0f} {s.endpoints:9.0f} {s.rss / MIB:8.1f} {s.fds:5d}"
        )
        previous = s
    return "\n".join(lines)


def summary(samples: list[Sample], load: LoadResult, replaced: int) -> str:
    first, last = samples[0], samples[-1]
    rss_max = max(s.rss for s in samples)
    fds_max = max(s.fds for s in samples)
    return (
        f"summary: {load.requests} requests, {load.errors} errors"
        f"{f' ({load.first_error})' if load.errors else ''}; sidelink counted "
        f"{last.requests:.0f}, {last.failed:.0f} not 2xx, {last.upstream_errors:.0f} upstream "
        f"errors; {replaced} replicas replaced; RSS start/end/max "
        f"{first.rss / MIB:.1f}/{last.rss / MIB:.1f}/{rss_max / MIB:.1f} MiB; "
        f"fds start/end/max {first.fds}/{last.fds}/{fds_max}"
    )


# --- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["replica"]:
        return run_replica(argv[1], int(argv[2]))
    args = _parser().parse_args(argv)
    if args.minutes <= 0 or args.rps < 0 or args.rotate <= 0 or args.sample <= 0:
        print(
            "--minutes, --rotate and --sample must be positive, --rps not negative", file=sys.stderr
        )
        return EXIT_USAGE
    raise_nofile_limit()
    seconds = args.minutes * 60
    tmp = Path(tempfile.mkdtemp(prefix="sidelink-soak-"))
    soak = Soak(tmp)
    samples: list[Sample] = []
    try:
        soak.start()
        thread, result = start_load(which("wrk"), tmp, soak.listen_port, args.rps, seconds)
        start = time.monotonic()
        samples.append(soak.sample(0.0))
        progress(f"soak: {seconds:g} s, replicas {', '.join(soak.replicas)} on port {soak.port}")
        next_sample = start + args.sample
        next_rotation = start + args.rotate
        while thread.is_alive() or time.monotonic() < start + seconds:
            now = time.monotonic()
            if now >= next_rotation and now < start + seconds - args.rotate / 2:
                progress(f"{now - start:6.0f} s  replaced {soak.rotate(now)}")
                next_rotation += args.rotate
            soak.retire(now)
            if now >= next_sample:
                samples.append(soak.sample(now - start))
                next_sample += args.sample
            if soak.sidelink is None or not soak.sidelink.alive:
                raise BenchError("sidelink exited during the soak")
            thread.join(0.1)
        samples.append(soak.sample(time.monotonic() - start))
        load = result()
    except (BenchError, LoadError) as e:
        print(f"soak failed: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        soak.stop()
        if args.keep_tmp:
            progress(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"load: {load.how}")
    print(table(samples))
    print(summary(samples, load, soak.replaced))
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10, help="how long (default 10)")
    parser.add_argument(
        "--rps", type=int, default=0, help="paced requests a second (default: wrk, unpaced)"
    )
    parser.add_argument("--rotate", type=float, default=30, help="seconds between replacements")
    parser.add_argument("--sample", type=float, default=10, help="seconds between samples")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the config and the logs")
    return parser


if __name__ == "__main__":
    sys.exit(main())
