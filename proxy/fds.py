"""The process's file descriptors, shared by every route: a budget with a reserve.

A sidecar shares its pod's fd limit with everything it serves. Without a budget, a
flood of connections takes the last descriptor and everything fails at once: new
upstream connects, established clients' next requests, and the admin server that
answers the kubelet's probes. So every proxied socket is counted, and:

- a new downstream connection beyond the budget is shed (closed at once, counted);
- an upstream connect may dip into half of the reserve, so clients already accepted
  are still served; beyond that it fails as ``fd_limit`` (503), without blaming the
  endpoint;
- the rest of the reserve is the admin server's: /healthz, /readyz and /metrics
  answer at the limit.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from typing import Final

log = logging.getLogger("sidelink.fds")

# Descriptors kept back from proxying: at least this many, or this share of the limit.
MIN_RESERVE: Final = 32
RESERVE_SHARE: Final = 16  # 1/16 of the limit
# At most one warning per this many seconds while at the limit.
WARN_INTERVAL: Final = 1.0


def open_fds() -> int:
    """Descriptors open now (0 where /proc is not there to tell)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class FdBudget:
    """How many sockets proxying may hold, and how many it holds."""

    def __init__(self, limit: int, base: int) -> None:
        self.reserve = max(MIN_RESERVE, limit // RESERVE_SHARE)
        # (base: what the process holds besides proxied sockets: listeners, DNS, logs.)
        self.downstream_cap = max(0, limit - base - self.reserve)
        self.upstream_cap = self.downstream_cap + self.reserve // 2
        self.used = 0
        self.shed = 0
        self._warned = 0.0

    @classmethod
    def of_process(cls) -> FdBudget:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
        return cls(limit, open_fds())

    def __repr__(self) -> str:
        return f"<FdBudget used={self.used} downstream_cap={self.downstream_cap} shed={self.shed}>"

    def admit(self) -> bool:
        """A downstream connection was accepted: keep it (counted), or shed it."""
        if self.used >= self.downstream_cap:
            self.shed += 1
            self.warn("new connections are shed")
            return False
        self.used += 1
        return True

    def room_upstream(self) -> bool:
        """Whether an upstream connect may take a descriptor."""
        if self.used >= self.upstream_cap:
            self.warn("upstream connects fail (fd_limit)")
            return False
        return True

    def opened(self) -> None:
        self.used += 1

    def closed(self) -> None:
        self.used -= 1

    def warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self._warned >= WARN_INTERVAL:
            self._warned = now
            log.warning(
                "at the file descriptor limit (%d proxied sockets open): %s", self.used, what
            )


_process: FdBudget | None = None


def process_budget() -> FdBudget:
    """The one budget of this process, made at first use (by the first route)."""
    global _process
    if _process is None:
        _process = FdBudget.of_process()
    return _process
