"""Hostile-client scaffolding: an upstream that parses strictly and records, and slowloris.

`StrictUpstream` stands behind sidelink in the smuggling battery: it parses every request
it gets by the letter of RFC 9112 (no obs-fold, no bare CR or LF, one Host, one framing,
Content-Length digits only, `chunked` as the only transfer coding) and keeps each one,
so a test sees exactly what reached the service: never a request sidelink did not mean
to send. What it cannot parse goes to `violations`; a request cut short (sidelink gave up
on it halfway) to `partial`.

`python -m support.hostile slowloris PORT COUNT ...` (run from tests/) is the slowloris
attacker, in a process of its own so that its work never runs on the loop under test:
it opens COUNT connections, sends a request head one byte at a time and never finishes
it, and prints one JSON line saying how each connection ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field

from .pods import HANG_UPS, POD, StreamPods

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]

TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") (\S+) HTTP/1\.1")
# RFC 9110 5.5: field-value = *field-content, visible characters with inner SP/HTAB.
FIELD_LINE = re.compile(
    rb"(" + TOKEN + rb"):[ \t]*((?:[!-~\x80-\xff]+(?:[ \t]+[!-~\x80-\xff]+)*)?)[ \t]*"
)
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
DIGITS = re.compile(rb"[0-9]{1,18}")
MAX_HEAD = 1024 * 1024


class Violation(Exception):
    """The request breaks RFC 9112: no strict server would have read it this way."""


@dataclass
class Seen:
    """One request as the upstream parsed it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        return ", ".join(values) if values else None

    @property
    def summary(self) -> tuple[str, str, bytes]:
        return self.method, self.target, self.body


def _field_lines(block: bytes, what: str) -> list[tuple[str, str]]:
    fields = []
    for line in block.split(b"\r\n") if block else []:
        if b"\r" in line or b"\n" in line or b"\x00" in line:
            raise Violation(f"bare CR, LF or NUL in a {what} line: {line!r}")
        if line[:1] in (b" ", b"\t"):
            raise Violation(f"obs-fold in a {what} line: {line!r}")
        match = FIELD_LINE.fullmatch(line)
        if match is None:
            raise Violation(f"malformed {what} line: {line!r}")
        fields.append((match.group(1).decode(), match.group(2).decode("latin-1")))
    return fields


