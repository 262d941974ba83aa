"""``sidelink top``: its figures from fed values, and the command in a pseudo-terminal
against a real sidelink subprocess under traffic."""

from __future__ import annotations

import http.server
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.pods import EchoServer, ask_once
from support.procs import Sidelink, clean_environ, free_port, sidelink
from support.wait import until_sync

from proxy.top import CLEAR, Scrape, quantile, render, route_rows

# --- the figures, from values ---------------------------------------------------------------


def test_quantile_interpolates_within_the_bucket_of_the_interval() -> None:
    before = [(0.01, 10.0), (0.1, 10.0), (1.0, 10.0), (float("inf"), 10.0)]
    # 100 new observations: 50 up to 10 ms, 40 more up to 100 ms, 10 more up to 1 s.
    after = [(0.01, 60.0), (0.1, 100.0), (1.0, 110.0), (float("inf"), 110.0)]
    assert quantile(0.5, before, after) == pytest.approx(0.01)
    assert quantile(0.9, before, after) == pytest.approx(0.1)
    assert quantile(0.99, before, after) == pytest.approx(0.1 + 0.9 * 0.9)
    assert quantile(0.5, after, after) is None  # nothing happened in between
    beyond = [(0.01, 0.0), (float("inf"), 5.0)]
    assert quantile(0.5, [], beyond) == 0.01  # past the last bound: the highest finite one


EXPOSITION = """\
sidelink_build_info{{version="0.1.0"}} 1
sidelink_requests_total{{route="web",method="GET",code="200"}} {ok}
sidelink_requests_total{{route="web",method="GET",code="503"}} {bad}
sidelink_request_duration_seconds_bucket{{route="web",le="0.005"}} {fast}
sidelink_request_duration_seconds_bucket{{route="web",le="0.05"}} {total}
sidelink_request_duration_seconds_bucket{{route="web",le="+Inf"}} {total}
sidelink_request_duration_seconds_count{{route="web"}} {total}
sidelink_request_duration_seconds_sum{{route="web"}} 1
sidelink_connections_opened_total{{route="db",side="downstream"}} {conns}
sidelink_connections_opened_total{{route="db",side="upstream"}} {conns}
sidelink_upstream_errors_total{{route="db",reason="connect_refused"}} {errors}
"""
ROUTES = """{"routes": [
 {"name": "web", "listen": "127.0.0.1:8081", "protocol": "http", "service": "web", "port": 80,
  "source": "dns", "last_resolved": "2030-01-01T00:00:00Z", "last_error": null,
  "endpoints": [{"state": "active"}, {"state": "active"}, {"state": "ejected"}]},
 {"name": "db", "listen": "127.0.0.1:5432", "protocol": "tcp", "service": "10.0.0.9",
  "port": 5432, "source": "static", "last_resolved": null, "endpoints": [{"state": "active"}]}
]}"""


def scrape(at: float, **values: int) -> Scrape:
    return Scrape.parse(at, EXPOSITION.format(**values), ROUTES)


def test_rows_are_rates_over_the_interval_between_two_scrapes() -> None:
    before = scrape(10.0, ok=100, bad=0, fast=50, total=100, conns=3, errors=0)
    after = scrape(12.0, ok=296, bad=4, fast=150, total=300, conns=7, errors=1)
    wall = 1893456000.0 + 42  # 2030-01-01T00:00:42Z
    web, db = route_rows(before, after, wall)
    assert (web.name, web.rate, web.success) == ("web", 100.0, 0.98)
    assert web.p50 == pytest.approx(0.005)
    assert web.p99 == pytest.approx(0.005 + 0.045 * 0.98)
    assert web.endpoints == {"active": 2, "ejected": 1}
    assert web.dns == "dns 42s ago"
    assert (db.rate, db.success, db.p50, db.dns) == (2.0, 0.75, None, "static")

    frame = render([web, db], "header")
    head, blank, columns, row_web, row_db = frame.splitlines()
    assert (head, blank) == ("header", "")
    assert columns.split() == [
        "ROUTE", "PROTO", "LISTEN", "SERVICE", "RPS", "SUCCESS", "P50", "P99", "ENDPOINTS", "DNS",
    ]  # fmt: skip
    assert row_web.split() == [
        "web", "http", "127.0.0.1:8081", "web:80", "100.0", "98.00%", "5.0ms", "49.1ms",
        "2", "active", "1", "ejected", "dns", "42s", "ago",
    ]  # fmt: skip
    assert row_db.split()[4:9] == ["2.0", "75.00%", "-", "-", "1"]


# --- the command, in a pseudo-terminal, against a real sidelink under traffic ----------------


