"""Endpoint health under load: outlier ejection, the retry budget, balancing, slow start.

Through sidelink in-process, on real sockets: replicas (tests/support/replicas.py) on
127.0.0.2 ... that answer 500 or 503, reset after reading the request, refuse
connections or answer slowly, found through the in-process DNS server, with 8 keep-alive
clients calling. Shares are counted where the requests land (at the replicas) and where
they are answered (at the clients); each test prints its figures (`pytest -s`).
"""

from __future__ import annotations

import time

import pytest
from support.inproc import collector_as_served, route_address, running_server
from support.metrics import Scrape
from support.replicas import (
    ANSWER_500,
    ANSWER_503,
    OK,
    RESET,
    Load,
    Replica,
    Replicas,
    Sampler,
    dns_publisher,
    route_yaml,
)
from support.wait import until

from proxy.dnsserver import DnsServer
from proxy.server import Server

pytestmark = pytest.mark.usefixtures("loop_errors")

CLIENTS = 8
OUTLIER = {
    "consecutive_failures": 5,
    "base_ejection": "2s",
    "max_ejection": "4s",
    "max_ejected_percent": 50,
}


def states(server: Server) -> dict[str, str]:
    """Each endpoint's state as /routes shows it, by address."""
    endpoints = server.routes["app1"].to_dict()["endpoints"]
    assert isinstance(endpoints, list)
    return {e["address"]: e["state"] for e in endpoints}


def ejected(server: Server) -> int:
    return sum(1 for state in states(server).values() if state == "ejected")


async def elapse(seconds: float) -> None:
    """Let the load run for a measuring window (time passing is the point, not a wait)."""
    end = time.monotonic() + seconds
    await until(lambda: time.monotonic() >= end, seconds + 1.0, "the window")


def landed(replicas: Replicas, before: dict[str, int]) -> dict[str, int]:
    """Requests each replica read since `before` (replicas.hits())."""
    return {host: hits - before.get(host, 0) for host, hits in replicas.hits().items()}


# --- outlier ejection ------------------------------------------------------------------


@pytest.mark.parametrize("mode", [ANSWER_500, ANSWER_503])
async def test_a_replica_answering_5xx_is_ejected_kept_out_and_let_back(
    dns: DnsServer, mode: str
) -> None:
    async with Replicas(dns_publisher(dns)) as replicas:
        bad, *_ = await replicas.add_many(4)
        config = route_yaml(dns.port, replicas.port, outlier=OUTLIER)
        async with (
            running_server(config) as server,
            Load(route_address(server), clients=CLIENTS) as load,
        ):
            await until(lambda: len(load.shares()) == 4, 5.0, "every replica to answer")
            before = Scrape.of(server)
            sick_since = bad.hits
            bad.mode = mode
            await until(lambda: states(server)[bad.host] == "ejected", 5.0, f"{bad} ejected")
            read_before_ejection = bad.hits - sick_since
            # While ejected (a window well inside base_ejection): next to no traffic.
            hits = replicas.hits()
            await elapse(1.0)
            assert states(server)[bad.host] == "ejected"
            window = landed(replicas, hits)
            ejected_share = window[bad.host] / sum(window.values())
            # Recovered: it is let back when the ejection ends, and takes its share again.
            bad.mode = OK
            await until(lambda: states(server)[bad.host] == "active", 5.0, f"{bad} back")
            back = load.mark()
            await until(lambda: load.count >= back + 1000, 5.0, "answers after the return")
        shares = load.shares(back)
        back_share = shares[bad.host] / sum(shares.values())
        ejections = Scrape.of(server).get("sidelink_endpoint_ejections_total") - before.get(
            "sidelink_endpoint_ejections_total"
        )
        failed = load.errors()
        print(
            f"\n{mode}: {read_before_ejection} requests read before ejection; "
            f"{window} while ejected ({ejected_share:.1%}); back: {dict(shares)} "
            f"({back_share:.1%}); downstream failures {dict(failed)}; ejections {ejections}"
        )
        assert ejections >= 1
        assert ejected_share < 0.05
        assert back_share > 0.25 / 2
        # 5xx are answers, not retried: the clients saw those answered before the ejection
        # (the failures in a row, and those already in flight on it then).
        assert set(failed) <= {mode}
        assert failed[mode] <= OUTLIER["consecutive_failures"] + CLIENTS


