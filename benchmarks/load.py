"""Load generators: wrk for request rates and latency, curl for bulk transfers, and a
holder of many idle keep-alive connections for memory measurements."""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

# wrk runs one thread: on 2 cores, one is the load generator's and the other is
# shared by the proxy and the upstream.
WRK_THREADS = 1
WRK_TIMEOUT = "5s"  # a request slower than this counts as a wrk timeout error
# Slack for wrk's start and exit on top of the requested duration.
WRK_GRACE = 30.0
WRK_MARK = "WRKJSON "
# wrk's done() hook: the summary as one JSON line (latencies in microseconds).
WRK_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d,"
    .. "\\"p50_us\\":%d,\\"p99_us\\":%d,\\"max_us\\":%d,"
    .. "\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d}\\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""
# wrk's error kinds; "status" is its "Non-2xx or 3xx responses".
WRK_ERRORS = ("connect", "read", "write", "timeout", "status")

BULK_MAX_TIME = 120  # seconds; curl gives up on a transfer slower than ~9 MB/s
MB = 1_000_000

IDLE_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
IDLE_CONCURRENCY = 64  # connections being opened at once
IDLE_TIMEOUT = 60.0


@dataclass(frozen=True)
class RunResult:
    """One run of a load generator (wrk, or h2load: benchmarks.h2)."""

    requests: int
    duration_s: float
    p50_us: float
    p99_us: float
    errors: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


async def read_answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response framed by Content-Length, body and all: its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


class LoadError(Exception):
    """A load generator failed to run or to report (not: the target answered badly)."""


def write_wrk_script(directory: Path) -> Path:
    path = directory / "report.lua"
    path.write_text(WRK_SCRIPT)
    return path


def run_wrk(
    wrk: str,
    script: Path,
    port: int,
    *,
    connections: int,
    duration: int,
    headers: tuple[str, ...] = (),
) -> RunResult:
    argv = [
        wrk,
        f"-t{WRK_THREADS}",
        f"-c{connections}",
        f"-d{duration}s",
        f"--timeout={WRK_TIMEOUT}",
        "-s",
        str(script),
    ]
    for header in headers:
        argv += ["-H", header]
    argv.append(f"http://127.0.0.1:{port}/")
    try:
        done = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=duration + WRK_GRACE
        )
    except subprocess.TimeoutExpired as e:
        raise LoadError(f"wrk did not finish: {' '.join(argv)}") from e
    for line in done.stdout.splitlines():
        if line.startswith(WRK_MARK):
            data = json.loads(line[len(WRK_MARK) :])
            return RunResult(
                requests=int(data["requests"]),
                duration_s=data["duration_us"] / 1e6,
                p50_us=float(data["p50_us"]),
                p99_us=float(data["p99_us"]),
                errors={kind: int(data[kind]) for kind in WRK_ERRORS},
            )
    raise LoadError(f"wrk gave no summary (exit {done.returncode}):\n{done.stdout}{done.stderr}")


@dataclass(frozen=True)
class BulkResult:
    mb_per_s: float
    received: int
    status: int
    error: str  # "" when the whole body arrived with a 200


def run_curl_bulk(curl: str, port: int, path: str, expected: int) -> BulkResult:
    """Download one large body to /dev/null; the rate is curl's average over the transfer."""
    argv = [
        curl,
        "-sS",
        "-o",
        "/dev/null",
        "--max-time",
        str(BULK_MAX_TIME),
        "-w",
        "%{http_code} %{size_download} %{speed_download}",
        f"http://127.0.0.1:{port}{path}",
    ]
    try:
        done = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=BULK_MAX_TIME + 10
        )
    except subprocess.TimeoutExpired as e:
        raise LoadError(f"curl did not finish: {' '.join(argv)}") from e
    try:
        code, size, speed = done.stdout.split()
        status, received, rate = int(code), int(size), float(speed)
    except ValueError as e:
        raise LoadError(f"curl gave no summary (exit {done.returncode}): {done.stderr}") from e
    error = ""
    if done.returncode != 0:
        error = f"curl exit {done.returncode}: {done.stderr.strip()}"
    elif status != 200:
        error = f"status {status}"
    elif received != expected:
        error = f"received {received} of {expected} bytes"
    return BulkResult(mb_per_s=rate / MB, received=received, status=status, error=error)


class IdleConnections:
    """Holds ``count`` keep-alive connections open, each after one completed request.

    A connection that has served a request is what an idle pooled client looks like to
    a proxy (parser state, buffers, maybe an upstream connection), unlike a bare accept.
    """

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.failed = 0
        self.first_error = ""
        self._writers: list[asyncio.StreamWriter] = []
        self._runner = asyncio.Runner()

    @property
    def opened(self) -> int:
        return len(self._writers)

    def open(self) -> None:
        self._runner.run(self._open_all())

    def close(self) -> None:
        try:
            self._runner.run(self._close_all())
        finally:
            self._runner.close()

    async def _open_all(self) -> None:
        gate = asyncio.Semaphore(IDLE_CONCURRENCY)
        async with asyncio.timeout(IDLE_TIMEOUT):
            await asyncio.gather(*(self._open_one(gate) for _ in range(self.count)))

    async def _open_one(self, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError as e:
                self._fail(f"connect: {e}")
                return
            try:
                status = await self.hello(reader, writer)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
                writer.close()
                self._fail(f"request: {e!r}")
                return
            if status != 200:
                writer.close()
                self._fail(f"status {status}" if status > 0 else "status not decoded")
                return
            self._writers.append(writer)

    async def hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        """The one request a connection makes before it idles: its status."""
        writer.write(IDLE_REQUEST)
        return await read_answer(reader)

    def _fail(self, error: str) -> None:
        self.failed += 1
        self.first_error = self.first_error or error

    async def _close_all(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        # Let the transports run their close callbacks before the loop goes away.
        await asyncio.sleep(0)
