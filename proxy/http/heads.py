"""The rules for HTTP message heads, pure: values in, values out, no I/O.

What the proxy does with each header (hop-by-hop ones go, RFC 9110 7.6.1), the Host
it sends, how a body is framed, whether a connection is kept, the smuggling shapes
it refuses, and the answers it makes itself; for HTTP/2, the request fields upstream
gets and sidelink's answers (gRPC's included). ``h1.py`` and ``h2.py`` call these from the parser's
callbacks; ``tests/unit/test_heads.py`` feeds them values.

On every request's path and compiled with mypyc (setup.py): constants are ``Final``
(compiled code reads them without a dict lookup).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Final, cast

import httptools
from ngh2.types import Header

from proxy.errors import (
    BadRequest,
    ForbiddenHost,
    NotImplementedCoding,
    ProtocolError,
    ProxyError,
)

# The largest request or response head accepted, however its bytes arrive.
MAX_HEAD_BYTES: Final = 64 * 1024
# Reads of a head under this many bytes surely hold a head within the limit (at most
# one byte a header short of the plain size: "Name:value"), so it is not measured.
MEASURE_ABOVE: Final = MAX_HEAD_BYTES // 2

# What the proxy does with a header, by its lowercase name: most pass as they came.
# The kinds up to LENGTH are end-to-end; the others hop-by-hop (RFC 9110 7.6.1).
PASS: Final = 0
HOST: Final = 1
LENGTH: Final = 2
CONNECTION: Final = 3
TRANSFER_ENCODING: Final = 4
UPGRADE: Final = 5
HOP: Final = 6
FIELDS: Final = {
    b"host": HOST,
    b"content-length": LENGTH,
    b"connection": CONNECTION,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"upgrade": UPGRADE,
    b"keep-alive": HOP,
    b"proxy-connection": HOP,
    b"te": HOP,
}
# The usual spellings of the usual names, so that most headers are classified by one
# lookup (lowercasing each name costs more); any other spelling is lowercased.
SPELLINGS: Final = {
    spelling: FIELDS.get(name, PASS)
    for name in (
        *FIELDS,
        *(
            b"accept accept-encoding accept-language accept-ranges age authorization "
            b"cache-control content-encoding content-language content-type cookie date etag "
            b"expires if-modified-since if-none-match last-modified location origin pragma "
            b"referer server set-cookie traceparent tracestate user-agent vary "
            b"x-forwarded-for x-forwarded-proto x-request-id"
        ).split(),
    )
    for spelling in (name, name.title())
}
# Connection tokens that are not header names, or that name the framing: dropping
# that would have the receiver read a body as the next message (smuggling).
CONNECTION_OPTIONS: Final = frozenset((b"keep-alive", b"close", b"upgrade", b"content-length"))

# What a Host value may hold (RFC 9112 3.2, RFC 3986 3.2.2: reg-name or IP literal, a port).
HOST_VALUE: Final = re.compile(rb"[A-Za-z0-9._~!$&'()*+,;=:%\[\]-]*")

# The method of a request refused before its method was read: none (its metric label
# is OTHER, its access-log method null).
NO_METHOD: Final = b""
IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}
CRLF: Final = b"\r\n"
LAST_CHUNK: Final = b"0\r\n"

# How a response body is delimited.
FRAMING_LENGTH: Final = 0
FRAMING_CHUNKED: Final = 1
FRAMING_CLOSE: Final = 2


def field_kind(name: bytes) -> int:
    kind = SPELLINGS.get(name)
    return FIELDS.get(name.lower(), PASS) if kind is None else kind


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")}


def drop_named(lines: list[bytes], tokens: set[bytes]) -> list[bytes]:
    """Head lines (after the first) less the headers Connection names: they are hop-by-hop
    too (RFC 9110 7.6.1). Never the framing: see CONNECTION_OPTIONS."""
    named = tokens - CONNECTION_OPTIONS
    if not named:
        return lines
    return [lines[0]] + [ln for ln in lines[1:] if ln.split(b":", 1)[0].lower() not in named]


def error_response(error: ProxyError, keep_alive: bool) -> bytes:
    """sidelink's own answer: a short text body and the reason in ``sidelink-error``."""
    status = error.status
    body = error_body(error)
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"sidelink-error: %s\r\n" % error.reason.encode(),
            b"connection: keep-alive\r\n\r\n" if keep_alive else b"connection: close\r\n\r\n",
            body,
        )
    )


