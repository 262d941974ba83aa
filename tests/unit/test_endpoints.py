"""EndpointSet: following DNS, draining, balancing, outlier ejection, panic mode, ewma and
slow start."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import endpoints
from proxy.config import OutlierConfig, PoolConfig
from proxy.endpoints import (
    ACTIVE,
    DRAINING,
    EJECT_DOUBLINGS,
    EJECTED,
    EWMA_DECAY,
    SLOW_START_FLOOR,
    Endpoint,
    EndpointSet,
)
from proxy.metrics import RouteStats
from proxy.pool import Pool, Pooled

A = ("10.0.0.1", 80)
B = ("10.0.0.2", 80)
C = ("10.0.0.3", 80)
D = ("10.0.0.4", 80)


class Clock:
    """Stands in for proxy.endpoints.monotonic: it moves on demand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Conn(Pooled):
    def __init__(self, created: float) -> None:
        self.created = created
        self.idle_since = created
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(endpoints, "monotonic", clock.monotonic)
    return clock


@pytest.fixture(autouse=True)
def seeded() -> Iterator[None]:
    """Balancing draws from `random`: seed it, and give the rest of the suite its state back."""
    state = random.getstate()
    random.seed(8)
    yield
    random.setstate(state)


E = ("10.0.0.5", 80)

# Every endpoint may be ejected: what panic mode needs to be reached at all.
ALL_MAY_GO = OutlierConfig(max_ejected_percent=100)


def make_set(
    *addresses: tuple[str, int],
    balance: str = "p2c",
    outlier: OutlierConfig | None = None,
    slow_start: float = 0.0,
) -> EndpointSet:
    eps = EndpointSet("app1", balance, RouteStats("app1"), outlier, slow_start)
    eps.update(addresses)
    return eps


def come_back(eps: EndpointSet, clock: Clock, ep: Endpoint) -> None:
    """Let ep's ejection run out and a pick see it (a pick is what returns it)."""
    clock.now = max(clock.now, ep.ejected_until)
    others = [other for other in eps.endpoints if other is not ep]
    assert eps.pick(exclude=others) is ep
    assert ep.state == ACTIVE


def by_address(eps: EndpointSet) -> dict[tuple[str, int], Endpoint]:
    return {ep.address: ep for ep in eps.all()}


def adopt(pool: Pool, conn: Conn) -> None:
    """A new connection handed out: the one place this file tells a pool so."""
    pool.adopt(conn)


def with_idle_pool(ep: Endpoint, stats: RouteStats, idle: int) -> list[Conn]:
    pool: Pool = Pool("app1", ep.address, PoolConfig(), stats)
    conns = [Conn(0.0) for _ in range(idle)]
    for conn in conns:
        adopt(pool, conn)
        pool.put(conn, 0.0, reusable=True)
    ep.pool = pool
    return conns


def picks(eps: EndpointSet, n: int) -> Counter[tuple[str, int]]:
    counts: Counter[tuple[str, int]] = Counter()
    for _ in range(n):
        ep = eps.pick()
        assert ep is not None
        counts[ep.address] += 1
    return counts


# Endpoint


def test_endpoint_repr_and_to_dict() -> None:
    ep = Endpoint("10.0.0.1", 8080)
    ep.in_flight = 2
    assert repr(ep) == "<Endpoint 10.0.0.1:8080 active in_flight=2>"
    assert ep.to_dict() == {"address": "10.0.0.1", "port": 8080, "state": "active", "in_flight": 2}
    assert repr(Endpoint("fd00::1", 80)) == "<Endpoint [fd00::1]:80 active in_flight=0>"


# update: following DNS


def test_new_addresses_join_active_in_dns_order() -> None:
    eps = make_set(B, A)
    assert [ep.address for ep in eps.endpoints] == [B, A]
    assert all(ep.state == ACTIVE for ep in eps.endpoints)
    assert len(eps) == 2
    assert eps.draining == []


def test_an_address_that_stays_keeps_its_endpoint() -> None:
    eps = make_set(A, B)
    a = by_address(eps)[A]
    eps.acquire(a)
    eps.update([B, A, C])
    assert [ep.address for ep in eps.endpoints] == [B, A, C]
    assert by_address(eps)[A] is a
    assert a.in_flight == 1


def test_a_leaving_idle_endpoint_is_dropped_at_once() -> None:
    eps = make_set(A, B)
    eps.update([A])
    assert [ep.address for ep in eps.endpoints] == [A]
    assert eps.draining == []


def test_a_leaving_busy_endpoint_drains_until_its_last_release() -> None:
    eps = make_set(A, B)
    b = by_address(eps)[B]
    eps.acquire(b)
    eps.acquire(b)

    eps.update([A])
    assert eps.draining == [b]
    assert b.state == DRAINING
    assert [ep.address for ep in eps.endpoints] == [A]
    assert all(eps.pick() is not b for _ in range(20))

    eps.release(b)
    assert eps.draining == [b]
    eps.release(b)
    assert eps.draining == []
    assert list(eps.all()) == eps.endpoints


