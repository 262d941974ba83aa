"""HTTP/2 load: h2load for cleartext (prior knowledge) request rates and latency, the gRPC
client of benchmarks.grpcbench, and a holder of many idle HTTP/2 connections.

h2load prints no percentiles, so every run writes its per-request log (``--log-file``:
start, status, µs until the end of the response) and p50/p99 come from that.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.load import IdleConnections, LoadError, RunResult

H2LOAD_THREADS = 1  # as wrk: one core drives load, the proxy shares the other
H2LOAD_GRACE = 30.0
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed,"
    r" (\d+) errored, (\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return 0.0
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


def run_h2load(
    h2load: str,
    host: str,
    port: int,
    *,
    connections: int,
    streams: int,
    duration: int,
    log_file: Path,
) -> RunResult:
    """``h2load -c CONNS -m STREAMS -D SECONDS http://host:port/``: h2c, prior knowledge."""
    argv = [
        h2load,
        f"-t{H2LOAD_THREADS}",
        f"-c{connections}",
        f"-m{streams}",
        f"-D{duration}",
        f"--log-file={log_file}",
        f"http://{host}:{port}/",
    ]
    try:
        done = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=duration + H2LOAD_GRACE
        )
    except subprocess.TimeoutExpired as e:
        raise LoadError(f"h2load did not finish: {' '.join(argv)}") from e
    out = done.stdout
    finished, counts, status = _FINISHED.search(out), _REQUESTS.search(out), _STATUS.search(out)
    if finished is None or counts is None or status is None:
        raise LoadError(f"h2load gave no summary (exit {done.returncode}):\n{out}{done.stderr}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    _total, _started, _done, succeeded, _failed, errored, timeout = map(int, counts.groups())
    _2xx, _3xx, c4xx, c5xx = map(int, status.groups())
    latencies = _latencies(log_file)
    errors = {
        # errored: the stream or connection failed (reset, refused, closed); timeout is a subset
        "errored": errored - timeout,
        "timeout": timeout,
        "status_4xx": c4xx,
        "status_5xx": c5xx,
    }
    if succeeded == 0 and not any(errors.values()):
        # Nothing completed and nothing was counted: the connections never came up.
        errors["no_connection"] = connections
    return RunResult(
        requests=succeeded,
        duration_s=seconds,
        p50_us=percentile(latencies, 0.50),
        p99_us=percentile(latencies, 0.99),
        errors={kind: n for kind, n in errors.items() if n},
    )


def _latencies(log_file: Path) -> list[int]:
    """The third column of h2load's log (µs until the end of the response), 2xx/3xx only."""
    found: list[int] = []
    try:
        with log_file.open() as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1][:1] in ("2", "3"):
                    found.append(int(parts[2]))
    except OSError:
        return []
    finally:
        log_file.unlink(missing_ok=True)
    found.sort()
    return found


@dataclass(frozen=True)
class GrpcResult:
    calls: int
    duration_s: float
    p50_us: float
    p99_us: float
    errors: dict[str, int]  # grpc status code name -> count

    @property
    def rps(self) -> float:
        return self.calls / self.duration_s if self.duration_s > 0 else 0.0


def run_grpc_client(
    host: str, port: int, *, concurrency: int, duration: int, cwd: Path
) -> GrpcResult:
    argv = [sys.executable, "-m", "benchmarks.grpcbench", "client", "--host", host]
    argv += ["--port", str(port), "--concurrency", str(concurrency), "--duration", str(duration)]
    try:
        done = subprocess.run(
            argv,
            check=False,
            capture_output=True,
            text=True,
            timeout=duration + H2LOAD_GRACE,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as e:
        raise LoadError(f"the gRPC client did not finish: {' '.join(argv)}") from e
    for line in done.stdout.splitlines():
        if line.startswith("GRPCJSON "):
            data = json.loads(line.removeprefix("GRPCJSON "))
            return GrpcResult(
                calls=int(data["calls"]),
                duration_s=float(data["elapsed_s"]),
                p50_us=float(data["p50_us"]),
                p99_us=float(data["p99_us"]),
                errors={f"grpc_{k.lower()}": int(v) for k, v in data["errors"].items()},
            )
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-10:])
    raise LoadError(f"the gRPC client gave no summary (exit {done.returncode}):\n{tail}")


