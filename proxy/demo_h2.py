"""The demo's HTTP/2 side, on ngh2: a replica's h2c port, and one long-lived client.

:class:`H2Replica` is the HTTP/2 port of a demo pod. Each stream is answered after a
moment's work: a gRPC-shaped unary call (``application/grpc``, one length-prefixed
message each way, ``grpc-status`` in the trailers) with the replica's name as its reply,
any other request with a line of text (``curl --http2-prior-knowledge`` works). It stops
as real servers do: it stops accepting, sends GOAWAY at once (the shutdown notice, so
streams already on the wire are still taken), the final GOAWAY naming the last stream
a moment later, finishes the streams it took, then closes each connection.

:class:`H2Channel` is one client connection, as a gRPC channel is: many calls at once,
each on its own stream. A call returns the name of the replica that answered it, or
raises :class:`CallFailed` with a short reason (the failure's name in the figures).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final, cast

import ngh2
from ngh2 import (
    ConnectionClosed,
    DataReceived,
    Event,
    GoAwayReceived,
    RequestReceived,
    ResponseReceived,
    Role,
    Setting,
    StreamClosed,
    TrailersReceived,
)

# How long a replica works on a call: long enough that a replica that stops has calls in
# flight, which it must finish.
SERVICE_TIME: Final = 0.002
# Between a stopping replica's shutdown notice and its final GOAWAY.
GOAWAY_GRACE: Final = 0.5
# How long a stopping replica waits for its streams before it cuts the connections.
STOP_TIMEOUT: Final = 5.0
MAX_CONCURRENT_STREAMS: Final = 128
CALL_PATH: Final = b"/demo.Replicas/Who"
GRPC: Final = b"application/grpc"
NO_ERROR: Final = 0x0
CANCEL: Final = 0x8
ERROR_NAMES: Final = {
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x5: "STREAM_CLOSED",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0xB: "ENHANCE_YOUR_CALM",
}

Fields = tuple[tuple[bytes, bytes], ...]


def grpc_message(payload: bytes) -> bytes:
    """One uncompressed gRPC message: a zero flag, its length, then the bytes."""
    return b"\0" + len(payload).to_bytes(4, "big") + payload


class CallFailed(Exception):
    """A call that did not end in a whole, successful answer; its text is the reason."""


# --- the replica's HTTP/2 port -------------------------------------------------------------


class H2Replica:
    """A pod's HTTP/2 port on ``host:port``, answering as replica ``name``."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.connections: set[_PodConnection] = set()
        self.server: asyncio.Server | None = None
        self.answered = 0  # streams answered

    def __repr__(self) -> str:
        return f"<H2Replica {self.name} {self.host}:{self.port} conns={len(self.connections)}>"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _PodConnection(self), self.host, self.port, reuse_address=True
        )

    async def stop(self) -> tuple[int, int]:
        """Stop accepting, GOAWAY, finish the streams taken, close; how many connections
        were told GOAWAY, and how many streams were answered after it."""
        server, self.server = self.server, None
        if server is None:
            return 0, 0
        server.close()
        connections = list(self.connections)
        answered = self.answered
        for conn in connections:
            conn.shutdown_notice()
        if connections:
            await asyncio.sleep(GOAWAY_GRACE)
        for conn in connections:
            conn.last_goaway()
        pending = [conn.done for conn in connections if not conn.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=STOP_TIMEOUT)
        for conn in list(self.connections):
            conn.abort()  # streams still open after the timeout: cut, as a kubelet would
        await server.wait_closed()
        return len(connections), self.answered - answered


