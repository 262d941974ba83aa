"""HTTP/2 (cleartext, prior knowledge) on asyncio Protocols, framed by ngh2 (libnghttp2).

:class:`H2Downstream` is a client connection that began with the HTTP/2 preface (the
HTTP/1 protocol that accepted it hands it over). Each stream is one request, a
:class:`Stream`, balanced on its own over the route's endpoints and carried upstream
on an :class:`H2Upstream`: a connection to one endpoint that multiplexes streams, kept
in that endpoint's :class:`~proxy.pool.StreamPool`.

Flow control is end to end. Data taken from one side is acknowledged to its sender
(its window reopened) only once it has left for the other side, so sidelink holds at
most a stream's window per stream and a connection's window per connection, and a
stream whose reader is slow stalls only itself.

The engine (ngh2) frames, checks and limits the protocol: HPACK, SETTINGS, PING,
windows, the header list limit, and the flood limits (CONTINUATION, SETTINGS, PING,
reset rates). What it refuses as a flood ends the connection with GOAWAY
ENHANCE_YOUR_CALM, as does a client that resets most of its streams before their
answer within a second of opening them (rapid reset, CVE-2023-44487).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Final, cast

import httptools
import ngh2
from ngh2 import (
    Configuration,
    ConnectionClosed,
    DataReceived,
    GoAwayReceived,
    InformationalResponseReceived,
    RequestReceived,
    ResponseReceived,
    Role,
    Setting,
    SettingsReceived,
    StreamClosed,
    StreamReset,
    TrailersReceived,
)
from ngh2.types import Header

from proxy.endpoints import DRAINING, Endpoint
from proxy.errors import (
    BadRequest,
    BodyStalled,
    ClientGone,
    ClientReset,
    ConnectionCut,
    MethodNotAllowed,
    NoEndpoints,
    ProtocolError,
    ProxyError,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.flow import FlowControl
from proxy.http import heads
from proxy.http.exchange import (
    AWAITING,
    CONNECTING,
    DONE,
    HEAD,
    NO_ENDPOINTS,
    PHASES,
    REPLAY_LIMIT,
    SENDING,
    STREAMING,
    Exchange,
    Upstream,
    log_answer,
    perf_counter,
)
from proxy.http.heads import (
    CRLF,
    FRAMING_CLOSE,
    FRAMING_LENGTH,
    IDEMPOTENT,
    LAST_CHUNK,
    MAX_HEAD_BYTES,
    NO_METHOD,
)
from proxy.metrics import RESET_CODE
from proxy.pool import ASSUMED_STREAM_LIMIT, Multiplexed, StreamPool
from proxy.route import Route, peer_name

log = logging.getLogger("sidelink.http2")

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# What a peer may send on one stream, and on one connection, before sidelink has passed
# it on: the most it holds for a stream, and for a connection.
STREAM_WINDOW: Final = 256 * 1024
CONNECTION_WINDOW: Final = 1024 * 1024
# Credit given back for closed streams goes to the peer once this much has gathered: one
# WINDOW_UPDATE for many small answers, not one each (the peer's window is short of at
# most this, a sixteenth of it).
REGROW_AT: Final = CONNECTION_WINDOW // 16
MAX_WINDOW: Final = 2**31 - 1
# Between the shutdown notice (GOAWAY with the largest stream id) and the final GOAWAY
# naming the last stream sidelink takes: streams the client sent meanwhile still count.
GOAWAY_GRACE: Final = 1.0
# Rapid reset: a reset is premature when it comes before any answer, within this long of
# the stream's opening (a call cancelled later, or once its answer began, is the client's
# business); a client with more than PREMATURE_RESETS of them, and more than half of all
# the streams it opened, is cut. Envoy's defaults: 1 s, and half of at least 500 streams.
PREMATURE_LIFETIME: Final = 1.0
PREMATURE_RESETS: Final = 250
# After cutting a client, how long its GOAWAY has to reach it before the close.
LINGER_TIMEOUT: Final = 1.0
# The most of one read the engine takes in at once: between slices sidelink checks
# what came (a burst of resets in one big read is seen before the engine's own limit).
RECEIVE_SLICE: Final = 16 * 1024

NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
ENHANCE_YOUR_CALM: Final = 0xB
# Not a code of the protocol's: the engine itself reset an upstream stream, for what the
# server sent on it was malformed (a second :status, an uppercase name, fewer bytes than
# its content-length): the server's fault, reason "protocol", not a reset by the server.
MALFORMED: Final = -1

SERVER_CONFIG: Final = Configuration(
    auto_window_update=False,
    max_inbound_header_list_size=MAX_HEAD_BYTES,
    # Resets are counted by sidelink itself (PREMATURE_RESETS), which cuts with
    # ENHANCE_YOUR_CALM; the engine's own limit (which says INTERNAL_ERROR) is a backstop.
    stream_reset_rate_limit=(10_000, 1_000),
)
CLIENT_CONFIG: Final = Configuration(
    auto_window_update=False, max_inbound_header_list_size=MAX_HEAD_BYTES
)
Fields = Sequence[Header]
# What the three digits of a status each count too much as ASCII ("0" is 48).
THREE_ZEROS: Final = ord("0") * 111
# The engine's event classes, as constants: compiled code reads a Final from a C static,
# an imported name from the module's dict, and dispatch compares each event with several.
DATA: Final = DataReceived
REQUEST: Final = RequestReceived
RESPONSE: Final = ResponseReceived
INTERIM: Final = InformationalResponseReceived
TRAILERS: Final = TrailersReceived
CLOSED: Final = StreamClosed
RESET: Final = StreamReset
GOAWAY: Final = GoAwayReceived
SETTINGS: Final = SettingsReceived
ENDED: Final = ConnectionClosed


class Carrier(Multiplexed):
    """A connection that carries streams: either side of an HTTP/2 connection, or an
    HTTP/1.1 connection carrying one stream upstream (``upstream_protocol: http1``).

    Data a carrier took from its peer is acknowledged (``acknowledge``) once it has
    left for the other side; what never will (its stream ended) is given back
    (``give_back``). ``held`` says how much of what a stream handed it is still here.
    """

    # Streams whose data from the other side is held here, not all sent. (A dict as a
    # set: an empty one is 64 bytes, an empty set 216, and most connections owe nothing
    # when idle.)
    owing: dict[Rider, None]
    parting: bool  # the peer said GOAWAY: a stream it refuses here is routine, not an error
    # What the peer sent that ended the connection (garbage, or not HTTP/2 at all), if so.
    broken: UpstreamError | None
    pool: StreamPool | None

    def pooled(self, pool: StreamPool) -> None:
        """Made (dialled): it joins its endpoint's pool."""
        self.pool = pool
        pool.add(self)

    def open(self, stream: Rider, end: bool) -> int:
        """Start ``stream`` here (its request head): its id on this connection."""
        raise NotImplementedError

    def send_data(self, sid: int, data: bytes, end: bool) -> None:
        raise NotImplementedError

    def send_trailers(self, sid: int, fields: Fields) -> None:
        raise NotImplementedError

    def cancel(self, sid: int, owed: int) -> None:
        """Stop stream ``sid`` (``owed``: what it sent that never goes on)."""
        raise NotImplementedError

    def held(self, sid: int) -> int:
        """Bytes handed to ``sid`` that have not left yet."""
        raise NotImplementedError

    def acknowledge(self, size: int, sid: int) -> None:
        raise NotImplementedError

    def give_back(self, size: int, sid: int) -> None:
        raise NotImplementedError

    def schedule(self) -> None:
        raise NotImplementedError

    def stream_ended(self) -> None:
        raise NotImplementedError


