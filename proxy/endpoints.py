"""A route's endpoint set: which endpoint takes the next request or connection.

Endpoints follow DNS: new addresses join as ``active``; addresses that leave DNS
become ``draining`` (no new work; in-flight work finishes; then they are dropped).
An endpoint that fails to connect is ``ejected`` for a while, with the time
doubling on repeated failures, unless that would leave nothing to try.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from proxy.addr import Address, join_host_port
from proxy.metrics import RouteStats

if TYPE_CHECKING:
    from proxy.pool import Pool


ACTIVE: Final = "active"
EJECTED: Final = "ejected"
DRAINING: Final = "draining"

# The clock ejections are timed by: a plain module global (not Final), so that a test
# can move it, compiled or not.
monotonic = time.monotonic

EJECT_FIRST: Final = 1.0
EJECT_MAX: Final = 30.0
EJECT_DOUBLINGS: Final = 16  # failures counted at most: past EJECT_MAX either way


class Endpoint:
    __slots__ = (
        "address",
        "ejected_until",
        "failures",
        "host",
        "in_flight",
        "pool",
        "port",
        "state",
    )

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.address: Address = (host, port)
        self.state = ACTIVE
        self.in_flight = 0
        self.failures = 0
        self.ejected_until = 0.0
        self.pool: Pool[Any] | None = None  # idle upstream connections (http)

    def __repr__(self) -> str:
        address = join_host_port(self.host, self.port)
        return f"<Endpoint {address} {self.state} in_flight={self.in_flight}>"

    def to_dict(self) -> dict[str, object]:
        return {
            "address": self.host,
            "port": self.port,
            "state": self.state,
            "in_flight": self.in_flight,
        }


class EndpointSet:
    def __init__(self, name: str, balance: str, stats: RouteStats) -> None:
        self.name = name
        self.balance = balance
        self.stats = stats
        self.endpoints: list[Endpoint] = []  # active and ejected, in DNS order
        self.draining: list[Endpoint] = []
        self._next = 0

    def __repr__(self) -> str:
        counts = {ACTIVE: 0, EJECTED: 0}
        for ep in self.endpoints:
            counts[ep.state] += 1
        return (
            f"<EndpointSet {self.name} active={counts[ACTIVE]} ejected={counts[EJECTED]} "
            f"draining={len(self.draining)} balance={self.balance}>"
        )

    def __len__(self) -> int:
        return len(self.endpoints)

    def all(self) -> Iterable[Endpoint]:
        yield from self.endpoints
        yield from self.draining

    def update(self, addresses: Sequence[Address]) -> None:
        """Make the set follow a new DNS answer."""
        current = {ep.address: ep for ep in self.endpoints}
        revived = {ep.address: ep for ep in self.draining}
        fresh: list[Endpoint] = []
        for address in addresses:
            ep = current.pop(address, None) or revived.pop(address, None)
            if ep is None:
                ep = Endpoint(*address)
            elif ep.state == DRAINING:
                ep.state = ACTIVE
            fresh.append(ep)
        self.draining = [ep for ep in self.draining if ep.address in revived]
        for ep in current.values():
            ep.state = DRAINING
            self.draining.append(ep)
            if ep.pool is not None:
                ep.pool.close_idle()
        self.endpoints = fresh
        self._reap()

    def pick(self, exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
        """The endpoint for the next request, or None when there is nothing to try."""
        candidates = self.endpoints
        if not candidates:
            return None
        n = len(candidates)
        if not exclude:
            # The common cases in one step: a single active endpoint (a ClusterIP), or two
            # distinct random active ones for p2c.
            if n == 1:
                if candidates[0].state == ACTIVE:
                    return candidates[0]
            elif self.balance == "p2c":
                i = int(random.random() * n)
                j = int(random.random() * (n - 1))
                a = candidates[i]
                b = candidates[j + 1 if j >= i else j]
                if a.state == ACTIVE and b.state == ACTIVE:
                    return a if a.in_flight <= b.in_flight else b
        now = monotonic()
        usable = [ep for ep in candidates if ep not in exclude and self._usable(ep, now)]
        if not usable:
            # Everything is ejected: a failing endpoint beats a certain failure (panic mode).
            usable = [ep for ep in candidates if ep not in exclude]
            if not usable:
                return None
        if self.balance == "p2c" and len(usable) > 1:
            a, b = random.sample(usable, 2)
            return a if a.in_flight <= b.in_flight else b
        self._next = (self._next + 1) % len(usable)
        return usable[self._next]

    def acquire(self, ep: Endpoint) -> None:
        ep.in_flight += 1

    def release(self, ep: Endpoint) -> None:
        ep.in_flight -= 1
        if ep.state == DRAINING and ep.in_flight == 0:
            self._reap()

    def failed(self, ep: Endpoint) -> None:
        """A connect to ep failed: eject it for a while, doubling on repeated failures."""
        # (The doubling stops at the cap: 2 ** 1024 seconds would not even be a float.)
        ep.failures = min(ep.failures + 1, EJECT_DOUBLINGS)
        ep.ejected_until = monotonic() + min(EJECT_FIRST * 2 ** (ep.failures - 1), EJECT_MAX)
        if ep.state == ACTIVE:
            ep.state = EJECTED
            self.stats.ejections += 1

    def succeeded(self, ep: Endpoint) -> None:
        if ep.failures:
            ep.failures = 0
            ep.ejected_until = 0.0
            if ep.state == EJECTED:
                ep.state = ACTIVE

    def _usable(self, ep: Endpoint, now: float) -> bool:
        if ep.state == EJECTED and now >= ep.ejected_until:
            # Give it another chance; the next failure ejects it for longer.
            ep.state = ACTIVE
        return ep.state == ACTIVE

    def _reap(self) -> None:
        gone = [ep for ep in self.draining if ep.in_flight == 0]
        if gone:
            self.draining = [ep for ep in self.draining if ep.in_flight > 0]
            for ep in gone:
                if ep.pool is not None:
                    ep.pool.close_idle()
