"""gRPC through sidelink in-process: HTTP/2 per stream, on real sockets, with grpcio.

The pods are grpcio servers (tests/support/grpc_servers.py) on 127.0.0.2, 127.0.0.3, ...
sharing one port, listed as the A records of one service by the in-process DNS server;
each answers with its own address, so a test counts where every call landed. The client
is grpcio too: one channel (one HTTP/2 connection) to sidelink's listener, which must
spread its streams over every pod, carry cancellation and deadlines through, move 16 MB
messages both ways, ride through a rolling replacement and a SIGKILL, and answer its own
failures the gRPC way (HTTP 200, trailers only, `grpc-status`, `sidelink-error`).

grpcio's client and servers run on threads of their own; sidelink's loop stays free.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml
from support.data import chunks
from support.grpc_servers import (
    KINDS,
    MB,
    METHOD_OF,
    Caller,
    GrpcLoad,
    GrpcPods,
    call_one,
    pod_processes,
    sidelink_error,
)
from support.inproc import resolver_yaml, route_address, running_server
from support.metrics import Scrape, metric
from support.replicas import HOSTS, SERVICE, TTL, common_port, route_yaml
from support.wait import until

from proxy.dnsserver import DnsServer
from proxy.server import Server

pytestmark = pytest.mark.usefixtures("loop_errors")

ROUTE = "grpc"
PODS = HOSTS[:3]  # 127.0.0.2 .. 127.0.0.4
DEAD = ("127.0.0.8", "127.0.0.9")  # pod IPs nothing listens on: connects are refused
CALLERS = 8
# Each answer takes this long at the pod, so that several streams are in flight at once
# and the balancer's outstanding counts mean something.
POD_DELAY = 0.002
# How long a pod may take to see a call end once its client gave up on it.
END_BOUND = 1.0


def grpc_yaml(dns_port: int, port: int, **settings: object) -> str:
    return route_yaml(dns_port, port, name=ROUTE, **settings)


def streams_active(server: Server, side: str) -> float:
    return metric(server, "sidelink_streams_active", route=ROUTE, side=side)


def grpc_responses(server: Server, route: str = ROUTE) -> dict[str, float]:
    """sidelink_grpc_responses_total of route, by grpc_status (those counted)."""
    scrape = Scrape.of(server)
    return {
        labels["grpc_status"]: value
        for name, labels, value in scrape.samples
        if name == "sidelink_grpc_responses_total" and labels.get("route") == route and value
    }


def calls(caller: Caller, kind: str, n: int, concurrency: int = CALLERS) -> list[tuple[str, ...]]:
    """n calls of kind, `concurrency` at a time over caller's one channel (blocking)."""
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda _: call_one(caller, kind, 10.0), range(n)))


# --- one channel, every pod -------------------------------------------------------------

PER_KIND = 600


async def test_one_channel_spreads_every_kind_of_rpc_evenly_over_the_pods(
    dns: DnsServer,
) -> None:
    with GrpcPods(PODS, delay=POD_DELAY) as pods:
        dns.set_a(SERVICE, PODS, ttl=TTL)
        async with running_server(grpc_yaml(dns.port, pods.port)) as server:
            with Caller(route_address(server)) as caller:
                answered: dict[str, Counter[str]] = {}
                for kind in KINDS:
                    results = await asyncio.to_thread(calls, caller, kind, PER_KIND)
                    # Every message of a call comes from the pod the call landed on.
                    assert all(len(set(pods_)) == 1 for pods_ in results), kind
                    answered[kind] = Counter(r[0] for r in results)
            print(f"\nper kind: { {k: dict(v) for k, v in answered.items()} }")
            served = {kind: pods.calls(METHOD_OF[kind]) for kind in KINDS}
            for kind in KINDS:
                third = PER_KIND / 3
                for pod in PODS:
                    got = answered[kind][pod]
                    assert abs(got - third) <= 0.1 * third, (kind, dict(answered[kind]))
                # Each call reached exactly one pod, once: no stray or doubled stream.
                assert served[kind] == dict(answered[kind]), (kind, served[kind])
            total = PER_KIND * len(KINDS)
            # Counted per stream, each once, when it ends.
            await until(
                lambda: metric(server, "sidelink_requests_total", route=ROUTE, code="200") == total,
                5.0,
                "every stream counted",
            )
            assert Scrape.of(server).get("sidelink_requests_total", route=ROUTE) == total
            assert grpc_responses(server) == {"0": total}
            assert streams_active(server, "downstream") == 0
            assert streams_active(server, "upstream") == 0
            # One client connection, however many streams.
            downstream = metric(
                server, "sidelink_connections_opened_total", route=ROUTE, side="downstream"
            )
            assert downstream == 1, downstream