def error_body(error: ProxyError) -> bytes:
    status = error.status
    phrase = REASONS.get(status, b"Error")
    return b"%d %s: %s\n" % (status, phrase, error.detail.encode(errors="replace"))


# --- requests ---------------------------------------------------------------------


class RequestHead:
    """A request head as it goes upstream, and what its headers said about it."""

    __slots__ = ("chunked", "content_length", "host", "lines", "tokens", "upgrade")

    def __init__(self) -> None:
        self.lines: list[bytes] = []  # the head less Host, framing and its last line
        self.host: bytes | None = None
        self.content_length: bytes | None = None
        self.chunked = False
        self.upgrade: bytes | None = None  # the Upgrade header's value
        self.tokens: set[bytes] | None = None  # what Connection named


def scan_request(
    method: bytes, target: bytes, headers: list[bytes], valid_host: bytes = b""
) -> RequestHead:
    """One pass over a request's headers (``name, value, name, value...``): hop-by-hop
    ones are dropped, end-to-end ones kept as they came; the smuggling shapes (two
    Hosts, Content-Lengths that differ, an invalid Host) raise BadRequest.

    ``valid_host``: a Host value known to be valid (the connection's last one), spared
    the check."""
    head = RequestHead()
    lines = head.lines
    lines.append(b"%s %s HTTP/1.1\r\n" % (method, target))
    content_length: bytes | None = None
    codings: bytes | None = None  # every Transfer-Encoding, in order
    for i in range(0, len(headers), 2):
        name = headers[i]
        value = headers[i + 1]
        kind = field_kind(name)
        if kind == PASS:
            lines.append(b"%s: %s\r\n" % (name, value))
        elif kind == HOST:
            if head.host is not None:
                raise BadRequest("more than one Host header")
            if value != valid_host and HOST_VALUE.fullmatch(value) is None:
                raise BadRequest("invalid Host header")
            head.host = value
        elif kind == LENGTH:
            if content_length is not None and content_length != value:
                raise BadRequest("conflicting Content-Length headers")
            content_length = head.content_length = value
            lines.append(b"%s: %s\r\n" % (name, value))
        elif kind == CONNECTION:
            tokens = connection_tokens(value)
            head.tokens = tokens if head.tokens is None else head.tokens | tokens
        elif kind == TRANSFER_ENCODING:
            codings = value if codings is None else codings + b"," + value
            head.chunked = True
        elif kind == UPGRADE:
            head.upgrade = value
    if codings is not None and codings != b"chunked":
        _check_codings(codings)
    return head


def _check_codings(value: bytes) -> None:
    """A coding before the final chunked (``gzip, chunked``): 501. llhttp decodes chunked
    only, so the upstream would get the coded bytes as if plain. (A last coding other than
    chunked is llhttp's to refuse, with 400.)"""
    codings = [c.strip().lower() for c in value.split(b",")]
    if codings[-1] == b"chunked" and any(c != b"chunked" for c in codings[:-1]):
        raise NotImplementedCoding(f"transfer coding {value.decode(errors='replace')}")


def request_bytes(head: RequestHead, host_line: bytes, upgrade: bool) -> bytes:
    """The head for upstream: Connection-named headers out, one Host, the framing."""
    lines = head.lines
    if head.tokens:
        lines = drop_named(lines, head.tokens)
    lines.append(host_line)
    if head.chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    if upgrade:
        lines.append(b"connection: upgrade\r\nupgrade: %s\r\n" % head.upgrade)
    lines.append(CRLF)
    return b"".join(lines)


def host_line(fixed: bytes | None, client: bytes | None, default: bytes) -> bytes:
    """The Host line upstream gets: the route's own (``auto`` or a literal, made once per
    connection), else the client's (``preserve``), else the service as written."""
    if fixed is not None:
        return fixed
    return b"host: %s\r\n" % (client or default)


