"""HTTP/2 peers for the tests: upstream h2c pods, a client, and hand-framed bytes.

H2Pods     cleartext HTTP/2 servers (the `h2` library) on loopback pod IPs sharing one port,
           standing in for a Service's pods behind sidelink. Each stream is answered with a
           JSON account of what the pod saw (its own name first); the request path says
           what else to do (see `H2Pods`), and the test can make a pod refuse streams, send
           GOAWAY, or stop reading. Every stream, reset and connection is tallied per pod.
           The same port speaks HTTP/1.1 (httptools) to a client that sends no preface, as
           a pod behind `upstream_protocol: auto` must.
H2Client   a client connection (the `h2` library) with requests, trailers, resets and flow
           control per stream (a stream can be left unread: its window closes, the
           connection's stays open). GOAWAY frames are taken off the wire before the library
           sees them, since the library treats any GOAWAY as the end of the connection and
           would fail the streams a graceful GOAWAY lets finish.
RawH2      frames written by hand, for the attacks a well-behaved library refuses to send,
           and the frames sidelink sends back, read only when the attacker chooses to.

The frame layout, flags and error codes are RFC 9113's (section 6 and 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import httptools

from .data import chunks
from .pods import POD, Pods

# --- the wire: frame types, flags, error codes -----------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
DEFAULT_MAX_FRAME = 16384
DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
FRAME_NAMES = {
    DATA: "DATA",
    HEADERS: "HEADERS",
    PRIORITY: "PRIORITY",
    RST_STREAM: "RST_STREAM",
    SETTINGS: "SETTINGS",
    PUSH_PROMISE: "PUSH_PROMISE",
    PING: "PING",
    GOAWAY: "GOAWAY",
    WINDOW_UPDATE: "WINDOW_UPDATE",
    CONTINUATION: "CONTINUATION",
}

END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB
ERROR_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

# How long a peer waits for what sidelink owes it.
IO_TIMEOUT = 10.0
# Our side's own limit on header lists: far above sidelink's 64 KiB, so that what sidelink
# forwards is never refused here.
PEER_MAX_HEADER_LIST = 1 << 20
# How much of a request body the pods keep (beyond it, only its length and digest).
KEEP_BODY = 1 << 20
# A transport's write buffer above this pauses the pod's body writers.
WRITE_HIGH_WATER = 1 << 20
# An attacker keeps this many of the frames it reads (it counts them all).
MAX_KEPT_FRAMES = 10_000

Fields = list[tuple[str, str]]


def error_name(code: int | None) -> str:
    if code is None:
        return "none"
    return ERROR_NAMES.get(code, hex(code))


@dataclass(frozen=True)
class Frame:
    """One frame as it came off the wire."""

    type: int
    flags: int
    stream_id: int
    payload: bytes

    def __repr__(self) -> str:
        name = FRAME_NAMES.get(self.type, hex(self.type))
        extra = ""
        if self.type in (RST_STREAM, GOAWAY):
            extra = " " + error_name(self.error_code)
        return (
            f"<{name} stream={self.stream_id} flags={self.flags:#x} len={len(self.payload)}{extra}>"
        )

    @property
    def error_code(self) -> int:
        if self.type == RST_STREAM:
            return int(struct.unpack(">I", self.payload[:4])[0])
        if self.type == GOAWAY:
            return int(struct.unpack(">I", self.payload[4:8])[0])
        raise ValueError(f"{self!r} carries no error code")

    @property
    def last_stream_id(self) -> int:
        assert self.type == GOAWAY
        return int(struct.unpack(">I", self.payload[:4])[0]) & MAX_WINDOW

    def raw(self) -> bytes:
        return frame(self.type, self.flags, self.stream_id, self.payload)


@dataclass(frozen=True)
class GoAway:
    last_stream_id: int
    error_code: int
    debug: bytes = b""

    def __repr__(self) -> str:
        return (
            f"<GOAWAY last_stream_id={self.last_stream_id} {error_name(self.error_code)}"
            f" {self.debug[:80]!r}>"
        )

    @classmethod
    def of(cls, f: Frame) -> GoAway:
        return cls(f.last_stream_id, f.error_code, f.payload[8:])


def frame(type_: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame's bytes (RFC 9113 4.1)."""
    return (
        struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", type_, flags, stream_id) + payload
    )


def settings_frame(settings: dict[int, int] | None = None, *, ack: bool = False) -> bytes:
    payload = b"".join(struct.pack(">HI", k, v) for k, v in (settings or {}).items())
    return frame(SETTINGS, ACK if ack else 0, 0, payload)


def ping_frame(opaque: bytes = b"\0" * 8, *, ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, opaque)


def rst_frame(stream_id: int, code: int = CANCEL) -> bytes:
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def goaway_frame(last_stream_id: int, code: int = NO_ERROR, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream_id, code) + debug)


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def data_frame(stream_id: int, payload: bytes, *, end: bool = False) -> bytes:
    return frame(DATA, END_STREAM if end else 0, stream_id, payload)