async def test_three_of_four_replicas_refusing_fail_no_request_and_at_most_half_are_ejected(
    dns: DnsServer,
) -> None:
    async with Replicas(dns_publisher(dns)) as replicas:
        await replicas.add()
        for _ in range(3):
            await replicas.add(listen=False, publish=False)  # connects refused
        replicas.publish()
        config = route_yaml(dns.port, replicas.port, outlier=OUTLIER)
        async with (
            running_server(config) as server,
            Sampler(lambda: ejected(server)) as sampler,
            Load(route_address(server), clients=CLIENTS, total=1500, timeout=3.0) as load,
        ):
            await load.done()
    slowest = load.quantile(1.0)
    print(
        f"\n{load.count} requests, failures {dict(load.errors())}, slowest {slowest * 1000:.1f} "
        f"ms, p99 {load.quantile(0.99) * 1000:.1f} ms; ejected at most {max(sampler.values)} "
        f"of 4 over {len(sampler.values)} samples"
    )
    assert load.count == 1500
    assert not load.failed, load.errors()
    # A refused connect is answered at once on loopback: no request waits for anything.
    assert slowest < 1.0
    assert 1 <= max(sampler.values) <= 2  # max_ejected_percent: 50


# --- the retry budget -------------------------------------------------------------------


async def test_the_retry_budget_bounds_upstream_attempts_when_half_the_replicas_reset(
    dns: DnsServer,
) -> None:
    budget = {"percent": 20, "min_per_second": 10}
    async with Replicas(dns_publisher(dns)) as replicas:
        await replicas.add_many(2)
        await replicas.add_many(2, RESET)  # read the request, then RST: a GET is retried
        # No ejection on resets here: the budget alone must hold the retries back.
        config = route_yaml(
            dns.port,
            replicas.port,
            retry_budget=budget,
            outlier={**OUTLIER, "consecutive_failures": 1000},
        )
        async with running_server(config) as server:
            before = Scrape.of(server)
            async with Load(route_address(server), clients=CLIENTS, total=3000) as load:
                await load.done()
            seconds = load.elapsed
            attempts = replicas.total_hits()
            after = Scrape.of(server)
    retries = after.get("sidelink_retries_total") - before.get("sidelink_retries_total")
    exhausted = after.get("sidelink_retry_budget_exhausted_total") - before.get(
        "sidelink_retry_budget_exhausted_total"
    )
    bound = 1.2 * load.count + budget["min_per_second"] * seconds
    print(
        f"\n{load.count} requests in {seconds:.2f}s, {attempts} attempts at the replicas "
        f"{replicas.hits()} (bound {bound:.0f}); retries {retries}, budget exhausted "
        f"{exhausted}; downstream {dict(load.errors())} failed"
    )
    assert attempts <= bound
    assert exhausted > 0  # the budget, not luck, held them back
    assert set(load.errors()) <= {"502 reset"}


# --- balancing ------------------------------------------------------------------------------

# Replica latencies well above the jitter of one loop serving clients, sidelink and
# replicas alike (about 3 ms at p99 here, 15 ms in a CI run), so that latency-aware
# balancing sees them. Peak-EWMA believes a peak at once and keeps it for seconds, and
# weighs it by the load in flight: the slow replica is picked whenever a fast one's
# peak times its load passes SLOW. A stall of the loop is such a peak. With 5 ms and 8
# clients (about 4 in flight on each fast replica) a 12 ms stall was enough, and a CI
# run under load sent the slow replica 1.5-1.8% of the requests, and so the p99. With
# 10 ms and 4 clients a peak has to pass 50 ms: under four CPU-bound processes beside
# the test, ewma's share stayed 0.1-0.2% (p2c's 9.8-10.2%).
FAST = 0.010
SLOW = 10 * FAST
BALANCE_CLIENTS = 4
BALANCE_REQUESTS = 1200


@pytest.mark.parametrize("balance", ["p2c", "ewma", "round_robin"])
async def test_three_equal_replicas_each_get_a_third_within_ten_percent(
    dns: DnsServer, balance: str
) -> None:
    async with Replicas(dns_publisher(dns)) as replicas:
        await replicas.add_many(3, delay=FAST)
        config = route_yaml(dns.port, replicas.port, balance=balance)
        async with (
            running_server(config) as server,
            Load(route_address(server), clients=CLIENTS, total=3000) as load,
        ):
            await load.done()
    hits = replicas.hits()
    mean = sum(hits.values()) / 3
    print(f"\n{balance}: {hits} (mean {mean:.0f}), failures {dict(load.errors())}")
    assert not load.failed
    assert all(abs(n - mean) <= 0.1 * mean for n in hits.values()), hits