async def read_strict(reader: asyncio.StreamReader) -> Seen | None:
    """One request, parsed strictly (None at a clean EOF between requests).

    Raises Violation for anything RFC 9112 does not allow a sender to produce, and
    asyncio.IncompleteReadError when the connection ends inside a request.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise
        return None
    first, _, block = head[:-4].partition(b"\r\n")
    match = REQUEST_LINE.fullmatch(first)
    if match is None:
        raise Violation(f"malformed request line: {first!r}")
    seen = Seen(match.group(1).decode(), match.group(2).decode("latin-1"), [])
    seen.headers = _field_lines(block, "header")
    hosts = [v for k, v in seen.headers if k.lower() == "host"]
    if len(hosts) != 1:
        raise Violation(f"{len(hosts)} Host headers")
    lengths = {v for k, v in seen.headers if k.lower() == "content-length"}
    codings = [v for k, v in seen.headers if k.lower() == "transfer-encoding"]
    if lengths and codings:
        raise Violation("both Content-Length and Transfer-Encoding")
    if codings:
        # Codings may come before chunked (the body is then still coded), never after.
        tokens = [t.strip().lower() for c in codings for t in c.split(",")]
        if tokens[-1] != "chunked" or tokens.count("chunked") != 1:
            raise Violation(f"Transfer-Encoding {codings}")
        seen.body, seen.trailers = await _chunked(reader)
    elif lengths:
        if len(lengths) != 1 or not DIGITS.fullmatch(next(iter(lengths)).encode()):
            raise Violation(f"Content-Length {sorted(lengths)}")
        seen.body = await reader.readexactly(int(next(iter(lengths))))
    return seen


async def _chunked(reader: asyncio.StreamReader) -> tuple[bytes, list[tuple[str, str]]]:
    parts = []
    while True:
        line = (await reader.readuntil(b"\r\n"))[:-2]
        if not CHUNK_SIZE.fullmatch(line):  # sidelink re-chunks: never an extension
            raise Violation(f"chunk size line {line!r}")
        size = int(line, 16)
        if size == 0:
            break
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise Violation("chunk data longer than its size")
    block = b""
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        block += line
    return b"".join(parts), _field_lines(block[:-2], "trailer")


class StrictUpstream(StreamPods):
    """Parses every request strictly, keeps it, answers 200 with what it saw."""

    def __init__(self, host: str = POD) -> None:
        super().__init__(self.serve, host, tolerate=HANG_UPS, limit=MAX_HEAD)
        self.requests: list[Seen] = []
        self.violations: list[str] = []
        self.partial: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen = await read_strict(reader)
            except Violation as e:
                self.violations.append(str(e))
                return
            except asyncio.IncompleteReadError as e:
                self.partial.append(e.partial)
                return
            if seen is None:
                return
            self.requests.append(seen)
            body = f"{seen.method} {seen.target} {len(seen.body)}".encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()


# --- slowloris, in a process of its own --------------------------------------------------

# A head that never ends: the request line, Host, then a header whose value goes on.
SLOW_HEAD = b"GET /slowloris HTTP/1.1\r\nHost: app1\r\nX-Slow: " + b"s" * 4096


@dataclass
class SlowResult:
    """How one slow connection ended, `after` seconds after its first byte."""

    outcome: str = "open"  # "408", "close", "reset", "open", "other:...", "connect:..."
    after: float = 0.0
    sent: int = 0


async def _attack(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    interval: float,
    hold: float,
    result: SlowResult,
) -> None:
    """One byte of SLOW_HEAD every `interval` until sidelink answers or closes, or `hold`."""
    await asyncio.sleep(random.uniform(0, interval))  # spread the bytes over the interval
    first = time.monotonic()
    answer = asyncio.ensure_future(reader.read(1024))
    try:
        while not answer.done() and time.monotonic() - first < hold:
            try:
                writer.write(SLOW_HEAD[result.sent : result.sent + 1])
            except (ConnectionError, RuntimeError):
                break
            result.sent += 1
            await asyncio.wait([answer], timeout=interval)  # the attacker's pace
        if not answer.done():
            await asyncio.wait([answer], timeout=max(0.0, hold - (time.monotonic() - first)))
        result.after = time.monotonic() - first
        if not answer.done():
            answer.cancel()
            return  # still "open": sidelink held it for `hold` seconds
        try:
            data = answer.result()
        except ConnectionError:
            result.outcome = "reset"
            return
        if data == b"":
            result.outcome = "close"
        elif data.startswith(b"HTTP/1.1 408 "):
            result.outcome = "408"
        else:
            result.outcome = "other:" + data.split(b"\r\n", 1)[0].decode("latin-1")
    finally:
        writer.transport.abort()


async def slowloris(port: int, count: int, interval: float, hold: float) -> list[SlowResult]:
    """count connections first (a bounded number connecting at once), then all of them slow."""
    results = [SlowResult() for _ in range(count)]
    gate = asyncio.Semaphore(64)

    async def connect(result: SlowResult) -> Connection | None:
        async with gate:
            try:
                return await asyncio.open_connection("127.0.0.1", port)
            except OSError as e:
                result.outcome = f"connect:{e.__class__.__name__}"
                return None

    connections = await asyncio.gather(*(connect(r) for r in results))
    print(json.dumps({"connected": sum(c is not None for c in connections)}), flush=True)
    await asyncio.gather(
        *(
            _attack(*c, interval, hold, r)
            for c, r in zip(connections, results, strict=True)
            if c is not None
        )
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m support.hostile")
    sub = parser.add_subparsers(dest="command", required=True)
    slow = sub.add_parser("slowloris")
    slow.add_argument("port", type=int)
    slow.add_argument("count", type=int)
    slow.add_argument("--interval", type=float, default=0.25)
    slow.add_argument("--hold", type=float, default=6.0)
    args = parser.parse_args(argv)
    results = asyncio.run(slowloris(args.port, args.count, args.interval, args.hold))
    print(json.dumps({"results": [r.__dict__ for r in results]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
