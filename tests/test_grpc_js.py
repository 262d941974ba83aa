"""gRPC through sidelink with a second implementation as the client: @grpc/grpc-js on Node.

tests/test_grpc.py has grpcio on both sides; here the servers are still the grpcio pods of
tests/support/grpc_servers.py (127.0.0.2-4, one port, listed by the in-process DNS
server), and the client is tests/support/grpc_js_client.js: one grpc-js client object
(one channel) to sidelink's listener, raw bytes both ways, printing what it got as JSON.
sidelink must spread that one channel's calls over every pod, carry each kind of call
whole, and answer its own failures so grpc-js reads them: status 14 and `sidelink-error`.

@grpc/grpc-js is installed once per session with npm into the pytest cache
(.pytest_cache/d/grpc-js, outside git), unless it is there already.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.grpc_servers import GrpcPods
from support.inproc import route_address, running_server
from support.metrics import Scrape, metric
from support.npm import npm_install
from support.procs import clean_environ, require_tool
from support.replicas import HOSTS, SERVICE, TTL, route_yaml

from proxy.dnsserver import DnsServer
from proxy.server import Server

pytestmark = pytest.mark.usefixtures("loop_errors")

ROUTE = "grpc"
PODS = HOSTS[:3]  # 127.0.0.2 .. 127.0.0.4
CLIENT = Path(__file__).parent / "support" / "grpc_js_client.js"
PACKAGE = "@grpc/grpc-js@1"
NODE_TIMEOUT = 60.0

# Unary calls one after another. Nothing is in flight at each pick, so p2c's tie-break
# (the one picked longer ago) decides: even, but not round-robin. Simulating that rule,
# a pod strays beyond 10% of a third in about 0.4% of runs of 300 calls, and in under
# 1 in 40,000 of 600.
SEQUENTIAL = 600
PARALLEL = 60  # unary calls all at once on the one channel
MESSAGES = 5  # per streaming call
UNAVAILABLE = 14


# --- grpc-js, installed once --------------------------------------------------------------


def _installed(prefix: Path) -> bool:
    return (prefix / "node_modules" / "@grpc" / "grpc-js" / "package.json").is_file()


@dataclass(frozen=True)
class GrpcJs:
    node: Path
    node_modules: Path  # holding @grpc/grpc-js: the client's NODE_PATH


@pytest.fixture(scope="session")
def grpc_js(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> GrpcJs:
    """node, and @grpc/grpc-js npm-installed into the pytest cache the first time."""
    node = require_tool("node")
    prefix = npm_install(request, tmp_path_factory, "grpc-js", PACKAGE, _installed)
    return GrpcJs(Path(node), prefix / "node_modules")


async def grpc_js_client(grpc_js: GrpcJs, **args: Any) -> dict[str, Any]:
    """Run grpc_js_client.js with args (as JSON) and return the JSON it prints; a
    subprocess, so sidelink's loop serves on meanwhile."""
    environ = {**clean_environ(), "NODE_PATH": str(grpc_js.node_modules)}
    proc = await asyncio.create_subprocess_exec(
        str(grpc_js.node),
        str(CLIENT),
        json.dumps(args),
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), NODE_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise AssertionError(f"the grpc-js client took over {NODE_TIMEOUT}s ({args})") from None
    assert proc.returncode == 0, (proc.returncode, err.decode()[-4000:])
    result: dict[str, Any] = json.loads(out)
    return result


def grpc_responses(server: Server, route: str) -> dict[str, float]:
    """sidelink_grpc_responses_total of route, by grpc_status (those counted)."""
    return {
        labels["grpc_status"]: value
        for name, labels, value in Scrape.of(server).samples
        if name == "sidelink_grpc_responses_total" and labels.get("route") == route and value
    }


# --- one grpc-js channel, three grpcio pods -----------------------------------------------


async def test_one_grpc_js_channel_spreads_its_calls_over_the_grpcio_pods(
    dns: DnsServer, grpc_js: GrpcJs
) -> None:
    with GrpcPods(PODS) as pods:
        dns.set_a(SERVICE, PODS, ttl=TTL)
        async with running_server(route_yaml(dns.port, pods.port, name=ROUTE)) as server:
            host, port = route_address(server)
            result = await grpc_js_client(
                grpc_js,
                address=f"{host}:{port}",
                mode="spread",
                unary=SEQUENTIAL,
                parallel=PARALLEL,
                messages=MESSAGES,
            )
            print(f"\ngrpc-js {result['grpc_js']}: {json.dumps(result)}")
            assert result["failures"] == [], result["failures"]

            sequential = Counter(result["unary"])
            third = SEQUENTIAL / 3
            assert set(sequential) == set(PODS), sequential
            for pod in PODS:
                assert abs(sequential[pod] - third) <= 0.1 * third, sequential
            parallel = Counter(result["parallel"])
            assert sum(parallel.values()) == PARALLEL, parallel
            assert set(parallel) == set(PODS), parallel
            # Every message of a streaming call comes from the one pod it landed on.
            streams = result["streams"]
            assert set(streams) == {"server_stream", "client_stream", "bidi"}, streams
            for kind, senders in streams.items():
                want = 1 if kind == "client_stream" else MESSAGES
                assert len(senders) == want and len(set(senders)) == 1, (kind, senders)
                assert senders[0] in PODS, (kind, senders)

            # Each call reached exactly one pod, once: the pods saw what grpc-js got.
            assert pods.calls("Who") == dict(sequential + parallel), pods.calls("Who")
            for kind, method in (("server_stream", "Stream"), ("client_stream", "Sum")):
                assert pods.calls(method) == {p: int(p == streams[kind][0]) for p in PODS}, (
                    kind,
                    pods.calls(method),
                )
            assert pods.calls("Chat") == {p: int(p == streams["bidi"][0]) for p in PODS}

            total = SEQUENTIAL + PARALLEL + 3
            assert grpc_responses(server, ROUTE) == {"0": total}
            assert metric(server, "sidelink_requests_total", route=ROUTE, code="200") == total
            # One grpc-js channel: one connection to sidelink, however many streams.
            downstream = metric(
                server, "sidelink_connections_opened_total", route=ROUTE, side="downstream"
            )
            assert downstream == 1, downstream


# --- sidelink's own failure, read by grpc-js -----------------------------------------------


async def test_no_endpoints_is_unavailable_with_sidelink_error_to_grpc_js(
    dns: DnsServer, grpc_js: GrpcJs
) -> None:
    # The route's service has no A record: nothing to send a call to.
    config = route_yaml(dns.port, 50051, name="empty", service="empty.ns1.svc.cluster.local")
    async with running_server(config) as server:
        host, port = route_address(server)
        result = await grpc_js_client(grpc_js, address=f"{host}:{port}", mode="failures")
        print(f"\ngrpc-js {result['grpc_js']}: {json.dumps(result)}")
        assert result["succeeded"] == [], result
        failures = result["failures"]
        assert [f["kind"] for f in failures] == ["unary", "server_stream", "client_stream", "bidi"]
        for f in failures:
            assert f["code"] == UNAVAILABLE, f
            assert f["metadata"].get("sidelink-error") == "no_endpoints", f
            # sidelink's own message (a bare HTTP 503 would be UNAVAILABLE too, but
            # grpc-js would say it made the status from the HTTP one)
            assert f["details"] and "HTTP status code" not in f["details"], f
        assert grpc_responses(server, "empty") == {"14": len(failures)}
