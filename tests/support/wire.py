"""Raw bytes on a client connection to a route: requests written by hand, responses parsed.

For the tests where the exact bytes are the point; a real client library would hide
them (or refuse to send them).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from proxy.server import Server

from .inproc import route_address

# How long a read waits for what sidelink owes the client.
IO_TIMEOUT = 10.0
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) .*")

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


# --- connections -----------------------------------------------------------------------


async def connect(
    server: Server, name: str | None = None, *, sockopt: tuple[int, int] | None = None
) -> Connection:
    """A connection to a route; `sockopt` (SO_RCVBUF, size) is set on the socket first."""
    if sockopt is None:
        return await asyncio.open_connection(*route_address(server, name))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, *sockopt)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, route_address(server, name))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def closed(writer: asyncio.StreamWriter) -> None:
    """Close our side and wait for it (the peer may have reset it first)."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_client(server: Server, name: str | None = None) -> AsyncIterator[Connection]:
    """connect(), closed on exit."""
    reader, writer = await connect(server, name)
    try:
        yield reader, writer
    finally:
        await closed(writer)


async def closed_by_peer(
    reader: asyncio.StreamReader, timeout: float = IO_TIMEOUT, *, reset: bool = False
) -> bool:
    """True when the peer closes without sending anything more (with reset, a reset counts)."""
    try:
        async with asyncio.timeout(timeout):
            data = await reader.read()
    except ConnectionResetError:
        if reset:
            return True
        raise
    assert data == b"", f"expected a close, got {data[:200]!r}"
    return True


# --- requests --------------------------------------------------------------------------


def get(
    path: str = "/", *headers: str, method: str = "GET", version: str = "1.1", host: str = "app1"
) -> bytes:
    """A request head (no body): the request line, Host, then `headers` as lines."""
    lines = [f"{method} {path} HTTP/{version}", f"Host: {host}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, body: bytes, *headers: str) -> bytes:
    """A POST with a Content-Length body."""
    return get(path, f"Content-Length: {len(body)}", *headers, method="POST") + body


def chunk_of(data: bytes) -> bytes:
    """data as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- responses -------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    head: bytes = b""

    def header(self, name: str) -> str | None:
        """The field's value (several fields of that name joined by ", "), or None."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    @property
    def close(self) -> bool:
        """Whether the response says the connection closes after it."""
        return (self.header("connection") or "").lower() == "close"


def _fields(lines: list[bytes]) -> list[tuple[str, str]]:
    out = []
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        out.append((name.strip(), value.strip()))
    return out


async def read_head(reader: asyncio.StreamReader) -> Response:
    """A response head, which must start with a well-formed HTTP/1.x status line."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].split(b"\r\n")
    match = STATUS_LINE.fullmatch(status_line)
    assert match, f"bad status line {status_line!r}"
    return Response(int(match.group(1)), _fields(lines), head=head)


async def read_response(
    reader: asyncio.StreamReader,
    method: str = "GET",
    *,
    http10: bool = False,
    timeout: float = IO_TIMEOUT,
) -> Response:
    """One response, framed the way RFC 9112 section 6.3 says a client must read it.

    Interim (1xx) responses before it are skipped. With http10, a chunked response
    fails the test (an HTTP/1.0 client cannot read it).
    """
    async with asyncio.timeout(timeout):
        r = await read_head(reader)
        while 100 <= r.status < 200 and r.status != 101:
            r = await read_head(reader)
        if method == "HEAD" or r.status in (204, 304):
            return r
        te = (r.header("transfer-encoding") or "").lower()
        length = r.header("content-length")
        if "chunked" in te:
            assert not http10, "chunked sent to an HTTP/1.0 client"
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    break
                parts.append(await reader.readexactly(size))
                assert await reader.readexactly(2) == b"\r\n"
            trailer_lines = []
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                trailer_lines.append(line[:-2])
            r.body = b"".join(parts)
            r.trailers = _fields(trailer_lines)
        elif length is not None:
            r.body = await reader.readexactly(int(length))
        else:
            r.body = await reader.read()  # until the close
        return r
