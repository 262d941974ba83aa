"""EndpointSet: following DNS, draining, balancing, outlier ejection and panic mode."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import endpoints
from proxy.config import PoolConfig
from proxy.endpoints import ACTIVE, DRAINING, EJECTED, Endpoint, EndpointSet
from proxy.metrics import RouteStats
from proxy.pool import Pool

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


class Conn:
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


def make_set(*addresses: tuple[str, int], balance: str = "p2c") -> EndpointSet:
    eps = EndpointSet("app1", balance, RouteStats("app1"))
    eps.update(addresses)
    return eps


def by_address(eps: EndpointSet) -> dict[tuple[str, int], Endpoint]:
    return {ep.address: ep for ep in eps.all()}


def adopt(pool: Pool[Conn], conn: Conn) -> None:
    """A new connection handed out: the one place this file tells a pool so."""
    pool.adopt(conn)


def with_idle_pool(ep: Endpoint, stats: RouteStats, idle: int) -> list[Conn]:
    pool: Pool[Conn] = Pool("app1", ep.address, PoolConfig(), stats)
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
        times.append(a.ejected_until - clock.now)
    assert times == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert a.state == EJECTED
    assert a.failures == 8


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
    assert a.failures == 1  # still on probation: the next failure ejects it for longer


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
    eps.failed(a)
    eps.succeeded(a)
    assert a.state == ACTIVE
    assert a.failures == 0
    assert a.ejected_until == 0.0
    assert a in {eps.pick() for _ in range(100)}
    eps.failed(a)
    assert a.ejected_until - clock.now == 1.0  # the doubling starts over


def test_succeeded_without_failures_changes_nothing() -> None:
    eps = make_set(A)
    (a,) = eps.endpoints
    eps.succeeded(a)
    assert (a.state, a.failures, a.ejected_until) == (ACTIVE, 0, 0.0)


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
    eps = make_set(A, B)
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
    eps = make_set(A)
    (a,) = eps.endpoints
    for _ in range(1100):  # one pod down for minutes, every request trying it in panic mode
        eps.failed(a)
    assert a.ejected_until - clock.now == 30.0


# Panic mode


@pytest.mark.parametrize("balance", ["p2c", "round_robin"])
def test_when_every_endpoint_is_ejected_one_is_still_picked(clock: Clock, balance: str) -> None:
    eps = make_set(A, B, C, balance=balance)
    for ep in eps.endpoints:
        eps.failed(ep)
    chosen = {eps.pick() for _ in range(100)}
    assert chosen == set(eps.endpoints)
    assert all(ep.state == EJECTED for ep in eps.endpoints)  # picked, but still ejected


def test_panic_mode_with_a_single_ejected_endpoint(clock: Clock) -> None:
    eps = make_set(A)
    (a,) = eps.endpoints
    eps.failed(a)
    assert eps.pick() is a
    assert eps.pick(exclude=[a]) is None


def test_panic_mode_respects_the_exclude_list(clock: Clock) -> None:
    eps = make_set(A, B)
    a, b = eps.endpoints
    eps.failed(a)
    eps.failed(b)
    assert all(eps.pick(exclude=[a]) is b for _ in range(20))


def test_not_panic_while_one_is_usable(clock: Clock) -> None:
    eps = make_set(A, B, C)
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
