"""heads: the pure HTTP/1 head rules, fed values (no parser, no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.errors import (
    BadRequest,
    ClientError,
    ForbiddenHost,
    HeadTooLarge,
    MethodNotAllowed,
    NoEndpoints,
    NotImplementedCoding,
    ProtocolError,
    ProxyError,
    UpstreamTimeout,
    VersionNotSupported,
)
from proxy.http import heads
from proxy.http.heads import (
    CONNECTION,
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_LENGTH,
    HOP,
    HOST,
    LENGTH,
    PASS,
    TRANSFER_ENCODING,
    UPGRADE,
    HostRule,
)

HOP_BY_HOP = (b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding")
HOP_BY_HOP += (b"upgrade",)


def spellings(name: bytes) -> list[bytes]:
    return [
        name,
        name.upper(),
        name.title(),
        bytes(c ^ 0x20 if 97 <= c <= 122 else c for c in name),
    ]


# --- field_kind -------------------------------------------------------------------------

KINDS = {
    b"host": HOST,
    b"content-length": LENGTH,
    b"connection": CONNECTION,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"upgrade": UPGRADE,
    b"keep-alive": HOP,
    b"proxy-connection": HOP,
    b"te": HOP,
}


@pytest.mark.parametrize(
    ("name", "kind"),
    [(spelling, kind) for name, kind in KINDS.items() for spelling in spellings(name)],
)
def test_field_kind_any_spelling(name: bytes, kind: int) -> None:
    assert heads.field_kind(name) == kind


@pytest.mark.parametrize(
    "name",
    [
        b"Content-Type",
        b"CONTENT-TYPE",
        b"content-type",
        b"X-Request-Id",
        b"x-custom",
        b"X-CUSTOM",
        b"Hostname",
        b"Content-Lengths",
        b"TE2",
        b"Upgrade-Insecure-Requests",
        b"Keep-Alive-Extra",
    ],
)
def test_field_kind_other_names_pass(name: bytes) -> None:
    assert heads.field_kind(name) == PASS


def test_field_kind_precomputed_spellings_agree_with_lowercasing() -> None:
    for spelling, kind in heads.SPELLINGS.items():
        assert kind == heads.FIELDS.get(spelling.lower(), PASS), spelling


# --- Connection tokens ----------------------------------------------------------------


def test_connection_tokens_split_strip_lower() -> None:
    assert heads.connection_tokens(b"Keep-Alive , X-Foo,x-bar") == {
        b"keep-alive",
        b"x-foo",
        b"x-bar",
    }
    assert heads.connection_tokens(b"close") == {b"close"}


def test_drop_named_drops_named_headers_case_insensitively() -> None:
    lines = [b"GET / HTTP/1.1\r\n", b"X-Foo: 1\r\n", b"accept: */*\r\n", b"x-FOO: 2\r\n"]
    lines += [b"X-Bar: 3\r\n"]
    out = heads.drop_named(lines, heads.connection_tokens(b"X-FOO, x-bar"))
    assert out == [b"GET / HTTP/1.1\r\n", b"accept: */*\r\n"]


@pytest.mark.parametrize("token", [b"keep-alive", b"close", b"upgrade", b"content-length"])
def test_drop_named_never_drops_the_framing(token: bytes) -> None:
    lines = [b"POST / HTTP/1.1\r\n", b"Content-Length: 5\r\n", b"Keep-Alive: 1\r\n"]
    lines += [b"Close: x\r\n", b"Upgrade: y\r\n"]
    assert heads.drop_named(lines, {token}) is lines  # nothing named: the same list


def test_drop_named_keeps_content_length_among_other_tokens() -> None:
    lines = [b"POST / HTTP/1.1\r\n", b"Content-Length: 5\r\n", b"X-Foo: 1\r\n"]
    tokens = heads.connection_tokens(b"Content-Length, X-Foo")
    assert heads.drop_named(lines, tokens) == [b"POST / HTTP/1.1\r\n", b"Content-Length: 5\r\n"]


def test_drop_named_never_drops_the_first_line() -> None:
    lines = [b"x-foo: not a header\r\n", b"X-Foo: 1\r\n"]
    assert heads.drop_named(lines, {b"x-foo"}) == [b"x-foo: not a header\r\n"]


# --- scan_request and request_bytes ---------------------------------------------------


def test_scan_request_drops_hop_by_hop_and_keeps_end_to_end_in_order() -> None:
    headers = [
        b"Accept",
        b"*/*",
        b"Connection",
        b"keep-alive",
        b"X-Custom",
        b"  spaced  value ",
        b"Keep-Alive",
        b"timeout=5",
        b"Proxy-Connection",
        b"keep-alive",
        b"TE",
        b"trailers",
        b"cookie",
        b"a=1; b=2",
        b"Content-Length",
        b"3",
        b"Upgrade",
        b"websocket",
        b"X-Custom",
        b"second",
    ]
    head = heads.scan_request(b"POST", b"/p?q=1", headers)
    assert head.lines == [
        b"POST /p?q=1 HTTP/1.1\r\n",
        b"Accept: */*\r\n",
        b"X-Custom:   spaced  value \r\n",
        b"cookie: a=1; b=2\r\n",
        b"Content-Length: 3\r\n",
        b"X-Custom: second\r\n",
    ]
    assert head.host is None
    assert not head.chunked
    assert head.upgrade == b"websocket"
    assert head.tokens == {b"keep-alive"}


def test_scan_request_takes_host_out_of_the_lines() -> None:
    head = heads.scan_request(b"GET", b"/", [b"HOST", b"svc:8080", b"Accept", b"*/*"])
    assert head.host == b"svc:8080"
    assert head.lines == [b"GET / HTTP/1.1\r\n", b"Accept: */*\r\n"]


@pytest.mark.parametrize(("first", "second"), [(b"Host", b"host"), (b"host", b"HOST")])
def test_scan_request_two_hosts_are_refused(first: bytes, second: bytes) -> None:
    with pytest.raises(BadRequest):
        heads.scan_request(b"GET", b"/", [first, b"a", second, b"a"])


def test_scan_request_differing_content_lengths_are_refused() -> None:
    with pytest.raises(BadRequest) as info:
        heads.scan_request(b"POST", b"/", [b"Content-Length", b"3", b"content-length", b"4"])
    assert info.value.status == 400
    assert info.value.reason == "bad_request"


def test_scan_request_equal_content_lengths_pass() -> None:
    head = heads.scan_request(b"POST", b"/", [b"Content-Length", b"3", b"CONTENT-LENGTH", b"3"])
    assert head.lines[1:] == [b"Content-Length: 3\r\n", b"CONTENT-LENGTH: 3\r\n"]


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b" chunked", b"xchunked", b"identity"])
def test_scan_request_transfer_encoding_sets_chunked(value: bytes) -> None:
    # (A last coding other than chunked is llhttp's to refuse: 400 before any forwarding.)
    head = heads.scan_request(b"POST", b"/", [b"Transfer-Encoding", value])
    assert head.chunked
    assert head.lines == [b"POST / HTTP/1.1\r\n"]


@pytest.mark.parametrize(
    "codings",
    [[b"gzip, chunked"], [b"x", b"chunked"], [b"chunked, identity, chunked"]],
)
def test_a_coding_before_chunked_is_501(codings: list[bytes]) -> None:
    # llhttp decodes chunked only: forwarded as "chunked", the coded bytes would pass as plain.
    headers = [field for value in codings for field in (b"Transfer-Encoding", value)]
    with pytest.raises(NotImplementedCoding) as caught:
        heads.scan_request(b"POST", b"/", headers)
    assert (caught.value.status, caught.value.reason) == (501, "not_implemented")


@pytest.mark.parametrize("value", [b"app1 evil.example", b"a/b", b"a\tb", b"x@y", b"a?b", b"a#b"])
def test_an_invalid_host_value_is_400(value: bytes) -> None:
    with pytest.raises(BadRequest):
        heads.scan_request(b"GET", b"/", [b"Host", value])


@pytest.mark.parametrize("value", [b"app1", b"127.0.0.1:8081", b"[::1]:80", b"a-b.c_d~e", b""])
def test_a_valid_host_value_passes(value: bytes) -> None:
    assert heads.scan_request(b"GET", b"/", [b"Host", value]).host == value


def test_scan_request_tokens_accumulate_over_connection_headers() -> None:
    headers = [b"Connection", b"X-A, keep-alive", b"connection", b"x-b", b"CONNECTION", b"X-C"]
    head = heads.scan_request(b"GET", b"/", headers)
    assert head.tokens == {b"x-a", b"keep-alive", b"x-b", b"x-c"}


def test_scan_request_without_connection_has_no_tokens() -> None:
    assert heads.scan_request(b"GET", b"/", [b"Accept", b"*/*"]).tokens is None


def test_request_bytes_plain() -> None:
    head = heads.scan_request(b"GET", b"/x", [b"Host", b"svc", b"Accept", b"*/*"])
    out = heads.request_bytes(head, b"host: svc\r\n", upgrade=False)
    assert out == b"GET /x HTTP/1.1\r\nAccept: */*\r\nhost: svc\r\n\r\n"


def test_request_bytes_chunked_re_adds_transfer_encoding() -> None:
    headers = [b"Transfer-Encoding", b"chunked", b"Content-Type", b"text/plain"]
    head = heads.scan_request(b"POST", b"/up", headers)
    out = heads.request_bytes(head, b"host: svc:8080\r\n", upgrade=False)
    assert out == (
        b"POST /up HTTP/1.1\r\n"
        b"Content-Type: text/plain\r\n"
        b"host: svc:8080\r\n"
        b"transfer-encoding: chunked\r\n"
        b"\r\n"
    )


def test_request_bytes_upgrade() -> None:
    headers = [b"Host", b"svc", b"Connection", b"Upgrade", b"Upgrade", b"websocket"]
    headers += [b"Sec-WebSocket-Key", b"k=="]
    head = heads.scan_request(b"GET", b"/ws", headers)
    out = heads.request_bytes(head, b"host: svc\r\n", upgrade=True)
    assert out == (
        b"GET /ws HTTP/1.1\r\n"
        b"Sec-WebSocket-Key: k==\r\n"
        b"host: svc\r\n"
        b"connection: upgrade\r\nupgrade: websocket\r\n"
        b"\r\n"
    )


def test_request_bytes_upgrade_not_taken_drops_it() -> None:
    headers = [b"Connection", b"Upgrade", b"Upgrade", b"h2c", b"Accept", b"*/*"]
    head = heads.scan_request(b"GET", b"/", headers)
    out = heads.request_bytes(head, b"host: svc\r\n", upgrade=False)
    assert out == b"GET / HTTP/1.1\r\nAccept: */*\r\nhost: svc\r\n\r\n"


def test_request_bytes_drops_connection_named_headers_keeps_framing() -> None:
    headers = [
        b"Connection",
        b"X-Secret, content-length, Host, transfer-encoding",
        b"x-secret",
        b"1",
        b"Content-Length",
        b"0",
        b"Host",
        b"client.example",
        b"X-Kept",
        b"2",
    ]
    head = heads.scan_request(b"POST", b"/", headers)
    out = heads.request_bytes(head, b"host: svc\r\n", upgrade=False)
    assert out == b"POST / HTTP/1.1\r\nContent-Length: 0\r\nX-Kept: 2\r\nhost: svc\r\n\r\n"


def test_request_bytes_chunked_survives_connection_naming_transfer_encoding() -> None:
    headers = [b"Connection", b"Transfer-Encoding", b"Transfer-Encoding", b"chunked"]
    head = heads.scan_request(b"POST", b"/", headers)
    out = heads.request_bytes(head, b"host: svc\r\n", upgrade=False)
    assert out == b"POST / HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"


# A property: whatever the header list, what goes upstream has no hop-by-hop header,
# exactly one Host (the one given), and every end-to-end header, in order, unless
# Connection named it (Content-Length never counts as named).

INTERESTING = (
    *HOP_BY_HOP,
    b"host",
    b"content-length",
    b"accept",
    b"x-foo",
    b"x-bar",
    b"cookie",
)
TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))


def recased(name: bytes) -> st.SearchStrategy[bytes]:
    flips = st.lists(st.booleans(), min_size=len(name), max_size=len(name))
    return flips.map(
        lambda fs: bytes(c ^ 0x20 if f and c >= 97 else c for c, f in zip(name, fs, strict=True))
    )


header_names = st.one_of(
    st.sampled_from(INTERESTING).flatmap(recased),
    st.text(TCHAR, min_size=1, max_size=12).map(str.encode),
)
field_values = st.one_of(
    st.text(VCHAR + " \t", max_size=20).map(lambda s: s.strip(" \t").encode()),
    st.sampled_from([b"1", b"2", b"chunked", b"websocket", b"close", b"keep-alive"]),
    st.lists(st.sampled_from(INTERESTING).flatmap(recased), min_size=1, max_size=4).map(b", ".join),
)
header_lists = st.lists(st.tuples(header_names, field_values), max_size=12)


@given(header_lists)
@example([(b"Connection", b"content-length"), (b"Content-Length", b"1")])
@example([(b"Host", b"a"), (b"hOST", b"a")])
@example([(b"tE", b"trailers"), (b"Proxy-Connection", b"x")])
def test_request_bytes_never_forwards_hop_by_hop_or_second_host(
    pairs: list[tuple[bytes, bytes]],
) -> None:
    flat = [field for pair in pairs for field in pair]
    hosts = [v for n, v in pairs if n.lower() == b"host"]
    lengths = {v for n, v in pairs if n.lower() == b"content-length"}
    codings = b",".join(v for n, v in pairs if n.lower() == b"transfer-encoding")
    try:
        head = heads.scan_request(b"GET", b"/", flat)
    except NotImplementedCoding:
        tokens = [c.strip().lower() for c in codings.split(b",")]
        assert tokens[-1] == b"chunked" and set(tokens[:-1]) - {b"chunked"}
        return
    except BadRequest:
        invalid = any(heads.HOST_VALUE.fullmatch(v) is None for v in hosts)
        assert len(hosts) > 1 or len(lengths) > 1 or invalid
        return
    assert len(hosts) <= 1
    assert len(lengths) <= 1
    out = heads.request_bytes(head, b"host: upstream\r\n", upgrade=False)
    assert out.startswith(b"GET / HTTP/1.1\r\n")
    assert out.endswith(b"\r\n\r\n")
    lines = out[:-2].split(b"\r\n")[1:-1]
    names = [ln.split(b":", 1)[0].lower() for ln in lines]
    assert names.count(b"host") == 1
    assert b"host: upstream" in lines
    chunked = any(n.lower() == b"transfer-encoding" for n, _ in pairs)
    assert lines.count(b"transfer-encoding: chunked") == chunked
    assert names.count(b"transfer-encoding") == chunked
    for hop in (b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade"):
        assert hop not in names
    named: set[bytes] = set()
    for n, v in pairs:
        if n.lower() == b"connection":
            named |= heads.connection_tokens(v)
    named -= heads.CONNECTION_OPTIONS
    kept = [
        b"%s: %s" % (n, v)
        for n, v in pairs
        if n.lower() not in HOP_BY_HOP and n.lower() != b"host" and n.lower() not in named
    ]
    assert [ln for ln in lines if ln not in (b"host: upstream", b"transfer-encoding: chunked")] == (
        kept
    )


# --- Host -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "default"),
    [(80, b"svc"), (8080, b"svc:8080"), (443, b"svc:443"), ("http", b"svc"), ("grpc", b"svc")],
)
def test_host_rule_auto(port: int | str, default: bytes) -> None:
    rule = HostRule("svc", port, "auto")
    assert rule.default == default
    assert rule.fixed == b"host: %s\r\n" % default
    assert heads.host_line(rule.fixed, b"client.example", rule.default) == rule.fixed


def test_host_rule_preserve_uses_the_clients_host_or_the_default() -> None:
    rule = HostRule("svc.ns", 8080, "preserve")
    assert rule.fixed is None
    assert rule.default == b"svc.ns:8080"
    assert heads.host_line(rule.fixed, b"client.example", rule.default) == (
        b"host: client.example\r\n"
    )
    assert heads.host_line(rule.fixed, None, rule.default) == b"host: svc.ns:8080\r\n"
    assert heads.host_line(rule.fixed, b"", rule.default) == b"host: svc.ns:8080\r\n"


def test_host_rule_literal() -> None:
    rule = HostRule("svc", 8080, "api.example.com")
    assert rule.fixed == b"host: api.example.com\r\n"
    assert rule.default == b"svc:8080"
    assert heads.host_line(rule.fixed, b"client", rule.default) == b"host: api.example.com\r\n"


# --- version, absolute form ------------------------------------------------------------


@pytest.mark.parametrize(
    ("keep_alive", "tokens", "unsure"),
    [
        (True, None, False),
        (True, {b"x-foo"}, False),
        (True, {b"keep-alive"}, True),
        (False, None, True),
        (False, {b"close"}, True),
    ],
)
def test_version_unsure(keep_alive: bool, tokens: set[bytes] | None, unsure: bool) -> None:
    assert heads.version_unsure(keep_alive, tokens) is unsure


def test_own_hosts() -> None:
    assert heads.own_hosts("Svc.NS.", None) == {"svc.ns", "svc.ns.svc", "localhost", "127.0.0.1"}
    names = heads.own_hosts("svc", "Svc.NS.svc.cluster.local.")
    assert names == {"svc", "svc.svc", "localhost", "127.0.0.1", "svc.ns.svc.cluster.local"}
    assert heads.own_hosts("svc", "") == {"svc", "svc.svc", "localhost", "127.0.0.1"}


OWN = heads.own_hosts("svc", "svc.ns.svc.cluster.local")


@pytest.mark.parametrize(
    ("target", "origin", "authority"),
    [
        (b"http://svc/a/b?c=d", b"/a/b?c=d", b"svc"),
        (b"http://svc", b"/", b"svc"),
        (b"http://svc?x=1", b"/?x=1", b"svc"),
        (b"http://SVC.:8080/p", b"/p", b"SVC.:8080"),
        (b"http://svc.svc/p", b"/p", b"svc.svc"),
        (b"http://localhost:8080/", b"/", b"localhost:8080"),
        (b"http://127.0.0.1/health", b"/health", b"127.0.0.1"),
        (b"http://svc.ns.svc.cluster.local/x#frag", b"/x", b"svc.ns.svc.cluster.local"),
        (b"HTTP://Svc.Ns.Svc.Cluster.Local./x?", b"/x", b"Svc.Ns.Svc.Cluster.Local."),
        (b"http://user@svc:81/", b"/", b"svc:81"),
    ],
)
def test_origin_form_for_own_names(target: bytes, origin: bytes, authority: bytes) -> None:
    # The authority replaces the client's Host upstream (RFC 9112 3.2.2), userinfo left out.
    assert heads.origin_form(target, OWN) == (origin, authority)


def test_origin_form_of_an_ipv6_literal_keeps_its_brackets() -> None:
    own = heads.own_hosts("::1", None) | {"::1"}
    assert heads.origin_form(b"http://[::1]:8080/x", own) == (b"/x", b"[::1]:8080")


@pytest.mark.parametrize(
    "target",
    [b"http://evil.example/", b"http://svc.evil/", b"http://u@evil/svc", b"http://10.0.0.1/"],
)
def test_origin_form_for_another_host_is_forbidden(target: bytes) -> None:
    with pytest.raises(ForbiddenHost) as info:
        heads.origin_form(target, OWN)
    assert info.value.reason == "forbidden_host"
    assert info.value.status == 400
    assert isinstance(info.value, ClientError)


@pytest.mark.parametrize("target", [b"http://", b"svc/x", b"http://svc/a b"])
def test_origin_form_invalid_target(target: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        heads.origin_form(target, OWN)
    assert not isinstance(info.value, ForbiddenHost)


# --- responses --------------------------------------------------------------------------


def test_response_lines_status_line_and_hop_by_hop() -> None:
    headers = [
        b"Content-Type",
        b"text/plain",
        b"Connection",
        b"keep-alive",
        b"Keep-Alive",
        b"timeout=5",
        b"Proxy-Connection",
        b"close",
        b"TE",
        b"trailers",
        b"Upgrade",
        b"h2c",
        b"Content-Length",
        b"5",
        b"Set-Cookie",
        b"a=1",
    ]
    lines, framing = heads.response_lines(200, headers)
    assert lines == [
        b"HTTP/1.1 200 OK\r\n",
        b"Content-Type: text/plain\r\n",
        b"Content-Length: 5\r\n",
        b"Set-Cookie: a=1\r\n",
    ]
    assert framing == FRAMING_LENGTH


@pytest.mark.parametrize(
    ("status", "line"),
    [
        (404, b"HTTP/1.1 404 Not Found\r\n"),
        (503, b"HTTP/1.1 503 Service Unavailable\r\n"),
        (204, b"HTTP/1.1 204 No Content\r\n"),
        (299, b"HTTP/1.1 299 Unknown\r\n"),
    ],
)
def test_response_lines_reason_phrase(status: int, line: bytes) -> None:
    assert heads.response_lines(status, [])[0] == [line]


@pytest.mark.parametrize(
    ("headers", "framing"),
    [
        ([], FRAMING_CLOSE),
        ([b"Content-Type", b"text/plain"], FRAMING_CLOSE),
        ([b"Content-Length", b"0"], FRAMING_LENGTH),
        ([b"content-length", b"10"], FRAMING_LENGTH),
        ([b"Transfer-Encoding", b"chunked"], FRAMING_CHUNKED),
        ([b"transfer-encoding", b"Chunked"], FRAMING_CHUNKED),
    ],
)
def test_response_lines_framing(headers: list[bytes], framing: int) -> None:
    lines, got = heads.response_lines(200, headers)
    assert got == framing
    assert all(b"transfer-encoding" not in ln.lower() for ln in lines)
    h2_fields, h2_framing = heads.h2_response(200, headers)
    assert h2_framing == framing
    assert all(name != b"transfer-encoding" for name, _ in h2_fields)


@pytest.mark.parametrize("value", [b"gzip, chunked", b"gzip", b"chunked, br", b"identity"])
def test_a_response_coding_other_than_chunked_is_a_protocol_error(value: bytes) -> None:
    # Before, the coding was dropped with the header and the client got gzip bytes as a
    # plain body (for HTTP/2 clients too).
    for make in (heads.response_lines, heads.h2_response):
        with pytest.raises(ProtocolError, match="transfer coding"):
            make(200, [b"Transfer-Encoding", value])


def test_response_lines_101_keeps_upgrade_and_connection() -> None:
    headers = [b"Upgrade", b"websocket", b"Connection", b"Upgrade", b"Sec-WebSocket-Accept", b"x"]
    lines, _ = heads.response_lines(101, headers)
    assert lines == [
        b"HTTP/1.1 101 Switching Protocols\r\n",
        b"Upgrade: websocket\r\n",
        b"Connection: Upgrade\r\n",
        b"Sec-WebSocket-Accept: x\r\n",
    ]


def test_response_lines_drops_connection_named_headers() -> None:
    headers = [
        b"X-Hop",
        b"1",
        b"Connection",
        b"keep-alive, X-Hop",
        b"connection",
        b"x-other",
        b"X-Other",
        b"2",
        b"Content-Length",
        b"1",
        b"X-End",
        b"3",
    ]
    lines, framing = heads.response_lines(200, headers)
    assert lines == [b"HTTP/1.1 200 OK\r\n", b"Content-Length: 1\r\n", b"X-End: 3\r\n"]
    assert framing == FRAMING_LENGTH


def test_response_lines_connection_naming_content_length_keeps_it() -> None:
    lines, framing = heads.response_lines(
        200, [b"Connection", b"Content-Length", b"Content-Length", b"2"]
    )
    assert lines == [b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n"]
    assert framing == FRAMING_LENGTH


@pytest.mark.parametrize(
    ("method", "status", "body"),
    [
        (b"GET", 200, True),
        (b"POST", 500, True),
        (b"HEAD", 200, False),
        (b"GET", 204, False),
        (b"GET", 304, False),
        (b"GET", 101, False),
        (b"HEAD", 404, False),
    ],
)
def test_has_body(method: bytes, status: int, body: bool) -> None:
    assert heads.has_body(method, status) is body


@pytest.mark.parametrize(
    ("keep_alive", "http10", "line"),
    [
        (True, False, b"\r\n"),
        (True, True, b"connection: keep-alive\r\n\r\n"),
        (False, False, b"connection: close\r\n\r\n"),
        (False, True, b"connection: close\r\n\r\n"),
    ],
)
def test_last_line(keep_alive: bool, http10: bool, line: bytes) -> None:
    assert heads.last_line(keep_alive, http10) == line


def test_trailer_block_keeps_only_end_to_end_trailers() -> None:
    trailers = [
        b"grpc-status",
        b"0",
        b"Connection",
        b"close",
        b"Transfer-Encoding",
        b"chunked",
        b"Keep-Alive",
        b"x",
        b"Content-Length",
        b"5",
        b"Host",
        b"evil",
        b"X-Checksum",
        b"abc",
    ]
    assert heads.trailer_block(trailers) == b"0\r\ngrpc-status: 0\r\nX-Checksum: abc\r\n\r\n"
    assert [name for name in trailers[::2] if heads.trailer_field(name)] == [
        b"grpc-status",
        b"X-Checksum",
    ]


def test_trailer_block_empty() -> None:
    assert heads.trailer_block([]) == b"0\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "framed"),
    [
        (b"abc", b"3\r\nabc\r\n"),
        (b"x" * 16, b"10\r\n" + b"x" * 16 + b"\r\n"),
        (b"y" * 255, b"ff\r\n" + b"y" * 255 + b"\r\n"),
    ],
)
def test_chunk(data: bytes, framed: bytes) -> None:
    assert heads.chunk(data) == framed


# --- sidelink's own answers ---------------------------------------------------------------


def test_error_response_exact() -> None:
    out = heads.error_response(NoEndpoints("x"), keep_alive=True)
    assert out == (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"content-type: text/plain; charset=utf-8\r\n"
        b"content-length: 27\r\n"
        b"sidelink-error: no_endpoints\r\n"
        b"connection: keep-alive\r\n"
        b"\r\n"
        b"503 Service Unavailable: x\n"
    )


@pytest.mark.parametrize(
    ("error", "status_line", "reason"),
    [
        (NoEndpoints("x"), b"HTTP/1.1 503 Service Unavailable", b"no_endpoints"),
        (UpstreamTimeout("slow"), b"HTTP/1.1 504 Gateway Timeout", b"timeout"),
        (HeadTooLarge(), b"HTTP/1.1 431 Request Header Fields Too Large", b"head_too_large"),
        (MethodNotAllowed("CONNECT"), b"HTTP/1.1 405 Method Not Allowed", b"method_not_allowed"),
        (
            VersionNotSupported("HTTP/2.0"),
            b"HTTP/1.1 505 HTTP Version Not Supported",
            b"version_not_supported",
        ),
        (ForbiddenHost("evil"), b"HTTP/1.1 400 Bad Request", b"forbidden_host"),
        (BadRequest("d\u00e9j\u00e0 \udcff"), b"HTTP/1.1 400 Bad Request", b"bad_request"),
    ],
)
@pytest.mark.parametrize("keep_alive", [True, False])
def test_error_response(
    error: ProxyError, status_line: bytes, reason: bytes, keep_alive: bool
) -> None:
    out = heads.error_response(error, keep_alive)
    head, body = out.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == status_line
    fields = dict(ln.split(b": ", 1) for ln in lines[1:])
    assert fields == {
        b"content-type": b"text/plain; charset=utf-8",
        b"content-length": b"%d" % len(body),
        b"sidelink-error": reason,
        b"connection": b"keep-alive" if keep_alive else b"close",
    }
    assert body.startswith(status_line.split(b" ", 1)[1] + b": ")
    assert body.endswith(b"\n")


def test_error_response_unknown_status() -> None:
    class Odd(ProxyError):
        reason = "odd"
        status = 599

    out = heads.error_response(Odd(), keep_alive=False)
    assert out.startswith(b"HTTP/1.1 599 Error\r\n")
    assert out.endswith(b"\r\n\r\n599 Error: odd\n")


# --- head_size ----------------------------------------------------------------------------

tokens = st.text(TCHAR, min_size=1, max_size=20).map(str.encode)
values = st.text(VCHAR + " \t", max_size=40).map(str.encode)


def wire(method: bytes, target: bytes, pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (
        method,
        target,
        b"".join(b"%s: %s\r\n" % pair for pair in pairs),
    )


def test_head_size_example() -> None:
    pairs = [(b"Host", b"svc"), (b"Accept", b"*/*")]
    flat = [f for pair in pairs for f in pair]
    assert heads.head_size(b"GET", b"/x", flat) == len(wire(b"GET", b"/x", pairs)) == 43


@given(
    st.sampled_from([b"GET", b"POST", b"OPTIONS", b"PROPFIND"]) | tokens,
    st.text(VCHAR, min_size=1, max_size=60).map(str.encode),
    st.lists(st.tuples(tokens, values), max_size=20),
)
def test_head_size_is_the_plain_wire_length(
    method: bytes, target: bytes, pairs: list[tuple[bytes, bytes]]
) -> None:
    flat = [f for pair in pairs for f in pair]
    assert heads.head_size(method, target, flat) == len(wire(method, target, pairs))
