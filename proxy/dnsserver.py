"""In-process authoritative DNS server for ``sidelink demo`` and the test suite.

sidelink's whole job is to keep pod-to-service calls working while DNS
answers change underneath it, so the demo and the tests need a DNS server
they fully control: records can be rewritten while it runs, failures
(SERVFAIL, REFUSED, silent drops) can be injected per name, every query is
logged so callers can assert how often sidelink re-resolved, and the server
can be stopped and restarted on the same port to simulate an outage.

The server is authoritative for every name: anything it has no data for is
NXDOMAIN, and negative answers carry a synthetic SOA so resolvers can
negative-cache them for a short, predictable time.

Two front ends share one record API: :class:`DnsServer` runs on the caller's
asyncio loop, :class:`ThreadedDnsServer` runs it on a private thread for
synchronous tests (for example ones that drive sidelink as a subprocess).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import threading
from collections.abc import Callable, Iterable
from contextlib import suppress
from types import TracebackType
from typing import Self, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.IN.SRV
import dns.rrset

__all__ = ["FAILURE_MODES", "DnsServer", "ThreadedDnsServer"]

_log = logging.getLogger(__name__)

#: Values accepted by ``set_failure``: answer SERVFAIL, answer REFUSED, or
#: never answer at all (the client sees a timeout).
FAILURE_MODES = frozenset({"servfail", "refused", "drop"})

_IN = dns.rdataclass.IN
_A = dns.rdatatype.A
_AAAA = dns.rdatatype.AAAA
_CNAME = dns.rdatatype.CNAME
_SRV = dns.rdatatype.SRV
_ANY = dns.rdatatype.ANY

# Same bound as common recursive resolvers; also stops CNAME loops.
_MAX_CNAME_CHAIN = 8
# A short negative TTL keeps "record added after NXDOMAIN" scenarios quick
# in tests without disabling negative caching altogether.
_SOA_TTL = 5
_SOA = dns.rrset.from_text(
    dns.name.root,
    _SOA_TTL,
    _IN,
    dns.rdatatype.SOA,
    f"ns.sidelink.invalid. hostmaster.sidelink.invalid. 1 3600 600 86400 {_SOA_TTL}",
)
# RFC 1035 limit for UDP replies when the client did not offer EDNS.
_CLASSIC_UDP_SIZE = 512
_MAX_MESSAGE_SIZE = 65535
# Picking a free TCP port and then taking the same UDP port is racy; a few
# fresh attempts make a collision with another process vanishingly unlikely.
_BIND_ATTEMPTS = 5
# Idle TCP clients must not pin server resources forever.
_TCP_IDLE_TIMEOUT = 30.0
# Bounds how long ThreadedDnsServer's sync calls wait for the loop thread.
_THREAD_TIMEOUT = 10.0

_Node = dict[dns.rdatatype.RdataType, dns.rrset.RRset]


def _to_name(name: str | dns.name.Name) -> dns.name.Name:
    """Normalise a user-supplied owner name to an absolute, lowercase Name."""
    if isinstance(name, dns.name.Name):
        parsed = name if name.is_absolute() else name.derelativize(dns.name.root)
    else:
        parsed = dns.name.from_text(name)
    # Name comparison is already case-insensitive; lowercasing the stored
    # copy keeps the query log and answers predictable.
    return parsed.canonicalize()


def _check_ttl(ttl: int) -> None:
    if not 0 <= ttl <= 0x7FFFFFFF:
        raise ValueError(f"TTL out of range: {ttl}")


def _rdatas(rdtype: dns.rdatatype.RdataType, texts: Iterable[str]) -> list[dns.rdata.Rdata]:
    # A bare string is iterable too; iterating it would silently try to
    # parse each character as an address.
    if isinstance(texts, str):
        raise TypeError("expected a list of addresses, not a single string")
    rdatas = []
    for text in texts:
        try:
            rdatas.append(dns.rdata.from_text(_IN, rdtype, text))
        except dns.exception.DNSException as exc:
            # Callers should not need dnspython's exception hierarchy to
            # catch a bad address or an out-of-range port.
            raise ValueError(
                f"invalid {dns.rdatatype.to_text(rdtype)} data {text!r}: {exc}"
            ) from exc
    return rdatas


class _Zone:
    """Thread-safe record store, failure switches and query log.

    RRsets are never mutated after being stored, only replaced, so a
    response may keep references to them after the lock is released.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[dns.name.Name, _Node] = {}
        # Key None holds the failure that applies to every query.
        self._failures: dict[dns.name.Name | None, str] = {}
        self.queries: list[tuple[str, str]] = []

    def replace(
        self,
        name: str | dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        rdatas: list[dns.rdata.Rdata],
        ttl: int,
    ) -> None:
        owner = _to_name(name)
        _check_ttl(ttl)
        rrset = dns.rrset.from_rdata_list(owner, ttl, rdatas) if rdatas else None
        with self._lock:
            node = self._nodes.setdefault(owner, {})
            if rrset is None:
                node.pop(rdtype, None)
            elif rdtype == _CNAME:
                # A CNAME cannot coexist with other data (RFC 1034 3.6.2),
                # so setting one turns the name into a pure alias.
                node.clear()
                node[rdtype] = rrset
            else:
                node.pop(_CNAME, None)
                node[rdtype] = rrset
            if not node:
                del self._nodes[owner]

    def remove(self, name: str | dns.name.Name) -> None:
        owner = _to_name(name)
        with self._lock:
            self._nodes.pop(owner, None)

    def set_failure(self, name: str | dns.name.Name | None, mode: str | None) -> None:
        if mode is not None and mode not in FAILURE_MODES:
            raise ValueError(
                f"unknown failure mode {mode!r}; expected one of {sorted(FAILURE_MODES)}"
            )
        key = None if name is None else _to_name(name)
        with self._lock:
            if mode is None:
                self._failures.pop(key, None)
            else:
                self._failures[key] = mode

    def count(self, name: str | dns.name.Name, rdtype: str) -> int:
        wanted = (_to_name(name).to_text(), dns.rdatatype.to_text(dns.rdatatype.from_text(rdtype)))
        with self._lock:
            return sum(1 for entry in self.queries if entry == wanted)

    def respond(self, query: dns.message.Message) -> dns.message.Message | None:
        """Build the reply to a parsed query; None means stay silent."""
        response = dns.message.make_response(query)
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        with self._lock:
            for question in query.question:
                self.queries.append(
                    (question.name.canonicalize().to_text(), dns.rdatatype.to_text(question.rdtype))
                )
            if len(query.question) != 1:
                response.set_rcode(dns.rcode.FORMERR)
                return response
            question = query.question[0]
            qname = question.name.canonicalize()
            failure = self._failures.get(qname, self._failures.get(None))
            if failure == "drop":
                return None
            if failure == "servfail":
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            if failure == "refused":
                response.set_rcode(dns.rcode.REFUSED)
                return response
            if query.edns > 0:
                response.set_rcode(dns.rcode.BADVERS)
                return response
            if question.rdclass != _IN:
                response.set_rcode(dns.rcode.REFUSED)
                return response
            response.flags |= dns.flags.AA
            self._answer(response, qname, question.rdtype)
            return response

    def _answer(
        self,
        response: dns.message.Message,
        qname: dns.name.Name,
        qtype: dns.rdatatype.RdataType,
    ) -> None:
        """Fill the sections of an authoritative answer; caller holds the lock."""
        name = qname
        seen = {name}
        hops = 0
        while True:
            node = self._nodes.get(name)
            if node is None:
                # RFC 6604: with a CNAME chain the rcode describes the last
                # name; a name that only has descendants is an empty
                # non-terminal, which exists (RFC 8020).
                if not self._has_descendants(name):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                break
            if qtype == _ANY:
                response.answer.extend(node.values())
                return
            rrset = node.get(qtype)
            if rrset is not None:
                response.answer.append(rrset)
                if qtype == _SRV:
                    self._add_srv_glue(response, rrset)
                return
            cname = node.get(_CNAME)
            if cname is None:
                break
            if hops == _MAX_CNAME_CHAIN:
                # Overlong chains and loops get the partial chain; a
                # resolver would give up on them too.
                return
            response.answer.append(cname)
            hops += 1
            target = _cname_target(cname)
            if target in seen:
                return
            seen.add(target)
            name = target
        response.authority.append(_SOA)

    def _has_descendants(self, name: dns.name.Name) -> bool:
        return any(owner.is_subdomain(name) for owner in self._nodes)

    def _add_srv_glue(self, response: dns.message.Message, srv: dns.rrset.RRset) -> None:
        # Saves clients a round trip per target, as real service
        # discovery DNS servers (e.g. Consul, CoreDNS) do.
        added: set[dns.name.Name] = set()
        for rdata in srv:
            if not isinstance(rdata, dns.rdtypes.IN.SRV.SRV):
                continue
            target = _to_name(rdata.target)
            node = self._nodes.get(target)
            if node is None or target in added:
                continue
            added.add(target)
            for rdtype in (_A, _AAAA):
                glue = node.get(rdtype)
                if glue is not None:
                    response.additional.append(glue)