def header_frames(
    stream_id: int, block: bytes, *, end_stream: bool = True, max_frame: int = DEFAULT_MAX_FRAME
) -> bytes:
    """A header block as HEADERS and as many CONTINUATION frames as it takes."""
    pieces = [block[i : i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
    out = []
    for i, piece in enumerate(pieces):
        flags = END_HEADERS if i == len(pieces) - 1 else 0
        if i == 0:
            out.append(frame(HEADERS, flags | (END_STREAM if end_stream else 0), stream_id, piece))
        else:
            out.append(frame(CONTINUATION, flags, stream_id, piece))
    return b"".join(out)


class FrameBuffer:
    """Bytes in, whole frames out (after the client preface, for a server's side)."""

    def __init__(self, *, preface: bool = False) -> None:
        self.buffer = bytearray()
        self.preface_left = len(PREFACE) if preface else 0

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[Frame, bytes]]]:
        """(the preface bytes completed by data, the frames completed by data with their bytes)."""
        self.buffer += data
        preface = b""
        if self.preface_left:
            take = min(self.preface_left, len(self.buffer))
            preface = bytes(self.buffer[:take])
            del self.buffer[:take]
            self.preface_left -= take
            if self.preface_left:
                return preface, []
        frames = []
        view = self.buffer
        at = 0
        while len(view) - at >= FRAME_HEADER:
            length = int.from_bytes(view[at : at + 3], "big")
            end = at + FRAME_HEADER + length
            if len(view) < end:
                break
            type_, flags = view[at + 3], view[at + 4]
            stream_id = int.from_bytes(view[at + 5 : at + 9], "big") & MAX_WINDOW
            raw = bytes(view[at:end])
            frames.append((Frame(type_, flags, stream_id, raw[FRAME_HEADER:]), raw))
            at = end
        del self.buffer[:at]
        return preface, frames


def split_goaways(frames: list[tuple[Frame, bytes]]) -> tuple[bytes, list[GoAway]]:
    """The bytes of every frame but GOAWAY (for the h2 library), and the GOAWAYs."""
    keep, goaways = [], []
    for f, raw in frames:
        if f.type == GOAWAY:
            goaways.append(GoAway.of(f))
        else:
            keep.append(raw)
    return b"".join(keep), goaways


# --- upstream pods -------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as a pod got it (HTTP/2 stream or HTTP/1.1 request)."""

    pod: str
    protocol: str  # "h2" or "http/1.1"
    connection: int  # the pod connection's number (in H2Pods.conns)
    stream_id: int  # 0 for HTTP/1.1
    method: str = ""
    path: str = ""
    authority: str = ""
    headers: Fields = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    body_bytes: int = 0
    body_sha256: Any = field(default_factory=hashlib.sha256)
    trailers: Fields = field(default_factory=list)
    never_indexed: list[str] = field(default_factory=list)  # fields sent never-indexed
    complete: bool = False  # the whole request arrived
    answered: bool = False  # the whole response was sent
    reset_by_peer: int | None = None  # the RST_STREAM code sidelink sent on it
    sent: int = 0  # response body bytes written

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return ", ".join(values) if values else None

    def take(self, data: bytes) -> None:
        self.body_bytes += len(data)
        self.body_sha256.update(data)
        if len(self.body) < KEEP_BODY:
            self.body += data[: KEEP_BODY - len(self.body)]

    def account(self) -> dict[str, Any]:
        """The JSON answer: what this pod saw."""
        return {
            "pod": self.pod,
            "protocol": self.protocol,
            "connection": self.connection,
            "stream": self.stream_id,
            "method": self.method,
            "path": self.path,
            "authority": self.authority,
            "headers": self.headers,
            "body_bytes": self.body_bytes,
            "body_sha256": self.body_sha256.hexdigest(),
            "trailers": self.trailers,
        }


class _PodStream:
    """A pod's state for one HTTP/2 stream it is serving."""

    def __init__(self, seen: Seen) -> None:
        self.seen = seen
        self.ended = asyncio.Event()  # the request is complete
        self.reset = asyncio.Event()  # sidelink reset it (or the connection went)
        self.read = True  # acknowledge the data it gets (False: its window closes)
        self.unacked = 0
        self.task: asyncio.Task[None] | None = None


