"""A Service's replicas that fail the ways pods fail, the DNS that lists them, and load.

`Replica` is a small hand-written HTTP/1.1 server (an asyncio Protocol, cheap enough that
sidelink, the replicas and the clients share one loop) on one loopback address. Its
`mode` switches what it does with each request it reads: answer 200 ("ok"), answer 500
or 503, or reset the connection after reading the request ("reset"); `delay` makes it
slow. Its lifecycle is a pod's: `stop_listening` (connects are refused), `kill` (every
connection aborted and the listener gone: SIGKILL, in-process) and `terminate`
(Kubernetes' way: keep serving through a grace period, then stop listening, finish what
is in flight, close idle keep-alive connections, exit). Each replica tallies the
requests it read (`hits`, every upstream attempt sidelink made), its answers with their
times (`answers`), and its requests in flight.

`Replicas` holds several of them on 127.0.0.2 ... 127.0.0.9, all on one port (a DNS
answer carries no port), and publishes the ones in service to DNS: the in-process DNS
server (`dns_publisher`) or anything else given as a callable (dnsmasq's hosts file).
`roll` replaces one the Kubernetes way. `ClusterIp` is a per-connection TCP balancer on
127.0.0.10, standing in for kube-proxy in front of a ClusterIP Service.

`Load` runs N clients through a route, keep-alive or a new connection per request,
bounded in count and time, and records every outcome: status or error, latency, and
the replica that answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import yaml

from proxy.dnsserver import DnsServer

from . import wire
from .inproc import resolver_yaml
from .wait import until

SERVICE = "app1.ns1.svc.cluster.local"
HOSTS = tuple(f"127.0.0.{n}" for n in range(2, 10))
CLUSTER_IP = "127.0.0.10"
TTL = 1

OK = "ok"
ANSWER_500 = "500"
ANSWER_503 = "503"
RESET = "reset"  # read the request, then reset the connection (RST, no byte answered)
MODES = (OK, ANSWER_500, ANSWER_503, RESET)
STATUS = {OK: 200, ANSWER_500: 500, ANSWER_503: 503}
REASONS = {200: b"OK", 500: b"Internal Server Error", 503: b"Service Unavailable"}
# How long terminate() lets in-flight requests finish before it exits anyway.
EXIT_TIMEOUT = 5.0
LINGER_ZERO = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


# --- sidelink's config for a route to the replicas --------------------------------------


def route_yaml(
    dns_port: int,
    port: int,
    *,
    name: str = "app1",
    protocol: str = "http",
    service: str = SERVICE,
    **settings: Any,
) -> str:
    """A config with one route to `service`, resolved by the DNS server on dns_port.

    `settings` are the route's own keys (outlier={...}, balance="ewma", pool={...}).
    """
    return routes_yaml(dns_port, [route_entry(name, service, port, protocol, **settings)])


def route_entry(
    name: str, service: str, port: int, protocol: str = "http", **settings: Any
) -> dict[str, Any]:
    """One route listening on a free port, with short timeouts, so a test that sees one
    still ends in seconds; `settings` add to them or override them."""
    return {
        "name": name,
        "listen": "127.0.0.1:0",
        "protocol": protocol,
        "service": service,
        "port": port,
        "connect_timeout": "300ms",
        "request_timeout": "2s",
        "head_timeout": "2s",
        **settings,
    }


def routes_yaml(dns_port: int, routes: list[dict[str, Any]]) -> str:
    """A config with these routes, resolved by the DNS server on dns_port, logging warnings."""
    return resolver_yaml(dns_port) + yaml.safe_dump(
        {"logging": {"level": "warning"}, "routes": routes}
    )


# --- one replica --------------------------------------------------------------------------


@dataclass
class _Request:
    method: bytes
    close: bool


def _parse(buffer: bytearray) -> tuple[_Request, int] | None:
    """The first whole request in buffer and its length, or None (Content-Length bodies)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buffer[:end]).split(b"\r\n")
    length = 0
    close = lines[0].endswith(b"HTTP/1.0")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    total = end + 4 + length
    if len(buffer) < total:
        return None
    return _Request(lines[0].split(b" ", 1)[0], close), total