def version_unsure(keep_alive: bool, tokens: set[bytes] | None) -> bool:
    """Whether a request may be other than HTTP/1.1 and its version must be asked for:
    llhttp takes 0.9, 1.0, 1.1 and 2.0, and only 1.1 keeps the connection unasked."""
    return not keep_alive or (tokens is not None and b"keep-alive" in tokens)


def origin_form(target: bytes, own_hosts: set[str]) -> tuple[bytes, bytes]:
    """An absolute-form target as origin-form, and its authority (host and port), only for
    the route's own service (never an open proxy); ForbiddenHost otherwise."""
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        raise BadRequest("invalid request target") from None
    raw: bytes = url.host or b""  # (typed: compiled code checks what it is given)
    host = raw.decode(errors="replace").lower().rstrip(".")
    if host not in own_hosts:
        raise ForbiddenHost(f"{host} is not this route's service")
    path: bytes | None = url.path
    query: bytes | None = url.query
    if not path:
        path = b"/"
    authority = b"[%s]" % raw if b":" in raw else raw
    port: int | None = url.port
    if port is not None:
        authority += b":%d" % port
    return (path + b"?" + query if query else path), authority


# --- responses --------------------------------------------------------------------


def response_lines(status: int, headers: list[bytes]) -> tuple[list[bytes], int]:
    """The response head for the client, less its last line, and how the body is framed.

    One pass over the headers: hop-by-hop ones are dropped (the framing is redone for
    the client), end-to-end ones kept as they came.
    """
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Unknown"))]
    framing = FRAMING_CLOSE
    tokens: set[bytes] | None = None
    for i in range(0, len(headers), 2):
        name = headers[i]
        value = headers[i + 1]
        kind = field_kind(name)
        if kind <= LENGTH:
            if kind == LENGTH:
                framing = FRAMING_LENGTH
            lines.append(b"%s: %s\r\n" % (name, value))
        elif kind == TRANSFER_ENCODING:
            check_response_codings(value)
            if framing == FRAMING_CLOSE:
                framing = FRAMING_CHUNKED
        elif status == 101 and kind in (UPGRADE, CONNECTION):
            lines.append(b"%s: %s\r\n" % (name, value))
        elif kind == CONNECTION and value.lower() not in (b"keep-alive", b"close"):
            tokens = connection_tokens(value) | (tokens or set())
    if tokens:
        lines = drop_named(lines, tokens)
    return lines, framing


def check_response_codings(value: bytes) -> None:
    """A response's Transfer-Encoding other than chunked (``gzip, chunked``, or ``gzip``
    read to the close) is ProtocolError: llhttp decodes chunked only, and sidelink frames
    the body anew for the client, so the coded bytes would reach it as if plain."""
    if value != b"chunked" and any(c.strip().lower() != b"chunked" for c in value.split(b",")):
        coding = value.decode(errors="replace")
        raise ProtocolError(f"transfer coding {coding} in a response (only chunked is forwarded)")


def has_body(method: bytes, status: int) -> bool:
    return not (method == b"HEAD" or status in (204, 304) or status == 101)


def last_line(keep_alive: bool, http10: bool) -> bytes:
    """How a response head for the client ends: what it says about the connection."""
    if not keep_alive:
        return b"connection: close\r\n\r\n"
    return b"connection: keep-alive\r\n\r\n" if http10 else CRLF


def trailer_field(name: bytes) -> bool:
    """Whether a trailer goes on: not one about framing, routing or the connection (RFC
    9110 6.5.1: Content-Length, Host, Connection and the hop-by-hop fields)."""
    return field_kind(name) == PASS


def trailer_block(headers: list[bytes]) -> bytes:
    """The last chunk with the end-to-end trailers of ``headers`` (name, value, ...)."""
    trailers = b"".join(
        b"%s: %s\r\n" % (headers[i], headers[i + 1])
        for i in range(0, len(headers), 2)
        if trailer_field(headers[i])
    )
    return LAST_CHUNK + trailers + CRLF


# --- the route's names --------------------------------------------------------------