class _PodConnection(asyncio.Protocol):
    """One client connection to a replica's HTTP/2 port (sidelink's, in the demo)."""

    def __init__(self, replica: H2Replica) -> None:
        self.replica = replica
        self.loop = asyncio.get_running_loop()
        self.h2 = ngh2.Connection(Role.SERVER)
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, tuple[Fields, bytearray]] = {}  # streams not answered yet
        self.last_sid = 0
        self.done: asyncio.Future[None] = self.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)
        self.replica.connections.add(self)
        self.h2.initiate_connection({Setting.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS})
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            self.h2.receive_data(data)
        except ngh2.NGH2Error:
            self.abort()
            return
        self.handle(self.h2.events())
        self.flush()

    def eof_received(self) -> bool:
        return False  # the peer is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.requests.clear()
        self.replica.connections.discard(self)
        if not self.done.done():
            self.done.set_result(None)

    def handle(self, events: list[Event]) -> None:
        requests = self.requests
        for event in events:
            if isinstance(event, RequestReceived):
                sid = event.stream_id
                self.last_sid = max(self.last_sid, sid)
                requests[sid] = (event.headers, bytearray())
                if event.end_stream:
                    self.loop.call_later(SERVICE_TIME, self.answer, sid)
            elif isinstance(event, DataReceived):
                request = requests.get(event.stream_id)
                if request is not None:
                    request[1].extend(event.data)
                    if event.end_stream:
                        self.loop.call_later(SERVICE_TIME, self.answer, event.stream_id)
            elif isinstance(event, StreamClosed):
                requests.pop(event.stream_id, None)
            elif isinstance(event, ConnectionClosed):
                self.close()

    def answer(self, sid: int) -> None:
        request = self.requests.pop(sid, None)
        if request is None or self.transport is None:
            return  # reset meanwhile, or the connection is gone
        headers, _ = request
        h2 = self.h2
        replica = self.replica
        try:
            if any(name == b"content-type" and value.startswith(GRPC) for name, value in headers):
                h2.send_response(sid, ((b":status", b"200"), (b"content-type", GRPC)))
                h2.send_data(sid, grpc_message(replica.name.encode()))
                h2.send_trailers(sid, ((b"grpc-status", b"0"),))
            else:
                text = f"hello from {replica.name} ({replica.host}) over HTTP/2\n".encode()
                fields = (
                    (b":status", b"200"),
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(text)).encode()),
                )
                h2.send_response(sid, fields)
                h2.send_data(sid, text, end_stream=True)
        except ngh2.NGH2Error:
            return  # the stream closed under us
        replica.answered += 1
        self.flush()

    def flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        h2 = self.h2
        try:
            data = h2.data_to_send()
            if data:
                transport.write(data)
            self.handle(h2.events())
            finished = not h2.want_read and not h2.want_write
        except ngh2.NGH2Error:
            finished = True
        if finished:
            self.close()  # GOAWAY sent or received, and no stream left

    def shutdown_notice(self) -> None:
        with contextlib.suppress(ngh2.NGH2Error):
            self.h2.send_shutdown_notice()
        self.flush()

    def last_goaway(self) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(ngh2.NGH2Error):
            self.h2.send_goaway(NO_ERROR, last_stream_id=self.last_sid)
        self.flush()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


# --- the client -------------------------------------------------------------------------


class _Call:
    __slots__ = ("answer", "body", "fields", "status")

    def __init__(self, answer: asyncio.Future[str]) -> None:
        self.answer = answer
        self.status = b""
        self.fields: Fields = ()  # the response head, then its trailers
        self.body = bytearray()