class _Connection(asyncio.Protocol):
    """One connection to a replica: requests one at a time, answered as the replica says."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False  # a request read and not yet answered
        self.timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        return not self.busy and not self.buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.replica.connections.add(self)
        self.replica.accepted += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.replica.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.busy:
            self.replica.lost += 1
            self._done()

    def _done(self) -> None:
        self.busy = False
        self.replica.in_flight -= 1

    def _next(self) -> None:
        parsed = _parse(self.buffer)
        if parsed is None:
            return
        request, length = parsed
        del self.buffer[:length]
        replica = self.replica
        self.busy = True
        replica.hits += 1
        replica.in_flight += 1
        if replica.terminated:
            replica.hits_after_terminate += 1
        mode = replica.mode
        if mode == RESET:
            self.reset()
        elif replica.delay:
            self.timer = replica.loop.call_later(replica.delay, self._answer, mode, request)
        else:
            self._answer(mode, request)

    def _answer(self, mode: str, request: _Request) -> None:
        self.timer = None
        transport = self.transport
        assert transport is not None
        if transport.is_closing():
            return
        replica = self.replica
        status = STATUS[mode]
        close = request.close or replica.terminated
        body = replica.tag
        transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n%s\r\n%s"
            % (
                status,
                REASONS[status],
                len(body),
                b"connection: close\r\n" if close else b"",
                body,
            )
        )
        replica.answers.append((time.monotonic(), status))
        self._done()
        if close:
            transport.close()
        else:
            self._next()

    def reset(self) -> None:
        """Abort with an RST, as a crashing worker's socket does."""
        transport = self.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
        transport.abort()


class Replica:
    """One pod of the service on host:port; see the module docstring."""

    def __init__(self, host: str, port: int, mode: str = OK, delay: float = 0.0) -> None:
        assert mode in MODES, mode
        self.host = host
        self.port = port
        self.mode = mode
        self.delay = delay  # seconds before each answer
        self.tag = host.encode() + b"\n"  # the body of every answer: who answered
        self.loop = asyncio.get_running_loop()
        self.server: asyncio.Server | None = None
        self.connections: set[_Connection] = set()
        self.hits = 0  # requests read: the attempts sidelink made here
        self.accepted = 0  # connections
        self.in_flight = 0
        self.lost = 0  # requests read whose connection closed before an answer
        self.answers: list[tuple[float, int]] = []  # (monotonic time, status)
        self.terminated = False  # stopped listening in terminate(): answers say close
        self.hits_after_terminate = 0
        self.exited = False

    def __repr__(self) -> str:
        state = "listening" if self.server is not None else "not listening"
        return (
            f"<Replica {self.host}:{self.port} {self.mode} delay={self.delay:g}s {state} "
            f"hits={self.hits} in_flight={self.in_flight} connections={len(self.connections)}>"
        )

    async def start(self) -> None:
        self.server = await self.loop.create_server(
            lambda: _Connection(self), self.host, self.port, reuse_address=True, backlog=1024
        )

    def stop_listening(self) -> None:
        """New connects are refused from now on; open connections live on."""
        if self.server is not None:
            self.server.close()
            self.server = None

    def kill(self) -> None:
        """SIGKILL: the listener and every connection gone at once, in-flight work lost."""
        self.stop_listening()
        for conn in list(self.connections):
            assert conn.transport is not None
            conn.transport.abort()
        self.exited = True

    async def terminate(self, grace: float) -> None:
        """Kubernetes' way: serve through `grace` (the preStop sleep while the endpoint
        leaves DNS), then stop listening, close idle keep-alive connections, let the
        busy ones finish their request (answered with `connection: close`), exit."""
        await asyncio.sleep(grace)  # a stand-in for time passing in the pod, not a wait
        self.stop_listening()
        self.terminated = True
        for conn in list(self.connections):
            if conn.idle and conn.transport is not None:
                conn.transport.close()
        with contextlib.suppress(AssertionError):
            await until(lambda: not self.connections, EXIT_TIMEOUT, f"{self} to finish")
        self.kill()

    def answered_between(self, start: float, end: float, status: int = 200) -> int:
        return sum(1 for t, s in self.answers if start <= t < end and s == status)

    async def close(self) -> None:
        self.kill()
        await until(lambda: not self.connections, EXIT_TIMEOUT, f"{self} to close")


def common_port(hosts: Sequence[str] = HOSTS) -> int:
    """A port free on every one of hosts now (replicas bind it later, one by one)."""
    for _ in range(20):
        probes: list[socket.socket] = []
        try:
            port = 0
            for host in hosts:
                sock = socket.socket()
                probes.append(sock)
                sock.bind((host, port))
                port = sock.getsockname()[1]
            return port
        except OSError:
            continue
        finally:
            for sock in probes:
                sock.close()
    raise AssertionError(f"no common free port on {hosts}")