class _Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def busy_sidelink() -> Iterator[tuple[Sidelink, str, str]]:
    """sidelink with an http route to localhost (the hosts file) and a tcp one, under traffic."""
    if not re.search(r"^127\.0\.0\.1\s.*\blocalhost\b", Path("/etc/hosts").read_text(), re.M):
        pytest.skip("this machine's /etc/hosts does not map localhost to 127.0.0.1")
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=web.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    echo = EchoServer("127.0.0.2", b"db ")
    http_port, tcp_port = free_port(), free_port()
    http_route = f"localhost:{http_port}"
    tcp_route = f"127.0.0.2:{tcp_port}"
    args = ["run", "--route", f"{http_port}=localhost:{web.server_port}/http"]
    args += ["--route", f"{tcp_port}=127.0.0.2:{echo.port}/tcp"]
    stop = threading.Event()

    def traffic() -> None:
        while not stop.wait(0.01):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=2) as r:
                    r.read()
                ask_once(tcp_port)
            except OSError:
                pass

    with sidelink(args) as proc:
        proc.wait_admin()
        until_sync(lambda: proc.get("/readyz")[0] == 200, 10, "every route to resolve")
        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            yield proc, http_route, tcp_route
        finally:
            stop.set()
            thread.join()
            web.shutdown()
            web.server_close()
            echo.close()


def test_the_hosts_file_answer_shows_in_routes(busy_sidelink: tuple[Sidelink, str, str]) -> None:
    proc, http_route, _ = busy_sidelink
    _, body = proc.get_json("/routes")
    routes = {r["name"]: r for r in body["routes"]}  # type: ignore[attr-defined]
    assert routes[http_route]["source"] == "hosts"
    assert routes[http_route]["ready"] is True


def read_until(fd: int, pattern: re.Pattern[str], timeout: float) -> str:
    """What the terminal showed until ``pattern`` matched the latest frame."""
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            seen += chunk.decode(errors="replace")
            if pattern.search(seen.rsplit(CLEAR, 1)[-1]):
                return seen
    raise AssertionError(f"no frame matched {pattern.pattern!r} in {timeout}s:\n{seen[-3000:]}")


def test_top_in_a_terminal_shows_each_route_live(busy_sidelink: tuple[Sidelink, str, str]) -> None:
    proc, http_route, tcp_route = busy_sidelink
    main, terminal = pty.openpty()
    top = subprocess.Popen(
        [sys.executable, "-m", "proxy", "top", "--admin", f"127.0.0.1:{proc.admin_port}"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env={**clean_environ(), "COLUMNS": "200"},
        close_fds=True,
    )
    os.close(terminal)
    try:
        number = r"\d+\.\d"
        http_row = re.compile(
            rf"^{re.escape(http_route)} +http +127\.0\.0\.1:\d+ +localhost:\d+ +(?P<rps>{number}) "
            r"+100\.00% +[\d.]+m?s +[\d.]+m?s +1 active +hosts \d+s ago",
            re.M,
        )
        tcp_row = re.compile(rf"^{re.escape(tcp_route)} +tcp .* 1 active +static", re.M)
        seen = read_until(main, http_row, 15)
        frame = seen.rsplit(CLEAR, 1)[-1]
        assert seen.count(CLEAR) >= 1, "each frame clears the screen in a terminal"
        assert tcp_row.search(frame), frame
        match = http_row.search(frame)
        assert match is not None and float(match["rps"]) > 0, frame
        assert frame.startswith("sidelink 0.1.0 at http://127.0.0.1:"), frame
        # Refreshed each second: another frame follows.
        frames = seen.count(CLEAR)
        more = read_until(main, http_row, 5)
        assert frames + more.count(CLEAR) >= 2
        top.send_signal(signal.SIGINT)
        assert top.wait(10) == 0
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
        os.close(main)


def test_top_once_without_a_terminal(busy_sidelink: tuple[Sidelink, str, str]) -> None:
    proc, http_route, tcp_route = busy_sidelink
    admin = f"127.0.0.1:{proc.admin_port}"
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "top", "--once", "--interval", "0.5", "--admin", admin],
        capture_output=True,
        text=True,
        env=clean_environ(),
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert CLEAR not in result.stdout, "no escape codes when the output is not a terminal"
    out = result.stdout.splitlines()
    assert out[2].split()[:3] == ["ROUTE", "PROTO", "LISTEN"]
    assert [line.split()[0] for line in out[3:]] == [http_route, tcp_route]


def test_top_once_says_when_sidelink_cannot_be_reached() -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "top", "--once", "--admin", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        env=clean_environ(),
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"sidelink top: cannot read http://127.0.0.1:{port}: ")
    assert "Connection refused" in result.stderr
