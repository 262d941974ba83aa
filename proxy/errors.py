"""The failures sidelink reports, one class per metric reason and HTTP status.

Low-level exceptions (OSError, timeouts, parser errors) are translated into these
at the boundary where they happen, so the rest of the code deals in one small
hierarchy that maps 1:1 onto ``sidelink_upstream_errors_total{reason}`` and onto
the status code and ``sidelink-error`` header sent downstream.
"""

from __future__ import annotations

import errno


class UpstreamError(Exception):
    reason = "protocol"
    status = 502

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason


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


class NoEndpoints(UpstreamError):
    reason = "no_endpoints"
    status = 503


class ProtocolError(UpstreamError):
    reason = "protocol"


def connect_error(exc: BaseException) -> UpstreamError:
    """Translate what ``loop.create_connection`` raised."""
    if isinstance(exc, TimeoutError):
        return ConnectTimeout("connect timed out")
    if isinstance(exc, OSError) and exc.errno in (errno.ETIMEDOUT,):
        return ConnectTimeout(exc.strerror or "connect timed out")
    if isinstance(exc, OSError):
        return ConnectRefused(exc.strerror or str(exc))
    return ConnectRefused(str(exc))