class PodConnection(asyncio.Protocol):
    """One connection to a pod: HTTP/2 after a preface, else HTTP/1.1."""

    def __init__(self, pods: H2Pods) -> None:
        self.pods = pods
        self.number = len(pods.conns)
        pods.conns.append(self)
        self.pod = ""
        self.transport: asyncio.Transport | None = None
        self.protocol = ""  # decided by the first bytes
        self.silent = False  # its SETTINGS are not written yet (H2Pods.settings_delay)
        self.first = bytearray()
        self.h2: h2.connection.H2Connection | None = None
        self.frames = FrameBuffer(preface=True)
        self.streams: dict[int, _PodStream] = {}
        self.streams_seen = 0
        self.max_open = 0  # the most streams open at once (what the limit is checked against)
        self.over_limit = 0  # streams refused for going past our MAX_CONCURRENT_STREAMS
        self.goaway_sent: int | None = None  # our last-stream-id, once we sent GOAWAY
        self.ignored = 0  # streams above that last-stream-id (never processed)
        self.goaways: list[GoAway] = []  # what sidelink sent us
        self.closed = False
        self._window = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._h1: _H1 | None = None

    def __repr__(self) -> str:
        return (
            f"<PodConnection #{self.number} {self.pod} {self.protocol or '?'} "
            f"streams={self.streams_seen} open={len(self.streams)} max_open={self.max_open}>"
        )

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.pod = str(transport.get_extra_info("sockname")[0])
        self.pods.accepted[self.pod] += 1
        if self.pod in self.pods.stalled:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if not self.protocol:
            self.first += data
            if len(self.first) < len(PREFACE) and PREFACE.startswith(bytes(self.first)):
                return
            data, self.first = bytes(self.first), bytearray()
            if data.startswith(PREFACE):
                self.protocol = "h2"
                self._start_h2()
            else:
                self.protocol = "http/1.1"
                self._h1 = _H1(self)
        if self._h1 is not None:
            self._h1.feed(data)
            return
        preface, frames = self.frames.feed(data)
        passed, goaways = split_goaways(frames)
        self.goaways += goaways
        self.pods.goaways_received += [(self.pod, g) for g in goaways]
        assert self.h2 is not None
        try:
            events = self.h2.receive_data(preface + passed)
        except h2.exceptions.ProtocolError as e:
            self.pods.violations.append(f"{self.pod} connection #{self.number}: {e!r}")
            self.flush()
            self.abort()
            return
        for event in events:
            self._event(event)
        self.flush()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        self._writable.set()
        for stream in self.streams.values():
            stream.reset.set()
            if stream.task is not None:
                stream.task.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # HTTP/2

    def _start_h2(self) -> None:
        # The library is told streams are unlimited, so that it never raises on the 101st
        # stream; what we advertise (and enforce below, as RFC 9113 5.1.2 says) is ours.
        config = h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8", validate_inbound_headers=True
        )
        conn = h2.connection.H2Connection(config)
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: PEER_MAX_HEADER_LIST,
            },
        )
        conn.initiate_connection()
        conn.data_to_send()  # replaced by our own SETTINGS
        self.h2 = conn
        settings = settings_frame(
            {
                SETTINGS_MAX_CONCURRENT_STREAMS: self.pods.max_concurrent_streams,
                SETTINGS_MAX_HEADER_LIST_SIZE: PEER_MAX_HEADER_LIST,
            }
        )
        # The connection's window never holds anything up: stalls are per stream.
        conn.increment_flow_control_window(MAX_WINDOW - DEFAULT_WINDOW)
        if self.pods.settings_delay:
            self.silent = True
            asyncio.get_running_loop().call_later(self.pods.settings_delay, self._speak, settings)
        else:
            self._speak(settings)

    def _speak(self, settings: bytes) -> None:
        """The pod's preface (SETTINGS), then whatever it held back until then."""
        self.silent = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(settings)
        self.flush()

    def flush(self) -> None:
        if self.silent:
            return
        if self.h2 is not None and self.transport is not None and not self.transport.is_closing():
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        self._window.set()
        self._window = asyncio.Event()

    def _event(self, event: h2.events.Event) -> None:
        assert self.h2 is not None
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:  # ignored (after our GOAWAY) or already answered and gone
                if event.flow_controlled_length:
                    self.h2.increment_flow_control_window(event.flow_controlled_length)
                return
            stream.seen.take(event.data)
            if stream.read:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif event.flow_controlled_length:
                stream.unacked += event.flow_controlled_length
                self.h2.increment_flow_control_window(event.flow_controlled_length)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.seen.trailers = _decoded(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.seen.complete = True
                stream.ended.set()
                if stream.seen.answered:  # answered before the request ended: closed now
                    del self.streams[event.stream_id]
                    self._maybe_finish()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                if event.remote_reset:
                    stream.seen.reset_by_peer = int(event.error_code)
                    self.pods.resets.append((self.pod, event.stream_id, int(event.error_code)))
                stream.reset.set()
                if stream.task is not None:
                    stream.task.cancel()
            self._wake()
            self._maybe_finish()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._wake()

    def _request(self, event: h2.events.RequestReceived) -> None:
        assert self.h2 is not None
        sid = event.stream_id
        headers = _decoded(event.headers)
        if self.goaway_sent is not None and sid > self.goaway_sent:
            self.ignored += 1
            self.pods.ignored[self.pod] += 1
            path = dict(headers).get(":path", "")
            self.pods.ignored_streams.append((self.pod, self.number, sid, path))
            return  # never processed: sidelink must take it as refused (RFC 9113 6.8)
        self.streams_seen += 1
        if len(self.streams) >= self.pods.max_concurrent_streams:
            self.over_limit += 1
            self.pods.over_limit[self.pod] += 1
            self.h2.reset_stream(sid, REFUSED_STREAM)
            return
        if self.pod in self.pods.refuse:
            self.pods.refused[self.pod] += 1
            self.h2.reset_stream(sid, REFUSED_STREAM)
            return
        pseudo = dict(h for h in headers if h[0].startswith(":"))
        seen = Seen(
            self.pod,
            "h2",
            self.number,
            sid,
            method=pseudo.get(":method", ""),
            path=pseudo.get(":path", ""),
            authority=pseudo.get(":authority", ""),
            headers=[h for h in headers if not h[0].startswith(":")],
            never_indexed=[
                name
                for name, _ in _decoded(
                    [h for h in event.headers if isinstance(h, hpack.NeverIndexedHeaderTuple)]
                )
            ],
        )
        self.pods.requests.append(seen)
        self.pods.hits[self.pod] += 1
        stream = _PodStream(seen)
        if event.stream_ended is not None:
            seen.complete = True
            stream.ended.set()
        if seen.path.startswith("/stall-upload"):
            stream.read = False
        self.streams[sid] = stream
        self.max_open = max(self.max_open, len(self.streams))
        after = self.pods.goaway_after.get(self.pod)
        if after is not None and self.streams_seen >= after and self.goaway_sent is None:
            self.send_goaway(sid)
        stream.task = asyncio.ensure_future(self._serve(sid, stream))
        self.pods.tasks.add(stream.task)
        stream.task.add_done_callback(self.pods.tasks.discard)

    def send_goaway(self, last_stream_id: int | None = None, code: int = NO_ERROR) -> None:
        """GOAWAY, written past the library (which would stop every stream): the streams up
        to last_stream_id go on; the connection closes once they are done."""
        if self.h2 is None or self.transport is None or self.transport.is_closing():
            return
        last = max(self.streams, default=0) if last_stream_id is None else last_stream_id
        self.goaway_sent = last
        self.flush()
        self.transport.write(goaway_frame(last, code))
        self.pods.goaways_sent.append((self.pod, self.number, last))
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.goaway_sent is not None and not any(
            sid <= self.goaway_sent for sid in self.streams
        ):
            assert self.transport is not None
            self.flush()
            self.transport.close()

    async def _serve(self, sid: int, stream: _PodStream) -> None:
        try:
            await self.pods.behave(self, sid, stream)
        except (h2.exceptions.StreamClosedError, ConnectionError):
            pass  # sidelink reset the stream, or the connection went
        except h2.exceptions.ProtocolError as e:
            if not self.closed:
                self.pods.violations.append(f"{self.pod} stream {sid}: {e!r}")
        finally:
            if self.streams.get(sid) is stream and stream.seen.answered and stream.seen.complete:
                del self.streams[sid]
            self._maybe_finish()

    # what a stream's handler uses

    async def send_headers(self, sid: int, headers: Fields, *, end: bool = False) -> None:
        assert self.h2 is not None
        self.h2.send_headers(sid, headers, end_stream=end)
        self.flush()

    async def send_body(self, sid: int, data: bytes | Iterable[bytes], *, end: bool = True) -> None:
        """Body bytes as flow control allows them; with end, the stream's end after them."""
        assert self.h2 is not None
        pieces = [data] if isinstance(data, bytes) else data
        stream = self.streams[sid]
        for piece in pieces:
            view = memoryview(piece)
            while view:
                if stream.reset.is_set() or self.closed:
                    raise ConnectionError("stream reset")
                window = self.h2.local_flow_control_window(sid)
                size = min(window, len(view), self.h2.max_outbound_frame_size)
                if size <= 0:
                    await self._window.wait()
                    continue
                self.h2.send_data(sid, view[:size].tobytes())
                stream.seen.sent += size
                view = view[size:]
                self.flush()
                if not self._writable.is_set():
                    await self._writable.wait()
        if end:
            self.h2.end_stream(sid)
            stream.seen.answered = True
            self.flush()

    async def send_malformed(self, sid: int, part: str) -> None:
        """A second :status in the head, or a body shorter than its content-length."""
        assert self.h2 is not None
        config = self.h2.config
        config.validate_outbound_headers = config.normalize_outbound_headers = False
        try:
            if part == "head":
                self.h2.send_headers(sid, [(":status", "200"), (":status", "204")])
            else:
                self.h2.send_headers(sid, [(":status", "200"), ("content-length", "10")])
                self.h2.send_data(sid, b"short", end_stream=True)
        finally:
            config.validate_outbound_headers = config.normalize_outbound_headers = True
        self.streams[sid].seen.answered = True
        self.flush()

    async def send_trailers(self, sid: int, trailers: Fields) -> None:
        assert self.h2 is not None
        self.h2.send_headers(sid, trailers, end_stream=True)
        self.streams[sid].seen.answered = True
        self.flush()

    def reset_stream(self, sid: int, code: int) -> None:
        assert self.h2 is not None
        self.h2.reset_stream(sid, code)
        self.streams.pop(sid, None)
        self.flush()


def _decoded(headers: Sequence[tuple[Any, Any]]) -> Fields:
    return [
        (k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v)
        for k, v in headers
    ]


class _H1:
    """HTTP/1.1 on a pod's port (for a client that sent no preface): the same answers."""

    def __init__(self, conn: PodConnection) -> None:
        self.conn = conn
        self.parser = httptools.HttpRequestParser(self)
        self.seen: Seen | None = None
        self.url = b""

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.conn.pods.violations.append(f"{self.conn.pod} HTTP/1.1: {e!r} in {data[:200]!r}")
            self.conn.abort()

    def on_message_begin(self) -> None:
        self.seen = Seen(self.conn.pod, "http/1.1", self.conn.number, 0)
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.seen is not None
        self.seen.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self.seen is not None
        self.seen.method = self.parser.get_method().decode()
        self.seen.path = self.url.decode("latin-1")
        self.seen.authority = self.seen.header("host") or ""

    def on_body(self, body: bytes) -> None:
        assert self.seen is not None
        self.seen.take(body)

    def on_message_complete(self) -> None:
        seen = self.seen
        assert seen is not None and self.conn.transport is not None
        seen.complete = True
        pods = self.conn.pods
        pods.requests.append(seen)
        pods.hits[seen.pod] += 1
        body = json.dumps(seen.account()).encode()
        keep = self.parser.should_keep_alive()
        self.conn.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-pod: %s\r\n"
            b"content-length: %d\r\n%s\r\n%s"
            % (seen.pod.encode(), len(body), b"" if keep else b"connection: close\r\n", body)
        )
        seen.answered = True
        if not keep:
            self.conn.transport.close()