# --- a set of replicas in DNS ---------------------------------------------------------------

Publish = Callable[[list[str]], None]


def dns_publisher(dns: DnsServer, name: str = SERVICE, ttl: int = TTL) -> Publish:
    """Publish addresses as the A records of name on the in-process DNS server."""
    return lambda addresses: dns.set_a(name, addresses, ttl=ttl)


class Replicas:
    """Replicas on HOSTS sharing one port; those `in_service` are published to DNS.

    An async context manager: on exit every replica is closed and every termination
    begun by roll() awaited.
    """

    def __init__(self, publish: Publish | None = None) -> None:
        self.publish_to = publish
        self.port = common_port()
        self.all: list[Replica] = []
        self.in_service: list[Replica] = []
        self._free = iter(HOSTS)
        self._terminations: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Replicas port={self.port} in_service={[r.host for r in self.in_service]}>"

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.all)

    def __getitem__(self, index: int) -> Replica:
        return self.all[index]

    async def add(
        self, mode: str = OK, delay: float = 0.0, *, listen: bool = True, publish: bool = True
    ) -> Replica:
        """A new replica on the next free address; listening and published unless told."""
        host = next(self._free, None)
        assert host is not None, f"no loopback address left among {HOSTS}"
        replica = Replica(host, self.port, mode, delay)
        if listen:
            await replica.start()
        self.all.append(replica)
        self.in_service.append(replica)
        if publish:
            self.publish()
        return replica

    async def add_many(self, n: int, mode: str = OK, delay: float = 0.0) -> list[Replica]:
        added = [await self.add(mode, delay, publish=False) for _ in range(n)]
        self.publish()
        return added

    def publish(self) -> None:
        if self.publish_to is not None:
            self.publish_to([r.host for r in self.in_service])

    def withdraw(self, replica: Replica) -> None:
        """Out of DNS (the endpoint is removed); the replica itself keeps running."""
        self.in_service.remove(replica)
        self.publish()

    async def roll(
        self, old: Replica, grace: float, settle: Callable[[Replica], object]
    ) -> Replica:
        """One step of a rolling update: a new replica up and in DNS; once settle(new) is
        true (it serves), the old one leaves DNS and terminates after `grace`."""
        new = await self.add(old.mode, old.delay)
        await until(lambda: settle(new), 5.0, f"{new} to take traffic")
        self.withdraw(old)
        task = asyncio.ensure_future(old.terminate(grace))
        self._terminations.add(task)
        task.add_done_callback(self._terminations.discard)
        return new

    async def terminations(self) -> None:
        """Wait for every termination roll() began."""
        if self._terminations:
            await asyncio.gather(*self._terminations)

    def hits(self) -> dict[str, int]:
        return {r.host: r.hits for r in self.all}

    def total_hits(self) -> int:
        return sum(r.hits for r in self.all)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._terminations:
            task.cancel()
        await asyncio.gather(*self._terminations, return_exceptions=True)
        for replica in self.all:
            await replica.close()


# --- kube-proxy in front of a ClusterIP --------------------------------------------------


class ClusterIp:
    """A stable address (CLUSTER_IP:port) balancing each new connection round-robin over
    `backends`, as kube-proxy does: a connection stays with the replica it was given."""

    def __init__(self, backends: Sequence[Replica], host: str = CLUSTER_IP) -> None:
        self.host = host
        self.port = 0
        self.backends = list(backends)
        self.server: asyncio.Server | None = None
        self.per_backend: Counter[str] = Counter()
        self._next = itertools.count()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        # Aborting both sides ends every pump, and with them the handlers.
        for writer in list(self._writers):
            writer.transport.abort()
        await until(lambda: not self._writers, EXIT_TIMEOUT, "the ClusterIP's connections")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = self.backends[next(self._next) % len(self.backends)]
        self.per_backend[backend.host] += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(backend.host, backend.port)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            writer.transport.abort()
            up_writer.transport.abort()
            self._writers -= {writer, up_writer}


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