# --- cancellation and deadlines ----------------------------------------------------------


async def test_a_cancelled_server_stream_ends_at_the_pod(dns: DnsServer) -> None:
    with GrpcPods(PODS[:1]) as pods:
        dns.set_a(SERVICE, PODS[:1], ttl=TTL)
        pod = pods[0].servicer
        async with running_server(grpc_yaml(dns.port, pods.port)) as server:
            with Caller(route_address(server)) as caller:
                call = caller.endless()
                messages = iter(call)
                first = await asyncio.to_thread(lambda: [next(messages) for _ in range(5)])
                assert first == [PODS[0].encode()] * 5
                assert pod.endless_started == 1 and not pod.endless_ended
                assert streams_active(server, "downstream") == 1
                assert streams_active(server, "upstream") == 1
                cancelled = time.monotonic()
                call.cancel()
                await until(lambda: pod.endless_ended, END_BOUND, "the pod to see the cancel")
                print(f"\nthe pod saw the cancel after {pod.endless_ended[0].at - cancelled:.3f}s")
                await until(
                    lambda: (
                        streams_active(server, "downstream") == 0
                        and streams_active(server, "upstream") == 0
                    ),
                    END_BOUND,
                    "sidelink to close both streams",
                )
                # The channel goes on: the reset was one stream's, not the connection's.
                assert await asyncio.to_thread(caller.who) == PODS[0]


async def test_deadlines_reach_the_pod_and_expire_at_the_client(dns: DnsServer) -> None:
    with GrpcPods(PODS[:1]) as pods:
        dns.set_a(SERVICE, PODS[:1], ttl=TTL)
        pod = pods[0].servicer
        async with running_server(grpc_yaml(dns.port, pods.port)) as server:
            with Caller(route_address(server)) as caller:
                # grpc-timeout went through: the pod knows how long its caller waits.
                assert await asyncio.to_thread(caller.slow, 0.0, 5.0) == PODS[0]
                remaining = pod.deadlines[-1]
                assert remaining is not None, "no grpc-timeout reached the pod"
                assert 3.0 < remaining <= 5.0, remaining

                # A slow pod and a short deadline: the client's own DEADLINE_EXCEEDED, on
                # time, and the pod stops working for it.
                began = time.monotonic()
                with pytest.raises(grpc.RpcError) as failed:
                    await asyncio.to_thread(caller.slow, 5.0, 0.5)
                took = time.monotonic() - began
                assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failed.value
                assert took < 0.5 + END_BOUND, took
                # (grpc-timeout rounds the client's deadline up a little)
                assert 0 < pod.deadlines[-1] <= 0.55, pod.deadlines
                await until(lambda: len(pod.slow_ended) == 2, END_BOUND, "the pod's call to end")
                assert pod.slow_ended[-1] < 0.5 + END_BOUND, pod.slow_ended
                await until(
                    lambda: streams_active(server, "upstream") == 0,
                    END_BOUND,
                    "sidelink to close the upstream stream",
                )


REQUEST_TIMEOUT = 1.0


async def test_a_pod_slower_than_request_timeout_is_deadline_exceeded_from_sidelink(
    dns: DnsServer,
) -> None:
    with GrpcPods(PODS[:1]) as pods:
        dns.set_a(SERVICE, PODS[:1], ttl=TTL)
        pod = pods[0].servicer
        config = grpc_yaml(dns.port, pods.port, request_timeout=f"{REQUEST_TIMEOUT}s")
        async with running_server(config) as server:
            with Caller(route_address(server)) as caller:
                began = time.monotonic()
                with pytest.raises(grpc.RpcError) as failed:
                    # The client would wait 4 s: what ends the call at 1 s is sidelink.
                    await asyncio.to_thread(caller.slow, 10.0, 4.0)
                took = time.monotonic() - began
                error = failed.value
                assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
                assert sidelink_error(error) == "timeout", (error, error.trailing_metadata())
                assert REQUEST_TIMEOUT <= took < REQUEST_TIMEOUT + END_BOUND, took
                assert grpc_responses(server) == {"4": 1}
                assert (
                    metric(server, "sidelink_upstream_errors_total", route=ROUTE, reason="timeout")
                    == 1
                )
                # sidelink gave up on the stream upstream too, not only downstream.
                await until(lambda: pod.slow_ended, END_BOUND, "the pod's call to end")
                assert pod.slow_ended[0] < REQUEST_TIMEOUT + END_BOUND, pod.slow_ended


# --- large messages ----------------------------------------------------------------------

BIG = 16 * MB