class H2Pods(Pods):
    """h2c pods on `hosts` sharing one port; an async context manager.

    What a stream's path asks of the pod (after the whole request has arrived, unless said):
      /hold/KEY         wait for release(KEY) (`holding` counts the streams waiting)
      /slow/SECONDS     answer after that long
      /status/CODE      answer with that status
      /big/BYTES        a body of BYTES (a multiple of data.CHUNK) of data.chunks(BYTES)
      /trailers...      the answer ends with trailers (as does any request that had some)
      /reset/STAGE/CODE RST_STREAM CODE: at once (now), after the response head (head), or
                        after the head and some body (body); ?sized: a head that says a
                        content-length (never reached)
      /stall-upload     never acknowledge the request body (the stream's window closes)
                        and never answer
    anything else: 200 with the JSON account of the request (Seen.account), `x-pod: POD`.

    What the test can set: `refuse` (pods that reset every new stream with REFUSED_STREAM),
    `goaway_after` ({pod: N}: each of its connections sends GOAWAY once it has seen N
    streams, naming the Nth as its last-stream-id: the streams above it are ignored),
    goaway(pod) now, stall(pod) (stop reading the pod's connections), and
    `max_concurrent_streams` (advertised, and enforced with REFUSED_STREAM), and
    `settings_delay` (seconds between a client's preface and the pod's SETTINGS: until
    they come, the client does not know the limit, as over a real network).
    """

    def __init__(
        self, *hosts: str, max_concurrent_streams: int = 100, settings_delay: float = 0.0
    ) -> None:
        super().__init__(hosts or (POD,))
        self.max_concurrent_streams = max_concurrent_streams
        self.settings_delay = settings_delay
        self.refuse: set[str] = set()
        self.goaway_after: dict[str, int] = {}
        self.stalled: set[str] = set()
        self.conns: list[PodConnection] = []
        self.accepted: Counter[str] = Counter()  # connections per pod
        self.hits: Counter[str] = Counter()  # requests taken (not refused, not ignored)
        self.refused: Counter[str] = Counter()
        self.over_limit: Counter[str] = Counter()
        self.ignored: Counter[str] = Counter()
        self.ignored_streams: list[tuple[str, int, int, str]] = []  # (pod, conn, stream, path)
        self.requests: list[Seen] = []
        self.resets: list[tuple[str, int, int]] = []  # (pod, stream id, code) sidelink sent
        self.goaways_sent: list[tuple[str, int, int]] = []  # (pod, connection, last id)
        self.goaways_received: list[tuple[str, GoAway]] = []
        self.violations: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self._releases: dict[str, asyncio.Event] = {}
        self._holding: Counter[str] = Counter()
        self._servers: list[asyncio.AbstractServer] = []

    def __repr__(self) -> str:
        return (
            f"<H2Pods port={self.port} hits={dict(self.hits)} connections={dict(self.accepted)} "
            f"holding={self.holding}>"
        )

    async def _listen(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: PodConnection(self), host, port, backlog=1024)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def _unlisten(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []

    async def stop(self) -> None:
        await self._unlisten()
        for conn in self.conns:
            conn.abort()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)

    def check(self) -> None:
        assert not self.violations, self.violations

    # controls

    @property
    def holding(self) -> int:
        return sum(self._holding.values())

    def held(self, key: str) -> int:
        return self._holding[key]

    def release(self, key: str) -> None:
        self._releases.setdefault(key, asyncio.Event()).set()

    def live(self, pod: str | None = None) -> list[PodConnection]:
        return [
            c
            for c in self.conns
            if not c.closed and c.protocol == "h2" and (pod is None or c.pod == pod)
        ]

    def goaway(self, pod: str | None = None, last_stream_id: int | None = None) -> int:
        """GOAWAY on every live HTTP/2 connection of pod (all pods when None); how many."""
        conns = self.live(pod)
        for conn in conns:
            conn.send_goaway(last_stream_id)
        return len(conns)

    def stall(self, pod: str) -> None:
        self.stalled.add(pod)
        for c in self.conns:
            if c.pod == pod and c.transport is not None and not c.closed:
                c.transport.pause_reading()

    def unstall(self, pod: str) -> None:
        self.stalled.discard(pod)
        for c in self.conns:
            if c.pod == pod and c.transport is not None and not c.closed:
                c.transport.resume_reading()

    def seen(self, path: str) -> list[Seen]:
        return [s for s in self.requests if s.path == path]

    def max_open(self) -> int:
        return max((c.max_open for c in self.conns), default=0)

    # one stream

    async def behave(self, conn: PodConnection, sid: int, stream: _PodStream) -> None:
        seen = stream.seen
        parts = seen.path.split("?")[0].strip("/").split("/")
        kind = parts[0]
        if kind == "stall-upload":
            await stream.reset.wait()
            return
        if kind == "reset" and parts[1] == "now":
            conn.reset_stream(sid, int(parts[2]))
            return
        if kind == "malformed":  # an answer HTTP/2 forbids: /malformed/head, /malformed/body
            await conn.send_malformed(sid, parts[1])
            return
        await stream.ended.wait()
        status = 200
        if kind == "hold":
            key = parts[1]
            self._holding[key] += 1
            try:
                await self._releases.setdefault(key, asyncio.Event()).wait()
            finally:
                self._holding[key] -= 1
        elif kind == "slow":
            await asyncio.sleep(float(parts[1]))  # the pod's own pace, not a wait
        elif kind == "status":
            status = int(parts[1])
        head = [(":status", str(status)), ("x-pod", seen.pod), ("x-stream", str(sid))]
        if kind == "big":
            size = int(parts[1])
            await conn.send_headers(
                sid,
                [
                    *head,
                    ("content-type", "application/octet-stream"),
                    ("content-length", str(size)),
                ],
            )
            await conn.send_body(sid, chunks(size))
            return
        if kind == "reset":
            head.append(("content-type", "text/plain"))
            if seen.path.endswith("?sized"):
                head.append(("content-length", "100000"))
            await conn.send_headers(sid, head)
            if parts[1] == "body":
                await conn.send_body(sid, b"partial " * 128, end=False)
            conn.reset_stream(sid, int(parts[2]))
            return
        body = json.dumps(seen.account()).encode()
        head.append(("content-type", "application/json"))
        if kind == "trailers" or seen.trailers:
            await conn.send_headers(sid, head)
            await conn.send_body(sid, body, end=False)
            echoed = ";".join(f"{k}={v}" for k, v in seen.trailers)
            await conn.send_trailers(
                sid, [("x-pod-trailer", seen.pod), ("x-echo-trailers", echoed or "-")]
            )
            return
        await conn.send_headers(sid, [*head, ("content-length", str(len(body)))])
        await conn.send_body(sid, body)


