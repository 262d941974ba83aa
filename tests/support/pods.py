"""Upstream servers standing in for a Service's pods, on loopback addresses 127.0.0.2, ...

A DNS answer carries no port, so the pods of one service share one: `Pods` binds port 0
on the first address, the same port on the others, and tries again on a clash. Two
kinds serve on it: `AppPods`, one aiohttp application (well-behaved HTTP, every request
tallied), and `StreamPods`, a hand-written handler per connection (raw TCP, and HTTP
framings aiohttp will not produce). Both are async context managers.

`EchoServer` and `Client` are the thread-based pod and client of the subprocess tests,
which have no event loop of their own.
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self, cast

from aiohttp import web

POD = "127.0.0.2"
# What a handler meets when sidelink closes its side: that is sidelink's right.
HANG_UPS: tuple[type[BaseException], ...] = (ConnectionError, asyncio.IncompleteReadError)
# How long stop() lets handlers end on their own before cancelling them.
STOP_TIMEOUT = 5.0

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
AppHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Pods:
    """Servers on several loopback addresses sharing one port; subclasses say what serves."""

    def __init__(self, hosts: tuple[str, ...]) -> None:
        self.hosts = hosts or (POD,)
        self.port = 0

    async def _listen(self, host: str, port: int) -> int:
        """Serve on host:port (port 0: any); return the port bound."""
        raise NotImplementedError

    async def _unlisten(self) -> None:
        """Stop serving on every address (before a retry, or for good)."""
        raise NotImplementedError

    async def start(self) -> None:
        for _ in range(20):
            self.port = 0
            try:
                for host in self.hosts:
                    self.port = await self._listen(host, self.port)
            except OSError:  # that port is taken on a later address: try another
                await self._unlisten()
                continue
            return
        raise AssertionError(f"no common free port on {self.hosts}")

    async def stop(self) -> None:
        await self._unlisten()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        if exc is None:
            self.check()

    def check(self) -> None:
        """Fail the test for whatever the pods saw go wrong (nothing, here)."""


def pod_of(where: web.Request | asyncio.StreamWriter) -> str:
    """The pod address a request or connection came in on (as the server sees it)."""
    transport = where.transport
    assert transport is not None
    return str(transport.get_extra_info("sockname")[0])


class AppPods(Pods):
    """One aiohttp application served on every address.

    Every request is tallied where it lands: `hits` per pod, `seen` as (pod, method,
    target, Host) and `connections` as (pod, client address), so tests count upstream
    requests and connections where they are made. `runner` goes to aiohttp's AppRunner
    (keepalive_timeout, ...).
    """

    def __init__(self, app: web.Application, *hosts: str, **runner: Any) -> None:
        super().__init__(hosts)
        self.connections: set[tuple[str, tuple[str, int]]] = set()
        self.hits: Counter[str] = Counter()
        self.seen: list[tuple[str, str, str, str]] = []
        self.runner = web.AppRunner(app, access_log=None, **runner)
        self._sites: list[web.TCPSite] = []
        app.middlewares.append(self._track)

    @web.middleware
    async def _track(self, request: web.Request, handler: AppHandler) -> web.StreamResponse:
        assert request.transport is not None
        pod = pod_of(request)
        self.connections.add((pod, request.transport.get_extra_info("peername")))
        self.hits[pod] += 1
        self.seen.append((pod, request.method, request.path_qs, request.host))
        return await handler(request)

    async def start(self) -> None:
        await self.runner.setup()
        await super().start()

    async def _listen(self, host: str, port: int) -> int:
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        self._sites.append(site)
        return port or int(self.runner.addresses[-1][1])

    async def _unlisten(self) -> None:
        for site in self._sites:
            await site.stop()
        self._sites = []

    async def stop(self) -> None:
        await self.runner.cleanup()
        self._sites = []


class StreamPods(Pods):
    """`handler(reader, writer)` for every connection, on every address.

    The handler runs in a task of its own, so that stop() can cancel one that does not
    end (cancelling the stream server's own task would reach the loop's exception
    handler). What a handler raises is kept in `errors`, which must be empty when the
    block ends, except the exceptions in `tolerate` (HANG_UPS where sidelink may close
    on it) and anything raised once stop() has begun cutting connections.
    """

    def __init__(
        self,
        handler: StreamHandler,
        *hosts: str,
        tolerate: tuple[type[BaseException], ...] = (),
        limit: int = 64 * 1024,
    ) -> None:
        super().__init__(hosts)
        self.handler = handler
        self.tolerate = tolerate
        self.limit = limit  # the streams' buffer limit (readuntil fails past it)
        self.accepted: Counter[str] = Counter()
        self.errors: list[BaseException] = []
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopping = False

    async def _listen(self, host: str, port: int) -> int:
        server = await asyncio.start_server(self._serve, host, port, limit=self.limit)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def _unlisten(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted[pod_of(writer)] += 1
        task = asyncio.ensure_future(self.handler(reader, writer))
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await asyncio.wait({task})
            error = None if task.cancelled() else task.exception()
            if error is not None and not self._stopping and not isinstance(error, self.tolerate):
                self.errors.append(error)
        finally:
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def stop(self) -> None:
        self._stopping = True
        for server in self._servers:
            server.close()
        # Aborting the sockets ends the handlers' reads; one that still does not end is
        # cancelled.
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT)
        for task in list(self._tasks):
            task.cancel()
        await self._unlisten()

    def check(self) -> None:
        assert not self.errors, self.errors


# --- pods and clients in threads, for the subprocess tests ----------------------------


class _EchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        tag = cast(EchoServer, self.server).tag
        for line in self.rfile:
            self.wfile.write(tag + line)


class EchoServer(socketserver.ThreadingTCPServer):
    """A pod on a loopback address: answers every line with its tag and the line."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, tag: bytes, port: int = 0) -> None:
        self.tag = tag
        super().__init__((host, port), _EchoHandler)
        self.port: int = self.server_address[1]
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class Client:
    """A downstream connection to a sidelink listener, speaking the echo servers' lines."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.reader = self.sock.makefile("rb")

    def ask(self, text: str = "ping") -> str:
        self.sock.sendall(text.encode() + b"\n")
        return self.reader.readline().decode()

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def ask_once(port: int, text: str = "ping") -> str:
    """One line asked on a connection of its own."""
    client = Client(port)
    try:
        return client.ask(text)
    finally:
        client.close()
