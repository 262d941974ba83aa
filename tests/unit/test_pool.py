"""Pool: which idle connection is handed out, which are kept or closed, and the gauge."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from proxy.config import PoolConfig
from proxy.metrics import RouteStats
from proxy.pool import Pool, Pooled

ADDRESS = ("127.0.0.2", 80)


class Conn(Pooled):
    """The little a pool reads of an upstream connection."""

    def __init__(self, created: float) -> None:
        self.created = created
        self.idle_since = created
        self.closed = False
        self.close_calls = 0

    def close(self) -> None:
        self.closed = True
        self.close_calls += 1

    def __repr__(self) -> str:
        return f"<Conn created={self.created} idle_since={self.idle_since} closed={self.closed}>"


def make_pool(max_idle: int = 64, idle_timeout: float = 60.0, max_lifetime: float = 300.0) -> Pool:
    config = PoolConfig(max_idle=max_idle, idle_timeout=idle_timeout, max_lifetime=max_lifetime)
    return Pool("app1", ADDRESS, config, RouteStats("app1"))


def connect(pool: Pool, now: float) -> Conn:
    """A new connection made and handed out (the one place that tells the pool so)."""
    conn = Conn(now)
    pool.adopt(conn)
    return conn


def idle_conns(pool: Pool, now: float, count: int) -> list[Conn]:
    """count connections made at `now` and returned idle at once, oldest first."""
    conns = [connect(pool, now) for _ in range(count)]
    for conn in conns:
        pool.put(conn, now, reusable=True)
    return conns


def assert_gauge(pool: Pool) -> None:
    assert pool.stats.pool_idle == len(pool.idle)


# get


def test_get_from_an_empty_pool_is_none() -> None:
    pool = make_pool()
    assert pool.get(0.0) is None
    assert pool.active == 0
    assert_gauge(pool)


def test_get_returns_the_newest_idle_connection_first() -> None:
    pool = make_pool()
    a, b, c = idle_conns(pool, 0.0, 3)
    assert pool.get(1.0) is c
    assert pool.get(1.0) is b
    assert pool.get(1.0) is a
    assert pool.get(1.0) is None
    assert pool.active == 3
    assert not any(conn.closed for conn in (a, b, c))
    assert_gauge(pool)


def test_get_prefers_the_most_recently_returned() -> None:
    pool = make_pool()
    a = connect(pool, 0.0)
    b = connect(pool, 0.0)
    pool.put(b, 1.0, reusable=True)
    pool.put(a, 2.0, reusable=True)
    assert pool.get(3.0) is a


@pytest.mark.parametrize(
    ("stale", "why"),
    [
        ({"idle_since": 40.0}, "idle for exactly idle_timeout"),
        ({"idle_since": 10.0}, "idle past idle_timeout"),
        ({"created": -200.0}, "exactly max_lifetime old"),
        ({"created": -250.0}, "older than max_lifetime"),
        ({"closed": True}, "closed by the server"),
    ],
)
def test_get_closes_stale_connections_on_the_way(stale: dict[str, object], why: str) -> None:
    pool = make_pool(idle_timeout=60.0, max_lifetime=300.0)
    healthy, bad = idle_conns(pool, 90.0, 2)
    for field, value in stale.items():
        setattr(bad, field, value)
    bad.close_calls = 0

    assert pool.get(100.0) is healthy, why
    assert bad.close_calls == 1
    assert not healthy.closed
    assert pool.idle == []
    assert pool.active == 1
    assert_gauge(pool)


def test_get_closes_every_stale_connection_and_then_returns_none() -> None:
    pool = make_pool(idle_timeout=60.0)
    conns = idle_conns(pool, 0.0, 4)
    assert pool.get(60.0) is None
    assert all(conn.close_calls == 1 for conn in conns)
    assert pool.idle == []
    assert pool.active == 0
    assert_gauge(pool)


def test_get_just_before_the_limits_still_hands_out() -> None:
    pool = make_pool(idle_timeout=60.0, max_lifetime=300.0)
    (conn,) = idle_conns(pool, 0.0, 1)
    conn.created = -240.0
    assert pool.get(59.999) is conn
    assert not conn.closed


def test_get_leaves_older_idle_connections_alone() -> None:
    pool = make_pool(idle_timeout=60.0)
    old = connect(pool, 0.0)
    new = connect(pool, 0.0)
    pool.put(old, 0.0, reusable=True)
    pool.put(new, 50.0, reusable=True)
    # old is stale at 70, but the newest one is found first and old is not examined.
    assert pool.get(70.0) is new
    assert pool.idle == [old]
    assert not old.closed
    assert_gauge(pool)


# put


def test_put_keeps_a_reusable_connection_and_stamps_idle_since() -> None:
    pool = make_pool()
    conn = connect(pool, 0.0)
    assert pool.active == 1
    pool.put(conn, 7.5, reusable=True)
    assert pool.idle == [conn]
    assert conn.idle_since == 7.5
    assert not conn.closed
    assert pool.active == 0
    assert_gauge(pool)


def test_put_closes_a_connection_that_is_not_reusable() -> None:
    pool = make_pool()
    conn = connect(pool, 0.0)
    pool.put(conn, 1.0, reusable=False)
    assert conn.close_calls == 1
    assert pool.idle == []
    assert pool.active == 0
    assert_gauge(pool)


def test_put_closes_a_closed_connection_rather_than_keeping_it() -> None:
    pool = make_pool()
    conn = connect(pool, 0.0)
    conn.closed = True
    pool.put(conn, 1.0, reusable=True)
    assert pool.idle == []
    assert pool.active == 0
    assert_gauge(pool)


def test_put_closes_beyond_max_idle() -> None:
    pool = make_pool(max_idle=2)
    conns = [connect(pool, 0.0) for _ in range(3)]
    for conn in conns:
        pool.put(conn, 1.0, reusable=True)
    assert pool.idle == conns[:2]
    assert [conn.closed for conn in conns] == [False, False, True]
    assert pool.active == 0
    assert_gauge(pool)


def test_put_with_max_idle_zero_keeps_nothing() -> None:
    pool = make_pool(max_idle=0)
    conn = connect(pool, 0.0)
    pool.put(conn, 1.0, reusable=True)
    assert conn.closed
    assert pool.idle == []
    assert_gauge(pool)


@pytest.mark.parametrize(("now", "kept"), [(299.999, True), (300.0, False), (400.0, False)])
def test_put_closes_a_connection_at_the_end_of_its_lifetime(now: float, kept: bool) -> None:
    pool = make_pool(max_lifetime=300.0)
    conn = connect(pool, 0.0)
    pool.put(conn, now, reusable=True)
    assert (pool.idle == [conn]) is kept
    assert conn.closed is not kept
    assert_gauge(pool)


def test_put_after_get_round_trips() -> None:
    pool = make_pool()
    (conn,) = idle_conns(pool, 0.0, 1)
    assert pool.get(1.0) is conn
    assert pool.stats.pool_idle == 0
    pool.put(conn, 2.0, reusable=True)
    assert pool.idle == [conn]
    assert conn.idle_since == 2.0
    assert pool.active == 0
    assert_gauge(pool)


# discard


def test_discard_forgets_an_idle_connection_without_closing_it_again() -> None:
    pool = make_pool()
    a, b = idle_conns(pool, 0.0, 2)
    a.closed = True  # the server closed it
    pool.discard(a)
    assert pool.idle == [b]
    assert a.close_calls == 0
    assert_gauge(pool)


def test_discard_of_a_connection_not_idle_changes_nothing() -> None:
    pool = make_pool()
    (idle,) = idle_conns(pool, 0.0, 1)
    busy = connect(pool, 0.0)
    pool.discard(busy)
    pool.discard(Conn(0.0))
    assert pool.idle == [idle]
    assert pool.active == 1
    assert_gauge(pool)


def test_discard_twice_counts_once() -> None:
    pool = make_pool()
    a, _ = idle_conns(pool, 0.0, 2)
    pool.discard(a)
    pool.discard(a)
    assert pool.stats.pool_idle == 1
    assert_gauge(pool)


# sweep


def test_sweep_of_an_empty_pool_does_nothing() -> None:
    pool = make_pool()
    pool.sweep(1000.0)
    assert pool.idle == []
    assert_gauge(pool)


def test_sweep_closes_idle_too_long_too_old_and_closed_and_keeps_the_rest() -> None:
    pool = make_pool(idle_timeout=60.0, max_lifetime=300.0)
    keep1, idle_long, keep2, too_old, dead = idle_conns(pool, 0.0, 5)
    for conn in (keep1, keep2, dead):
        conn.idle_since = 50.0
    too_old.idle_since = 50.0
    too_old.created = -250.0
    dead.closed = True
    dead.close_calls = 0

    pool.sweep(60.0)

    assert pool.idle == [keep1, keep2]  # order kept: the newest still comes out first
    assert [c.close_calls for c in (keep1, idle_long, keep2, too_old, dead)] == [0, 1, 0, 1, 1]
    assert_gauge(pool)
    assert pool.get(61.0) is keep2


def test_sweep_with_nothing_stale_keeps_everything() -> None:
    pool = make_pool(idle_timeout=60.0)
    conns = idle_conns(pool, 0.0, 3)
    pool.sweep(59.0)
    assert pool.idle == conns
    assert not any(conn.closed for conn in conns)
    assert_gauge(pool)


def test_sweep_leaves_active_connections_alone() -> None:
    pool = make_pool(idle_timeout=60.0)
    busy = connect(pool, 0.0)
    idle_conns(pool, 0.0, 1)
    pool.sweep(1000.0)
    assert not busy.closed
    assert pool.active == 1
    assert pool.idle == []
    assert_gauge(pool)


# close_idle


def test_close_idle_closes_every_idle_connection_and_not_the_active_ones() -> None:
    pool = make_pool()
    idle = idle_conns(pool, 0.0, 3)
    busy = connect(pool, 0.0)
    pool.close_idle()
    assert all(conn.close_calls == 1 for conn in idle)
    assert not busy.closed
    assert pool.idle == []
    assert pool.active == 1
    assert_gauge(pool)
    pool.close_idle()
    assert_gauge(pool)


def test_one_gauge_shared_by_the_pools_of_a_route() -> None:
    stats = RouteStats("app1")
    config = PoolConfig()
    first: Pool = Pool("app1", ("10.0.0.7", 80), config, stats)
    second: Pool = Pool("app1", ("10.0.0.8", 80), config, stats)
    idle_conns(first, 0.0, 2)
    idle_conns(second, 0.0, 3)
    assert stats.pool_idle == 5
    first.close_idle()
    assert stats.pool_idle == 3
    second.get(1.0)
    assert stats.pool_idle == 2


# active and repr


def test_active_counts_handed_out_connections() -> None:
    pool = make_pool()
    a = connect(pool, 0.0)
    b = connect(pool, 0.0)
    assert pool.active == 2
    pool.put(a, 1.0, reusable=True)
    assert pool.active == 1
    assert pool.get(2.0) is a
    assert pool.active == 2
    pool.put(a, 3.0, reusable=False)
    pool.put(b, 3.0, reusable=True)
    assert pool.active == 0


def test_repr() -> None:
    pool = make_pool()
    idle_conns(pool, 0.0, 3)
    for _ in range(5):
        connect(pool, 0.0)
    assert repr(pool) == "<Pool app1 127.0.0.2:80 idle=3 active=5>"


def test_repr_of_an_ipv6_endpoint() -> None:
    pool: Pool = Pool("app1", ("fd00::7", 8080), PoolConfig(), RouteStats("app1"))
    assert repr(pool) == "<Pool app1 [fd00::7]:8080 idle=0 active=0>"


# Any sequence of calls keeps the books straight.


class PoolMachine(RuleBasedStateMachine):
    handed_out = Bundle("handed_out")

    @initialize(
        max_idle=st.integers(0, 4),
        idle_timeout=st.sampled_from([1.0, 5.0, 60.0]),
        max_lifetime=st.sampled_from([2.0, 10.0, 300.0]),
    )
    def setup(self, max_idle: int, idle_timeout: float, max_lifetime: float) -> None:
        self.pool = make_pool(max_idle, idle_timeout, max_lifetime)
        self.now = 0.0
        self.out: list[Conn] = []
        self.made: list[Conn] = []

    @rule(target=handed_out)
    def open(self) -> Conn:
        conn = connect(self.pool, self.now)
        self.out.append(conn)
        self.made.append(conn)
        return conn

    @rule(target=handed_out)
    def get(self) -> Conn:
        conn = self.pool.get(self.now)
        if conn is None:
            conn = connect(self.pool, self.now)
            self.made.append(conn)
        else:
            config = self.pool.config
            assert not conn.closed
            assert self.now - conn.idle_since < config.idle_timeout
            assert self.now - conn.created < config.max_lifetime
        self.out.append(conn)
        return conn

    @rule(conn=consumes(handed_out), reusable=st.booleans())
    def put(self, conn: Conn, reusable: bool) -> None:
        self.out.remove(conn)
        self.pool.put(conn, self.now, reusable)

    @precondition(lambda self: bool(self.pool.idle))
    @rule(data=st.data())
    def server_closes_an_idle_connection(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(self.pool.idle))
        conn.closed = True
        self.pool.discard(conn)
        assert conn not in self.pool.idle

    @precondition(lambda self: bool(self.pool.idle))
    @rule(data=st.data())
    def server_closing_noticed_later(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from(self.pool.idle)).closed = True

    @rule()
    def sweep(self) -> None:
        self.pool.sweep(self.now)
        assert all(not c.closed and self.pool._fresh(c, self.now) for c in self.pool.idle)

    @rule()
    def close_idle(self) -> None:
        self.pool.close_idle()
        assert self.pool.idle == []

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 3.0, 30.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def gauge_is_exact(self) -> None:
        assert self.pool.stats.pool_idle == len(self.pool.idle)

    @invariant()
    def active_counts_what_is_out(self) -> None:
        assert self.pool.active == len(self.out)

    @invariant()
    def idle_within_bounds(self) -> None:
        idle = self.pool.idle
        assert len(idle) <= self.pool.config.max_idle
        assert len({id(c) for c in idle}) == len(idle)
        assert not any(c in self.out for c in idle)

    @invariant()
    def each_connection_closed_at_most_once_by_the_pool(self) -> None:
        assert all(c.close_calls <= 1 for c in self.made)


PoolMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
test_pool_books_stay_straight = PoolMachine.TestCase