# --- a client ------------------------------------------------------------------------------


class StreamReset(Exception):
    """The stream was reset by the peer (code), or refused by its GOAWAY (code None)."""

    def __init__(self, stream_id: int, code: int | None, refused: bool = False) -> None:
        self.stream_id = stream_id
        self.code = code
        self.refused = refused
        how = "refused by GOAWAY" if refused else f"reset {error_name(code)}"
        super().__init__(f"stream {stream_id} {how}")


@dataclass
class H2Response:
    stream_id: int
    status: int
    headers: Fields
    body: bytes
    trailers: Fields
    body_bytes: int
    body_sha256: str

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return ", ".join(values) if values else None

    def trailer(self, name: str) -> str | None:
        values = [v for k, v in self.trailers if k == name.lower()]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class _ClientStream:
    def __init__(self, stream_id: int, keep: bool, read: bool) -> None:
        self.id = stream_id
        self.keep = keep  # keep the body (else only its length and digest)
        self.read = read  # acknowledge its data (else its window closes)
        self.unacked = 0
        self.sent = 0  # request body bytes written
        self.headers: Fields | None = None
        self.body = bytearray()
        self.body_bytes = 0
        self.sha = hashlib.sha256()
        self.trailers: Fields = []
        self.ended = False
        self.reset: int | None = None
        self.refused = False
        self.got_headers = asyncio.Event()
        self.done = asyncio.Event()
        self.got_data = asyncio.Event()