# --- load -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    started: float  # monotonic
    seconds: float
    status: int | None  # None: no response (error says why)
    error: str | None  # why there was no response; or the sidelink-error of a proxy's own
    replica: str | None  # the address that answered (the body of a replica's answer)

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Load:
    """`clients` clients calling `address` until stopped, or `total` requests, or
    `duration` seconds. Keep-alive (one connection per client, reopened after a failure)
    unless `per_request`, a new connection (`connection: close`) per request. Every
    request gets `timeout` to be answered: one that hangs is an outcome, "timeout".

    An async context manager: the clients run inside the block, and stop on exit (each
    ends the request it is in).
    """

    address: tuple[str, int]
    clients: int = 8
    method: str = "GET"
    body: bytes = b""
    per_request: bool = False
    total: int | None = None
    duration: float = 30.0
    timeout: float = 5.0
    outcomes: list[Outcome] = field(default_factory=list)
    _issued: int = 0
    _stopping: bool = False
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _began: float = 0.0

    def __repr__(self) -> str:
        return f"<Load {self.method} x{self.clients} done={self.count} failed={len(self.failed)}>"

    @property
    def count(self) -> int:
        return len(self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._began

    def mark(self) -> int:
        """An index into outcomes: `load.outcomes[mark:]` are those since."""
        return len(self.outcomes)

    def request(self) -> bytes:
        close = ("Connection: close",) if self.per_request else ()
        if self.method == "POST" or self.body:
            return wire.get(
                "/", f"Content-Length: {len(self.body)}", *close, method=self.method
            ) + (self.body)
        return wire.get("/", *close, method=self.method)

    async def start(self) -> None:
        self._began = time.monotonic()
        self._tasks = [asyncio.ensure_future(self._client()) for _ in range(self.clients)]

    def stop(self) -> None:
        self._stopping = True

    async def done(self, timeout: float | None = None) -> None:
        """Wait for the clients to end (stopped, or their count or duration reached)."""
        bound = timeout if timeout is not None else self.duration + self.timeout + 5.0
        async with asyncio.timeout(bound):
            await asyncio.gather(*self._tasks)

    def _go_on(self) -> bool:
        if self._stopping or time.monotonic() - self._began >= self.duration:
            return False
        if self.total is not None and self._issued >= self.total:
            return False
        self._issued += 1
        return True

    async def _client(self) -> None:
        raw = self.request()
        conn: wire.Connection | None = None
        try:
            while self._go_on():
                started = time.monotonic()
                status = replica = error = None
                try:
                    async with asyncio.timeout(self.timeout):
                        if conn is None:
                            conn = await asyncio.open_connection(*self.address)
                        reader, writer = conn
                        writer.write(raw)
                        response = await wire.read_response(reader, self.method)
                    status = response.status
                    if status == 200:
                        replica = response.body.strip().decode()
                    else:  # a proxy-made answer names its reason
                        error = response.header("sidelink-error")
                    if self.per_request or response.close:
                        await _close(conn)
                        conn = None
                except (OSError, asyncio.IncompleteReadError, TimeoutError, AssertionError) as e:
                    error = "timeout" if isinstance(e, TimeoutError) else type(e).__name__
                    if conn is not None:
                        await _close(conn)
                        conn = None
                self.outcomes.append(
                    Outcome(started, time.monotonic() - started, status, error, replica)
                )
        finally:
            if conn is not None:
                await _close(conn)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        await self.done()

    # --- figures

    def shares(self, since: int = 0) -> Counter[str]:
        """Successful answers per replica address, from outcome index `since`."""
        return Counter(o.replica for o in self.outcomes[since:] if o.ok and o.replica)

    def errors(self, since: int = 0) -> Counter[str]:
        """Failures by status (with sidelink's reason, "502 reset") or error ("timeout"),
        from outcome index `since`."""
        return Counter(
            " ".join(str(part) for part in (o.status, o.error) if part is not None)
            for o in self.outcomes[since:]
            if not o.ok
        )

    def quantile(self, q: float, since: int = 0) -> float:
        """The q-quantile of the latencies (seconds) from outcome index `since`."""
        return quantile([o.seconds for o in self.outcomes[since:]], q)


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of `values`."""
    assert values, "no values"
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _close(conn: wire.Connection) -> None:
    _, writer = conn
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class Sampler:
    """Calls probe() every `every` seconds in the background and keeps what it returns."""

    def __init__(self, probe: Callable[[], Any], every: float = 0.005) -> None:
        self.probe = probe
        self.every = every
        self.values: list[Any] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.values.append(self.probe())
            await asyncio.sleep(self.every)

    async def __aenter__(self) -> Self:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.values.append(self.probe())