def test_a_draining_endpoint_that_comes_back_is_active_again() -> None:
    eps = make_set(A, B)
    b = by_address(eps)[B]
    eps.acquire(b)
    eps.update([A])
    eps.update([A, B])
    assert eps.draining == []
    assert eps.endpoints[1] is b
    assert b.state == ACTIVE
    assert b.in_flight == 1
    eps.release(b)
    assert eps.endpoints[1] is b  # active, so not reaped


def test_only_the_returning_endpoint_leaves_draining() -> None:
    eps = make_set(A, B, C)
    b, c = by_address(eps)[B], by_address(eps)[C]
    eps.acquire(b)
    eps.acquire(c)
    eps.update([A])
    assert eps.draining == [b, c]
    eps.update([A, C])
    assert eps.draining == [b]
    assert c.state == ACTIVE


def test_an_ejected_endpoint_that_leaves_drains(clock: Clock) -> None:
    eps = make_set(A, B)
    b = by_address(eps)[B]
    eps.acquire(b)
    eps.failed(b)
    eps.update([A])
    assert b.state == DRAINING
    assert repr(eps) == "<EndpointSet app1 active=1 ejected=0 draining=1 balance=p2c>"


def test_an_empty_answer_drains_everything() -> None:
    eps = make_set(A, B)
    a = by_address(eps)[A]
    eps.acquire(a)
    eps.update([])
    assert eps.endpoints == []
    assert eps.draining == [a]
    assert eps.pick() is None


def test_leaving_closes_the_idle_connections_at_once() -> None:
    stats = RouteStats("app1")
    eps = EndpointSet("app1", "p2c", stats)
    eps.update([A, B])
    a, b = by_address(eps)[A], by_address(eps)[B]
    a_idle = with_idle_pool(a, stats, 2)
    b_idle = with_idle_pool(b, stats, 3)
    eps.acquire(b)
    assert stats.pool_idle == 5

    eps.update([A])
    # b is still draining, but no new request will use its idle connections.
    assert eps.draining == [b]
    assert all(conn.closed for conn in b_idle)
    assert not any(conn.closed for conn in a_idle)
    assert stats.pool_idle == 2

    # A connection b's last request returns while it drains is closed when b is reaped.
    assert b.pool is not None
    late = Conn(0.0)
    adopt(b.pool, late)
    b.pool.put(late, 1.0, reusable=True)
    assert stats.pool_idle == 3
    eps.release(b)
    assert late.closed
    assert stats.pool_idle == 2
    assert eps.draining == []


def test_an_idle_endpoint_leaving_closes_its_pool() -> None:
    stats = RouteStats("app1")
    eps = EndpointSet("app1", "p2c", stats)
    eps.update([A, B])
    conns = with_idle_pool(by_address(eps)[B], stats, 2)
    eps.update([A])
    assert all(conn.closed for conn in conns)
    assert stats.pool_idle == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from([A, B, C, D]), unique=True),
            st.lists(st.sampled_from([A, B, C, D])),
            st.lists(st.sampled_from([A, B, C, D])),
        ),
        max_size=8,
    )
)
def test_any_sequence_of_answers_keeps_the_books_straight(
    steps: list[tuple[list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]]],
) -> None:
    eps = EndpointSet("app1", "p2c", RouteStats("app1"))
    busy: Counter[int] = Counter()  # id(endpoint) -> requests we hold on it
    held: dict[int, Endpoint] = {}
    for answer, to_acquire, to_release in steps:
        eps.update(answer)
        assert [ep.address for ep in eps.endpoints] == answer
        assert all(ep.state in (ACTIVE, EJECTED) for ep in eps.endpoints)
        assert all(ep.state == DRAINING and ep.in_flight > 0 for ep in eps.draining)
        # Nothing that still has work in flight is forgotten.
        tracked = {id(ep) for ep in eps.all()}
        assert {i for i, n in busy.items() if n} <= tracked
        assert len(tracked) == len(eps.endpoints) + len(eps.draining)

        current = by_address(eps)
        for address in to_acquire:
            if address in answer:
                ep = current[address]
                eps.acquire(ep)
                busy[id(ep)] += 1
                held[id(ep)] = ep
        for address in to_release:
            found = current.get(address)
            if found is not None and busy[id(found)]:
                eps.release(found)
                busy[id(found)] -= 1
        for i, n in busy.items():
            assert held[i].in_flight == n
        assert all(ep.in_flight > 0 for ep in eps.draining)


# pick: p2c


def test_p2c_of_two_always_picks_the_less_loaded() -> None:
    eps = make_set(A, B)
    a, b = by_address(eps)[A], by_address(eps)[B]
    a.in_flight = 3
    b.in_flight = 1
    assert all(eps.pick() is b for _ in range(100))
    b.in_flight = 5
    assert all(eps.pick() is a for _ in range(100))


def test_p2c_with_equal_load_spreads_over_all() -> None:
    counts = picks(make_set(A, B, C, D), 4000)
    assert set(counts) == {A, B, C, D}
    assert all(800 < n < 1200 for n in counts.values()), counts