class H2Client(asyncio.Protocol):
    """One HTTP/2 (prior knowledge) client connection; see the module docstring."""

    def __init__(
        self,
        *,
        authority: str = "app1",
        initial_window: int = DEFAULT_WINDOW,
        settings: dict[int, int] | None = None,
    ) -> None:
        self.authority = authority
        self.initial_window = initial_window
        self.extra_settings = settings or {}
        self.transport: asyncio.Transport | None = None
        self.h2: h2.connection.H2Connection | None = None
        self.frames = FrameBuffer()
        self.streams: dict[int, _ClientStream] = {}
        self.goaways: list[GoAway] = []
        self.errors: list[BaseException] = []
        self.frames_in: Counter[str] = Counter()
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.remote_settings = asyncio.Event()
        self._window = asyncio.Event()

    def __repr__(self) -> str:
        closed = self.closed.is_set()
        return f"<H2Client streams={len(self.streams)} goaways={self.goaways} closed={closed}>"

    @classmethod
    async def connect(cls, address: tuple[str, int], **options: Any) -> H2Client:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(lambda: cls(**options), *address)
        async with asyncio.timeout(IO_TIMEOUT):
            await client.connected.wait()  # uvloop calls connection_made a little later
        return client

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, address: tuple[str, int], **options: Any) -> AsyncIterator[H2Client]:
        client = await cls.connect(address, **options)
        try:
            yield client
        finally:
            await client.close()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        config = h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_inbound_headers=True
        )
        conn = h2.connection.H2Connection(config)
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.initial_window,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: PEER_MAX_HEADER_LIST,
                **self.extra_settings,
            },
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(MAX_WINDOW - DEFAULT_WINDOW)
        self.h2 = conn
        self.flush()
        self.connected.set()

    def data_received(self, data: bytes) -> None:
        _, frames = self.frames.feed(data)
        for f, _raw in frames:
            self.frames_in[FRAME_NAMES.get(f.type, hex(f.type))] += 1
        passed, goaways = split_goaways(frames)
        assert self.h2 is not None
        try:
            events = self.h2.receive_data(passed) if passed else []
        except h2.exceptions.ProtocolError as e:
            self.errors.append(e)
            self._fail_all()
            if self.transport is not None:
                self.transport.abort()
            return
        for event in events:
            self._event(event)
        for g in goaways:
            self.goaways.append(g)
            for stream in self.streams.values():
                if stream.id > g.last_stream_id and not stream.done.is_set():
                    stream.refused = True
                    stream.done.set()
                    stream.got_headers.set()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self._fail_all()

    def _fail_all(self) -> None:
        self._wake()
        for stream in self.streams.values():
            stream.got_headers.set()
            stream.got_data.set()
            stream.done.set()

    def _wake(self) -> None:
        self._window.set()
        self._window = asyncio.Event()

    def flush(self) -> None:
        if self.h2 is not None and self.transport is not None and not self.transport.is_closing():
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)

    def _event(self, event: h2.events.Event) -> None:
        assert self.h2 is not None
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.headers = _decoded(event.headers)
            stream.got_headers.set()
        elif isinstance(event, h2.events.DataReceived):
            if stream is None:
                if event.flow_controlled_length:
                    self.h2.increment_flow_control_window(event.flow_controlled_length)
                return
            stream.body_bytes += len(event.data)
            stream.sha.update(event.data)
            if stream.keep:
                stream.body += event.data
            stream.got_data.set()
            if stream.read:
                self.h2.acknowledge_received_data(event.flow_controlled_length, stream.id)
            elif event.flow_controlled_length:
                stream.unacked += event.flow_controlled_length
                self.h2.increment_flow_control_window(event.flow_controlled_length)
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.trailers = _decoded(event.headers)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended = True
            stream.done.set()
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.reset = int(event.error_code)
            stream.got_headers.set()
            stream.done.set()
            self._wake()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            if isinstance(event, h2.events.RemoteSettingsChanged):
                self.remote_settings.set()
            self._wake()
        elif isinstance(event, h2.events.SettingsAcknowledged):
            pass

    # requests

    @property
    def goaway(self) -> GoAway | None:
        return self.goaways[-1] if self.goaways else None

    def start(
        self,
        method: str = "GET",
        path: str = "/",
        headers: Sequence[tuple[str, str]] = (),
        *,
        end: bool = True,
        keep: bool = True,
        read: bool = True,
    ) -> int:
        """HEADERS for a new stream (with end, the request is complete); its id."""
        assert self.h2 is not None
        if self.goaways:
            raise ConnectionError(f"GOAWAY received: {self.goaways}")
        if self.closed.is_set():
            raise ConnectionError("connection closed")
        sid = self.h2.get_next_available_stream_id()
        self.streams[sid] = _ClientStream(sid, keep, read)
        fields = [
            (":method", method),
            (":scheme", "http"),
            (":authority", self.authority),
            (":path", path),
            *headers,
        ]
        self.h2.send_headers(sid, fields, end_stream=end)
        self.flush()
        return sid

    async def send(self, sid: int, data: bytes, *, end: bool = False) -> None:
        """Request body bytes as the stream's and the connection's windows allow."""
        assert self.h2 is not None
        view = memoryview(data)
        while view:
            stream = self.streams[sid]
            if stream.done.is_set():
                raise StreamReset(sid, stream.reset, stream.refused)
            if self.closed.is_set():
                raise ConnectionError("connection closed")
            window = self.h2.local_flow_control_window(sid)
            size = min(window, len(view), self.h2.max_outbound_frame_size)
            if size <= 0:
                await self._window.wait()
                continue
            self.h2.send_data(sid, view[:size].tobytes())
            stream.sent += size
            view = view[size:]
            self.flush()
            assert self.transport is not None
            if self.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                await asyncio.sleep(0.001)  # let the loop write (a pace, not a wait)
        if end:
            self.h2.end_stream(sid)
            self.flush()

    def send_trailers(self, sid: int, trailers: Sequence[tuple[str, str]]) -> None:
        assert self.h2 is not None
        self.h2.send_headers(sid, list(trailers), end_stream=True)
        self.flush()

    def reset(self, sid: int, code: int = CANCEL) -> None:
        assert self.h2 is not None
        self.h2.reset_stream(sid, code)
        self.streams[sid].done.set()
        self.flush()

    def resume(self, sid: int) -> None:
        """Acknowledge what a stream started with read=False got, and read it from now on."""
        assert self.h2 is not None
        stream = self.streams[sid]
        stream.read = True
        if stream.unacked:
            self.h2.increment_flow_control_window(stream.unacked, stream_id=sid)
            stream.unacked = 0
            self.flush()

    async def headers(self, sid: int, timeout: float = IO_TIMEOUT) -> Fields:
        stream = self.streams[sid]
        async with asyncio.timeout(timeout):
            await stream.got_headers.wait()
        self._raise_if_failed(stream)
        assert stream.headers is not None
        return stream.headers

    def _raise_if_failed(self, stream: _ClientStream) -> None:
        if self.errors:
            raise AssertionError(f"protocol error from sidelink: {self.errors}")
        if stream.refused:
            raise StreamReset(stream.id, None, refused=True)
        if stream.reset is not None:
            raise StreamReset(stream.id, stream.reset)
        if stream.headers is None or (stream.done.is_set() and not stream.ended):
            raise ConnectionError(f"connection closed before stream {stream.id} ended")

    async def response(self, sid: int, timeout: float = IO_TIMEOUT) -> H2Response:
        """The stream's whole response; StreamReset if it was reset or refused."""
        stream = self.streams[sid]
        try:
            async with asyncio.timeout(timeout):
                await stream.done.wait()
        except TimeoutError:
            raise AssertionError(
                f"stream {sid} unanswered after {timeout}s (headers={stream.headers}, "
                f"{stream.body_bytes} body bytes, goaways={self.goaways})"
            ) from None
        self._raise_if_failed(stream)
        assert stream.headers is not None
        headers = [h for h in stream.headers if h[0] != ":status"]
        status = int(dict(stream.headers)[":status"])
        return H2Response(
            sid,
            status,
            headers,
            bytes(stream.body),
            stream.trailers,
            stream.body_bytes,
            stream.sha.hexdigest(),
        )

    def received(self, sid: int) -> int:
        return self.streams[sid].body_bytes

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        trailers: Sequence[tuple[str, str]] | None = None,
        timeout: float = IO_TIMEOUT,
        keep: bool = True,
    ) -> H2Response:
        end = body is None and trailers is None
        sid = self.start(method, path, headers, end=end, keep=keep)
        if body is not None:
            await self.send(sid, body, end=trailers is None)
        if trailers is not None:
            self.send_trailers(sid, trailers)
        return await self.response(sid, timeout)

    async def wait_goaway(self, timeout: float = IO_TIMEOUT) -> GoAway:
        async def seen() -> None:
            while not self.goaways:
                if self.closed.is_set():
                    raise AssertionError("connection closed without a GOAWAY")
                await asyncio.sleep(0.01)

        async with asyncio.timeout(timeout):
            await seen()
        return self.goaways[-1]

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self.closed.wait()


