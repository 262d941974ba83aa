"""The one error hierarchy: what sidelink answers when it cannot forward a request.

Two families, each class with its metric reason, its HTTP status and the gRPC status a
gRPC request gets instead (HTTP 200, trailers only):

- :class:`UpstreamError`: the service failed us (refused, timed out, reset, sent
  garbage, or has no endpoints). Counted in ``sidelink_upstream_errors_total{reason}``.
- :class:`ClientError`: sidelink refuses the client's request (malformed, forbidden,
  too slow, too large). Counted only as the answer sent (``sidelink_requests_total``).

Low-level exceptions (OSError, timeouts, parser errors) are translated into these at
the boundary where they happen; the ``reason`` goes out in the ``sidelink-error``
header and in the access log.
"""

from __future__ import annotations

import errno
from typing import ClassVar

# gRPC status codes (grpc/doc/statuscodes.md) that sidelink's own answers use.
GRPC_DEADLINE_EXCEEDED = 4
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14


class ProxyError(Exception):
    reason: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    grpc_status: ClassVar[int] = GRPC_INTERNAL

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason


# --- the service failed -----------------------------------------------------------


class UpstreamError(ProxyError):
    reason = "protocol"
    status = 502
    grpc_status = GRPC_UNAVAILABLE  # a client may try again: the service did not answer


class ConnectRefused(UpstreamError):
    reason = "connect_refused"


class ConnectTimeout(UpstreamError):
    reason = "connect_timeout"
    status = 504


class UpstreamReset(UpstreamError):
    reason = "reset"


class UpstreamTimeout(UpstreamError):
    reason = "timeout"
    status = 504
    grpc_status = GRPC_DEADLINE_EXCEEDED


class NoEndpoints(UpstreamError):
    reason = "no_endpoints"
    status = 503


class ProtocolError(UpstreamError):
    reason = "protocol"


class FdLimit(UpstreamError):
    """No file descriptor for an upstream connection: this process is at its limit."""

    reason = "fd_limit"
    status = 503


# Every reason of sidelink_upstream_errors_total, in the order the metrics list them.
UPSTREAM_ERRORS: tuple[type[UpstreamError], ...] = (
    ConnectRefused,
    ConnectTimeout,
    UpstreamReset,
    UpstreamTimeout,
    NoEndpoints,
    ProtocolError,
    FdLimit,
)


def connect_error(exc: BaseException) -> UpstreamError:
    """Translate what ``loop.create_connection`` raised."""
    if isinstance(exc, TimeoutError):
        return ConnectTimeout("connect timed out")
    if isinstance(exc, OSError) and exc.errno in (errno.ETIMEDOUT,):
        return ConnectTimeout(exc.strerror or "connect timed out")
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return FdLimit(exc.strerror or "too many open files")
    if isinstance(exc, OSError):
        return ConnectRefused(exc.strerror or str(exc))
    return ConnectRefused(str(exc))


# --- the client's request is refused ----------------------------------------------


class ClientError(ProxyError):
    """A request sidelink refuses: answered with ``status``, then the connection closes."""

    reason = "bad_request"
    status = 400


class BadRequest(ClientError):
    pass


class ForbiddenHost(ClientError):
    """An absolute-form request for another host: sidelink is never an open proxy."""

    reason = "forbidden_host"


class MethodNotAllowed(ClientError):
    reason = "method_not_allowed"
    status = 405
    grpc_status = GRPC_UNIMPLEMENTED


class HeadTimeout(ClientError):
    reason = "head_timeout"
    status = 408


class BodyStalled(ClientError):
    reason = "idle_timeout"
    status = 408
    grpc_status = GRPC_DEADLINE_EXCEEDED


class HeadTooLarge(ClientError):
    reason = "head_too_large"
    status = 431
    grpc_status = GRPC_RESOURCE_EXHAUSTED


class NotImplementedCoding(ClientError):
    """A transfer coding other than chunked (RFC 9112 6.1: 501)."""

    reason = "not_implemented"
    status = 501


class VersionNotSupported(ClientError):
    reason = "version_not_supported"
    status = 505


class InternalError(ClientError):
    """A bug of ours met while reading a request: the client gets a 500, not a hang."""

    reason = "internal"
    status = 500


# --- the client goes before its answer is all sent ------------------------------------


class ClientGone(ProxyError):
    """The client closed its connection before it had its answer whole: nothing more goes
    to it. The request counts as ``code="reset"`` (it never got the answer), and the
    access log says which of these ended it; nothing is held against the upstream."""

    reason = "downstream_closed"


class ClientReset(ClientGone):
    """The client reset its HTTP/2 stream (a cancelled call, a gRPC deadline)."""

    reason = "downstream_reset"


class ConnectionCut(ClientGone):
    """sidelink closed the client's connection first: a drain past its timeout, a flood cut
    with GOAWAY, a timeout."""

    reason = "connection_cut"