def test_p2c_the_least_loaded_wins_most_and_the_most_loaded_never() -> None:
    eps = make_set(A, B, C)
    for address, load in ((A, 0), (B, 4), (C, 9)):
        by_address(eps)[address].in_flight = load
    counts = picks(eps, 3000)
    # A wins whenever it is one of the two drawn: two pairs in three.
    assert 1800 < counts[A] < 2200, counts
    assert 800 < counts[B] < 1200, counts
    assert counts[C] == 0


def test_p2c_with_an_exclude_list_still_prefers_the_less_loaded() -> None:
    eps = make_set(A, B, C)
    a, b, c = (by_address(eps)[x] for x in (A, B, C))
    b.in_flight = 1
    c.in_flight = 2
    for _ in range(50):
        assert eps.pick(exclude=[a]) is b


# pick: round_robin


def test_round_robin_cycles_evenly() -> None:
    eps = make_set(A, B, C, balance="round_robin")
    order = [eps.pick() for _ in range(9)]
    for start in range(0, 9, 3):
        assert set(order[start : start + 3]) == set(eps.endpoints)
    assert order[:3] == order[3:6] == order[6:9]


def test_round_robin_ignores_load() -> None:
    eps = make_set(A, B, balance="round_robin")
    by_address(eps)[A].in_flight = 100
    assert picks(eps, 10) == {A: 5, B: 5}


def test_round_robin_with_an_exclude_list() -> None:
    eps = make_set(A, B, C, balance="round_robin")
    b = by_address(eps)[B]
    counts: Counter[tuple[str, int]] = Counter()
    for _ in range(10):
        ep = eps.pick(exclude=[b])
        assert ep is not None
        counts[ep.address] += 1
    assert counts == {A: 5, C: 5}


def test_round_robin_retries_shift_no_turns() -> None:
    # C fails every request, which is retried elsewhere: first attempts still go round
    # evenly (before, the rotation indexed a list one shorter on every retry and locked
    # onto C, which took 29 first attempts in 30), and the retries spread over A and B.
    eps = make_set(A, B, C, balance="round_robin")
    c = by_address(eps)[C]
    first: Counter[tuple[str, int]] = Counter()
    served: Counter[tuple[str, int]] = Counter()
    for _ in range(30):
        ep = eps.pick()
        assert ep is not None
        first[ep.address] += 1
        if ep is c:
            ep = eps.pick(exclude=[c])
            assert ep is not None
        served[ep.address] += 1
    assert first == {A: 10, B: 10, C: 10}
    assert served == {A: 15, B: 15}


def test_round_robin_passes_over_an_ejected_endpoint_in_turn() -> None:
    eps = make_set(A, B, C, balance="round_robin")
    b = by_address(eps)[B]
    b.state = EJECTED
    b.ejected_until = math.inf
    assert picks(eps, 10) == {A: 5, C: 5}
    b.state = ACTIVE
    assert picks(eps, 9) == {A: 3, B: 3, C: 3}


def test_round_robin_when_every_endpoint_is_ejected_tries_them_all() -> None:
    eps = make_set(A, B, balance="round_robin")
    for ep in eps.endpoints:
        ep.state = EJECTED
        ep.ejected_until = math.inf
    assert picks(eps, 4) == {A: 2, B: 2}
    a = by_address(eps)[A]
    assert all(eps.pick(exclude=[a]) is by_address(eps)[B] for _ in range(3))


# pick: exclusions, one endpoint, none


@pytest.mark.parametrize("balance", ["p2c", "round_robin"])
def test_exclude_is_never_picked(balance: str) -> None:
    eps = make_set(A, B, C, D, balance=balance)
    a, c = by_address(eps)[A], by_address(eps)[C]
    chosen = {eps.pick(exclude=[a, c]) for _ in range(100)}
    assert chosen == {by_address(eps)[B], by_address(eps)[D]}


@pytest.mark.parametrize("balance", ["p2c", "round_robin"])
def test_everything_excluded_is_none(balance: str) -> None:
    eps = make_set(A, B, balance=balance)
    assert eps.pick(exclude=eps.endpoints) is None


@pytest.mark.parametrize("balance", ["p2c", "round_robin"])
def test_a_single_endpoint(balance: str) -> None:
    eps = make_set(A, balance=balance)
    (a,) = eps.endpoints
    a.in_flight = 50
    assert all(eps.pick() is a for _ in range(10))
    assert eps.pick(exclude=[a]) is None


@pytest.mark.parametrize("balance", ["p2c", "round_robin"])
def test_nothing_to_pick_is_none(balance: str) -> None:
    eps = EndpointSet("app1", balance, RouteStats("app1"))
    assert eps.pick() is None
    assert eps.pick(exclude=[Endpoint(*A)]) is None


# Outlier ejection


