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
answer (rapid reset, CVE-2023-44487).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, cast

import ngh2
from ngh2 import (
    Configuration,
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

from proxy.endpoints import DRAINING, Endpoint
from proxy.errors import (
    BodyStalled,
    MethodNotAllowed,
    NoEndpoints,
    ProtocolError,
    ProxyError,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.http import heads
from proxy.http.exchange import (
    AWAITING,
    CONNECTING,
    DONE,
    HEAD,
    PHASES,
    REPLAY_LIMIT,
    SENDING,
    STREAMING,
    log_answer,
    perf_counter,
)
from proxy.http.heads import IDEMPOTENT, MAX_HEAD_BYTES
from proxy.metrics import RESET_CODE
from proxy.route import Route, peer_name

if TYPE_CHECKING:
    from proxy.pool import StreamPool

log = logging.getLogger("sidelink.http2")

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# What a peer may send on one stream, and on one connection, before sidelink has passed
# it on: the most it holds for a stream, and for a connection.
STREAM_WINDOW: Final = 256 * 1024
CONNECTION_WINDOW: Final = 1024 * 1024
MAX_WINDOW: Final = 2**31 - 1
# Between the shutdown notice (GOAWAY with the largest stream id) and the final GOAWAY
# naming the last stream sidelink takes: streams the client sent meanwhile still count.
GOAWAY_GRACE: Final = 1.0
# Rapid reset: a client that has reset more than this many streams before their answer,
# and more than half of all it opened, is cut.
PREMATURE_RESETS: Final = 100

NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
ENHANCE_YOUR_CALM: Final = 0xB

SERVER_CONFIG: Final = Configuration(
    auto_window_update=False, max_inbound_header_list_size=MAX_HEAD_BYTES
)
CLIENT_CONFIG: Final = Configuration(
    auto_window_update=False, max_inbound_header_list_size=MAX_HEAD_BYTES
)
Fields = Sequence[tuple[bytes, bytes]]


class H2Connection(asyncio.Protocol):
    """What both sides share: the engine, writing what it has to send, and the credit
    owed to the other side for data that has left through this connection."""

    def __init__(self, route: Route, role: Role, config: Configuration) -> None:
        self.route = route
        self.stats = route.stats
        self.loop = route.loop
        self.clock = route.clock
        self.h2 = ngh2.Connection(role, config)
        self.transport: asyncio.Transport | None = None
        self.paused = False  # the socket's buffer is full: frames wait in the engine
        self.flush_due = False
        # Streams whose data from the other side this connection holds, not all sent.
        self.owing: set[Stream] = set()
        self.streams: dict[int, Stream] = {}  # by this side's stream id
        self.window = CONNECTION_WINDOW  # the connection window advertised to the peer
        self.closed = False
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
        data = h2.data_to_send()
        if data:
            transport.write(data)
            self.sent(len(data))
            events = h2.events()
            if events:
                self.dispatch(events)
        if self.owing:
            for stream in list(self.owing):
                stream.passed_on(self)
        if not h2.want_read and not h2.want_write:
            self.close()  # GOAWAY said and no stream left: the connection is done

    def sent(self, size: int) -> None:
        raise NotImplementedError

    def dispatch(self, events: list[ngh2.Event]) -> None:
        raise NotImplementedError

    def acknowledge(self, size: int, sid: int) -> None:
        """``size`` bytes the peer sent on ``sid`` have been dealt with: its window reopens."""
        if size and not self.closed:
            with contextlib.suppress(ngh2.NGH2Error):  # (the engine may be closing)
                self.h2.acknowledge_received_data(size, sid)
            self.schedule()

    def give_back(self, size: int) -> None:
        """Credit for data the peer sent that will never be passed on (its stream ended):
        the connection window grows by as much, since the engine cannot acknowledge data
        of a closed stream."""
        if size <= 0 or self.closed:
            return
        if self.window + size > MAX_WINDOW:
            self.retire()  # 2 GiB left behind on one connection: start a fresh one
            return
        self.window += size
        with contextlib.suppress(ngh2.NGH2Error):  # (the engine may be closing)
            self.h2.set_local_window_size(self.window)
        self.schedule()

    def retire(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _pass_credit(sender: H2Connection, sid: int, owed: int, via: H2Connection, via_sid: int) -> int:
    """Of ``owed`` bytes taken from ``sender`` on ``sid`` and handed to ``via``, acknowledge
    to the sender those that have left; the bytes still held are returned."""
    try:
        held = via.h2.queued_body_size(via_sid)
    except ngh2.NGH2Error:
        held = 0  # (the stream is gone there: nothing of it is held any more)
    if owed > held:
        sender.acknowledge(owed - held, sid)
        return held
    return owed


class Stream:
    """One HTTP/2 request from a client and its answer: the per-stream state and moves.

    Its phase is an exchange's (``exchange.py``): HEAD (read, not started), CONNECTING,
    SENDING (on an upstream stream, the request still coming), AWAITING (all sent, no
    answer yet: ``request_timeout`` runs), STREAMING, DONE.
    """

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "complete",
        "down",
        "down_owed",
        "endpoint",
        "error",
        "held",
        "last_active",
        "pending",
        "phase",
        "picked",
        "replay",
        "replay_size",
        "request",
        "retries",
        "sent_at",
        "sid",
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
        self.request = request
        self.started = perf_counter()
        self.phase = HEAD
        self.complete = False  # the request has been read whole
        self.pending: list[bytes] = []  # request data not yet handed upstream
        self.trailers: Fields | None = None
        # The request data kept to send again if a stream is refused (None: too much).
        self.replay: list[bytes] | None = []
        self.replay_size = 0
        self.up: H2Upstream | None = None
        self.usid = 0  # its stream id upstream (0: none)
        self.endpoint: Endpoint | None = None  # the last endpoint it went to
        self.held = False  # ...and its in_flight is held
        self.picked: Endpoint | None = None  # picked, waiting for a connect (in_flight held)
        self.tried: list[Endpoint] = []
        self.retries = 0
        self.down_owed = 0  # request bytes not yet acknowledged to the client
        self.up_owed = 0  # response bytes not yet acknowledged to the upstream
        self.last_active = down.last_active
        self.sent_at = 0.0
        self.status = 0  # the status sent downstream (0: none yet)
        self.error: ProxyError | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self) -> str:
        method = self.request.method.decode(errors="replace")
        return f"<Stream {self.sid} {method} {PHASES[self.phase]} status={self.status}>"

    # --- the request side (called by the downstream) -------------------------------

    def start(self) -> None:
        """Its turn: a pooled connection with room, else the one being made, else a new one."""
        self.phase = CONNECTING
        down = self.down
        route = down.route
        ep = route.endpoints.pick(self.tried)
        pool: StreamPool[H2Upstream] | None = None
        waiting = [self]
        if ep is not None:
            pool = route.streams(ep)
            conn = pool.get(down.last_active)
            if conn is not None:
                self._attach(ep, conn)
                return
            route.endpoints.acquire(ep)  # (held while it waits: the next pick sees it)
            self.picked = ep
            joining = pool.waiting
            if (
                joining is not None
                and len(joining) < route.settings.http2.max_streams_per_connection
            ):
                joining.append(self)
                return
            pool.waiting = waiting
        elif route.watch.resolved:
            self.fail(NoEndpoints(f"{route.config.service} has no endpoints"))
            return
        route.spawn(_dial(route, ep, pool, waiting, list(self.tried)))

    def request_data(self, data: bytes, end: bool) -> None:
        size = len(data)
        self.bytes_in += size
        self.last_active = self.down.last_active
        if self.phase == DONE:
            self.down.acknowledge(size, self.sid)  # answered already: dropped
            return
        self.down_owed += size
        replay = self.replay
        if replay is not None:
            self.replay_size += size
            if self.replay_size <= REPLAY_LIMIT:
                replay.append(data)
            else:
                self.replay = None
        up = self.up
        if up is not None:
            up.h2.send_data(self.usid, data, end_stream=end)
            up.owing.add(self)
            up.schedule()
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
            up.h2.send_trailers(self.usid, trailers)
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
                self.down.route.endpoints.went_wrong(ep, UpstreamTimeout.reason)
            self._cancel_upstream()
            self.fail(UpstreamTimeout("upstream did not answer in time"))
        elif now - self.last_active > idle_timeout:
            # Nothing moved either way: a window held at zero, or a silent peer.
            self._cancel_upstream()
            self.fail(BodyStalled("stream idle"))

    # --- connecting -------------------------------------------------------------------

    def dialed(self, ep: Endpoint, conn: H2Upstream) -> None:
        """The connection this stream waited for is made (maybe to another endpoint)."""
        self._unpick()
        if self.phase != CONNECTING or self.down.closed:
            return
        if conn.room() > 0:
            self._attach(ep, conn)
        else:
            self.start()

    def dial_failed(self, error: UpstreamError) -> None:
        self._unpick()
        if self.phase == CONNECTING and not self.down.closed:
            self.fail(error)
        else:
            self.down.stats.errors[error.reason] += 1  # (nobody is told, but it happened)

    def _unpick(self) -> None:
        picked = self.picked
        if picked is not None:
            self.picked = None
            self.down.route.endpoints.release(picked)

    def _attach(self, ep: Endpoint, conn: H2Upstream) -> None:
        pending = self.pending
        last = self.complete and self.trailers is None
        try:
            usid = conn.open(self, end=last and not pending)
        except ngh2.NGH2Error:
            conn.retire()  # it cannot take another stream after all (GOAWAY, ids spent)
            self.start()
            return
        self.down.route.endpoints.acquire(ep)
        self.endpoint = ep
        self.held = True
        self.up = conn
        self.usid = usid
        if pending:
            self.pending = []
            send = conn.h2.send_data
            for i, data in enumerate(pending, 1):
                send(usid, data, end_stream=last and i == len(pending))
            conn.owing.add(self)
        if self.complete and self.trailers is not None:
            conn.h2.send_trailers(usid, self.trailers)
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
        up.owing.discard(self)
        if up.streams.pop(usid, None) is not None:
            up.give_back(self.up_owed)
            up.stats.streams_upstream -= 1
            if not up.closed:
                up.h2.reset_stream(usid, CANCEL)
                up.schedule()
            up.stream_ended()
        self.up_owed = 0

    def _release(self) -> None:
        """The endpoint is no longer working on this stream."""
        if self.held:
            self.held = False
            ep = self.endpoint
            assert ep is not None
            self.down.route.endpoints.release(ep)

    # --- the response side (called by the upstream) ---------------------------------

    def passed_on(self, via: H2Connection) -> None:
        """``via`` has written: credit for what of this stream's data left goes back to
        whoever sent it."""
        down = self.down
        up = self.up
        if via is down:
            if up is not None and self.sid in down.streams:
                self.up_owed = _pass_credit(up, self.usid, self.up_owed, down, self.sid)
                if self.up_owed:
                    return
        elif via is up and self.usid in via.streams and self.sid in down.streams:
            self.down_owed = _pass_credit(down, self.sid, self.down_owed, via, self.usid)
            if self.down_owed:
                return
        via.owing.discard(self)

    def response(self, fields: Fields, end: bool) -> None:
        down = self.down
        status = _status(fields)
        self.status = status
        took = perf_counter() - self.started
        down.stats.request_duration.observe(took)
        ep = self.endpoint
        if ep is not None:
            down.route.endpoints.answered_by(ep, status, took)
        self.phase = STREAMING
        down.h2.send_response(self.sid, fields, end_stream=end)
        down.schedule()
        if end:
            if self.request.grpc:
                _count_grpc(down, fields)
            self._response_done()

    def informational(self, fields: Fields) -> None:
        self.down.h2.send_informational_response(self.sid, fields)
        self.down.schedule()

    def response_data(self, data: bytes, end: bool) -> None:
        down = self.down
        size = len(data)
        if self.phase == DONE or self.sid not in down.streams:
            if self.up is not None:
                self.up.acknowledge(size, self.usid)
            return
        self.bytes_out += size
        self.up_owed += size
        down.h2.send_data(self.sid, data, end_stream=end)
        down.owing.add(self)
        down.schedule()
        if end:
            self._response_done()

    def response_trailers(self, fields: Fields) -> None:
        down = self.down
        if self.phase != DONE and self.sid in down.streams:
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
        if up is not None:
            up.give_back(self.up_owed)  # what it sent that never went on
            up.owing.discard(self)
        self.up = None
        self.usid = 0
        self.up_owed = 0
        if self.phase == DONE:
            return
        if code == REFUSED_STREAM and self.status == 0:
            # Refused (REFUSED_STREAM, or above a GOAWAY's last stream id): the server never
            # processed it, so it goes again whatever its method, outside the retry budget.
            self._retry()
        elif self.status == 0:
            self.upstream_failed(UpstreamReset(f"upstream reset the stream (error {code})"))
        else:
            self._release()
            self._cut(code or CANCEL)

    def upstream_failed(self, error: UpstreamError) -> None:
        """The upstream stream, or its connection, failed before the answer began."""
        down = self.down
        route = down.route
        ep = self.endpoint
        if ep is not None:
            route.endpoints.went_wrong(ep, error.reason)
        if (
            isinstance(error, UpstreamReset)
            and self.request.method in IDEMPOTENT
            and len(self.tried) < route.settings.retries
            and route.retry_budget.allow()
        ):
            self._retry()
        else:
            self.fail(error)

    def _retry(self) -> None:
        """Send the request again on a new stream: to another endpoint if there is one."""
        down = self.down
        route = down.route
        self._release()
        ep = self.endpoint
        if self.replay is None:
            self.fail(UpstreamReset("upstream refused the stream, too large to send again"))
            return
        if self.retries >= route.settings.retries + len(route.endpoints):
            self.fail(UpstreamReset("upstream refused the stream on every try"))
            return
        if ep is not None:
            self.tried.append(ep)
            if ep.state != DRAINING and route.endpoints.pick(self.tried) is None:
                self.tried.pop()  # nowhere else: the same endpoint again, on a new stream
        down.stats.retries += 1
        self.retries += 1
        self.pending = list(self.replay)
        self.start()

    # --- the end --------------------------------------------------------------------

    def fail(self, error: ProxyError) -> None:
        """Answer with sidelink's own error, or reset the client's stream if the answer
        has begun."""
        down = self.down
        if isinstance(error, UpstreamError):
            down.stats.errors[error.reason] += 1
        self._release()
        self._unpick()
        self.error = error
        if self.status:
            self._cut(INTERNAL_ERROR)
            return
        self.status = 200 if self.request.grpc else error.status
        down.stats.request_duration.observe(perf_counter() - self.started)
        if self.sid in down.streams:
            down.answer(self, error)
        self.end()

    def _cut(self, code: int) -> None:
        """The answer began and cannot be finished: the client's stream is reset."""
        down = self.down
        self.status = RESET_CODE
        if self.sid in down.streams and not down.closed:
            down.h2.reset_stream(self.sid, code)
            down.schedule()
        self.end()

    def down_closed(self) -> None:
        """The client's stream closed: done, reset by the client, or its connection lost."""
        down = self.down
        down.give_back(self.down_owed)
        self.down_owed = 0
        down.owing.discard(self)
        if self.phase == DONE:
            return
        self._cancel_upstream()
        self._unpick()
        self._release()
        self.end()

    def end(self) -> None:
        """Counted once, and logged if asked."""
        if self.phase == DONE:
            return
        self.phase = DONE
        if self.status:
            down = self.down
            down.stats.count_request(self.request.method, self.status)
            route = down.route
            if route.access_log:
                request = self.request
                log_answer(
                    route.config.name,
                    down.peer(),
                    method=request.method,
                    path=request.path,
                    status=self.status,
                    started=self.started,
                    bytes_in=self.bytes_in,
                    bytes_out=self.bytes_out,
                    endpoint=self.endpoint,
                    retries=self.retries,
                    error=self.error,
                )


def _status(fields: Fields) -> int:
    for name, value in fields:
        if name == b":status":
            return int(value)
    return 0


def _count_grpc(down: H2Downstream, fields: Fields) -> None:
    for name, value in fields:
        if name == b"grpc-status":
            if value.isdigit():
                down.stats.count_grpc(int(value))
            return


async def _dial(
    route: Route,
    ep: Endpoint | None,
    pool: StreamPool[H2Upstream] | None,
    waiting: list[Stream],
    exclude: list[Endpoint],
) -> None:
    """Make a connection for the streams waiting on it (to ``ep``, or where the connect
    policy goes after a failure)."""
    try:
        got, _, conn = await route.connect(lambda: H2Upstream(route), exclude=exclude, first=ep)
    except UpstreamError as e:
        if pool is not None and pool.waiting is waiting:
            pool.waiting = None
        for stream in waiting:
            stream.dial_failed(e)
        return
    if pool is not None and pool.waiting is waiting:
        pool.waiting = None
    route.endpoints.release(got)  # (the connect's hold: each stream holds its own)
    conn.pool = route.streams(got)
    conn.pool.add(conn)
    for stream in waiting:
        stream.dialed(got, conn)
    conn.stream_ended()  # (none came after all: it idles in the pool)


class H2Downstream(H2Connection):
    """A client connection speaking HTTP/2: each stream proxied on its own."""

    def __init__(self, route: Route, hosts: heads.HostRule) -> None:
        super().__init__(route, Role.SERVER, SERVER_CONFIG)
        self.hosts = hosts
        self.settings = route.settings
        self.last_sid = 0  # the newest stream taken
        self.opened = 0  # streams the client opened
        self.premature = 0  # ...and reset before their answer
        self.draining = False
        self.fresh = True  # no request yet: head_timeout runs from the accept

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
        self.last_active = self.clock()
        h2 = self.h2
        try:
            h2.receive_data(data)
        except ngh2.DenialOfServiceError as e:
            self.calm(str(e))
            return
        except ngh2.NGH2Error as e:
            log.info("route %s: HTTP/2 error from %s: %s", self.route.config.name, self.peer(), e)
            self.terminate(PROTOCOL_ERROR)
            return
        self.dispatch(h2.events())
        self.flush()

    def dispatch(self, events: list[ngh2.Event]) -> None:
        """What the engine made of the client's frames, or of its own sending (a stream
        that has sent its end closes)."""
        new: list[Stream] | None = None
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                data_event = cast(DataReceived, event)
                stream = streams.get(data_event.stream_id)
                if stream is not None:
                    stream.request_data(data_event.data, data_event.end_stream)
                else:
                    self.acknowledge(len(data_event.data), data_event.stream_id)
            elif kind is RequestReceived:
                stream = self._request(cast(RequestReceived, event))
                if stream is not None:
                    if new is None:
                        new = []
                    new.append(stream)
            elif kind is StreamClosed:
                closed = cast(StreamClosed, event)
                stream = streams.pop(closed.stream_id, None)
                if stream is not None:
                    self.stats.streams_downstream -= 1
                    stream.down_closed()
                    if not streams and self.draining:
                        self.schedule()
            elif kind is TrailersReceived:
                trailers = cast(TrailersReceived, event)
                stream = streams.get(trailers.stream_id)
                if stream is not None:
                    stream.request_trailers(trailers.headers)
            elif kind is StreamReset:
                stream = streams.get(cast(StreamReset, event).stream_id)
                if stream is not None and stream.phase != DONE:
                    self.premature += 1
                    if self.premature > PREMATURE_RESETS and self.premature * 2 > self.opened:
                        self.calm("too many streams reset before their answer")
                        return
            elif kind is GoAwayReceived:
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
        self.schedule()

    # --- lifecycle --------------------------------------------------------------------

    def tick(self, now: float) -> None:
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
        """GOAWAY with ``code``, then close."""
        if self.closed:
            return
        try:
            self.h2.terminate_connection(code, last_stream_id=self.last_sid)
            self.paused = False
            self.flush()
        except ngh2.NGH2Error:
            pass
        self.close()

    def retire(self) -> None:
        self.shutdown()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            if transport.is_closing():
                transport.abort()
            else:
                transport.close()


class H2Upstream(H2Connection):
    """A connection to one endpoint carrying many streams (kept in its StreamPool)."""

    def __init__(self, route: Route) -> None:
        super().__init__(route, Role.CLIENT, CLIENT_CONFIG)
        self.fds = route.fds
        self.pool: StreamPool[H2Upstream] | None = None
        self.limit = route.settings.http2.max_streams_per_connection
        self.peer_limit = 100  # the server's MAX_CONCURRENT_STREAMS (100 until it says)
        self.created = self.idle_since = self.last_active
        self.retired = False

    def __repr__(self) -> str:
        pool = self.pool
        return f"<H2Upstream {pool.name if pool else '-'} streams={len(self.streams)}>"

    # --- what the pool and streams call ----------------------------------------------

    def room(self) -> int:
        if self.retired or self.closed:
            return 0
        return min(self.limit, self.peer_limit) - len(self.streams)

    def busy(self) -> bool:
        return bool(self.streams)

    def open(self, stream: Stream, end: bool) -> int:
        usid = self.h2.send_request(stream.request.fields, end_stream=end)
        self.streams[usid] = stream
        self.stats.streams_upstream += 1
        self.schedule()
        return usid

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
        self.flush()

    def dispatch(self, events: list[ngh2.Event]) -> None:
        now = self.last_active
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                data_event = cast(DataReceived, event)
                stream = streams.get(data_event.stream_id)
                if stream is not None:
                    stream.last_active = now
                    stream.response_data(data_event.data, data_event.end_stream)
                else:
                    self.acknowledge(len(data_event.data), data_event.stream_id)
            elif kind is ResponseReceived:
                head = cast(ResponseReceived, event)
                stream = streams.get(head.stream_id)
                if stream is not None:
                    stream.last_active = now
                    stream.response(head.headers, head.end_stream)
            elif kind is StreamClosed:
                closed = cast(StreamClosed, event)
                stream = streams.pop(closed.stream_id, None)
                if stream is not None:
                    self.stats.streams_upstream -= 1
                    stream.up_closed(closed.error_code)
                    self.stream_ended()
            elif kind is TrailersReceived:
                trailers = cast(TrailersReceived, event)
                stream = streams.get(trailers.stream_id)
                if stream is not None:
                    stream.response_trailers(trailers.headers)
            elif kind is InformationalResponseReceived:
                interim = cast(InformationalResponseReceived, event)
                stream = streams.get(interim.stream_id)
                if stream is not None:
                    stream.informational(interim.headers)
            elif kind is SettingsReceived:
                limit = cast(SettingsReceived, event).settings.get(Setting.MAX_CONCURRENT_STREAMS)
                if limit is not None:
                    self.peer_limit = limit
            elif kind is GoAwayReceived:
                # No new streams here; those above its last stream id close as refused.
                self.retire()

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
        for stream in streams:
            stream.up = None
            stream.usid = 0
            stream.up_owed = 0
            if stream.phase == DONE:
                continue
            if stream.status == 0:
                stream.upstream_failed(error)
            else:
                stream.fail(error)


def sniff(data: bytes) -> bool | None:
    """Whether the first bytes of a connection are HTTP/2's preface: True, False, or None
    while they are too few to say."""
    if data.startswith(PREFACE):
        return True
    if PREFACE.startswith(data):
        return None
    return False