# --- hand-framed bytes ---------------------------------------------------------------------


def request_block(
    encoder: hpack.Encoder,
    path: str = "/",
    method: str = "GET",
    extra: Sequence[tuple[str, str]] = (),
    authority: str = "app1",
) -> bytes:
    """A request's header block, HPACK-encoded with `encoder` (whose table it changes)."""
    fields = [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path)]
    return bytes(encoder.encode([*fields, *extra]))


@dataclass
class Ending:
    """How an attacker's connection ended, as the attacker read it."""

    goaways: list[GoAway] = field(default_factory=list)
    closed: bool = False  # EOF or reset
    resets: dict[int, int] = field(default_factory=dict)  # stream -> RST_STREAM code
    frames: Counter[str] = field(default_factory=Counter)
    written: int = 0  # bytes the attacker got onto the wire
    note: str = ""

    def __repr__(self) -> str:
        return (
            f"<Ending goaways={self.goaways} closed={self.closed} resets={len(self.resets)} "
            f"frames={dict(self.frames)} written={self.written} {self.note}>"
        )

    @property
    def calmed(self) -> bool:
        """Told ENHANCE_YOUR_CALM, or cut off without a word; never another GOAWAY."""
        if self.goaways:
            return all(g.error_code == ENHANCE_YOUR_CALM for g in self.goaways)
        return self.closed