def test_failed_ejects_with_doubling_times_up_to_the_cap(clock: Clock) -> None:
    eps = make_set(A, B)
    a = by_address(eps)[A]
    times = []
    for _ in range(8):
        eps.failed(a)
        assert a.state == EJECTED
        times.append(a.ejected_until - clock.now)
        come_back(eps, clock, a)
    assert times == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert a.ejections == 8
    assert eps.stats.ejections == 8


def test_a_failure_while_ejected_neither_extends_nor_counts(clock: Clock) -> None:
    eps = make_set(A, B)
    a = by_address(eps)[A]
    eps.failed(a)
    until = a.ejected_until
    clock.advance(0.5)
    eps.failed(a)  # tried in panic mode, say: it is out already
    assert (a.ejected_until, a.ejections, eps.stats.ejections) == (until, 1, 1)


def test_revive_ends_ejections_that_ran_out_without_a_pick(clock: Clock) -> None:
    # /routes showed "ejected" for minutes on a route with no traffic: the ejection's end
    # was noticed only at the next pick. The route's ticker calls revive.
    eps = make_set(A, B, C)
    a = by_address(eps)[A]
    eps.failed(a)
    clock.advance(0.5)
    eps.revive()
    assert a.state == EJECTED
    clock.advance(0.5)
    eps.revive()
    assert a.state == ACTIVE
    assert a.ejections == 1  # (forgiven only by a good answer: the next one lasts 2 s)


def test_an_ejected_endpoint_is_skipped_until_its_time_is_up(clock: Clock) -> None:
    eps = make_set(A, B, C)
    a = by_address(eps)[A]
    eps.failed(a)
    assert all(eps.pick() is not a for _ in range(100))
    clock.advance(0.999)
    assert all(eps.pick() is not a for _ in range(100))
    clock.advance(0.001)
    assert a in {eps.pick() for _ in range(100)}
    assert a.state == ACTIVE
    assert a.ejections == 1  # still on probation: the next ejection lasts longer


def test_a_second_ejection_lasts_twice_as_long(clock: Clock) -> None:
    eps = make_set(A, B, balance="round_robin")
    a = by_address(eps)[A]
    eps.failed(a)
    clock.advance(1.0)
    assert a in {eps.pick(), eps.pick()}
    eps.failed(a)
    clock.advance(1.5)
    assert all(eps.pick() is not a for _ in range(10))
    clock.advance(0.5)
    assert a in {eps.pick(), eps.pick()}


def test_succeeded_restores_at_once(clock: Clock) -> None:
    eps = make_set(A, B)
    a = by_address(eps)[A]
    eps.failed(a)
    come_back(eps, clock, a)
    eps.failed(a)
    assert a.ejected_until - clock.now == 2.0
    # A good answer while ejected (in panic mode, say): back at once, all forgiven.
    eps.succeeded(a)
    assert a.state == ACTIVE
    assert (a.consecutive, a.ejections) == (0, 0)
    assert a in {eps.pick() for _ in range(100)}
    eps.failed(a)
    assert a.ejected_until - clock.now == 1.0  # the doubling starts over


def test_succeeded_forgives_the_bad_answers_in_a_row(clock: Clock) -> None:
    eps = make_set(A, B)
    a = by_address(eps)[A]
    for _ in range(4):
        eps.went_wrong(a, "reset")
    eps.succeeded(a)
    assert a.consecutive == 0
    for _ in range(4):
        eps.went_wrong(a, "reset")
    assert a.state == ACTIVE  # 4 + 4, never 5 in a row


def test_succeeded_after_a_return_restarts_the_doubling(clock: Clock) -> None:
    eps = make_set(A, B)
    a = by_address(eps)[A]
    for _ in range(3):
        eps.failed(a)
        come_back(eps, clock, a)
    eps.succeeded(a)
    assert a.ejections == 0
    eps.failed(a)
    assert a.ejected_until - clock.now == 1.0


def test_succeeded_without_failures_changes_nothing() -> None:
    eps = make_set(A)
    (a,) = eps.endpoints
    eps.succeeded(a)
    assert (a.state, a.consecutive, a.ejections, a.ejected_until) == (ACTIVE, 0, 0, 0.0)


def test_a_draining_endpoint_that_fails_stays_draining(clock: Clock) -> None:
    eps = make_set(A, B)
    b = by_address(eps)[B]
    eps.acquire(b)
    eps.update([A])
    eps.failed(b)
    assert b.state == DRAINING
    assert eps.stats.ejections == 0
    eps.succeeded(b)
    assert b.state == DRAINING


def test_ejections_count_each_time_an_endpoint_is_taken_out(clock: Clock) -> None:
    eps = make_set(A, B, C, D)  # two of four may be out
    a, b = by_address(eps)[A], by_address(eps)[B]
    eps.failed(a)
    assert eps.stats.ejections == 1
    eps.failed(a)  # already out: it stays out longer, but it is not a new ejection
    assert eps.stats.ejections == 1
    eps.failed(b)
    assert eps.stats.ejections == 2
    clock.advance(10.0)
    eps.pick(exclude=[b])  # a's time is up and it is tried again
    assert a.state == ACTIVE
    eps.failed(a)
    assert eps.stats.ejections == 3