class H2Channel(asyncio.Protocol):
    """One HTTP/2 connection carrying many concurrent calls, each on its own stream."""

    def __init__(self, authority: str) -> None:
        self.authority = authority.encode()
        self.h2 = ngh2.Connection(Role.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, _Call] = {}
        self.ended: str | None = None  # why no more calls can be made

    def __repr__(self) -> str:
        return f"<H2Channel {self.authority.decode()} calls={len(self.calls)}>"

    @classmethod
    async def connect(cls, host: str, port: int) -> H2Channel:
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_connection(lambda: cls(f"{host}:{port}"), host, port)
        return channel

    async def call(self, timeout: float) -> str:
        """One gRPC-shaped unary call; the name of the replica that answered it."""
        if self.transport is None and self.ended is None:
            self.ended = "not connected"
        if self.ended is not None:
            raise CallFailed(self.ended)
        h2 = self.h2
        fields = (
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", CALL_PATH),
            (b":authority", self.authority),
            (b"content-type", GRPC),
            (b"te", b"trailers"),
        )
        try:
            sid = h2.send_request(fields)
            h2.send_data(sid, grpc_message(b""), end_stream=True)
        except ngh2.NGH2Error as e:
            self.ended = f"no new stream: {type(e).__name__}"  # closing, or out of stream ids
            raise CallFailed(self.ended) from None
        call = _Call(asyncio.get_running_loop().create_future())
        self.calls[sid] = call
        self.flush()
        try:
            return await asyncio.wait_for(call.answer, timeout)
        except TimeoutError:
            self.calls.pop(sid, None)
            with contextlib.suppress(ngh2.NGH2Error):
                h2.reset_stream(sid, CANCEL)
                self.flush()
            raise CallFailed("deadline exceeded") from None

    def close(self) -> None:
        """Say GOAWAY and close (the calls should be over by now)."""
        transport = self.transport
        if transport is None:
            return
        with contextlib.suppress(ngh2.NGH2Error):
            self.h2.terminate_connection(NO_ERROR)
            transport.write(self.h2.data_to_send())
        transport.close()

    # --- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)
        self.h2.initiate_connection({Setting.ENABLE_PUSH: 0})
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            self.h2.receive_data(data)
        except ngh2.NGH2Error as e:
            self._end(f"protocol error: {e}")
            return
        self.handle(self.h2.events())
        self.flush()

    def eof_received(self) -> bool:
        self._end("connection closed by sidelink")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._end("connection lost")

    def handle(self, events: list[Event]) -> None:
        calls = self.calls
        for event in events:
            if isinstance(event, DataReceived):
                call = calls.get(event.stream_id)
                if call is not None:
                    call.body.extend(event.data)
            elif isinstance(event, ResponseReceived):
                call = calls.get(event.stream_id)
                if call is not None:
                    call.fields = event.headers
                    call.status = dict(event.headers).get(b":status", b"")
            elif isinstance(event, TrailersReceived):
                call = calls.get(event.stream_id)
                if call is not None:
                    call.fields = event.headers
            elif isinstance(event, StreamClosed):
                call = calls.pop(event.stream_id, None)
                if call is not None and not call.answer.done():
                    _settle(call, event.error_code)
            elif isinstance(event, GoAwayReceived):
                self.ended = "GOAWAY from sidelink"
            elif isinstance(event, ConnectionClosed):
                self._end("connection closed")

    def flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            data = self.h2.data_to_send()
        except ngh2.NGH2Error as e:
            self._end(f"protocol error: {e}")
            return
        if data:
            transport.write(data)
        self.handle(self.h2.events())

    def _end(self, why: str) -> None:
        if self.ended is None:
            self.ended = why
        calls = list(self.calls.values())
        self.calls.clear()
        for call in calls:
            if not call.answer.done():
                call.answer.set_exception(CallFailed(why))
        if self.transport is not None:
            self.transport.close()


def _settle(call: _Call, error_code: int) -> None:
    """A stream's end: the replica's name, or why the call failed."""
    answer = call.answer
    if error_code != NO_ERROR:
        name = ERROR_NAMES.get(error_code, hex(error_code))
        answer.set_exception(CallFailed(f"reset {name}"))
        return
    if call.status != b"200":
        answer.set_exception(CallFailed(f"http {call.status.decode() or '?'}"))
        return
    grpc_status = dict(call.fields).get(b"grpc-status", b"?")
    if grpc_status != b"0":
        answer.set_exception(CallFailed(f"grpc-status {grpc_status.decode()}"))
        return
    body = call.body
    if len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
        answer.set_exception(CallFailed("malformed gRPC message"))
        return
    answer.set_result(body[5:].decode())