class HostRule:
    """What a route's ``host`` setting makes of the Host header, worked out once."""

    __slots__ = ("authority", "default", "fixed")

    def __init__(self, service: str, port: int | str, setting: str) -> None:
        # The service as written, with its port unless 80 (a port name: no port).
        auto = service if port == 80 or isinstance(port, str) else f"{service}:{port}"
        self.default = auto.encode()
        host = None if setting == "preserve" else auto if setting == "auto" else setting
        # The host upstream gets, unless it is the client's (host: preserve): as HTTP/2's
        # :authority, and as HTTP/1's whole Host line.
        self.authority = None if host is None else host.encode()
        self.fixed = None if host is None else b"host: %s\r\n" % self.authority


def own_hosts(service: str, answered_name: str | None) -> set[str]:
    """Names an absolute-form request may use: the service as written or as answered."""
    service = service.lower().rstrip(".")
    names = {service, f"{service}.svc", "localhost", "127.0.0.1"}
    if answered_name:
        names.add(answered_name.lower().rstrip("."))
    return names


def head_size(method: bytes, target: bytes, headers: list[bytes]) -> int:
    """A request head's size as written plainly (``Name: value`` lines): what the 64 KiB
    limit counts, the same however the bytes were cut into reads."""
    size = len(method) + len(target) + 14  # " ", " HTTP/1.1\r\n" and the final CRLF
    for field in headers:
        size += len(field) + 2  # ": " after a name, CRLF after a value
    return size


def check_response_head(raw_size: int, status: int, headers: list[bytes]) -> None:
    """An HTTP/1 upstream's response head (``raw_size``: its bytes as they came) over the
    64 KiB limit is garbage: ProtocolError."""
    if (
        raw_size > MEASURE_ABOVE
        and head_size(b"HTTP/1.1", b"%d" % status, headers) > MAX_HEAD_BYTES
    ):
        raise ProtocolError("response head over 64 KiB")


# --- HTTP/2 -----------------------------------------------------------------------

GRPC: Final = b"application/grpc"
COLON: Final = 0x3A  # ":", what the name of a pseudo-header field begins with


class H2Request:
    """An HTTP/2 request head as it goes upstream (RFC 9113 8.3.1), and what it said."""

    __slots__ = ("authority", "fields", "grpc", "method", "path")

    def __init__(self, method: bytes, path: bytes, authority: bytes, fields: list[Header]) -> None:
        self.method = method
        self.path = path
        self.authority = authority  # the :authority upstream gets
        self.fields = fields  # pseudo-header fields first
        self.grpc = False  # content-type application/grpc...


def h2_request(headers: Iterable[Header], hosts: HostRule) -> H2Request:
    """A client's HTTP/2 request fields for upstream: ``:authority`` by the route's
    ``host`` rule (a ``host`` field folded into it), the rest as they came (the engine has
    refused connection-specific fields already, RFC 9113 8.2.2). The fields themselves go
    on: one the client sent never-indexed stays so (RFC 7541 6.2.3), and none is copied."""
    method = path = b""
    authority: bytes | None = None
    at = -1  # where :authority is in fields
    fields: list[Header] = []
    grpc = False
    for field in headers:
        # (Read as a plain tuple, which both kinds of field are: compiled, that is an
        # index into it and a compare of bytes, not generic item and equality lookups.)
        pair = cast("tuple[bytes, ...]", field)
        name = pair[0]
        if name[0] == COLON:
            if name == b":method":
                method = pair[1]
            elif name == b":path":
                path = pair[1]
            elif name == b":authority":
                authority = pair[1]
                at = len(fields)
        elif name == b"host":
            authority = authority or pair[1]
            continue
        elif name == b"content-type" and pair[1].startswith(GRPC):
            grpc = True
        fields.append(field)
    wanted = hosts.authority or authority or hosts.default
    if at < 0:
        fields.insert(0, (b":authority", wanted))
    elif wanted is not authority:
        fields[at] = (b":authority", wanted)
    request = H2Request(method, path, wanted, fields)
    request.grpc = grpc
    return request


def grpc_answer(error: ProxyError) -> list[tuple[bytes, bytes]]:
    """sidelink's own answer to a gRPC request: HTTP 200, trailers only (the gRPC
    protocol's way to say a call failed), the reason in ``sidelink-error``."""
    return [(b":status", b"200"), (b"content-type", GRPC), *grpc_trailers(error)]