def test_a_long_run_of_failures_stays_at_the_cap(clock: Clock) -> None:
    eps = make_set(A, B)
    a = by_address(eps)[A]
    # One pod down for hours: ejected, back, failing again, 1,100 times (2 ** 1099
    # seconds would not even be a float).
    for _ in range(1100):
        eps.failed(a)
        come_back(eps, clock, a)
    eps.failed(a)
    assert a.ejected_until - clock.now == 30.0
    assert a.ejections == EJECT_DOUBLINGS


# Panic mode


@pytest.mark.parametrize("balance", ["p2c", "round_robin"])
def test_when_every_endpoint_is_ejected_one_is_still_picked(clock: Clock, balance: str) -> None:
    eps = make_set(A, B, C, balance=balance, outlier=ALL_MAY_GO)
    for ep in eps.endpoints:
        eps.failed(ep)
    chosen = {eps.pick() for _ in range(100)}
    assert chosen == set(eps.endpoints)
    assert all(ep.state == EJECTED for ep in eps.endpoints)  # picked, but still ejected


def test_panic_mode_with_a_single_ejected_endpoint(clock: Clock) -> None:
    eps = make_set(A, outlier=ALL_MAY_GO)
    (a,) = eps.endpoints
    eps.failed(a)
    assert a.state == EJECTED
    assert eps.pick() is a
    assert eps.pick(exclude=[a]) is None


def test_panic_mode_respects_the_exclude_list(clock: Clock) -> None:
    eps = make_set(A, B, outlier=ALL_MAY_GO)
    a, b = eps.endpoints
    eps.failed(a)
    eps.failed(b)
    assert (a.state, b.state) == (EJECTED, EJECTED)
    assert all(eps.pick(exclude=[a]) is b for _ in range(20))


def test_not_panic_while_one_is_usable(clock: Clock) -> None:
    eps = make_set(A, B, C, outlier=ALL_MAY_GO)
    a, b, c = eps.endpoints
    eps.failed(a)
    eps.failed(b)
    assert all(eps.pick() is c for _ in range(50))


# repr and to_dict


def test_repr(clock: Clock) -> None:
    eps = make_set(A, B, C)
    assert repr(eps) == "<EndpointSet app1 active=3 ejected=0 draining=0 balance=p2c>"
    eps.failed(eps.endpoints[2])
    assert repr(eps) == "<EndpointSet app1 active=2 ejected=1 draining=0 balance=p2c>"
    eps.acquire(eps.endpoints[0])
    eps.update([B, C, D])
    assert repr(eps) == "<EndpointSet app1 active=2 ejected=1 draining=1 balance=p2c>"
    rr = EndpointSet("app2", "round_robin", RouteStats("app2"))
    assert repr(rr) == "<EndpointSet app2 active=0 ejected=0 draining=0 balance=round_robin>"


def test_to_dict_of_every_endpoint(clock: Clock) -> None:
    eps = make_set(A, B, C)
    a, b, _ = eps.endpoints
    eps.acquire(a)
    eps.acquire(a)
    eps.failed(b)
    eps.update([B, C])
    assert [ep.to_dict() for ep in eps.all()] == [
        {"address": "10.0.0.2", "port": 80, "state": "ejected", "in_flight": 0},
        {"address": "10.0.0.3", "port": 80, "state": "active", "in_flight": 0},
        {"address": "10.0.0.1", "port": 80, "state": "draining", "in_flight": 2},
    ]


# Outlier ejection: bad answers in a row


def test_consecutive_5xx_answers_eject(clock: Clock) -> None:
    eps = make_set(A, B)
    a = by_address(eps)[A]
    for n in range(1, 5):
        eps.answered_by(a, 503, 0.01)
        assert (a.state, a.consecutive) == (ACTIVE, n)
    eps.answered_by(a, 500, 0.01)
    assert a.state == EJECTED
    assert a.consecutive == 0  # the count starts over once it is out
    assert a.ejected_until - clock.now == 1.0
    assert eps.stats.ejections == 1


def test_resets_and_timeouts_count_with_5xx_in_one_run(clock: Clock) -> None:
    eps = make_set(A, B, outlier=OutlierConfig(consecutive_failures=3))
    a = by_address(eps)[A]
    eps.went_wrong(a, "reset")
    eps.answered_by(a, 502, 0.01)
    assert a.state == ACTIVE
    eps.went_wrong(a, "timeout")
    assert a.state == EJECTED


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_answered_by_a_5xx_counts_against_the_endpoint(status: int) -> None:
    eps = make_set(A, B)
    a = by_address(eps)[A]
    eps.answered_by(a, status, 0.01)
    assert a.consecutive == 1


