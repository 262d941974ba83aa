"""A route's endpoint set: which endpoint takes the next request or connection.

Endpoints follow DNS: new addresses join as ``active``; addresses that leave DNS
become ``draining`` (no new work; in-flight work finishes; then they are dropped).

Passive health (``outlier``): a failed connect ejects an endpoint at once, and
``consecutive_failures`` bad answers in a row (5xx, or the connection reset or timed
out once the request was sent) eject it too, for ``base_ejection`` doubled on each
repeat up to ``max_ejection``. Never more than ``max_ejected_percent`` of a route's
endpoints are out at once (at least one stays); when every endpoint is unusable all
of them are tried rather than none (panic mode).

Balancing: ``p2c`` (the less loaded of two picked at random), ``ewma`` (p2c on
peak-EWMA latency times load, as Linkerd does: the estimate timed from the request
going on its connection to the answer's head, decaying while nothing is learnt) or
``round_robin``. With
``slow_start``, an endpoint that joins once the route has answered ramps its share
up linearly over that window, from its first good answer.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

from proxy.addr import Address, join_host_port
from proxy.config import OutlierConfig
from proxy.metrics import RouteStats

if TYPE_CHECKING:
    from proxy.pool import Pool, StreamPool

log = logging.getLogger("sidelink.endpoints")

ACTIVE: Final = "active"
EJECTED: Final = "ejected"
DRAINING: Final = "draining"

# The clock ejections are timed by: a plain module global (not Final), so that a test
# can move it, compiled or not.
monotonic = time.monotonic

EJECT_DOUBLINGS: Final = 16  # ejections counted at most: past max_ejection either way
# random.random, as a constant: compiled code calls it at once, not through the module's
# attribute on every pick (the module's generator all the same: random.seed holds).
uniform: Final = random.random
# Peak-EWMA (Linkerd's defaults): the latency assumed of a new endpoint, and the decay.
EWMA_INITIAL: Final = 0.030
EWMA_DECAY: Final = 10.0
# Estimates closer than this ratio are noise (each is its endpoint's recent peak): ewma
# compares those two by load alone, so that the tie-break spreads even shares. Otherwise
# whichever of equal replicas had the lower peak would win every tie in load, and take
# up to a third more than the others for as long as the peaks last.
EWMA_APART: Final = 1.25
# A joining endpoint's share before its first good answer, and its least share after.
SLOW_START_FLOOR: Final = 0.02


class Endpoint:
    __slots__ = (
        "address",
        "consecutive",
        "ejected_until",
        "ejections",
        "host",
        "in_flight",
        "last_pick",
        "pool",
        "port",
        "rtt",
        "rtt_at",
        "state",
        "streams",
        "warm_from",
        "warming",
    )

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.address: Address = (host, port)
        self.state = ACTIVE
        self.in_flight = 0
        self.last_pick = 0  # the set's pick count when this one was last picked
        self.consecutive = 0  # bad answers in a row
        self.ejections = 0  # ejections in a row, for the doubling
        self.ejected_until = 0.0
        self.rtt = EWMA_INITIAL  # peak-EWMA latency, seconds
        self.rtt_at = 0.0
        self.warming = False  # slow start: joined after the route answered
        self.warm_from = 0.0  # its first good answer (0: none yet)
        self.pool: Pool | None = None  # idle upstream connections (HTTP/1)
        self.streams: StreamPool | None = None  # multiplexed ones (HTTP/2)

    def __repr__(self) -> str:
        return f"<Endpoint {self.label} {self.state} in_flight={self.in_flight}>"

    def let_go(self) -> None:
        """It takes no new work (it left DNS, or has gone): its idle HTTP/1 connections
        close, and its HTTP/2 ones take no new stream, each closed once its last stream
        ends."""
        if self.pool is not None:
            self.pool.close_idle()
        if self.streams is not None:
            self.streams.retire_all()

    @property
    def label(self) -> str:
        """``host:port``, as logs and the access log name it."""
        return join_host_port(self.host, self.port)

    def to_dict(self) -> dict[str, object]:
        return {
            "address": self.host,
            "port": self.port,
            "state": self.state,
            "in_flight": self.in_flight,
        }

    def weight(self, now: float, window: float) -> float:
        """Its share while slow-starting: from SLOW_START_FLOOR up to 1 over the window."""
        if not self.warm_from:
            return SLOW_START_FLOOR
        share = (now - self.warm_from) / window
        if share >= 1.0:
            self.warming = False
            return 1.0
        return max(SLOW_START_FLOOR, share)

    def latency(self, now: float) -> float:
        """Its peak-EWMA latency: the estimate decays toward zero while nothing is learnt,
        so an endpoint that was slow once is tried again in time (as Linkerd's does)."""
        if self.rtt_at:
            self.rtt *= math.exp((self.rtt_at - now) / EWMA_DECAY)
            self.rtt_at = now
        return self.rtt

    def observe(self, seconds: float, now: float) -> None:
        """An answer took `seconds`, from the request going out to its head coming in: a
        slower one is believed at once, a faster one decays in."""
        if seconds > self.rtt or not self.rtt_at:
            self.rtt = seconds  # (the first answer replaces the assumed EWMA_INITIAL)
        else:
            decay = math.exp((self.rtt_at - now) / EWMA_DECAY)
            self.rtt = self.rtt * decay + seconds * (1.0 - decay)
        self.rtt_at = now


class EndpointSet:
    def __init__(
        self,
        name: str,
        balance: str,
        stats: RouteStats,
        outlier: OutlierConfig | None = None,
        slow_start: float = 0.0,
    ) -> None:
        self.name = name
        self.balance = balance
        self.stats = stats
        self.outlier = outlier if outlier is not None else OutlierConfig()
        self.slow_start = slow_start
        self.endpoints: list[Endpoint] = []  # active and ejected, in DNS order
        self.draining: list[Endpoint] = []
        self.warming = 0  # endpoints slow-starting now
        self.answered = False  # the route has had a good answer: joiners slow-start
        self._next = 0  # round_robin's cursors: first attempts, and retries
        self._again = 0
        self.picks = 0  # picks made by p2c or ewma, for their tie-break

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
                if self.answered and self.slow_start > 0:
                    ep.warming = True
                    self.warming += 1
            elif ep.state == DRAINING:
                ep.state = ACTIVE
            fresh.append(ep)
        self.draining = [ep for ep in self.draining if ep.address in revived]
        for ep in current.values():
            ep.state = DRAINING
            self.draining.append(ep)
            ep.let_go()
        self.endpoints = fresh
        self._reap()

    def pick(self, exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
        """The endpoint for the next request, or None when there is nothing to try."""
        candidates = self.endpoints
        if not candidates:
            return None
        n = len(candidates)
        balance = self.balance
        if not exclude and not self.warming:
            # The common cases in one step: a single active endpoint (a ClusterIP), or two
            # distinct random active ones for p2c or ewma.
            if n == 1:
                if candidates[0].state == ACTIVE:
                    return candidates[0]
            elif balance != "round_robin":
                i = int(uniform() * n)
                j = int(uniform() * (n - 1))
                a = candidates[i]
                b = candidates[j + 1 if j >= i else j]
                if a.state == ACTIVE and b.state == ACTIVE:
                    return self._better(a, b)
        now = monotonic()
        if balance == "round_robin" and not self.warming:
            return self._turn(candidates, exclude, now)
        usable = [ep for ep in candidates if ep not in exclude and self._usable(ep, now)]
        if not usable:
            # Everything is ejected: a failing endpoint beats a certain failure (panic mode).
            usable = [ep for ep in candidates if ep not in exclude]
            if not usable:
                return None
        if self.warming:
            return self._weighted(usable, now)
        if len(usable) == 1:
            return usable[0]
        a, b = random.sample(usable, 2)
        return self._better(a, b)

    def _turn(
        self, candidates: list[Endpoint], exclude: Sequence[Endpoint], now: float
    ) -> Endpoint | None:
        """round_robin: the first usable endpoint from the cursor on, in DNS order (else,
        when every one is ejected, the first not excluded). The cursor walks the whole
        list, so one passed over (ejected, or tried already) does not shift the others'
        turns; retries take turns of their own, so a sick endpoint's retries spread over
        the others instead of all landing on the next in line."""
        n = len(candidates)
        start = self._again if exclude else self._next
        for panic in (False, True):
            for k in range(n):
                i = (start + k) % n
                ep = candidates[i]
                if ep not in exclude and (panic or self._usable(ep, now)):
                    if exclude:
                        self._again = i + 1
                    else:
                        self._next = i + 1
                    return ep
        return None

    def _better(self, a: Endpoint, b: Endpoint) -> Endpoint:
        if self.balance == "ewma":
            now = monotonic()
            rtt_a = a.latency(now)
            rtt_b = b.latency(now)
            if rtt_a > rtt_b * EWMA_APART or rtt_b > rtt_a * EWMA_APART:
                cost_a = rtt_a * (a.in_flight + 1)
                cost_b = rtt_b * (b.in_flight + 1)
            else:  # latencies as good as equal: their load alone decides, as for p2c
                cost_a = float(a.in_flight)
                cost_b = float(b.in_flight)
        else:
            cost_a = float(a.in_flight)
            cost_b = float(b.in_flight)
        # A tie (most often when nothing is in flight: one client calling in turn) goes
        # to the one picked longer ago, so sequential calls spread evenly, not at random.
        a_wins = cost_a < cost_b or (cost_a == cost_b and a.last_pick <= b.last_pick)
        better = a if a_wins else b
        self.picks += 1
        better.last_pick = self.picks
        return better

    def _weighted(self, usable: list[Endpoint], now: float) -> Endpoint:
        """A pick while some endpoints slow-start: one drawn by share. (Not the better of
        two: a joiner has nothing in flight and would win most comparisons, twice its
        share.)"""
        window = self.slow_start
        weights = [ep.weight(now, window) if ep.warming else 1.0 for ep in usable]
        self.warming = sum(1 for ep in self.endpoints if ep.warming)
        return random.choices(usable, weights)[0]

    def acquire(self, ep: Endpoint) -> None:
        ep.in_flight += 1

    def release(self, ep: Endpoint) -> None:
        ep.in_flight -= 1
        if ep.state == DRAINING and ep.in_flight == 0:
            self._reap()

    # --- what happened at an endpoint -----------------------------------------------

    def failed(self, ep: Endpoint) -> None:
        """A connect to ep failed: it is ejected at once (within max_ejected_percent)."""
        self._eject(ep, "connect failed")

    def succeeded(self, ep: Endpoint) -> None:
        """A good answer (or, for tcp, a connection made): the failures are forgiven."""
        ep.consecutive = 0
        if ep.ejections:
            ep.ejections = 0
            if ep.state == EJECTED:
                ep.state = ACTIVE
                log.info("route %s: endpoint %s is back", self.name, ep.label)
        if not self.answered:
            self.answered = True
        if ep.warming and not ep.warm_from:
            ep.warm_from = monotonic()

    def answered_by(self, ep: Endpoint, status: int, seconds: float) -> None:
        """A response head came from ep after `seconds`: 5xx counts against it."""
        if self.balance == "ewma":
            ep.observe(seconds, monotonic())
        if status >= 500:
            self.went_wrong(ep, f"answered {status}")
        elif ep.consecutive or ep.ejections or not self.answered or ep.warming:
            self.succeeded(ep)

    def went_wrong(self, ep: Endpoint, why: str) -> None:
        """A bad answer from ep (5xx, or reset or timed out once the request was sent)."""
        ep.consecutive += 1
        if ep.consecutive >= self.outlier.consecutive_failures:
            self._eject(ep, f"{ep.consecutive} failures in a row, the last: {why}")

    def _eject(self, ep: Endpoint, why: str) -> None:
        if ep.state != ACTIVE:
            return  # ejected already, or draining (leaving anyway)
        config = self.outlier
        out = sum(1 for other in self.endpoints if other.state == EJECTED)
        if out + 1 > len(self.endpoints) * config.max_ejected_percent // 100:
            return  # max_ejected_percent: the others stay, and so does this one
        # (The doubling stops at the cap: 2 ** 1024 seconds would not even be a float.)
        ep.ejections = min(ep.ejections + 1, EJECT_DOUBLINGS)
        seconds = min(config.base_ejection * 2 ** (ep.ejections - 1), config.max_ejection)
        ep.ejected_until = monotonic() + seconds
        ep.consecutive = 0
        ep.state = EJECTED
        self.stats.ejections += 1
        log.info("route %s: endpoint %s ejected for %gs (%s)", self.name, ep.label, seconds, why)

    def revive(self) -> None:
        """Ejections that have run out end now (logged, and /routes says so), not when the
        endpoint is next picked: a route with no traffic would show them for ever."""
        now = monotonic()
        for ep in self.endpoints:
            if ep.state == EJECTED:
                self._usable(ep, now)

    def _usable(self, ep: Endpoint, now: float) -> bool:
        if ep.state == EJECTED and now >= ep.ejected_until:
            # Give it another chance; the next ejection lasts twice as long.
            ep.state = ACTIVE
            log.info("route %s: endpoint %s returns after its ejection", self.name, ep.label)
        return ep.state == ACTIVE

    def _reap(self) -> None:
        gone = [ep for ep in self.draining if ep.in_flight == 0]
        if gone:
            self.draining = [ep for ep in self.draining if ep.in_flight > 0]
            for ep in gone:
                ep.let_go()