class H2Connection(Carrier):
    """What both sides of HTTP/2 share: the engine, writing what it has to send, and
    the credit owed to the other side for data that has left through this connection."""

    def __init__(self, route: Route, role: Role, config: Configuration) -> None:
        self.route = route
        self.stats = route.stats
        self.loop = route.loop
        self.clock = route.clock
        self.h2 = ngh2.Connection(role, config)
        self.transport: asyncio.Transport | None = None
        self.paused = False  # the socket's buffer is full: frames wait in the engine
        self.flush_due = False
        self.owing = {}
        self.window = CONNECTION_WINDOW  # the connection window advertised to the peer
        self.regrown = 0  # ...grown since the engine was last told
        self.closed = False
        self.parting = False
        self.broken = None
        self.lingering = False  # cut: its GOAWAY sent, closed after LINGER_TIMEOUT
        self.last_active = self.clock()

    def begin(self, settings: dict[Setting, int]) -> None:
        h2 = self.h2
        h2.initiate_connection(
            {
                Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                Setting.MAX_HEADER_LIST_SIZE: MAX_HEAD_BYTES,
                Setting.ENABLE_PUSH: 0,
                **settings,
            }
        )
        h2.set_local_window_size(CONNECTION_WINDOW)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.flush()

    def schedule(self) -> None:
        """Write what the engine has, soon: what several streams queue goes in one write."""
        if not self.flush_due:
            self.flush_due = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_due = False
        transport = self.transport
        if transport is None or self.paused or self.closed:
            return
        h2 = self.h2
        if self.regrown >= REGROW_AT:
            self.regrown = 0
            try:
                h2.set_local_window_size(self.window)
            except ngh2.NGH2Error:
                pass  # (the engine is closing)
        data = h2.data_to_send()
        if data:
            transport.write(data)
            self.sent(len(data))
        # (Sending makes events too: a stream that sent its end closes, one the engine
        # could not send after a GOAWAY closes as refused.)
        events = h2.events()
        if events:
            self.dispatch(events)
        if self.owing:
            for stream in list(self.owing):
                stream.passed_on(self)
        if not h2.want_read and not h2.want_write and not self.lingering:
            self.close()  # GOAWAY said and no stream left: the connection is done

    def answer_read(self) -> None:
        """After a read: write what the engine has to say at once (SETTINGS and PING
        acknowledgements, window updates), and close a connection it is done with. (Most
        reads leave nothing: a flush, five calls into the engine, is skipped for them.)"""
        h2 = self.h2
        if h2.want_write or not h2.want_read:
            self.flush()

    def sent(self, size: int) -> None:
        raise NotImplementedError

    def dispatch(self, events: list[ngh2.Event]) -> None:
        raise NotImplementedError

    def send_data(self, sid: int, data: bytes, end: bool) -> None:
        self.h2.send_data(sid, data, end_stream=end)

    def send_trailers(self, sid: int, fields: Fields) -> None:
        self.h2.send_trailers(sid, fields)

    def reset(self, sid: int, code: int) -> None:
        """RST_STREAM ``sid`` with ``code``."""
        if not self.closed:
            try:
                self.h2.reset_stream(sid, code)
            except ngh2.NGH2Error:
                pass  # (the engine is closing)
            self.schedule()

    def held(self, sid: int) -> int:
        try:
            return self.h2.queued_body_size(sid)
        except ngh2.NGH2Error:
            return 0  # (the stream is gone here: nothing of it is held any more)

    def acknowledge(self, size: int, sid: int) -> None:
        """``size`` bytes the peer sent on ``sid`` have been dealt with: its window reopens."""
        if size and not self.closed:
            try:
                self.h2.acknowledge_received_data(size, sid)
            except ngh2.NGH2Error:
                pass  # (the engine is closing)
            self.schedule()

    def give_back(self, size: int, sid: int) -> None:
        """Credit for data the peer sent on ``sid``, a stream that has closed: the engine
        cannot reopen the connection's window through it, so the window grows by as much
        (what the peer may have in flight stays the same). It is acknowledged on the
        stream all the same, which is what lets the engine forget the stream's count."""
        if size <= 0 or self.closed:
            return
        try:
            self.h2.acknowledge_received_data(size, sid)
        except ngh2.NGH2Error:
            pass  # (the engine is closing)
        if self.window + size > MAX_WINDOW:
            self.retire()  # 2 GiB given back on one connection: a fresh one takes over
            return
        self.window += size
        self.regrown += size
        if self.regrown >= REGROW_AT:
            self.schedule()  # (the engine is told then, once for many streams)


def _drained(owed: int, via: Carrier, via_sid: int) -> int:
    """Of ``owed`` bytes handed to ``via`` on ``via_sid``, how many have left."""
    held = via.held(via_sid)
    return owed - held if owed > held else 0


class Rider:
    """What rides on a carrier's stream upstream and hears its answer: an HTTP/2 client's
    :class:`Stream`, or an :class:`H2Bridge` carrying an HTTP/1 exchange
    (``upstream_protocol: http2``). (A base class rather than a typing Protocol: compiled
    code calls a base class's methods directly, a Protocol's through a generic lookup,
    several times per stream.)"""

    request: heads.H2Request
    # The request data kept to send again if the stream is refused (None: too much).
    replay: list[bytes] | None
    replay_size: int
    up: Carrier | None  # the carrier of its upstream stream
    usid: int  # that stream's id (0: none)
    up_owed: int  # response bytes not yet acknowledged to the carrier
    phase: int
    status: int  # the status sent downstream (0: none yet)
    last_active: float

    def dialed(self, ep: Endpoint, conn: Carrier) -> None:
        """The connection it waited for is made (maybe to another endpoint)."""
        raise NotImplementedError

    def dial_failed(self, error: UpstreamError) -> None:
        raise NotImplementedError

    def redialed(self, attempts: int) -> None:
        """The connection it waited for took ``attempts`` more connects than one (each a
        retry, as route.connect counts them)."""
        raise NotImplementedError

    def passed_on(self, via: Carrier) -> None:
        """``via`` has written: credit for what left goes back to its sender."""
        raise NotImplementedError

    def response(self, fields: Fields, end: bool) -> None:
        raise NotImplementedError

    def informational(self, fields: Fields) -> None:
        raise NotImplementedError

    def response_data(self, data: bytes, end: bool) -> None:
        raise NotImplementedError

    def response_trailers(self, fields: Fields) -> None:
        raise NotImplementedError

    def up_closed(self, code: int) -> None:
        """The upstream stream closed (with the engine's error code)."""
        raise NotImplementedError

    def upstream_failed(self, error: UpstreamError) -> None:
        """The upstream stream or its connection failed before the answer began."""
        raise NotImplementedError

    def fail(self, error: ProxyError, code: int = INTERNAL_ERROR) -> None:
        """The upstream failed with the answer under way (or sidelink gives up on it)."""
        raise NotImplementedError

    def keep(self, data: bytes) -> None:
        """Keep request data to send again if the stream is refused, up to REPLAY_LIMIT."""
        replay = self.replay
        if replay is not None:
            self.replay_size += len(data)
            if self.replay_size <= REPLAY_LIMIT:
                replay.append(data)
            else:
                self.replay = None


def malformed_answer() -> ProtocolError:
    return ProtocolError("upstream sent a malformed answer (HTTP/2 rules, RFC 9113 8)")


def send_all(conn: Carrier, usid: int, chunks: Sequence[bytes], end: bool) -> None:
    """Request data held back (or kept to send again) on stream ``usid``; ``end`` with
    the last of it."""
    last = len(chunks)
    for i, data in enumerate(chunks, 1):
        conn.send_data(usid, data, end and i == last)


def refused_again(
    route: Route, ep: Endpoint | None, tried: Sequence[Endpoint], tries: int, routine: bool
) -> Sequence[Endpoint] | None:
    """A refused stream goes again (nothing of it was processed): the endpoints to leave
    out now (``ep`` too, if there is another), or None when it has gone again as often as
    it may (``retries`` and once per endpoint). Counted as a retry, and as an upstream
    error unless ``routine`` (the server said GOAWAY first)."""
    if tries >= route.settings.retries + len(route.endpoints):
        return None
    if ep is not None:
        more = [*tried, ep]
        if ep.state == DRAINING or route.endpoints.pick(more) is not None:
            tried = more  # (else nowhere else: the same one again, on a new stream)
    stats = route.stats
    if not routine:  # (counted as connect failures are: each one, retried past or not)
        stats.errors[UpstreamReset.reason] += 1
    stats.retries += 1
    return tried