@pytest.mark.parametrize("status", [100, 200, 204, 301, 400, 404, 429, 499])
def test_answered_by_a_good_answer_breaks_the_run(clock: Clock, status: int) -> None:
    # A 4xx is the client's problem, not the endpoint's: it is a good answer here.
    eps = make_set(A, B)
    a = by_address(eps)[A]
    for _ in range(4):
        eps.answered_by(a, 500, 0.01)
    eps.answered_by(a, status, 0.01)
    assert a.consecutive == 0
    for _ in range(4):
        eps.answered_by(a, 500, 0.01)
    assert a.state == ACTIVE
    assert eps.stats.ejections == 0


def test_a_good_answer_from_an_ejected_endpoint_brings_it_back(clock: Clock) -> None:
    eps = make_set(A, B)
    a = by_address(eps)[A]
    eps.failed(a)
    eps.answered_by(a, 200, 0.01)  # a request sent before the ejection, say
    assert (a.state, a.ejections) == (ACTIVE, 0)


def test_an_endpoint_ejected_by_5xx_returns_and_the_next_ejection_is_longer(
    clock: Clock,
) -> None:
    eps = make_set(A, B, C)
    a = by_address(eps)[A]
    for _ in range(5):
        eps.answered_by(a, 500, 0.01)
    assert a.ejected_until - clock.now == 1.0
    clock.advance(0.5)
    assert all(eps.pick() is not a for _ in range(50))
    clock.advance(0.5)
    assert a in {eps.pick() for _ in range(100)}  # its time is up: another chance
    assert a.state == ACTIVE
    for _ in range(4):
        eps.answered_by(a, 500, 0.01)
    assert a.state == ACTIVE  # a fresh run of failures is needed
    eps.answered_by(a, 500, 0.01)
    assert a.ejected_until - clock.now == 2.0
    assert eps.stats.ejections == 2


def test_a_custom_outlier_config_doubles_from_base_to_max(clock: Clock) -> None:
    config = OutlierConfig(consecutive_failures=2, base_ejection=0.25, max_ejection=3.0)
    eps = make_set(A, B, outlier=config)
    a = by_address(eps)[A]
    times = []
    for _ in range(6):
        eps.went_wrong(a, "reset")
        assert a.state == ACTIVE
        eps.went_wrong(a, "reset")
        assert a.state == EJECTED
        times.append(a.ejected_until - clock.now)
        come_back(eps, clock, a)
    assert times == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]


# Outlier ejection: never more than max_ejected_percent


@pytest.mark.parametrize(
    ("n", "percent", "out"),
    [
        (1, 50, 0),  # a single endpoint (a ClusterIP) is never ejected
        (2, 50, 1),
        (3, 50, 1),
        (4, 50, 2),
        (5, 50, 2),
        (10, 50, 5),
        (4, 0, 0),
        (4, 25, 1),
        (4, 99, 3),
        (2, 99, 1),
        (4, 100, 4),
    ],
)
def test_never_more_than_max_ejected_percent_are_out(
    clock: Clock, n: int, percent: int, out: int
) -> None:
    addresses = [(f"10.0.1.{i}", 80) for i in range(1, n + 1)]
    eps = make_set(*addresses, outlier=OutlierConfig(max_ejected_percent=percent))
    for ep in eps.endpoints:
        eps.failed(ep)
        for _ in range(10):
            eps.went_wrong(ep, "reset")
    states = [ep.state for ep in eps.endpoints]
    assert states.count(EJECTED) == out
    assert eps.stats.ejections == out
    if percent < 100:
        assert ACTIVE in states  # at least one stays


def test_the_default_keeps_half_in(clock: Clock) -> None:
    eps = make_set(A, B, C, D)
    for ep in eps.endpoints:
        eps.failed(ep)
    assert [ep.state for ep in eps.endpoints] == [EJECTED, EJECTED, ACTIVE, ACTIVE]
    # The two kept in are picked, and nothing else.
    assert {ep.address for ep in (eps.pick() for _ in range(100)) if ep} == {C, D}


def test_one_held_in_by_the_cap_is_ejected_once_another_returns(clock: Clock) -> None:
    eps = make_set(A, B)
    a, b = eps.endpoints
    eps.failed(a)
    eps.failed(b)
    assert b.state == ACTIVE  # a is out: b stays in
    come_back(eps, clock, a)
    eps.failed(b)
    assert (a.state, b.state) == (ACTIVE, EJECTED)


def test_the_cap_follows_the_endpoint_count(clock: Clock) -> None:
    eps = make_set(A)
    (a,) = eps.endpoints
    eps.failed(a)
    assert a.state == ACTIVE
    eps.update([A, B])  # a second endpoint: now one of the two may go
    eps.failed(a)
    assert a.state == EJECTED


# balance: ewma (peak-EWMA latency x load)


def test_ewma_a_slow_endpoint_loses_most_comparisons(clock: Clock) -> None:
    eps = make_set(A, B, C, D, balance="ewma")
    slow = by_address(eps)[A]
    for ep in eps.endpoints:
        eps.answered_by(ep, 200, 0.5 if ep is slow else 0.01)
    counts = picks(eps, 3000)
    assert counts[A] == 0, counts  # drawn half the time, it loses every comparison
    assert all(600 < counts[x] < 1400 for x in (B, C, D)), counts