async def run(
    dns: DnsServer, replicas: Replicas, balance: str, slow: Replica
) -> tuple[float, float]:
    """BALANCE_REQUESTS requests through a fresh sidelink balancing by `balance`: the share of
    them that landed on `slow`, and the p99 latency the clients saw."""
    hits = replicas.hits()
    # A collection of what earlier tests left is a pause every request in flight sees:
    # a peak that peak-EWMA keeps for seconds.
    config = route_yaml(dns.port, replicas.port, balance=balance)
    with collector_as_served():
        async with (
            running_server(config) as server,
            Load(route_address(server), clients=BALANCE_CLIENTS, total=BALANCE_REQUESTS) as load,
        ):
            await load.done()
    assert not load.failed, load.errors()
    window = landed(replicas, hits)
    return window[slow.host] / sum(window.values()), load.quantile(0.99)


async def test_a_replica_ten_times_slower_gets_under_half_its_share_with_p2c(
    dns: DnsServer,
) -> None:
    async with Replicas(dns_publisher(dns)) as replicas:
        slow, *_ = await replicas.add_many(3, delay=FAST)
        slow.delay = SLOW
        share, p99 = await run(dns, replicas, "p2c", slow)
    print(f"\np2c: the slow replica got {share:.1%} (fair 33.3%), p99 {p99 * 1000:.1f} ms")
    assert share < 1 / 3 / 2


async def test_ewma_gives_a_slow_replica_less_than_p2c_with_a_p99_near_an_all_fast_set(
    dns: DnsServer,
) -> None:
    async with Replicas(dns_publisher(dns)) as replicas:
        slow, *_ = await replicas.add_many(3, delay=FAST)
        slow.delay = SLOW
        p2c_share, p2c_p99 = await run(dns, replicas, "p2c", slow)
        ewma_share, ewma_p99 = await run(dns, replicas, "ewma", slow)
        slow.delay = FAST
        _, fast_p99 = await run(dns, replicas, "ewma", slow)
    print(
        f"\nslow replica's share: p2c {p2c_share:.1%}, ewma {ewma_share:.1%} (fair 33.3%); "
        f"p99: p2c {p2c_p99 * 1000:.1f} ms, ewma {ewma_p99 * 1000:.1f} ms, "
        f"all fast {fast_p99 * 1000:.1f} ms"
    )
    assert ewma_share < 1 / 3 / 2
    assert ewma_share < p2c_share
    assert ewma_p99 <= 1.5 * fast_p99


# --- slow start -------------------------------------------------------------------------------

SLOW_START = 3.0


async def test_a_joining_replica_ramps_up_over_slow_start(dns: DnsServer) -> None:
    async with Replicas(dns_publisher(dns)) as replicas:
        await replicas.add_many(3)
        config = route_yaml(dns.port, replicas.port, slow_start=f"{SLOW_START}s")
        async with (
            running_server(config) as server,
            Load(route_address(server), clients=CLIENTS, duration=SLOW_START + 5) as load,
        ):
            await until(lambda: len(load.shares()) == 3, 5.0, "every replica to answer")
            new = await replicas.add()
            await until(lambda: new.answers, 5.0, f"{new} to answer")
            joined = new.answers[0][0]  # its first successful response
            ramped = joined + SLOW_START
            await until(lambda: time.monotonic() > ramped + 1.2, SLOW_START + 3, "the ramp")

    def share(start: float, end: float) -> tuple[float, int]:
        counts = [r.answered_between(start, end) for r in replicas]
        return new.answered_between(start, end) / sum(counts), sum(counts)

    fair = 1 / 4
    early, early_total = share(joined, joined + SLOW_START / 10)
    late, late_total = share(ramped + 0.1, ramped + 1.1)
    print(
        f"\nthe joining replica's share: {early:.1%} of {early_total} answers in the first "
        f"tenth of slow_start, {late:.1%} of {late_total} after it (fair {fair:.0%}); "
        f"failures {dict(load.errors())}"
    )
    assert not load.failed
    assert early <= 0.1 * fair
    assert late >= 0.8 * fair
