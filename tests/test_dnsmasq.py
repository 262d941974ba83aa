"""Interop with a real DNS server: dnsmasq answering with a 1 s TTL, as cluster DNS does.

dnsmasq serves the Service name from a hosts file and is authoritative for
cluster.local (`--local`), so the search-list expansions of a pod's resolv.conf get
NXDOMAIN exactly as from CoreDNS. A "rollout" rewrites the hosts file and sends
dnsmasq SIGHUP; sidelink must follow within TTL + 1 s without touching connections
already open. Everything listens on loopback; dnsmasq has no upstream servers.
"""

from __future__ import annotations

import getpass
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from support.inproc import resolver_yaml
from support.pods import Client, EchoServer, ask_once
from support.procs import Sidelink, free_port, require_tool, sidelink
from support.wait import until_sync

SERVICE = "app1.ns1.svc.cluster.local"
POD_A = "127.0.0.2"
POD_B = "127.0.0.3"
TTL = 1


def pod_pair() -> tuple[EchoServer, EchoServer]:
    """Two pods on one port (a DNS answer carries no port): old on POD_A, new on POD_B."""
    for _ in range(5):
        old = EchoServer(POD_A, b"A ")
        try:
            return old, EchoServer(POD_B, b"B ", port=old.port)
        except OSError:  # that port is taken on POD_B: try another
            old.close()
    raise AssertionError("no port free on both pod addresses")


def endpoints(proc: Sidelink) -> dict[object, tuple[object, object]]:
    _, routes = proc.get_json("/routes")
    (route,) = cast(list[dict[str, object]], routes["routes"])
    return {
        e["address"]: (e["state"], e["in_flight"])
        for e in cast(list[dict[str, object]], route["endpoints"])
    }


class Dnsmasq:
    """dnsmasq in the foreground on 127.0.0.1:<free port>, serving a hosts file we rewrite."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.hosts = workdir / "hosts"
        self.port = free_port()
        self.set_address(POD_A)
        self.proc = subprocess.Popen(
            [
                binary,
                "--no-daemon",
                "--conf-file=/dev/null",
                f"--port={self.port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                f"--addn-hosts={self.hosts}",
                # Authoritative for the cluster domain: unknown names there are NXDOMAIN.
                "--local=/cluster.local/",
                f"--local-ttl={TTL}",
                f"--pid-file={workdir / 'dnsmasq.pid'}",
                # Stay the user we are (root or not) instead of dropping to "nobody".
                f"--user={getpass.getuser()}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def set_address(self, address: str) -> None:
        self.hosts.write_text(f"{address} {SERVICE}\n")

    def reload(self) -> None:
        """SIGHUP: dnsmasq re-reads the hosts file and empties its cache."""
        self.proc.send_signal(signal.SIGHUP)

    def query(self, name: str = SERVICE, timeout: float = 0.5) -> dns.message.Message | None:
        if self.proc.poll() is not None:
            assert self.proc.stderr is not None
            raise AssertionError(
                f"dnsmasq exited {self.proc.returncode}: {self.proc.stderr.read()}"
            )
        try:
            return dns.query.udp(
                dns.message.make_query(name + ".", "A"),
                "127.0.0.1",
                port=self.port,
                timeout=timeout,
            )
        except (dns.exception.Timeout, OSError):
            return None

    def addresses(self, timeout: float = 0.5) -> list[str]:
        answer = self.query(timeout=timeout)
        if answer is None or not answer.answer:
            return []
        return [rd.address for rrset in answer.answer for rd in rrset]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    server = Dnsmasq(require_tool("dnsmasq"), tmp_path)
    try:
        # Short tries: a query sent before dnsmasq binds is lost, not refused.
        until_sync(lambda: server.addresses(timeout=0.1) == [POD_A], 10, "dnsmasq to answer")
        yield server
    finally:
        server.close()


def test_dnsmasq_serves_the_ttl_we_rely_on(dnsmasq: Dnsmasq) -> None:
    answer = dnsmasq.query()
    assert answer is not None
    assert answer.rcode() == dns.rcode.NOERROR
    (rrset,) = answer.answer
    assert rrset.rdtype == dns.rdatatype.A
    assert rrset.ttl == TTL
    # The first search-list expansion of the name, as a pod with ndots 5 tries it.
    missing = dnsmasq.query(f"{SERVICE}.ns1.svc.cluster.local")
    assert missing is not None and missing.rcode() == dns.rcode.NXDOMAIN


def test_rollout_behind_dnsmasq(dnsmasq: Dnsmasq, tmp_path: Path) -> None:
    old_pod, new_pod = pod_pair()
    cfg = tmp_path / "sidelink.yaml"
    listen = free_port()
    cfg.write_text(
        resolver_yaml(dnsmasq.port)
        + "shutdown:\n  drain_delay: 0s\n  drain_timeout: 5s\n"
        + "routes:\n"
        + f'  - name: app1\n    listen: "127.0.0.1:{listen}"\n'
        + f"    service: {SERVICE}\n    port: {old_pod.port}\n    protocol: tcp\n"
    )
    try:
        with sidelink(["run", "-c", str(cfg)]) as proc:
            proc.wait_admin()
            until_sync(lambda: proc.get("/readyz")[0] == 200, 5, "sidelink to resolve via dnsmasq")
            _, routes = proc.get_json("/routes")
            (route,) = cast(list[dict[str, object]], routes["routes"])
            assert route["answered_name"] == SERVICE + "."
            assert route["source"] == "dns"
            old = Client(listen)
            assert old.ask("old") == "A old\n"

            dnsmasq.set_address(POD_B)
            dnsmasq.reload()
            until_sync(lambda: dnsmasq.addresses() == [POD_B], 5, "dnsmasq to serve the new pod")
            switched = time.monotonic()
            until_sync(lambda: ask_once(listen) == "B ping\n", TTL + 1, "traffic to reach pod B")
            assert time.monotonic() - switched <= TTL + 1
            # Every new connection goes to the new pod now; the old one keeps its pod.
            assert [ask_once(listen) for _ in range(5)] == ["B ping\n"] * 5
            assert old.ask("still") == "A still\n"

            # The old pod stays listed, draining, while its connection lives.
            expected = {POD_A: ("draining", 1), POD_B: ("active", 0)}
            until_sync(lambda: endpoints(proc) == expected, 2, f"/routes endpoints {expected}")
            old.close()
            proc.signal(signal.SIGTERM)
            assert proc.wait(5) == 0, proc.stderr()
    finally:
        old_pod.close()
        new_pod.close()