class Stream(Rider):
    """One HTTP/2 request from a client and its answer: the per-stream state and moves.

    Its phase is an exchange's (``exchange.py``): HEAD (read, not started), CONNECTING,
    SENDING (on an upstream stream, the request still coming), AWAITING (all sent, no
    answer yet: ``request_timeout`` runs), STREAMING, DONE.
    """

    __slots__ = (
        "attached",
        "bytes_in",
        "bytes_out",
        "complete",
        "cut_short",
        "down",
        "down_open",
        "down_owed",
        "endpoint",
        "error",
        "held",
        "last_active",
        "lender",
        "lender_sid",
        "peer_reset",
        "pending",
        "phase",
        "picked",
        "replay",
        "replay_size",
        "request",
        "retries",
        "sent_at",
        "sid",
        "sized",
        "started",
        "status",
        "trailers",
        "tried",
        "up",
        "up_owed",
        "usid",
    )

    def __init__(self, down: H2Downstream, sid: int, request: heads.H2Request) -> None:
        self.down = down
        self.sid = sid
        self.down_open = True  # the client's stream is open (in down.streams)
        self.peer_reset = False  # ...and the client reset it
        self.request = request
        self.started = perf_counter()
        self.phase = HEAD
        self.complete = False  # the request has been read whole
        self.pending: list[bytes] | None = None  # request data not yet handed upstream
        self.trailers: Fields | None = None
        # The request data kept to send again if a stream is refused (None: too much).
        self.replay: list[bytes] | None = []
        self.replay_size = 0
        self.up: Carrier | None = None
        self.usid = 0  # its stream id upstream (0: none)
        # The upstream whose stream closed with response bytes still on their way down:
        # the credit for them goes back to it as they leave.
        self.lender: Carrier | None = None
        self.lender_sid = 0
        self.endpoint: Endpoint | None = None  # the last endpoint it went to
        self.attached = 0.0  # perf_counter when it went on its upstream connection
        self.held = False  # ...and its in_flight is held
        self.picked: Endpoint | None = None  # picked, waiting for a connect (in_flight held)
        self.tried: Sequence[Endpoint] = NO_ENDPOINTS
        self.retries = 0
        self.down_owed = 0  # request bytes not yet acknowledged to the client
        self.up_owed = 0  # response bytes not yet acknowledged to the upstream
        self.last_active = down.last_active
        self.sent_at = 0.0
        self.status = 0  # the status sent downstream (0: none yet)
        self.cut_short = False  # the client never got the answer whole: code="reset"
        self.sized = False  # ...with a content-length (a gRPC answer: then cut by a reset)
        self.error: ProxyError | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self) -> str:
        method = self.method.decode(errors="replace")
        return f"<Stream {self.sid} {method} {PHASES[self.phase]} status={self.status}>"

    @property
    def method(self) -> bytes:
        return self.request.method

    @property
    def path(self) -> bytes:
        return self.request.path

    # --- the request side (called by the downstream) -------------------------------

    def start(self) -> None:
        """Its turn: a pooled connection with room, else the one being made, else a new one."""
        self.phase = CONNECTING
        down = self.down
        route = down.route
        ep = down.endpoints.pick(self.tried)
        if ep is None and route.watch.resolved:
            self.fail(NoEndpoints(f"{route.config.service} has no endpoints"))
            return
        conn = carrier_for(
            self, route, ep, down.last_active, per_conn=down.carried, tried=self.tried
        )
        if conn is not None:
            assert ep is not None
            self._attach(ep, conn)
        elif ep is not None:
            down.endpoints.acquire(ep)  # (held while it waits: the next pick sees it)
            self.picked = ep

    def request_data(self, data: bytes, end: bool) -> None:
        size = len(data)
        self.bytes_in += size
        self.last_active = self.down.last_active
        if self.phase == DONE:
            self.down.acknowledge(size, self.sid)  # answered already: dropped
            return
        self.down_owed += size
        self.keep(data)
        up = self.up
        if up is not None:
            up.send_data(self.usid, data, end)
            up.owing[self] = None
            up.schedule()
        elif self.pending is None:
            self.pending = [data]
        else:
            self.pending.append(data)
        if end:
            self._request_complete()

    def request_trailers(self, trailers: Fields) -> None:
        self.trailers = trailers
        if self.phase == DONE:
            return
        up = self.up
        if up is not None:
            up.send_trailers(self.usid, trailers)
            up.schedule()
        self._request_complete()

    def _request_complete(self) -> None:
        self.complete = True
        if self.phase == SENDING:
            self.phase = AWAITING
            self.sent_at = self.down.last_active

    def tick(self, now: float, request_timeout: float, idle_timeout: float) -> None:
        if self.phase == AWAITING and now - self.sent_at > request_timeout:
            ep = self.endpoint
            if ep is not None:
                self.down.endpoints.went_wrong(ep, UpstreamTimeout.reason)
            self._cancel_upstream()
            self.fail(UpstreamTimeout("upstream did not answer in time"))
        elif now - self.last_active > idle_timeout:
            # Nothing moved either way: a window held at zero, or a silent peer.
            self._cancel_upstream()
            self.fail(BodyStalled("stream idle"))

    # --- connecting -------------------------------------------------------------------

    def dialed(self, ep: Endpoint, conn: Carrier) -> None:
        """The connection this stream waited for is made (maybe to another endpoint)."""
        self._unpick()
        if self.phase != CONNECTING or self.down.closed:
            return
        if conn.room() > 0:
            self._attach(ep, conn)
        elif conn.busy():
            self.start()  # filled by the streams that waited with it: another one
        else:
            # A new connection that takes no stream (closed at once, or GOAWAY before
            # any; counted against ep in _dial): as a refused stream, bounded.
            self.endpoint = ep
            self._retry()

    def dial_failed(self, error: UpstreamError) -> None:
        self._unpick()
        if self.phase == CONNECTING and not self.down.closed:
            self.fail(error)
        else:
            self.down.stats.errors[error.reason] += 1  # (nobody is told, but it happened)

    def redialed(self, attempts: int) -> None:
        self.retries += attempts

    def _unpick(self) -> None:
        picked = self.picked
        if picked is not None:
            self.picked = None
            self.down.endpoints.release(picked)

    def _attach(self, ep: Endpoint, conn: Carrier) -> None:
        pending = self.pending
        last = self.complete and self.trailers is None
        try:
            usid = conn.open(self, end=last and not pending)
        except ngh2.NGH2Error:
            # It cannot take another stream after all (GOAWAY, ids spent, the engine
            # closing): as a refused stream, elsewhere if there is an elsewhere, bounded.
            conn.retire()
            self.endpoint = ep
            self._retry()
            return
        self.down.endpoints.acquire(ep)
        self.endpoint = ep
        self.held = True
        self.up = conn
        self.usid = usid
        self.attached = perf_counter()
        if pending:
            self.pending = None
            send_all(conn, usid, pending, last)
            conn.owing[self] = None
        if self.complete and self.trailers is not None:
            conn.send_trailers(usid, self.trailers)
        if self.complete:
            self.phase = AWAITING
            self.sent_at = self.down.last_active
        else:
            self.phase = SENDING

    def _cancel_upstream(self) -> None:
        """Reset the upstream stream: nobody wants its answer any more."""
        up = self.up
        if up is None:
            return
        usid = self.usid
        self.up = None
        self.usid = 0
        up.owing.pop(self, None)
        up.cancel(usid, self.up_owed)
        self.up_owed = 0

    def _release(self) -> None:
        """The endpoint is no longer working on this stream."""
        if self.held:
            self.held = False
            ep = self.endpoint
            assert ep is not None
            self.down.endpoints.release(ep)

    # --- the response side (called by the upstream) ---------------------------------

    def passed_on(self, via: Carrier) -> None:
        """``via`` has written: credit for what of this stream's data left goes back to
        whoever sent it (its stream there may have closed: then it is given back)."""
        down = self.down
        if via is down:
            if self.down_open:
                drained = _drained(self.up_owed, down, self.sid)
                if drained:
                    self.up_owed -= drained
                    if self.up is not None:
                        self.up.acknowledge(drained, self.usid)
                    elif self.lender is not None:
                        self.lender.give_back(drained, self.lender_sid)
                if self.up_owed:
                    return
        elif via is self.up and self.down_open:
            drained = _drained(self.down_owed, via, self.usid)
            if drained:
                self.down_owed -= drained
                down.acknowledge(drained, self.sid)
            if self.down_owed:
                return
        via.owing.pop(self, None)

    def response(self, fields: Fields, end: bool) -> None:
        down = self.down
        status = _status(fields)
        self.status = status
        now = perf_counter()
        down.stats.request_duration.observe(now - self.started)
        ep = self.endpoint
        if ep is not None:
            down.endpoints.answered_by(ep, status, now - self.attached)
        self.phase = STREAMING
        down.h2.send_response(self.sid, fields, end_stream=end)
        down.schedule()
        if self.request.grpc:
            if end:
                _count_grpc(down, fields)
            else:
                self.sized = _sized(fields)
        if end:
            self._response_done()

    def informational(self, fields: Fields) -> None:
        self.down.h2.send_informational_response(self.sid, fields)
        self.down.schedule()

    def response_data(self, data: bytes, end: bool) -> None:
        down = self.down
        size = len(data)
        if self.phase == DONE or not self.down_open:
            if self.up is not None:
                self.up.acknowledge(size, self.usid)
            return
        self.bytes_out += size
        self.up_owed += size
        down.h2.send_data(self.sid, data, end_stream=end)
        if end:
            # (The upstream stream closes now: its credit goes back once the client's
            # stream has closed too, see up_closed and down_closed.)
            down.schedule()
            self._response_done()
        else:
            down.owing[self] = None
            down.schedule()

    def response_trailers(self, fields: Fields) -> None:
        down = self.down
        if self.phase != DONE and self.down_open:
            if self.request.grpc:
                _count_grpc(down, fields)
            down.h2.send_trailers(self.sid, fields)
            down.schedule()
            self._response_done()

    def _response_done(self) -> None:
        if not self.complete:
            # Answered before the request was all sent: the rest is not needed upstream.
            self._cancel_upstream()
        self._release()
        self.end()

    def up_closed(self, code: int) -> None:
        """The upstream stream closed (the engine says so, with the error code)."""
        up = self.up
        usid = self.usid
        self.up = None
        self.usid = 0
        if up is not None:
            up.owing.pop(self, None)
            if self.phase == DONE and self.up_owed and self.down_open:
                self.lender = up  # answered whole: credited as the rest goes down
                self.lender_sid = usid
                return
            up.give_back(self.up_owed, usid)  # what it sent that never goes on
        self.up_owed = 0
        if self.phase == DONE:
            return
        if code == REFUSED_STREAM and self.status == 0:
            # Refused (REFUSED_STREAM, or above a GOAWAY's last stream id): the server never
            # processed it, so it goes again whatever its method, outside the retry budget.
            # After a GOAWAY that is the server closing the connection (nginx does after
            # keepalive_requests streams): a retry, not an upstream error.
            self._retry(routine=up is not None and up.parting)
        elif code == MALFORMED and self.status:
            self.fail(malformed_answer(), INTERNAL_ERROR)
        elif code == MALFORMED:
            self.upstream_failed(malformed_answer())
        elif self.status == 0:
            self.upstream_failed(UpstreamReset(f"upstream reset the stream (error {code})"))
        else:
            error = UpstreamReset(f"upstream reset the stream mid-answer (error {code})")
            self.fail(error, code or CANCEL)

    def upstream_failed(self, error: UpstreamError) -> None:
        """The upstream stream, or its connection, failed before the answer began."""
        down = self.down
        route = down.route
        ep = self.endpoint
        if ep is not None:
            down.endpoints.went_wrong(ep, error.reason)
        if (
            isinstance(error, UpstreamReset)
            and self.request.method in IDEMPOTENT
            and self.retries < route.settings.retries
            and route.retry_budget.allow()
        ):
            self._retry()
        else:
            self.fail(error)

    def _retry(self, routine: bool = False) -> None:
        """Send the request again on a new stream: to another endpoint if there is one
        (``routine``: it is not counted as an upstream error)."""
        self._release()
        replay = self.replay
        if replay is None:
            self.fail(UpstreamReset("upstream refused the stream, too large to send again"))
            return
        tried = refused_again(self.down.route, self.endpoint, self.tried, self.retries, routine)
        if tried is None:
            self.fail(UpstreamReset("upstream refused the stream on every try"))
            return
        self.tried = tried
        self.retries += 1
        self.pending = list(replay)
        self.start()

    # --- the end --------------------------------------------------------------------

    def fail(self, error: ProxyError, code: int = INTERNAL_ERROR) -> None:
        """Answer with sidelink's own error; if the answer has begun, end it (``code``: the
        stream reset's, for a stream that is not gRPC)."""
        down = self.down
        if isinstance(error, UpstreamError):
            down.stats.errors[error.reason] += 1
        self._release()
        self._unpick()
        self.error = error
        if self.status:
            self._cut(error, code)
            return
        self.status = 200 if self.request.grpc else error.status
        down.stats.request_duration.observe(perf_counter() - self.started)
        if self.down_open:
            down.answer(self, error)
        self.end()

    def _cut(self, error: ProxyError, code: int) -> None:
        """The answer began and cannot be finished: a gRPC call ends with the error in
        its trailers (unless its answer declared a length), any other stream is reset."""
        down = self.down
        self.cut_short = True
        if self.down_open and not down.closed:
            # (Trailers after fewer bytes than a content-length said would make the answer
            # malformed, RFC 9113 8.1.1: the client would drop them. A reset, then.)
            if self.request.grpc and not self.sized:
                with contextlib.suppress(ngh2.NGH2Error):  # (its end may be sent already)
                    down.h2.send_trailers(self.sid, heads.grpc_trailers(error))
                    down.stats.count_grpc(error.grpc_status)
            else:
                down.reset(self.sid, code)
            down.schedule()
        self.end()

    def down_closed(self) -> None:
        """The client's stream closed: done, reset by the client, or its connection lost
        (it has left down.streams)."""
        self.down_open = False
        down = self.down
        if self.down_owed:
            down.give_back(self.down_owed, self.sid)
            self.down_owed = 0
        down.owing.pop(self, None)
        lender = self.lender
        if lender is not None:
            self.lender = None
            lender.give_back(self.up_owed, self.lender_sid)
            self.up_owed = 0
        if self.phase == DONE:
            return
        self._cancel_upstream()
        self._unpick()
        self._release()
        error: ClientGone | BadRequest
        if down.cut:
            error = ConnectionCut()
        elif down.closed:
            error = ClientGone()
        elif self.peer_reset:
            error = ClientReset()
        else:
            # The engine reset it: what the client sent broke the rules (a body longer or
            # shorter than its content-length said).
            error = BadRequest("malformed HTTP/2 stream")
        self.error = error
        if not self.status and isinstance(error, BadRequest):
            # Unanswered: counted and timed as HTTP/1.1's 400 for a malformed request is.
            self.status = error.status
            down.stats.request_duration.observe(perf_counter() - self.started)
        else:
            self.cut_short = True
        self.end()

    def end(self) -> None:
        """Counted once, and logged if asked."""
        if self.phase == DONE:
            return
        self.phase = DONE
        if self.status or self.cut_short:
            down = self.down
            code = RESET_CODE if self.cut_short else self.status
            down.stats.count_request(self.request.method, code)
            route = down.route
            if route.access_log:
                log_answer(route.config.name, down.peer(), self)


