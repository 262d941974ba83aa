"""`sidelink demo` end to end: the command as a user runs it, its figures read from its output.

Seven seconds make two rollout steps (one every 3 s), each replica stopped 3 s after it
left DNS: the HTTP/1 clients and the one HTTP/2 connection ride through all of it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from support.procs import clean_environ

DURATION = 7
ROLLOUTS = 2  # a step every 3 s while one more fits before the end


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--duration", str(DURATION)],
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,  # the tests read the exit code
    )


def test_the_demo_ends_with_its_summary_and_no_failed_request(
    demo: subprocess.CompletedProcess[str],
) -> None:
    assert demo.returncode == 0, demo.stdout + demo.stderr
    last = demo.stdout.splitlines()[-1]
    m = re.fullmatch(r"summary: (\d+) requests, (\d+) failed, (\d+) rollouts", last)
    assert m, demo.stdout
    requests, failed, rollouts = map(int, m.groups())
    assert (failed, rollouts) == (0, ROLLOUTS), demo.stdout
    assert len(re.findall(r"^  rollout: ", demo.stdout, re.M)) == ROLLOUTS
    http1 = re.search(r"^  http/1: (\d+) requests from \d+ clients, 0 failed$", demo.stdout, re.M)
    http2 = re.search(r"^  http/2: (\d+) calls on 1 connection, 0 failed, ", demo.stdout, re.M)
    assert http1 and http2, demo.stdout
    assert int(http1[1]) + int(http2[1]) == requests
    assert "failures:" not in demo.stdout


def test_the_one_http2_connection_spreads_its_calls_over_the_replicas(
    demo: subprocess.CompletedProcess[str],
) -> None:
    out = demo.stdout
    m = re.search(r"^  http/2: (\d+) calls on 1 connection, 0 failed, by replica: (.*)$", out, re.M)
    assert m, out
    calls = int(m[1])
    per_replica = {name: int(n) for name, n in re.findall(r"(replica-\d+)=(\d+)", m[2])}
    assert sum(per_replica.values()) == calls > 0
    # The first three answered, and so did the one the first rollout brought in (4 s before
    # the end), over the same client connection; the second's (1 s before the end) may have.
    assert {f"replica-{i}" for i in range(4)} <= set(per_replica), out
    assert set(per_replica) <= {f"replica-{i}" for i in range(3 + ROLLOUTS)}, out
    # The first three served together for the first 3 s: balanced per stream, none idle.
    first = [per_replica[f"replica-{i}"] for i in range(3)]
    assert min(first) > 0.2 * max(first), out
    assert "connection ended early" not in out
    # The live figures show the HTTP/2 side too, each second.
    live = re.findall(
        r"^ +http/2 calls += *(\d+) \(\+ *\d+\)  failed=(\d+) .* by replica: ", out, re.M
    )
    assert len(live) >= DURATION - 1, out
    assert all(failed == "0" for _, failed in live), out


def test_each_replica_stops_after_sidelink_has_let_its_connection_go(
    demo: subprocess.CompletedProcess[str],
) -> None:
    # A replica stops 3 s after leaving DNS (its preStop grace); sidelink has closed its
    # HTTP/2 connection to it by then, so the replica has nobody left to tell GOAWAY.
    stopped = re.findall(r"^  stopped: (replica-\d+) \(127\.0\.0\.\d+\), (.*)$", demo.stdout, re.M)
    # The first rollout's old replica stops 3 s later, inside the run; the second's stops
    # as the demo ends (its stop is awaited before the summary).
    assert [name for name, _ in stopped] == [f"replica-{i}" for i in range(ROLLOUTS)], demo.stdout
    assert all(told == "no HTTP/2 connection left open to it" for _, told in stopped), demo.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_ends_the_demo_early_with_its_summary(sig: signal.Signals) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--duration", "60"],
        env=clean_environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # traffic runs once the admin line is out
            if line.startswith("  admin: "):
                break
        time.sleep(1.0)
        started = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert time.monotonic() - started < 15  # early: not at the end of its 60 s
    assert re.fullmatch(r"summary: \d+ requests, 0 failed, 0 rollouts", out.splitlines()[-1]), out