# A minimal HTTP/2 client for the idle-connection holder: the preface, an empty SETTINGS,
# and one GET / as a HEADERS frame (stream 1, END_STREAM | END_HEADERS) whose HPACK block
# is :method GET, :scheme http, :path / (static table 2, 6, 4) and :authority "bench"
# (literal with indexing, name from static entry 1).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADER_BLOCK = b"\x82\x86\x84\x41\x05bench"
FRAME_DATA, FRAME_HEADERS, FRAME_RST, FRAME_SETTINGS, FRAME_PING, FRAME_GOAWAY = 0, 1, 3, 4, 6, 7
FLAG_END_STREAM, FLAG_ACK, FLAG_END_HEADERS = 0x1, 0x1, 0x4
# The first byte of a response header block whose :status is a static-table entry.
_INDEXED_STATUS = {0x88: 200, 0x89: 204, 0x8A: 206, 0x8B: 304, 0x8C: 400, 0x8D: 404, 0x8E: 500}


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


IDLE_REQUEST = (
    PREFACE
    + frame(FRAME_SETTINGS, 0, 0)
    + frame(FRAME_HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, 1, _HEADER_BLOCK)
)


class H2Error(Exception):
    pass


async def get_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Send IDLE_REQUEST and read until stream 1 ends; the :status. Answers SETTINGS and PING."""
    writer.write(IDLE_REQUEST)
    status = 0
    while True:
        head = await reader.readexactly(9)
        length = int.from_bytes(head[:3], "big")
        kind, flags = head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        payload = await reader.readexactly(length) if length else b""
        if kind == FRAME_SETTINGS and not flags & FLAG_ACK:
            writer.write(frame(FRAME_SETTINGS, FLAG_ACK, 0))
        elif kind == FRAME_PING and not flags & FLAG_ACK:
            writer.write(frame(FRAME_PING, FLAG_ACK, 0, payload))
        elif kind == FRAME_GOAWAY:
            raise H2Error(f"GOAWAY error code {int.from_bytes(payload[4:8], 'big')}")
        elif kind == FRAME_RST and stream == 1:
            raise H2Error(f"RST_STREAM error code {int.from_bytes(payload[:4], 'big')}")
        elif kind == FRAME_HEADERS and stream == 1:
            if status == 0:
                status = _INDEXED_STATUS.get(_header_block(flags, payload)[:1][0], -1)
            if flags & FLAG_END_STREAM:
                return status
        elif kind == FRAME_DATA and stream == 1 and flags & FLAG_END_STREAM:
            return status


def _header_block(flags: int, payload: bytes) -> bytes:
    """The HPACK block of a HEADERS payload: without padding (0x8) and priority (0x20)."""
    start, end = 0, len(payload)
    if flags & 0x8:
        start, end = 1, end - payload[0]
    if flags & 0x20:
        start += 5
    return payload[start:end] or b"\x00"


class IdleH2Connections(IdleConnections):
    """Holds ``count`` HTTP/2 connections open, each after one completed GET /."""

    async def hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        try:
            return await get_once(reader, writer)
        except H2Error as e:
            raise ValueError(str(e)) from e


def h2_get(host: str, port: int, timeout: float = 2.0) -> int | str:
    """One GET / over a fresh HTTP/2 connection: the status, or what went wrong."""

    async def attempt() -> int:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                return await get_once(reader, writer)
            finally:
                writer.close()

    try:
        return asyncio.run(attempt())
    except (OSError, H2Error, asyncio.IncompleteReadError, TimeoutError) as e:
        return repr(e)


def h2_answers_200(host: str, port: int) -> Callable[[], bool]:
    return lambda: h2_get(host, port, timeout=1.0) == 200


def accepts(host: str, port: int) -> Callable[[], bool]:
    """Whether host:port accepts a TCP connection (a gRPC server's readiness)."""

    def check() -> bool:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
        except OSError:
            return False
        return True

    return check