def test_ewma_weighs_latency_by_load(clock: Clock) -> None:
    eps = make_set(A, B, balance="ewma")
    a, b = eps.endpoints
    eps.answered_by(a, 200, 0.1)
    eps.answered_by(b, 200, 0.01)
    assert all(eps.pick() is b for _ in range(50))
    b.in_flight = 20  # 0.01 x 21 > 0.1 x 1: the fast one is now the busier
    assert all(eps.pick() is a for _ in range(50))


def test_p2c_ignores_latency(clock: Clock) -> None:
    eps = make_set(A, B)
    a, b = eps.endpoints
    eps.answered_by(a, 200, 2.0)
    eps.answered_by(b, 200, 0.001)
    assert a.rtt == b.rtt  # not even measured
    assert set(picks(eps, 200)) == {A, B}


def test_ewma_a_peak_is_believed_at_once_and_decays_slowly(clock: Clock) -> None:
    eps = make_set(A, B, balance="ewma")
    a = by_address(eps)[A]
    eps.answered_by(a, 200, 0.02)
    assert a.rtt == pytest.approx(0.02)
    eps.answered_by(a, 200, 0.8)  # slower: at once
    assert a.rtt == pytest.approx(0.8)
    eps.answered_by(a, 200, 0.01)  # faster, at the same instant: nothing decayed yet
    assert a.rtt == pytest.approx(0.8)
    clock.advance(EWMA_DECAY)
    eps.answered_by(a, 200, 0.01)  # one decay time later: e ** -1 of the peak is left
    assert a.rtt == pytest.approx(0.8 * 0.36788 + 0.01 * 0.63212, rel=1e-3)
    previous = a.rtt
    for _ in range(10):
        clock.advance(EWMA_DECAY)
        eps.answered_by(a, 200, 0.01)
        assert a.rtt < previous
        previous = a.rtt
    assert a.rtt == pytest.approx(0.01, rel=0.01)


def test_ewma_an_endpoint_slow_once_is_tried_again_as_its_peak_decays(clock: Clock) -> None:
    eps = make_set(A, B, balance="ewma")
    a, b = eps.endpoints
    eps.answered_by(a, 200, 1.0)  # one stall: a 1 s peak, and nothing sent to it since
    b.in_flight = 3
    # Nothing is learnt of a while it gets nothing, and its estimate decays as picks look
    # at it, until b's load outweighs it: 1 s x e ** (-t / 10 s) < 10 ms x 4 at t = 32.2 s.
    waited = 0
    while waited < 40:
        eps.answered_by(b, 200, 0.01)
        if eps.pick() is a:
            break
        clock.advance(1.0)
        waited += 1
    assert waited == 33
    assert a.rtt == pytest.approx(math.exp(-3.3), rel=1e-6)
    clock.advance(EWMA_DECAY)
    eps.answered_by(a, 200, 0.01)  # fast again: that decays in
    assert a.rtt == pytest.approx(math.exp(-3.3) * math.exp(-1) + 0.01 * (1 - math.exp(-1)))


def test_ewma_compares_nearly_equal_latencies_by_load_alone(clock: Clock) -> None:
    # Each estimate is its endpoint's recent peak: 9.0 and 8.0 ms are noise, and the
    # lower one must not win every tie in load (it would take a third more than its share).
    eps = make_set(A, B, C, balance="ewma")
    for ep, rtt in zip(eps.endpoints, (0.009, 0.008, 0.0085), strict=True):
        eps.answered_by(ep, 200, rtt)
    counts = picks(eps, 3000)
    assert all(900 < counts[x] < 1100 for x in (A, B, C)), counts
    # Further apart (10 ms against 5), latency times load decides again.
    eps = make_set(A, B, balance="ewma")
    a, b = eps.endpoints
    eps.answered_by(a, 200, 0.010)
    eps.answered_by(b, 200, 0.005)
    a.in_flight = b.in_flight = 1
    assert eps._better(a, b) is b
    assert eps._better(b, a) is b


def test_ewma_a_5xx_counts_its_latency_too(clock: Clock) -> None:
    eps = make_set(A, B, balance="ewma")
    a = by_address(eps)[A]
    eps.answered_by(a, 503, 1.5)
    assert a.rtt == pytest.approx(1.5)
    assert a.consecutive == 1


# Slow start


def share(counts: Counter[tuple[str, int]], of: tuple[str, int], to: tuple[str, int]) -> float:
    return counts[of] / counts[to]


def test_endpoint_weight_ramps_from_the_floor() -> None:
    ep = Endpoint(*A)
    ep.warming = True
    assert ep.weight(100.0, 10.0) == SLOW_START_FLOOR  # no good answer yet
    ep.warm_from = 100.0
    assert ep.weight(100.0, 10.0) == SLOW_START_FLOOR
    assert ep.weight(100.1, 10.0) == SLOW_START_FLOOR  # 0.01 is below the floor
    assert ep.weight(102.5, 10.0) == pytest.approx(0.25)
    assert ep.weight(107.5, 10.0) == pytest.approx(0.75)
    assert ep.warming
    assert ep.weight(110.0, 10.0) == 1.0
    assert not ep.warming  # the window is over