def grpc_trailers(error: ProxyError) -> list[tuple[bytes, bytes]]:
    """How a gRPC call ends with sidelink's error: alone (trailers only), or after the
    server's answer began (then it ends the call instead of a stream reset)."""
    return [
        (b"grpc-status", b"%d" % error.grpc_status),
        (b"grpc-message", grpc_message(error.detail)),
        (b"sidelink-error", error.reason.encode()),
    ]


def grpc_message(text: str) -> bytes:
    """``grpc-message``: percent-encoded UTF-8 (the gRPC HTTP/2 protocol's rule)."""
    out = bytearray()
    for byte in text.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def h2_error(error: ProxyError) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """sidelink's own answer on HTTP/2 for a request that is not gRPC: fields and body."""
    body = error_body(error)
    fields = [
        (b":status", b"%d" % error.status),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (b"sidelink-error", error.reason.encode()),
    ]
    return fields, body


# --- between HTTP/2 and HTTP/1.1 (upstream_protocol) -------------------------------

# Methods whose request means a body: one with none says so (content-length: 0).
BODY_METHODS: Final = frozenset((b"POST", b"PUT", b"PATCH"))


def h1_request(request: H2Request, end: bool) -> tuple[bytes, bool]:
    """An HTTP/2 request's head as HTTP/1.1 (RFC 9113 8.2), and whether its body goes
    chunked: ``:authority`` becomes Host, cookie fields are joined into one (8.2.3), and
    ``te`` (hop-by-hop) stays behind. ``end``: the request has no body."""
    lines = [
        b"%s %s HTTP/1.1\r\n" % (request.method, request.path),
        b"host: %s\r\n" % request.authority,
    ]
    cookies: list[bytes] = []
    length = False
    for field in request.fields:
        name, value = cast("tuple[bytes, ...]", field)
        if name[0] == COLON:
            continue  # (pseudo-header fields: the request line and Host say them)
        if name == b"cookie":
            cookies.append(value)
        elif name != b"te":
            length = length or name == b"content-length"
            lines.append(b"%s: %s\r\n" % (name, value))
    if cookies:
        lines.append(b"cookie: %s\r\n" % b"; ".join(cookies))
    chunked = not length and not end
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    elif not length and request.method in BODY_METHODS:
        lines.append(b"content-length: 0\r\n")
    lines.append(CRLF)
    return b"".join(lines), chunked


def h2_response(status: int, headers: list[bytes]) -> tuple[list[tuple[bytes, bytes]], int]:
    """An HTTP/1.1 response head (``name, value...``) as HTTP/2 fields, lowercase and
    without connection-specific ones (RFC 9113 8.2.2), and how its body is framed."""
    fields = [(b":status", b"%d" % status)]
    framing = FRAMING_CLOSE
    tokens: set[bytes] = set()
    for i in range(0, len(headers), 2):
        name = headers[i].lower()
        value = headers[i + 1]
        kind = FIELDS.get(name, PASS)
        if kind == PASS:
            fields.append((name, value))
        elif kind == LENGTH:
            framing = FRAMING_LENGTH
            fields.append((name, value))
        elif kind == TRANSFER_ENCODING:
            check_response_codings(value)
            if framing == FRAMING_CLOSE:
                framing = FRAMING_CHUNKED
        elif kind == CONNECTION:
            tokens |= connection_tokens(value)
    if tokens:
        fields = [field for field in fields if field[0] not in tokens]
    return fields, framing


def h2_trailers(headers: list[bytes]) -> list[tuple[bytes, bytes]]:
    """HTTP/1.1 trailers (``name, value...``) as HTTP/2 fields: end-to-end ones only."""
    return [
        (headers[i].lower(), headers[i + 1])
        for i in range(0, len(headers), 2)
        if trailer_field(headers[i])
    ]


def h1_trailers(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """HTTP/2 trailers as the end of an HTTP/1.1 chunked body."""
    return LAST_CHUNK + b"".join(b"%s: %s\r\n" % (n, v) for n, v in fields) + CRLF