class RawH2:
    """A client connection written frame by frame (see the module docstring)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames = FrameBuffer()
        self.seen: list[Frame] = []
        self.ending = Ending()
        self.encoder = hpack.Encoder()
        self.ids = itertools.count(1, 2)

    @classmethod
    async def open(cls, address: tuple[str, int], settings: dict[int, int] | None = None) -> RawH2:
        """Connected, preface and SETTINGS sent, the server's SETTINGS read and acknowledged."""
        reader, writer = await asyncio.open_connection(*address)
        raw = cls(reader, writer)
        writer.write(PREFACE + settings_frame(settings))
        got = await raw.read_until(lambda f: f.type == SETTINGS and not f.flags & ACK)
        assert got is not None, f"no SETTINGS from sidelink: {raw.ending}"
        writer.write(settings_frame(ack=True))
        await writer.drain()
        return raw

    def next_id(self) -> int:
        return next(self.ids)

    async def write(self, data: bytes, timeout: float = 5.0) -> bool:
        """Write and drain; False when the peer stopped taking bytes (closed, or not
        reading for `timeout`)."""
        if self.writer.is_closing():
            return False
        try:
            self.writer.write(data)
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        except (ConnectionError, TimeoutError):
            return False
        self.ending.written += len(data)
        return True

    async def read_until(
        self, done: Callable[[Frame], bool], timeout: float = IO_TIMEOUT
    ) -> Frame | None:
        """Read frames until one satisfies done (returned), or EOF, reset or timeout (None)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        self.ending.closed = True
                        return None
                    _, frames = self.frames.feed(data)
                    hit = None
                    for f, _raw in frames:
                        self._note(f)
                        if hit is None and done(f):
                            hit = f
                    if hit is not None:
                        return hit
        except ConnectionError:
            self.ending.closed = True
        except TimeoutError:
            self.ending.note = f"nothing decisive within {timeout}s"
        return None

    def _note(self, f: Frame) -> None:
        if len(self.seen) < MAX_KEPT_FRAMES:
            self.seen.append(f)
        self.ending.frames[FRAME_NAMES.get(f.type, hex(f.type))] += 1
        if f.type == GOAWAY:
            self.ending.goaways.append(GoAway.of(f))
        elif f.type == RST_STREAM:
            self.ending.resets[f.stream_id] = f.error_code

    async def outcome(self, timeout: float = IO_TIMEOUT) -> Ending:
        """Read until a GOAWAY or the end of the connection (or timeout): how it ended."""
        await self.read_until(lambda f: f.type == GOAWAY, timeout)
        return self.ending

    async def response(self, stream_id: int, timeout: float = IO_TIMEOUT) -> tuple[int, bytes]:
        """(status, body) of a stream, decoded from the frames read meanwhile."""
        decoder = hpack.Decoder()
        decoder.max_header_list_size = PEER_MAX_HEADER_LIST
        status, body, block = 0, bytearray(), bytearray()
        # Every header block must go through the decoder, in order, to keep its table right.
        start = len(self.seen)

        def ended(f: Frame) -> bool:
            return f.stream_id == stream_id and (
                f.type == RST_STREAM or (f.type in (DATA, HEADERS) and bool(f.flags & END_STREAM))
            )

        if not any(ended(f) for f in self.seen[:start]):
            got = await self.read_until(ended, timeout)
            assert got is not None, f"stream {stream_id} not answered: {self.ending}"
        for f in self.seen:
            if f.type in (HEADERS, CONTINUATION):
                block += _header_fragment(f)
                if f.flags & END_HEADERS:
                    fields = decoder.decode(bytes(block))
                    block.clear()
                    if f.stream_id == stream_id and not status:
                        status = int(dict(fields).get(":status", "0"))
            elif f.type == DATA and f.stream_id == stream_id:
                body += f.payload
            elif f.type == RST_STREAM and f.stream_id == stream_id:
                raise StreamReset(stream_id, f.error_code)
        return status, bytes(body)

    async def close(self) -> None:
        self.writer.transport.abort()


def _header_fragment(f: Frame) -> bytes:
    """A HEADERS frame's block fragment, without its padding and priority fields."""
    payload = f.payload
    if f.type == HEADERS:
        pad = 0
        if f.flags & 0x8:
            pad = payload[0]
            payload = payload[1:]
        if f.flags & 0x20:
            payload = payload[5:]
        if pad:
            payload = payload[:-pad]
    return payload


# --- HPACK by hand -------------------------------------------------------------------------


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1) in a first byte carrying `first` in its high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name: bytes, value: bytes, *, index: bool = False) -> bytes:
    """A literal field with a new name, not Huffman-coded; with index, added to the table."""
    head = hpack_int(0, 6, 0x40) if index else hpack_int(0, 4, 0x00)
    return head + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


# :method GET, :scheme http, :path / from the static table, :authority app1 as a literal.
STATIC_GET = bytes([0x82, 0x86, 0x84]) + hpack_int(1, 4, 0x00) + hpack_int(4, 7) + b"app1"