async def test_16_mb_messages_pass_both_ways_intact(dns: DnsServer) -> None:
    with GrpcPods(PODS) as pods:
        dns.set_a(SERVICE, PODS, ttl=TTL)
        payload = b"".join(chunks(BIG))
        sent = hashlib.sha256(payload).digest()
        async with running_server(grpc_yaml(dns.port, pods.port)) as server:
            with Caller(route_address(server)) as caller:
                # Two at once on the one channel, and small calls beside them: each
                # stream's flow control is its own.
                big = [asyncio.to_thread(caller.echo, payload) for _ in range(2)]
                small = asyncio.to_thread(calls, caller, "unary", 50)
                *answers, smalls = await asyncio.gather(*big, small)
        for answer in answers:
            assert len(answer) == 32 + BIG, len(answer)
            assert answer[:32] == sent, "the pod got other bytes than were sent"
            assert hashlib.sha256(answer[32:]).digest() == sent, "other bytes came back"
        assert len(smalls) == 50
        assert sum(pods.calls("Echo").values()) == 2


# --- a rolling replacement, a SIGKILL ------------------------------------------------------


def summary(load: GrpcLoad, where: object) -> str:
    return (
        f"{load.count} calls, failed {dict(load.errors())}; per pod {dict(load.shares())}; {where}"
    )


async def test_a_rolling_replacement_under_load_fails_no_rpc(dns: DnsServer) -> None:
    with GrpcPods(PODS, delay=POD_DELAY) as pods:
        in_service = list(PODS)
        dns.set_a(SERVICE, in_service, ttl=TTL)
        async with running_server(grpc_yaml(dns.port, pods.port)) as server:
            with Caller(route_address(server)) as caller:
                async with GrpcLoad(caller, CALLERS) as load:
                    await until(lambda: len(load.shares()) == 3, 5.0, "every pod to answer")
                    stops = []
                    for old, host in zip(list(pods), HOSTS[3:6], strict=True):
                        new = pods.add(host)
                        in_service[in_service.index(old.host)] = new.host
                        dns.set_a(SERVICE, in_service, ttl=TTL)
                        await until(
                            lambda new=new: load.shares()[new.host] >= 5,
                            5.0,
                            f"{new} to take calls",
                        )
                        # A graceful stop: GOAWAY on its connections, in-flight calls
                        # finish, its listener gone; sidelink may still list it a moment.
                        stops.append(asyncio.create_task(asyncio.to_thread(old.stop)))
                    await asyncio.gather(*stops)
                    since = load.mark()
                    await until(lambda: load.count >= since + 200, 5.0, "calls after the rollout")
            print("\n" + summary(load, pods))
            assert not load.failed, summary(load, pods)
            after = load.shares(since)
            assert set(after) == set(in_service), summary(load, pods)
            await until(
                lambda: grpc_responses(server) == {"0": load.count}, 5.0, "every call counted"
            )


async def test_a_pod_stopping_while_still_in_dns_fails_no_rpc(dns: DnsServer) -> None:
    """Its GOAWAY stops new streams on its connections, and its closed listener refuses
    new ones: both are retried elsewhere, whatever sidelink's DNS view still says."""
    with GrpcPods(PODS, delay=POD_DELAY) as pods:
        dns.set_a(SERVICE, PODS, ttl=60)  # the stopped pod stays listed all along
        async with running_server(grpc_yaml(dns.port, pods.port)) as server:
            with Caller(route_address(server)) as caller:
                async with GrpcLoad(caller, CALLERS) as load:
                    await until(lambda: len(load.shares()) == 3, 5.0, "every pod to answer")
                    await asyncio.to_thread(pods[0].stop)
                    stopped = time.monotonic()
                    since = load.mark()
                    await until(lambda: load.count >= since + 300, 5.0, "calls after the stop")
            print("\n" + summary(load, pods))
            # grpc-core answers CANCELLED itself to a call it accepted as its shutdown began
            # but never started (one sent before its GOAWAY reached sidelink): that is the
            # server's own answer, passed on as it came. Nothing sidelink made failed, and
            # no call begun after the stop failed.
            for o in load.failed:
                assert o.code == grpc.StatusCode.CANCELLED, summary(load, pods)
                assert o.error and "sidelink-error=None" in o.error, summary(load, pods)
                assert o.started < stopped, summary(load, pods)
            assert len(load.failed) <= CALLERS, summary(load, pods)
            later = Counter(o.pods[0] for o in load.outcomes if o.started > stopped)
            assert set(later) == set(PODS[1:]), summary(load, pods)