def _status(fields: Fields) -> int:
    """A response's :status (first, with the other pseudo-header fields: the engine
    checks, and that it is three digits)."""
    for field in fields:
        pair = cast("tuple[bytes, ...]", field)  # (as in heads.h2_request)
        if pair[0] == b":status":
            value = pair[1]
            if len(value) == 3:
                return value[0] * 100 + value[1] * 10 + value[2] - THREE_ZEROS
            return int(value)
    return 0


def _sized(fields: Fields) -> bool:
    """Whether an answer's fields declare its length."""
    return any(field[0] == b"content-length" for field in fields)


def _count_grpc(down: H2Downstream, fields: Fields) -> None:
    for name, value in fields:
        if name == b"grpc-status":
            if value.isdigit():
                down.stats.count_grpc(int(value))
            return


def carrier_for(
    rider: Rider,
    route: Route,
    ep: Endpoint | None,
    now: float,
    *,
    per_conn: int,
    tried: Sequence[Endpoint],
) -> Carrier | None:
    """A pooled carrier to ``ep`` with room for one more stream; or None, and ``rider``
    waits for one being made (its ``dialed`` or ``dial_failed`` says how it went).
    ``per_conn``: the streams one connection takes, so how many may wait on one."""
    pool: StreamPool | None = None
    if ep is not None:
        pool = ep.streams  # (route.streams makes it the first time: an uncompiled call)
        if pool is None:
            pool = route.streams(ep)
        conn = pool.get(now)
        if conn is not None:
            return cast(Carrier, conn)  # (a StreamPool holds carriers only)
        joining = pool.waiting
        if joining is not None and len(joining) < min(per_conn, pool.peer_limit):
            joining.append(rider)
            return None
    waiting: list[Rider] = [rider]
    if pool is not None:
        pool.waiting = waiting
    route.spawn(_dial(route, ep, pool, waiting, list(tried)))
    return None


async def _dial(
    route: Route,
    ep: Endpoint | None,
    pool: StreamPool | None,
    waiting: list[Rider],
    exclude: list[Endpoint],
) -> None:
    """Make a connection for the streams waiting on it (to ``ep``, or where the connect
    policy goes after a failure)."""
    before = len(exclude)  # (route.connect adds each endpoint that fails)
    try:
        got, _, conn = await route.connect(carrier(route), exclude=exclude, first=ep)
    except UpstreamError as e:
        if pool is not None and pool.waiting is waiting:
            pool.waiting = None
        retried = len(exclude) - before - 1  # (all but the first attempt)
        for stream in waiting:
            if retried > 0:
                stream.redialed(retried)
            stream.dial_failed(e)
        return
    if pool is not None and pool.waiting is waiting:
        pool.waiting = None
    retried = len(exclude) - before
    route.endpoints.release(got)  # (the connect's hold: each stream holds its own)
    joined = route.streams(got)  # (got's: maybe not ep's, after a failed connect)
    conn.pooled(joined)
    broken = conn.broken
    if conn.room() <= 0:
        # Closed at once, or GOAWAY before any stream: one failure of the endpoint,
        # however many streams waited for the connection.
        route.endpoints.went_wrong(got, (broken or UpstreamReset).reason)
    for stream in waiting:
        if retried:
            stream.redialed(retried)
        if broken is not None:
            stream.dial_failed(broken)  # (what it answered was no HTTP/2: not refused, failed)
        else:
            stream.dialed(got, conn)
    conn.stream_ended()  # (none came after all: it idles in the pool)
    if got.state == DRAINING:
        joined.retire(conn)  # (it left DNS meanwhile: it takes only those that waited)


