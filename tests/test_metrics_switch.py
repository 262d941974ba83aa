"""SIDELINK_BENCH_NO_METRICS, the benchmark-only switch of proxy/metrics.py, really switches.

`python -m benchmarks.metrics_cost` compares sidelink with and without its per-request
metric work; these runs of the `sidelink` command (a subprocess: the switch is read once
at import, and compiled classes cannot be patched) show that the switched-off process
records no request count and no duration, that it says so at start, and that the same
requests without the switch are each counted once.
"""

from __future__ import annotations

import http.client
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.inproc import resolver_yaml
from support.metrics import Scrape
from support.procs import Sidelink, free_port, sidelink
from support.wait import until_sync

from proxy.dnsserver import ThreadedDnsServer

SWITCH = "SIDELINK_BENCH_NO_METRICS"
SERVICE = "app1.ns1.svc.cluster.local"
REQUESTS = 7
BODY = b"hello from the upstream\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def tdns() -> Iterator[ThreadedDnsServer]:
    with ThreadedDnsServer() as server:
        server.set_a(SERVICE, ["127.0.0.1"], ttl=30)
        yield server


def config(dns_port: int, listen: int, upstream_port: int) -> str:
    return resolver_yaml(dns_port) + (
        "routes:\n"
        "  - name: app1\n"
        f'    listen: "127.0.0.1:{listen}"\n'
        "    service: app1\n"
        f"    port: {upstream_port}\n"
        "    protocol: http\n"
    )


def scrape(proc: Sidelink) -> Scrape:
    status, body = proc.get("/metrics")
    assert status == 200
    return Scrape(body)


def run_requests(
    tmp_path: Path, tdns: ThreadedDnsServer, upstream: int, env: dict[str, str]
) -> tuple[Scrape, str]:
    """REQUESTS GETs through a sidelink started with `env` (one keep-alive connection, and
    one more connection for the last): its /metrics afterwards, and its log."""
    listen = free_port()
    path = tmp_path / "sidelink.yaml"
    path.write_text(config(tdns.port, listen, upstream))
    with sidelink(["run", "-c", str(path)], env) as proc:
        proc.wait_admin()
        until_sync(lambda: proc.get("/readyz")[0] == 200, 5, "/readyz 200")
        conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=5)
        for _ in range(REQUESTS - 1):
            conn.request("GET", "/")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, BODY)
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=5)
        conn.request("GET", "/", headers={"Connection": "close"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, BODY)
        conn.close()
        until_sync(
            lambda: scrape(proc).get("sidelink_connections_opened_total", side="downstream") == 2,
            5,
            "both downstream connections counted",
        )
        metrics = scrape(proc)
        proc.signal()
        assert proc.wait() == 0
        return metrics, proc.stderr()


def test_switch_off_records_no_request_and_warns(
    tmp_path: Path, tdns: ThreadedDnsServer, upstream: int
) -> None:
    metrics, log = run_requests(tmp_path, tdns, upstream, {SWITCH: "1"})
    assert metrics.matching("sidelink_requests_total") == []
    for histogram in (
        "sidelink_request_duration_seconds",
        "sidelink_upstream_connect_duration_seconds",
    ):
        assert metrics.get(f"{histogram}_count", route="app1") == 0, histogram
        assert metrics.get(f"{histogram}_sum", route="app1") == 0, histogram
        assert metrics.get(f"{histogram}_bucket", route="app1", le="+Inf") == 0, histogram
    # The plain integer counters are not the switch's: they still count.
    assert metrics.get("sidelink_connections_opened_total", side="downstream") == 2
    assert metrics.get("sidelink_connections_opened_total", side="upstream") >= 1
    assert metrics.get("sidelink_bytes_total", direction="to_downstream") > 0
    warnings = [line for line in log.splitlines() if SWITCH in line]
    assert len(warnings) == 1, log
    assert "WARNING" in warnings[0].upper() and "never for production" in warnings[0]


@pytest.mark.parametrize("value", [None, "0"])
def test_without_the_switch_every_request_is_counted_once(
    tmp_path: Path, tdns: ThreadedDnsServer, upstream: int, value: str | None
) -> None:
    env = {} if value is None else {SWITCH: value}
    metrics, log = run_requests(tmp_path, tdns, upstream, env)
    assert metrics.matching("sidelink_requests_total") == [REQUESTS]
    assert metrics.get("sidelink_requests_total", route="app1", method="GET", code="200") == (
        REQUESTS
    )
    assert metrics.get("sidelink_request_duration_seconds_count", route="app1") == REQUESTS
    assert metrics.get("sidelink_request_duration_seconds_sum", route="app1") > 0
    opened = metrics.get("sidelink_connections_opened_total", route="app1", side="upstream")
    assert opened >= 1
    assert metrics.get("sidelink_upstream_connect_duration_seconds_count", route="app1") == opened
    assert SWITCH not in log