def test_endpoints_present_before_the_first_answer_are_not_slow_started(clock: Clock) -> None:
    eps = make_set(A, B, slow_start=10.0)
    eps.update([A, B, C])  # still no answer: the route is starting, not scaling up
    assert not any(ep.warming for ep in eps.endpoints)
    assert eps.warming == 0
    counts = picks(eps, 3000)
    assert all(800 < counts[x] < 1200 for x in (A, B, C)), counts


def test_without_slow_start_a_joiner_gets_a_full_share_at_once(clock: Clock) -> None:
    eps = make_set(A, B)
    eps.succeeded(eps.endpoints[0])
    eps.update([A, B, C])
    assert not by_address(eps)[C].warming
    counts = picks(eps, 3000)
    assert all(800 < counts[x] < 1200 for x in (A, B, C)), counts


def test_a_joiner_ramps_up_from_its_first_good_answer(clock: Clock) -> None:
    eps = make_set(A, B, slow_start=10.0)
    eps.answered_by(eps.endpoints[0], 200, 0.01)
    assert eps.answered
    eps.update([A, B, C])
    c = by_address(eps)[C]
    assert c.warming
    assert eps.warming == 1

    # Before its first good answer: about SLOW_START_FLOOR of a full share, however long.
    clock.advance(60.0)
    floor = SLOW_START_FLOOR
    assert floor * 0.6 < share(picks(eps, 20000), C, A) < floor * 1.6

    eps.answered_by(c, 200, 0.01)
    assert c.warm_from == clock.now
    assert floor * 0.6 < share(picks(eps, 20000), C, A) < floor * 1.6  # the ramp starts there
    ramp = []
    for _ in range(3):
        clock.advance(2.5)
        ramp.append(share(picks(eps, 20000), C, A))
    for got, want in zip(ramp, (0.25, 0.5, 0.75), strict=True):
        assert want - 0.07 < got < want + 0.07, ramp

    clock.advance(2.5)  # the window is over: a full share, and the quick path again
    counts = picks(eps, 3000)
    assert not c.warming
    assert eps.warming == 0
    assert all(800 < counts[x] < 1200 for x in (A, B, C)), counts


def test_a_5xx_is_not_a_first_good_answer(clock: Clock) -> None:
    eps = make_set(A, slow_start=10.0)
    eps.succeeded(eps.endpoints[0])
    eps.update([A, B])
    b = by_address(eps)[B]
    eps.answered_by(b, 500, 0.01)
    assert b.warm_from == 0.0
    eps.answered_by(b, 404, 0.01)
    assert b.warm_from == clock.now


def test_a_slow_starting_endpoint_excluded_is_never_picked(clock: Clock) -> None:
    eps = make_set(A, B, slow_start=10.0)
    eps.succeeded(eps.endpoints[0])
    eps.update([A, B, C])
    a, c = by_address(eps)[A], by_address(eps)[C]
    assert all(eps.pick(exclude=[a, c]) is by_address(eps)[B] for _ in range(50))


# A property of the ejection cap


ADVANCES = (0.1, 0.5, 1.0, 3.0, 40.0, 0.0)
EVENTS = ("failed", "went_wrong", "succeeded", "answer", "advance", "pick")


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 6),
    percent=st.sampled_from([0, 10, 25, 33, 50, 67, 90, 99, 100]),
    consecutive=st.integers(1, 3),
    steps=st.lists(
        st.tuples(st.sampled_from(EVENTS), st.integers(0, 5), st.sampled_from([200, 404, 503])),
        max_size=60,
    ),
)
def test_no_sequence_of_events_ejects_more_than_max_ejected_percent(
    n: int, percent: int, consecutive: int, steps: list[tuple[str, int, int]]
) -> None:
    clock = Clock()
    config = OutlierConfig(consecutive_failures=consecutive, max_ejected_percent=percent)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(endpoints, "monotonic", clock.monotonic)
        eps = make_set(*[(f"10.0.2.{i}", 80) for i in range(n)], outlier=config)
        cap = n * percent // 100
        for kind, index, status in steps:
            ep = eps.endpoints[index % n]
            if kind == "failed":
                eps.failed(ep)
            elif kind == "went_wrong":
                eps.went_wrong(ep, "reset")
            elif kind == "succeeded":
                eps.succeeded(ep)
            elif kind == "answer":
                eps.answered_by(ep, status, 0.01)
            elif kind == "advance":
                clock.advance(ADVANCES[index])
            else:
                assert eps.pick() is not None  # never nothing while there are endpoints
            states = [ep.state for ep in eps.endpoints]
            assert states.count(EJECTED) <= cap
            assert set(states) <= {ACTIVE, EJECTED}
            assert all(ep.ejections <= EJECT_DOUBLINGS for ep in eps.endpoints)