class H2Downstream(H2Connection):
    """A client connection speaking HTTP/2: each stream proxied on its own."""

    def __init__(self, route: Route, hosts: heads.HostRule) -> None:
        super().__init__(route, Role.SERVER, SERVER_CONFIG)
        self.endpoints = route.endpoints  # (held here for a direct reach, as Downstream does)
        self.streams: dict[int, Stream] = {}  # the client's, by id
        self.hosts = hosts
        self.settings = route.settings
        self.last_sid = 0  # the newest stream taken
        self.opened = 0  # streams the client opened
        self.premature = 0  # ...and reset before their answer
        self.draining = False
        self.cut = False  # sidelink ends the connection (its streams end as connection_cut)
        self.fresh = True  # no request yet: head_timeout runs from the accept
        # Streams one upstream connection takes (HTTP/1.1 upstream: one at a time).
        http1 = route.settings.upstream_protocol == "http1"
        self.carried = 1 if http1 else route.settings.http2.max_streams_per_connection

    def __repr__(self) -> str:
        return f"<H2Downstream {self.route.config.name} {self.peer()} streams={len(self.streams)}>"

    def peer(self) -> str:
        return peer_name(self.transport)

    def adopt(self, transport: asyncio.Transport, data: bytes) -> None:
        """Take over an accepted connection whose first bytes were the preface."""
        self.transport = transport
        self.route.connections.add(self)
        self.begin({Setting.MAX_CONCURRENT_STREAMS: self.settings.http2.max_concurrent_streams})
        self.data_received(data)

    def sent(self, size: int) -> None:
        self.stats.bytes_to_downstream += size

    # --- asyncio callbacks ----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # cut: what the client still sends is dropped
        self.last_active = self.clock()
        h2 = self.h2
        whole = len(data) <= RECEIVE_SLICE
        for at in range(0, len(data), RECEIVE_SLICE):
            try:
                h2.receive_data(data if whole else data[at : at + RECEIVE_SLICE])
            except ngh2.DenialOfServiceError as e:
                self.calm(str(e))
                return
            except ngh2.NGH2Error as e:
                name = self.route.config.name
                log.info("route %s: HTTP/2 error from %s: %s", name, self.peer(), e)
                self.terminate(PROTOCOL_ERROR)
                return
            self.dispatch(h2.events())
            if self.lingering:
                return
        self.answer_read()

    def dispatch(self, events: list[ngh2.Event]) -> None:
        """What the engine made of the client's frames, or of its own sending (a stream
        that has sent its end closes)."""
        new: list[Stream] | None = None
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is DATA:
                data_event = cast(DataReceived, event)
                stream = streams.get(data_event.stream_id)
                if stream is not None:
                    stream.request_data(data_event.data, data_event.end_stream)
                else:
                    self.acknowledge(len(data_event.data), data_event.stream_id)
            elif kind is REQUEST:
                stream = self._request(cast(RequestReceived, event))
                if stream is not None:
                    if new is None:
                        new = []
                    new.append(stream)
            elif kind is CLOSED:
                closed = cast(StreamClosed, event)
                stream = streams.pop(closed.stream_id, None)
                if stream is not None:
                    self.stats.streams_downstream -= 1
                    stream.down_closed()
                    if not streams and self.draining:
                        self.schedule()
                elif closed.error_code == PROTOCOL_ERROR and closed.stream_id & 1:
                    self._malformed(closed.stream_id)
            elif kind is TRAILERS:
                trailers = cast(TrailersReceived, event)
                stream = streams.get(trailers.stream_id)
                if stream is not None:
                    stream.request_trailers(trailers.headers)
            elif kind is RESET:
                stream = streams.get(cast(StreamReset, event).stream_id)
                if stream is not None:
                    stream.peer_reset = True
                    if not stream.status and perf_counter() - stream.started < PREMATURE_LIFETIME:
                        self.premature += 1
                        if self.premature > PREMATURE_RESETS and self.premature * 2 > self.opened:
                            self.calm("too many streams reset before their answer")
                            return
            elif kind is GOAWAY:
                self.draining = True
        if new is not None:
            # Started once the whole read is taken in: a stream opened and reset in the
            # same read costs no upstream work.
            for stream in new:
                if stream.phase == HEAD:
                    stream.start()

    def _request(self, event: RequestReceived) -> Stream | None:
        sid = event.stream_id
        request = heads.h2_request(event.headers, self.hosts)
        stream = Stream(self, sid, request)
        self.streams[sid] = stream
        self.stats.streams_downstream += 1
        self.last_sid = sid
        self.opened += 1
        self.fresh = False
        if event.end_stream:
            stream.complete = True
        if request.method == b"CONNECT":
            stream.fail(MethodNotAllowed("CONNECT is not allowed"))
            return None
        return stream

    def _malformed(self, sid: int) -> None:
        """A client's stream the engine reset with PROTOCOL_ERROR before any request came
        of it: a malformed request (RFC 9113 8.1.1), which HTTP/2 refuses with a reset where
        HTTP/1.1 answers 400. Counted, timed and logged as that 400, method unknown."""
        stream = Stream(self, sid, heads.H2Request(NO_METHOD, b"", b"", []))
        stream.down_open = False  # (reset already: nothing more goes to the client)
        stream.fail(BadRequest("malformed HTTP/2 request"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.route.fds.closed()
        self.stats.active_downstream -= 1
        self.route.connections.discard(self)
        streams = list(self.streams.values())
        self.streams.clear()
        self.stats.streams_downstream -= len(streams)
        for stream in streams:
            stream.down_closed()
        self.owing.clear()

    # --- what a stream calls ---------------------------------------------------------

    def answer(self, stream: Stream, error: ProxyError) -> None:
        h2 = self.h2
        if stream.request.grpc:
            h2.send_response(stream.sid, heads.grpc_answer(error), end_stream=True)
            self.stats.count_grpc(error.grpc_status)
        else:
            fields, body = heads.h2_error(error)
            h2.send_response(stream.sid, fields)
            h2.send_data(stream.sid, body, end_stream=True)
            stream.bytes_out += len(body)
        self.schedule()

    # --- lifecycle --------------------------------------------------------------------

    def tick(self, now: float) -> None:
        if self.lingering:
            return
        settings = self.settings
        streams = self.streams
        if not streams:
            if self.fresh and now - self.last_active > settings.head_timeout:
                self.terminate(NO_ERROR)  # the preface, and no request since
            elif now - self.last_active > settings.idle_timeout:
                self.terminate(NO_ERROR)
            return
        for stream in list(streams.values()):
            stream.tick(now, settings.request_timeout, settings.idle_timeout)

    def shutdown(self) -> None:
        """Drain: GOAWAY at once (streams already sent still taken), the last stream id a
        moment later; closed once the streams have finished."""
        if self.closed:
            return
        self.draining = True
        if not self.streams:
            self.terminate(NO_ERROR)
            return
        self.h2.send_shutdown_notice()
        self.flush()
        self.loop.call_later(GOAWAY_GRACE, self._last_goaway)

    def _last_goaway(self) -> None:
        if not self.closed:
            self.h2.send_goaway(NO_ERROR, last_stream_id=self.last_sid)
            self.flush()

    def calm(self, why: str) -> None:
        log.warning(
            "route %s: HTTP/2 client %s cut (ENHANCE_YOUR_CALM): %s",
            self.route.config.name,
            self.peer(),
            why,
        )
        self.terminate(ENHANCE_YOUR_CALM)

    def terminate(self, code: int) -> None:
        """GOAWAY with ``code``, then close. For an error, reading stops and the close
        waits a moment, so that the GOAWAY is not lost to the reset that closing with
        unread bytes makes, while a flood still gets nothing more in."""
        if self.closed:
            return
        self.cut = True
        transport = self.transport
        self.lingering = code != NO_ERROR  # (so that the flush does not close at once)
        try:
            self.h2.terminate_connection(code, last_stream_id=self.last_sid)
            self.paused = False
            self.flush()
        except ngh2.NGH2Error:
            # The engine gave up on the peer (a flood): the frame is made here instead.
            if transport is not None and not transport.is_closing():
                transport.write(goaway_frame(self.last_sid, code))
        if not self.lingering or transport is None or not transport.can_write_eof():
            self.close()
            return
        transport.pause_reading()
        transport.write_eof()
        self.loop.call_later(LINGER_TIMEOUT, self.abort)

    def retire(self) -> None:
        self.shutdown()

    def abort(self) -> None:
        self.cut = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            self.cut = True
            self.closed = True
            if transport.is_closing():
                transport.abort()
            else:
                transport.close()


class H2Upstream(H2Connection):
    """A connection to one endpoint carrying many streams (kept in its StreamPool)."""

    def __init__(self, route: Route) -> None:
        super().__init__(route, Role.CLIENT, CLIENT_CONFIG)
        self.streams: dict[int, Rider] = {}
        self.fds = route.fds
        self.pool: StreamPool | None = None
        self.limit = route.settings.http2.max_streams_per_connection
        # The server's MAX_CONCURRENT_STREAMS: until its SETTINGS come, what the pool
        # learnt from the connections before (see _dial).
        self.peer_limit = ASSUMED_STREAM_LIMIT
        self.limit_said = False
        self.created = self.idle_since = self.last_active
        self.retired = False
        self.next_usid = 1  # the id of the next stream it opens
        self.sent_below = 1  # streams with lower ids have had their HEADERS written
        self.reset_by_server = 0  # the last stream the server reset

    def __repr__(self) -> str:
        pool = self.pool
        return f"<H2Upstream {pool.name if pool else '-'} streams={len(self.streams)}>"

    # --- what the pool and streams call ----------------------------------------------

    def pooled(self, pool: StreamPool) -> None:
        # The server's limit, as this connection or the last one heard it: a burst on a
        # new connection, before its SETTINGS, overshoots no limit the server said before.
        if self.limit_said:
            pool.peer_limit = self.peer_limit
        else:
            self.peer_limit = pool.peer_limit
        super().pooled(pool)

    def room(self) -> int:
        if self.retired or self.closed:
            return 0
        return min(self.limit, self.peer_limit) - len(self.streams)

    def busy(self) -> bool:
        return bool(self.streams)

    def open(self, stream: Rider, end: bool) -> int:
        usid = self.h2.send_request(stream.request.fields, end_stream=end)
        self.next_usid = usid + 2
        self.streams[usid] = stream
        self.stats.streams_upstream += 1
        self.schedule()
        return usid

    def cancel(self, sid: int, owed: int) -> None:
        if self.streams.pop(sid, None) is not None:
            self.stats.streams_upstream -= 1
            self.acknowledge(owed, sid)  # (the stream is still open: acknowledged through it)
            self.reset(sid, CANCEL)
            self.stream_ended()

    def stream_ended(self) -> None:
        if not self.streams:
            self.idle_since = self.clock()
            if self.retired:
                self.close()

    def retire(self) -> None:
        if self.pool is not None:
            self.pool.remove(self)
        self.retired = True
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pool is not None:
            self.pool.remove(self)
        transport = self.transport
        if transport is not None:
            try:
                self.h2.send_goaway(NO_ERROR)
                data = self.h2.data_to_send()
                if data:
                    transport.write(data)
            except ngh2.NGH2Error:
                pass
            transport.close()

    def sent(self, size: int) -> None:
        self.stats.bytes_to_upstream += size
        # Everything the engine had is written: every stream opened so far has gone out.
        # (Not the engine's next_stream_id: that raises once it is done, after a GOAWAY
        # and the last stream, and what it had to send then is still written.)
        self.sent_below = self.next_usid

    # --- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.stats.active_upstream += 1
        self.fds.opened()
        self.begin({Setting.MAX_CONCURRENT_STREAMS: 0})  # (no pushes)
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.clock()
        h2 = self.h2
        try:
            h2.receive_data(data)
        except ngh2.NGH2Error as e:
            self._fail_all(ProtocolError(f"HTTP/2 error from upstream: {e}"))
            self.close()
            return
        self.dispatch(h2.events())
        self.answer_read()

    def dispatch(self, events: list[ngh2.Event]) -> None:
        now = self.last_active
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is DATA:
                data_event = cast(DataReceived, event)
                stream = streams.get(data_event.stream_id)
                if stream is not None:
                    stream.last_active = now
                    stream.response_data(data_event.data, data_event.end_stream)
                else:
                    self.acknowledge(len(data_event.data), data_event.stream_id)
            elif kind is RESPONSE:
                head = cast(ResponseReceived, event)
                stream = streams.get(head.stream_id)
                if stream is not None:
                    stream.last_active = now
                    stream.response(head.headers, head.end_stream)
            elif kind is CLOSED:
                closed = cast(StreamClosed, event)
                sid = closed.stream_id
                stream = streams.pop(sid, None)
                if stream is not None:
                    self.stats.streams_upstream -= 1
                    code = closed.error_code
                    if code == PROTOCOL_ERROR and sid != self.reset_by_server:
                        code = MALFORMED
                    stream.up_closed(code)
                    self.stream_ended()
            elif kind is RESET:
                # (Its StreamClosed follows in the same events; one the engine closes with
                # PROTOCOL_ERROR and no reset from the server was found malformed here.)
                self.reset_by_server = cast(StreamReset, event).stream_id
            elif kind is TRAILERS:
                trailers = cast(TrailersReceived, event)
                stream = streams.get(trailers.stream_id)
                if stream is not None:
                    stream.response_trailers(trailers.headers)
            elif kind is INTERIM:
                interim = cast(InformationalResponseReceived, event)
                stream = streams.get(interim.stream_id)
                if stream is not None:
                    stream.informational(interim.headers)
            elif kind is SETTINGS:
                limit = cast(SettingsReceived, event).settings.get(Setting.MAX_CONCURRENT_STREAMS)
                if limit is not None:
                    self.peer_limit = limit
                    self.limit_said = True
                    if self.pool is not None:
                        self.pool.peer_limit = limit
            elif kind is GOAWAY:
                # No new streams here; those above its last stream id close as refused.
                self.parting = True
                self.retire()
            elif kind is ENDED:
                ended = cast(ConnectionClosed, event)
                if ended.error_code != NO_ERROR and not self.parting:
                    # The engine gave up on what the server sent and said so in a GOAWAY:
                    # garbage, or no HTTP/2 at all (a pod that speaks only HTTP/1.1
                    # answers the preface with a 400). (The code of a GOAWAY the server
                    # sent is here too: its streams go as refused, not failed.)
                    why = ended.debug_data.decode("ascii", errors="replace")
                    self.broken = ProtocolError(f"HTTP/2 error from upstream: {why}")
                    self._fail_all(self.broken)

    def eof_received(self) -> bool:
        self.retire()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stats.active_upstream -= 1
        self.fds.closed()
        if self.pool is not None:
            self.pool.remove(self)
        detail = "upstream closed the connection" + (f": {exc}" if exc else "")
        self._fail_all(UpstreamReset(detail))

    def _fail_all(self, error: UpstreamError) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        self.owing.clear()
        self.stats.streams_upstream -= len(streams)
        sent_below = self.sent_below
        for stream in streams:
            never_sent = stream.usid >= sent_below
            stream.up = None
            stream.usid = 0
            stream.up_owed = 0
            if stream.phase == DONE:
                continue
            if never_sent and stream.status == 0:
                # Opened on the connection as it died, its HEADERS never written: as a
                # refused stream, nothing reached the server, so it goes again whatever
                # its method (a pod killed as requests arrive).
                stream.up_closed(REFUSED_STREAM)
            elif stream.status == 0:
                stream.upstream_failed(error)
            else:
                stream.fail(error)


class _HeadOnly(Exception):
    """Stops the parser after the head of an answer to HEAD (it has no body)."""


class H1Leg(Carrier):
    """An HTTP/1.1 connection to one endpoint carrying one HTTP/2 stream at a time
    (``upstream_protocol: http1``): the request translated per RFC 9113 8.2, the
    response back as fields, data and trailers. Pooled in the endpoint's StreamPool,
    with room for one stream when idle."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.stats = route.stats
        self.fds = route.fds
        self.loop = route.loop
        self.clock = route.clock
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Rider] = {}
        self.owing = {}
        self.pool = None
        self.closed = False
        self.parting = False  # (an HTTP/1.1 server has no GOAWAY)
        self.broken = None
        self.retired = False
        self.created = self.idle_since = self.clock()
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[bytes] = []  # name, value...; after the head, the trailers
        self.stream: Rider | None = None
        self.chunked = False  # the request body goes chunked
        self.head_only = False
        self.interim = False
        self.until_close = False  # the response body ends when the server closes
        # The response ended within the read being parsed: the stream is done once the
        # rest of the read is parsed (bytes after a response break the connection).
        self.complete = False
        self.reusable = False
        self.head_bytes = 0
        self.unread = 0  # response bytes handed down and not yet sent on
        self.reading = True
        self.write_paused = False
        self.settle_due = False

    def __repr__(self) -> str:
        return f"<H1Leg {self.pool.name if self.pool else '-'} stream={self.stream}>"

    # --- what the pool and a stream call ---------------------------------------------

    def room(self) -> int:
        return 0 if self.closed or self.retired or self.stream is not None else 1

    def busy(self) -> bool:
        return self.stream is not None

    def open(self, stream: Rider, end: bool) -> int:
        head, self.chunked = heads.h1_request(stream.request, end)
        self.stream = stream
        self.streams = {1: stream}
        self.head_only = stream.request.method == b"HEAD"
        self.head_bytes = 0
        self.interim = self.until_close = False
        self.write(head)
        return 1

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)
            self.stats.bytes_to_upstream += len(data)

    def send_data(self, sid: int, data: bytes, end: bool) -> None:
        if self.chunked:
            out = heads.chunk(data) if data else b""
            self.write(out + LAST_CHUNK + CRLF if end else out)
        elif data:
            self.write(data)

    def send_trailers(self, sid: int, fields: Fields) -> None:
        if self.chunked:
            self.write(heads.h1_trailers(fields))
        # (a body framed by its length has nowhere to carry trailers: they stay behind)

    def cancel(self, sid: int, owed: int) -> None:
        if self.stream is not None:
            self.stream = None
            self.streams = {}
            self.close()  # HTTP/1.1 cancels a request only by closing its connection

    def held(self, sid: int) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def acknowledge(self, size: int, sid: int) -> None:
        """Response bytes have left downstream: read on once few are left there."""
        self.unread -= size
        if not self.reading and self.unread <= STREAM_WINDOW // 2 and self.transport:
            self.reading = True
            self.transport.resume_reading()

    def give_back(self, size: int, sid: int) -> None:
        self.acknowledge(size, sid)

    def schedule(self) -> None:
        if not self.settle_due:
            self.settle_due = True
            self.loop.call_soon(self.settle)

    def settle(self) -> None:
        """Request bytes written: those no longer buffered are acknowledged to the client."""
        self.settle_due = False
        if not self.write_paused:
            for stream in list(self.owing):
                stream.passed_on(self)

    def stream_ended(self) -> None:
        self.idle_since = self.clock()
        if self.retired:
            self.close()

    def retire(self) -> None:
        if self.pool is not None:
            self.pool.remove(self)
        self.retired = True
        if self.stream is None:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pool is not None:
            self.pool.remove(self)
        if self.transport is not None:
            self.transport.close()

    # --- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.stats.active_upstream += 1
        self.fds.opened()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.settle()

    def data_received(self, data: bytes) -> None:
        stream = self.stream
        if stream is None:
            self.close()  # bytes on an idle connection: the server broke the protocol
            return
        stream.last_active = self.clock()
        if self.head_bytes >= 0:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _HeadOnly):
                self._done(reusable=False)  # (what followed the head is not read)
                return
            self._broken(str(e.__context__ or e))
            return
        except httptools.HttpParserError as e:
            self._broken(f"invalid response: {e}")
            return
        if self.complete:
            self.complete = False
            self._done(self.reusable)
            return
        if self.head_bytes > 2 * MAX_HEAD_BYTES:
            self._broken("response head over 64 KiB")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stats.active_upstream -= 1
        self.fds.closed()
        if self.pool is not None:
            self.pool.remove(self)
        stream = self.stream
        if stream is None:
            return
        if self.until_close and self.head_bytes < 0:
            stream.response_data(b"", True)  # the body was delimited by the close
            self._done(reusable=False)
            return
        self.stream = None
        self.streams = {}
        stream.up_closed(INTERNAL_ERROR)  # (a reset, for the stream: retried where safe)

    # --- httptools callbacks ---------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += (name, value)

    def on_headers_complete(self) -> None:
        stream = self.stream
        assert stream is not None
        status = self.parser.get_status_code()
        heads.check_response_head(self.head_bytes, status, self.headers)
        fields, framing = heads.h2_response(status, self.headers)
        self.headers.clear()
        if 100 <= status < 200:
            self.interim = True
            if status != 101:
                stream.informational(fields)
            return
        self.head_bytes = -1  # (the head is in: no longer measured)
        no_body = not heads.has_body(stream.request.method, status)
        self.until_close = framing == FRAMING_CLOSE and not no_body
        stream.response(fields, end=no_body)
        if self.head_only:
            raise _HeadOnly

    def on_body(self, body: bytes) -> None:
        stream = self.stream
        assert stream is not None
        self.unread += len(body)
        stream.response_data(body, False)
        if self.reading and self.unread > STREAM_WINDOW and self.transport is not None:
            self.reading = False  # the client is slow: wait until it has taken some
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        stream = self.stream
        assert stream is not None
        if self.interim:
            self.interim = False
            return
        if self.headers:
            stream.response_trailers(heads.h2_trailers(self.headers))
            self.headers.clear()
        elif stream.phase != DONE:
            stream.response_data(b"", True)
        self.reusable = self.parser.should_keep_alive()
        self.complete = True

    def on_message_begin(self) -> None:
        if self.complete:
            raise ProtocolError("bytes after the response")

    def _done(self, reusable: bool) -> None:
        stream = self.stream
        self.stream = None
        self.streams = {}
        self.head_bytes = 0
        if stream is not None:
            stream.up_closed(NO_ERROR)
        if not reusable or self.until_close:
            self.close()
        else:
            self.stream_ended()

    def _broken(self, detail: str) -> None:
        if self.complete:
            # The bad bytes came after a whole response: that answer stands, and the
            # connection, which can no longer be trusted, goes.
            self.complete = False
            log.info(
                "route %s: %s after a complete response; connection closed",
                self.route.config.name,
                detail,
            )
            self._done(reusable=False)
            return
        stream = self.stream
        self.stream = None
        self.streams = {}
        self.close()
        if stream is not None:
            stream.upstream_failed(ProtocolError(detail))


class _StreamReading:
    """What an exchange's flow control sees as its upstream transport, for a bridge:
    pausing its reading holds back the credit for response data, so the HTTP/2 stream's
    window closes while the HTTP/1 client is slow."""

    def __init__(self, bridge: H2Bridge) -> None:
        self.bridge = bridge

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def is_closing(self) -> bool:
        return self.bridge.exchange is None  # (the exchange has let go)

    def pause_reading(self) -> None:
        self.bridge.reading = False

    def resume_reading(self) -> None:
        bridge = self.bridge
        bridge.reading = True
        if bridge.up is not None and bridge.up_owed:
            bridge.up.acknowledge(bridge.up_owed, bridge.usid)
            bridge.up_owed = 0


# A bridged exchange's Host is final already (the route's rule made it): kept as it is.
PRESERVE_HOST: Final = heads.HostRule("", 80, "preserve")


class H2Bridge(Rider):
    """An HTTP/1 exchange carried upstream as one HTTP/2 stream (``upstream_protocol:
    http2``): the exchange's request bytes are parsed back (httptools) into fields, data
    and trailers, the answer turned into HTTP/1.1 for the client. One per exchange; the
    connection under it is an :class:`H2Upstream` from the endpoint's StreamPool, and
    the exchange sees it as its upstream connection through ``face``."""

    def __init__(self, exchange: Exchange) -> None:
        down = exchange.down
        self.route = down.route
        self.exchange: Exchange | None = exchange
        self.flow = FlowControl(cast(asyncio.Transport, _StreamReading(self)))
        self.face = _BridgeFace(self, down.clock())
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[bytes] = []  # name, value...; after the head, the trailers
        self.opened = False  # its stream is open upstream
        self.keep_alive = True
        self.request = heads.H2Request(b"", b"", b"", [])
        self.up: Carrier | None = None
        self.usid = 0
        self.up_owed = 0
        self.reading = True  # the client takes what comes: response credit goes back at once
        self.rechunk = False
        self.phase = HEAD
        self.status = 0
        self.last_active = self.face.created
        self.endpoint: Endpoint | None = None
        # What went on the stream, to open it again if it is refused (None: too much).
        self.replay: list[bytes] | None = []
        self.replay_size = 0
        self.complete = False  # the request has been parsed whole
        self.trailers: list[tuple[bytes, bytes]] = []
        self.refusals = 0  # streams the servers refused, each opened again

    def __repr__(self) -> str:
        return f"<H2Bridge {self.usid} {self.exchange}>"

    def start(self, ep: Endpoint | None) -> None:
        """Find a carrier for the exchange's stream; attach the exchange once there is one."""
        exchange = self.exchange
        assert exchange is not None
        down = exchange.down
        route = self.route
        per_conn = route.settings.http2.max_streams_per_connection
        conn = carrier_for(
            self, route, ep, down.last_active, per_conn=per_conn, tried=exchange.tried
        )
        if conn is not None:
            assert ep is not None
            self.dialed(ep, conn)

    # --- the carrier's side (as a Rider) ---------------------------------------------

    def dialed(self, ep: Endpoint, conn: Carrier) -> None:
        exchange = self.exchange
        if self.refusals and exchange is not None and not exchange.down.closed:
            if conn.room() > 0:
                self._reopen(ep, conn)
            else:
                self.upstream_failed(UpstreamReset("upstream took no stream on a new connection"))
            return
        if exchange is None or exchange.phase != CONNECTING or exchange.down.closed:
            return
        if conn.room() <= 0:
            if conn.busy():
                self.start(ep)  # filled by the streams that waited with it: another one
            else:  # (counted against ep in _dial)
                exchange.fail(UpstreamReset("upstream took no stream on a new connection"))
            return
        self.up = conn
        self.endpoint = ep
        ep.in_flight += 1  # (released by the exchange when it lets go)
        exchange.attach_to(ep, self.face, exchange.down.clock())

    def redialed(self, attempts: int) -> None:
        if self.exchange is not None:
            self.exchange.retries += attempts

    def dial_failed(self, error: UpstreamError) -> None:
        exchange = self.exchange
        if exchange is None or exchange.down.closed:
            self.route.stats.errors[error.reason] += 1
        elif self.refusals:
            self.upstream_failed(error)  # (going again after a refusal: the exchange decides)
        elif exchange.phase == CONNECTING:
            exchange.fail(error)
        else:
            self.route.stats.errors[error.reason] += 1

    def passed_on(self, via: Carrier) -> None:
        """Request data left upstream: the client reads on once little is held there."""
        if via.held(self.usid) <= STREAM_WINDOW // 2:
            self.flow.writing_resumed()
            via.owing.pop(self, None)

    def response(self, fields: Fields, end: bool) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        status = _status(fields)
        self.status = status
        flat = [part for name, value in fields if name[:1] != b":" for part in (name, value)]
        lines, framing = heads.response_lines(status, flat)
        keep_alive = exchange.keeps_alive()
        self.rechunk = False
        if framing != FRAMING_LENGTH and not end and heads.has_body(exchange.method, status):
            if exchange.http10:
                keep_alive = False  # (read to the close)
            else:
                self.rechunk = True
                lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(heads.last_line(keep_alive, exchange.http10))
        self.keep_alive = keep_alive
        exchange.response_started(status)
        exchange.deliver(b"".join(lines))
        if end:
            self._complete()

    def informational(self, fields: Fields) -> None:
        exchange = self.exchange
        if exchange is not None and not exchange.http10:
            flat = [part for name, value in fields if name[:1] != b":" for part in (name, value)]
            lines, _ = heads.response_lines(_status(fields), flat)
            exchange.deliver(b"".join((*lines, CRLF)))

    def response_data(self, data: bytes, end: bool) -> None:
        exchange = self.exchange
        up = self.up
        if exchange is None or up is None:
            return
        if data:
            exchange.deliver(heads.chunk(data) if self.rechunk else data)
            if self.reading:
                up.acknowledge(len(data), self.usid)
            else:
                self.up_owed += len(data)
        if end:
            if self.rechunk:
                exchange.deliver(LAST_CHUNK + CRLF)
            self._complete()

    def response_trailers(self, fields: Fields) -> None:
        exchange = self.exchange
        if exchange is not None:
            if self.rechunk:
                flat = [part for field in fields for part in field]
                exchange.deliver(heads.trailer_block(flat))
            self._complete()

    def _complete(self) -> None:
        exchange = self.exchange
        self.phase = DONE
        if exchange is not None:
            exchange.response_complete(reusable=True, keep_alive=self.keep_alive)

    def up_closed(self, code: int) -> None:
        up = self.up
        self.up = None
        self.usid = 0
        if self.phase == DONE or self.exchange is None:
            return
        if code == REFUSED_STREAM and self.status == 0 and self._again(up):
            return
        if code == MALFORMED:
            self.upstream_failed(malformed_answer())
        else:
            self.upstream_failed(UpstreamReset(f"upstream reset the stream (error {code})"))

    def _again(self, refused_on: Carrier | None) -> bool:
        """The server refused the stream, so processed nothing of it: it goes again on a
        new stream, to another endpoint if there is one, whatever its method (as an HTTP/2
        client's stream does, bounded). False when it cannot."""
        exchange = self.exchange
        route = self.route
        ep = self.endpoint
        if exchange is None or ep is None or self.replay is None:
            return False
        routine = refused_on is not None and refused_on.parting
        tried = refused_again(route, ep, exchange.tried, self.refusals, routine)
        if tried is None:
            return False
        self.refusals += 1
        exchange.tried = tried
        down = exchange.down
        to = down.endpoints.pick(tried)
        per_conn = route.settings.http2.max_streams_per_connection
        conn = carrier_for(self, route, to, down.last_active, per_conn=per_conn, tried=tried)
        if conn is not None and to is not None:
            self._reopen(to, conn)
        return True

    def _reopen(self, ep: Endpoint, conn: Carrier) -> None:
        """Open the refused stream again on ``conn``, with all of it sent so far."""
        exchange = self.exchange
        old = self.endpoint
        assert exchange is not None and old is not None and self.replay is not None
        if old is not ep:  # (the exchange's hold on its endpoint moves with it)
            exchange.down.endpoints.release(old)
            exchange.down.endpoints.acquire(ep)
            exchange.endpoint = ep
            self.endpoint = ep
        self.up = conn
        replay = self.replay
        trailers = self.trailers
        last = self.complete and not trailers
        self.opened = False
        self._open(end=last and not replay)
        up = self.up
        if up is None or not self.usid:
            return  # (it failed to open: the exchange has been told)
        send_all(up, self.usid, replay, last)
        if self.complete and trailers:
            up.send_trailers(self.usid, trailers)
        up.schedule()

    def upstream_failed(self, error: UpstreamError) -> None:
        exchange = self.exchange
        self.up = None
        if exchange is not None and self.phase != DONE:
            self.phase = DONE
            exchange.upstream_failed(error)

    def fail(self, error: ProxyError, code: int = INTERNAL_ERROR) -> None:
        if isinstance(error, UpstreamError):
            self.upstream_failed(error)

    # --- the exchange's side (through its face) ----------------------------------------

    def send(self, data: bytes) -> None:
        """The exchange's HTTP/1.1 request bytes (its head first), parsed back."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:  # (our own bytes: a bug if ever)
            self._cancel()
            exchange = self.exchange
            if exchange is not None:
                exchange.upstream_failed(ProtocolError(f"cannot carry the request: {e}"))
            return
        if self.request.method and not self.opened:
            # The head is here and its body is not (a client that sent Expect: 100-continue
            # waits for an answer first): the stream opens now, for the server to answer.
            # (A request without a body was complete in the same bytes, and opened ended.)
            self._open(end=False)

    def detach(self) -> None:
        self._cancel()
        self.exchange = None

    def _cancel(self) -> None:
        up = self.up
        if up is not None:
            self.up = None
            up.owing.pop(self, None)
            up.cancel(self.usid, self.up_owed)
            self.up_owed = 0

    # --- httptools callbacks (the exchange's request, parsed back) ----------------------

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += (name, value)

    def on_headers_complete(self) -> None:
        method = self.parser.get_method()
        headers = self.headers
        fields = [(headers[i].lower(), headers[i + 1]) for i in range(0, len(headers), 2)]
        # (Hop-by-hop fields are gone already; what framed the body for HTTP/1 goes too.)
        fields = [f for f in fields if heads.FIELDS.get(f[0], heads.PASS) <= heads.LENGTH]
        self.request = heads.h2_request(
            [(b":method", method), (b":scheme", b"http"), (b":path", self.url), *fields],
            PRESERVE_HOST,
        )
        self.headers = []

    def on_body(self, body: bytes) -> None:
        self._open(end=False)
        self._send(body, end=False)

    def on_message_complete(self) -> None:
        headers = self.headers
        trailers = [(headers[i].lower(), headers[i + 1]) for i in range(0, len(headers), 2)]
        self.complete = True
        self.trailers = trailers
        if not self.opened:
            self._open(end=not trailers)
            if not trailers:
                return
        up = self.up
        if up is None:
            return
        if trailers:
            up.send_trailers(self.usid, trailers)
        else:
            self._send(b"", end=True)
        up.schedule()

    def _open(self, end: bool) -> None:
        if self.opened:
            return
        self.opened = True
        up = self.up
        if up is None:
            return
        try:
            self.usid = up.open(self, end)
        except ngh2.NGH2Error as e:
            # It took a GOAWAY after all: nothing reached the server.
            up.retire()
            self.up = None
            exchange = self.exchange
            if exchange is not None:
                exchange.upstream_failed(UpstreamReset(f"upstream connection closing: {e}"))
            return
        self.phase = SENDING

    def _send(self, data: bytes, end: bool) -> None:
        if data:
            self.keep(data)
        up = self.up
        if up is None or not self.usid:
            return
        up.send_data(self.usid, data, end)
        up.schedule()
        if up.held(self.usid) > STREAM_WINDOW:
            self.flow.writing_paused()  # the stream's window is shut: the client waits
            up.owing[self] = None


class _BridgeFace(Upstream):
    """An :class:`H2Bridge` as its exchange sees it: an upstream connection of its own,
    never pooled."""

    def __init__(self, bridge: H2Bridge, now: float) -> None:
        self.bridge = bridge
        self.flow = bridge.flow
        self.pool = None
        self.created = self.idle_since = now
        self.closed = False

    def attach(self, exchange: Exchange) -> None:
        self.bridge.exchange = exchange

    def send(self, data: bytes) -> None:
        self.bridge.send(data)

    def detach(self, reusable: bool, now: float) -> None:
        self.closed = True
        self.bridge.detach()

    def close(self) -> None:
        self.detach(False, 0.0)


def carrier(route: Route) -> Callable[[], Carrier]:
    """What carries a route's HTTP/2 streams upstream: HTTP/2, or HTTP/1.1 when asked."""
    if route.settings.upstream_protocol == "http1":
        return lambda: H1Leg(route)
    return lambda: H2Upstream(route)


def goaway_frame(last_sid: int, code: int) -> bytes:
    """A GOAWAY frame (RFC 9113 6.8), for when the engine can no longer make one."""
    return b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + (
        (last_sid & MAX_WINDOW).to_bytes(4, "big") + code.to_bytes(4, "big")
    )


def sniff(data: bytes) -> bool | None:
    """Whether the first bytes of a connection are HTTP/2's preface: True, False, or None
    while they are too few to say."""
    if data.startswith(PREFACE):
        return True
    if PREFACE.startswith(data):
        return None
    return False