def _cname_target(cname: dns.rrset.RRset) -> dns.name.Name:
    rdata = cname[0]
    if not isinstance(rdata, dns.rdtypes.ANY.CNAME.CNAME):
        raise TypeError(f"not a CNAME rdata: {rdata!r}")
    return _to_name(rdata.target)


class _RecordApi:
    """Record-editing surface shared by the async and threaded servers.

    Every method only touches the thread-safe zone, so all of them may be
    called from any thread while the server is running.
    """

    _zone: _Zone

    def set_a(self, name: str | dns.name.Name, addresses: Iterable[str], ttl: int = 30) -> None:
        """Replace the A records of *name*; an empty list removes them."""
        self._zone.replace(name, _A, _rdatas(_A, addresses), ttl)

    def set_aaaa(self, name: str | dns.name.Name, addresses: Iterable[str], ttl: int = 30) -> None:
        """Replace the AAAA records of *name*; an empty list removes them."""
        self._zone.replace(name, _AAAA, _rdatas(_AAAA, addresses), ttl)

    def set_cname(
        self, name: str | dns.name.Name, target: str | dns.name.Name | None, ttl: int = 30
    ) -> None:
        """Make *name* an alias of *target* (dropping its other records); None removes the alias."""
        rdatas = [] if target is None else _rdatas(_CNAME, [_to_name(target).to_text()])
        self._zone.replace(name, _CNAME, rdatas, ttl)

    def set_srv(
        self,
        name: str | dns.name.Name,
        records: Iterable[tuple[int, int, int, str]],
        ttl: int = 30,
    ) -> None:
        """Replace the SRV records of *name* from (priority, weight, port, target) tuples."""
        texts = [
            f"{priority} {weight} {port} {_to_name(target).to_text()}"
            for priority, weight, port, target in records
        ]
        self._zone.replace(name, _SRV, _rdatas(_SRV, texts), ttl)

    def remove(self, name: str | dns.name.Name) -> None:
        """Delete every record of *name*, so it answers NXDOMAIN."""
        self._zone.remove(name)

    def set_failure(self, name: str | dns.name.Name | None, mode: str | None) -> None:
        """Inject a failure for *name* (None: every query); mode None clears it.

        A failure set for a specific name takes precedence over the one set
        for every query, and clearing the every-query failure leaves
        per-name failures in place.
        """
        self._zone.set_failure(name, mode)

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Live log of (lowercase absolute qname, type mnemonic) per question received."""
        return self._zone.queries

    def count(self, name: str | dns.name.Name, rdtype: str = "A") -> int:
        """How many queries for *name* and *rdtype* have been received."""
        return self._zone.count(name, rdtype)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, handle: Callable[[bytes, bool], bytes | None]) -> None:
        self._handle = handle
        self._transport: asyncio.DatagramTransport | None = None
        # stop() awaits this: the socket is only released after
        # connection_lost, and restarting on the same port needs that.
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector-based UDP transport does not inherit from
        # DatagramTransport, so an isinstance check would reject it.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self._handle(data, True)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # Typically ICMP port-unreachable from a client that gave up.
        _log.debug("UDP error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class DnsServer(_RecordApi):
    """Authoritative DNS server on UDP and TCP, running on the current loop.

    ``port=0`` picks a free port at the first :meth:`start`; later starts
    reuse it so a test can stop the server to simulate an outage and bring
    it back at the same address.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._zone = _Zone()
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_protocol: _UdpProtocol | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_tasks: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """Bound port; the requested one (possibly 0) before the first start."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port``, with IPv6 hosts bracketed."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._udp is not None

    async def start(self) -> None:
        """Bind UDP and TCP on one port; a no-op if already running."""
        if self._udp is not None:
            return
        loop = asyncio.get_running_loop()
        # Only a never-bound ephemeral port may be re-picked; an explicit or
        # previously used port must be honoured exactly or fail loudly.
        attempts = _BIND_ATTEMPTS if self._port == 0 else 1
        for attempt in range(1, attempts + 1):
            # TCP first: the kernel then picks a port no TCP socket holds, not even the
            # local end of an outgoing connection (plenty of those under load), and UDP
            # ports are rarely taken.
            tcp = await asyncio.start_server(self._serve_tcp, self._host, self._port)
            port: int = tcp.sockets[0].getsockname()[1]
            try:
                udp, protocol = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self._handle_wire),
                    local_addr=(self._host, port),
                )
            except OSError as exc:
                tcp.close()
                await tcp.wait_closed()
                if exc.errno != errno.EADDRINUSE or attempt == attempts:
                    raise
                _log.debug("UDP port %d taken, retrying with a new port", port)
                continue
            self._udp, self._udp_protocol, self._tcp = udp, protocol, tcp
            self._port = port
            _log.debug("DNS server listening on %s", self.address)
            return

    async def stop(self) -> None:
        """Close both listeners and open TCP connections; a no-op if stopped."""
        udp, protocol, tcp = self._udp, self._udp_protocol, self._tcp
        self._udp = self._udp_protocol = self._tcp = None
        if udp is not None and protocol is not None:
            udp.close()
            await protocol.closed
        if tcp is not None:
            tcp.close()
            # Since Python 3.12 wait_closed() also waits for client
            # connections, so those have to go first.
            tasks = list(self._tcp_tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await tcp.wait_closed()

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

    def _handle_wire(self, wire: bytes, udp: bool) -> bytes | None:
        """Turn one request into reply bytes; None means send nothing."""
        try:
            query = dns.message.from_wire(wire)
        except Exception as exc:  # untrusted input may fail in any way
            _log.debug("ignoring malformed DNS packet (%d bytes): %s", len(wire), exc)
            return None
        if query.flags & dns.flags.QR:
            # Never answer responses: that could start a packet loop.
            _log.debug("ignoring DNS response packet id %d", query.id)
            return None
        try:
            response = self._zone.respond(query)
            if response is None:
                return None
            if udp:
                limit = (
                    max(_CLASSIC_UDP_SIZE, query.payload) if query.edns >= 0 else _CLASSIC_UDP_SIZE
                )
            else:
                limit = _MAX_MESSAGE_SIZE
            # Oversized UDP replies are cut short with TC set, telling the
            # client to retry over TCP.
            return response.to_wire(max_size=limit, prefer_truncation=True)
        except Exception:
            # A bug answering one query must not take the server down.
            _log.exception("failed to answer DNS query id %d", query.id)
            return None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tcp_tasks.add(task)
        try:
            while True:
                async with asyncio.timeout(_TCP_IDLE_TIMEOUT):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    wire = await reader.readexactly(size)
                reply = self._handle_wire(wire, False)
                if reply is not None:
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            # Client went away, or idled out: both are normal ends.
            pass
        finally:
            if task is not None:
                self._tcp_tasks.discard(task)
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()


class ThreadedDnsServer(_RecordApi):
    """A :class:`DnsServer` on its own thread and event loop, for sync code.

    Record changes go straight to the shared, lock-protected zone, so they
    are visible to the very next query without a round trip to the thread.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = DnsServer(host, port)
        self._zone = self._server._zone
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        """Bound port; the requested one (possibly 0) before the first start."""
        return self._server.port

    @property
    def address(self) -> str:
        return self._server.address

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start the loop thread and bind; returns once the server answers."""
        if self._thread is not None:
            return
        started: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event]]
        started = concurrent.futures.Future()
        thread = threading.Thread(
            target=lambda: asyncio.run(self._serve(started)),
            name="sidelink-dns",
            # A test that forgets stop() must not hang interpreter exit.
            daemon=True,
        )
        thread.start()
        try:
            self._loop, self._stop_event = started.result(_THREAD_TIMEOUT)
        except BaseException:
            thread.join(_THREAD_TIMEOUT)
            raise
        self._thread = thread

    def stop(self) -> None:
        """Stop the server and join its thread; a no-op if not running."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        self._thread = self._loop = self._stop_event = None
        if thread is None or loop is None or stop_event is None:
            return
        loop.call_soon_threadsafe(stop_event.set)
        thread.join(_THREAD_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("DNS server thread did not stop in time")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _serve(
        self,
        started: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event]],
    ) -> None:
        stop_event = asyncio.Event()
        try:
            await self._server.start()
        except Exception as exc:
            # Hand bind errors to the caller of start() rather than letting
            # them die silently on this thread.
            started.set_exception(exc)
            return
        started.set_result((asyncio.get_running_loop(), stop_event))
        try:
            await stop_event.wait()
        finally:
            await self._server.stop()