async def test_a_pod_killed_under_load_fails_at_most_its_streams_in_flight(
    dns: DnsServer,
) -> None:
    port = common_port(PODS)
    with pod_processes(PODS, port, delay=0.005) as procs:
        dns.set_a(SERVICE, PODS, ttl=TTL)
        victim = procs[0]
        async with running_server(grpc_yaml(dns.port, port)) as server:
            route = server.routes[ROUTE]

            def victim_in_flight() -> int:
                return sum(ep.in_flight for ep in route.endpoints.all() if ep.host == victim.host)

            with Caller(route_address(server)) as caller:
                async with GrpcLoad(caller, CALLERS) as load:
                    await until(
                        lambda: len(load.shares()) == 3 and min(load.shares().values()) >= 30,
                        10.0,
                        "every pod to answer",
                    )
                    await until(lambda: victim_in_flight() >= 1, 5.0, "streams on the victim")
                    # No await from here to the end of kill(): sidelink's loop waits while
                    # the pod dies, so the count is the one the kill meets.
                    in_flight = victim_in_flight()
                    killed = time.monotonic()
                    victim.kill()
                    # (kill() returns once the process is gone; sidelink's loop, held
                    # until then, learns of it in its next turn: a call the client began
                    # in between may be read first and meet the dead connection too.)
                    await until(lambda: victim_in_flight() == 0, 5.0, "the victim's streams cut")
                    seen = time.monotonic()
                    after = load.mark()
                    await until(lambda: load.count >= after + 400, 10.0, "calls after the kill")
            failed = load.failed
            offsets = [f"{o.kind} {o.code.name} {o.started - killed:+.3f}s" for o in failed]
            print(f"\n{in_flight} in flight on the victim; failed (started vs kill): {offsets}")
            print(summary(load, procs))
            # What the kill cut: the victim's streams in flight, at most one per caller
            # (a stream sidelink had read but not yet sent when the kill came may meet the
            # dead connection too: the bound is the callers').
            assert len(failed) <= CALLERS, summary(load, procs)
            assert all(o.error and "sidelink-error=reset" in o.error for o in failed), offsets
            # Only calls begun before sidelink saw the pod gone failed; all later succeeded.
            assert all(o.started < seen for o in failed), summary(load, procs)
            assert {o.code for o in failed} <= {grpc.StatusCode.UNAVAILABLE}, summary(load, procs)
            later = Counter(o.pods[0] for o in load.outcomes if o.started > killed and o.ok)
            assert set(later) == set(PODS[1:]), summary(load, procs)


# --- sidelink's own failures, the gRPC way --------------------------------------------------


def two_routes_yaml(dns_port: int, port: int) -> str:
    """Route `grpc` to SERVICE, route `empty` to a service of its own (no pod behind it)."""
    base = yaml.safe_load(grpc_yaml(dns_port, port))
    empty = {**base["routes"][0], "name": "empty", "service": "empty.ns1.svc.cluster.local"}
    base["routes"].append(empty)
    return resolver_yaml(dns_port) + yaml.safe_dump(
        {"logging": base["logging"], "routes": base["routes"]}
    )


def failures(caller: Caller, kinds: Sequence[str]) -> list[grpc.RpcError]:
    out = []
    for kind in kinds:
        try:
            call_one(caller, kind, 5.0)
        except grpc.RpcError as e:
            out.append(e)
        else:
            raise AssertionError(f"a {kind} call to a service with no endpoints succeeded")
    return out


@pytest.mark.parametrize("dns_answer", ["nothing", "refused"])
async def test_no_endpoints_is_unavailable_with_sidelink_error(
    dns: DnsServer, dns_answer: str
) -> None:
    with GrpcPods(PODS[:1]) as pods:
        dns.set_a(SERVICE, PODS[:1], ttl=TTL)
        if dns_answer == "refused":  # every endpoint refuses the connect
            dns.set_a("empty.ns1.svc.cluster.local", DEAD, ttl=TTL)
        async with running_server(two_routes_yaml(dns.port, pods.port)) as server:
            with (
                Caller(route_address(server, "empty")) as to_empty,
                Caller(route_address(server, ROUTE)) as to_pods,
            ):
                errors = await asyncio.to_thread(failures, to_empty, KINDS)
                answers = await asyncio.to_thread(calls, to_pods, "unary", 10)
            for error in errors:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                # sidelink's own answer (a bare 503 would be UNAVAILABLE too, but with
                # neither the header nor sidelink's message)
                assert sidelink_error(error) == "no_endpoints", (error, error.trailing_metadata())
                assert error.details() and "http2 header with status" not in error.details()
            assert answers == [(PODS[0],)] * 10
            assert grpc_responses(server, "empty") == {"14": len(KINDS)}
            assert grpc_responses(server, ROUTE) == {"0": 10}
            # HTTP 200 with trailers: counted as what was sent.
            assert Scrape.of(server).get(
                "sidelink_requests_total", route="empty", code="200"
            ) == len(KINDS)
            assert metric(
                server, "sidelink_upstream_errors_total", route="empty", reason="no_endpoints"
            ) >= len(KINDS)
