"""Shared test helpers: waiting on conditions, free ports, sidelink in-process and as a process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Overrides, parse
from proxy.server import Server

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    """The path of a system tool; skip without it, except in CI where it must be present."""
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} not installed")
    return path


async def until(condition: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Wait for condition() to be true, polling; fail with `what` after the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.01)


def until_sync(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.02)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def resolver_yaml(dns_port: int, **extra: object) -> str:
    lines = [
        "resolver:",
        f'  nameservers: ["127.0.0.1:{dns_port}"]',
        "  search: [ns1.svc.cluster.local, svc.cluster.local, cluster.local]",
        "  ndots: 5",
        "  timeout: 500ms",
    ]
    lines += [f"  {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def running_server(
    text: str | None = None, routes: Sequence[str] = (), environ: dict[str, str] | None = None
) -> AsyncIterator[Server]:
    """sidelink in this process, admin on a free port; shut down (at once) on exit."""
    config = parse(text, "test.yaml", routes, overrides=Overrides(admin="127.0.0.1:0"))
    async with serving(Server(config, environ=environ if environ is not None else {})) as server:
        yield server


@contextlib.asynccontextmanager
async def serving(server: Server) -> AsyncIterator[Server]:
    """Start server; on exit shut it down at once (a second shutdown skips the drain)."""
    await server.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.shutdown()
        await server.serve_until_shutdown()


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of the Prometheus exposition, as a scraper would read it."""
    body, _ = server.metrics.render(None)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels} in\n{body.decode()}")


def route_address(server: Server, name: str | None = None) -> tuple[str, int]:
    route = server.routes[name] if name else next(iter(server.routes.values()))
    assert route.bound is not None
    return route.bound


class Sidelink:
    """sidelink as a subprocess (`python -m proxy ...`), for lifecycle and CLI tests."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.admin_port = free_port()
        full_env = {**os.environ, **(env or {})}
        full_env.pop("SIDELINK_CONFIG", None) if "SIDELINK_CONFIG" not in (env or {}) else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args, "--admin", f"127.0.0.1:{self.admin_port}"],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def get_json(self, path: str) -> tuple[int, dict[str, object]]:
        status, body = self.get(path)
        return status, json.loads(body)

    def wait_admin(self, timeout: float = 10.0) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidelink exited {self.proc.returncode}: {self.stderr()}")
            try:
                return self.get("/healthz", timeout=0.5)[0] == 200
            except OSError:
                return False

        until_sync(up, timeout, "the admin server")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def sidelink(args: Sequence[str], env: dict[str, str] | None = None) -> Iterator[Sidelink]:
    proc = Sidelink(args, env)
    try:
        yield proc
    finally:
        proc.close()


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def settled(value: Callable[[], int], quiet: float = 0.3, timeout: float = 10.0) -> int:
    """Wait until value() has not changed for `quiet` seconds; return it."""
    last = value()
    since = time.monotonic()

    def still() -> bool:
        nonlocal last, since
        now = value()
        if now != last:
            last, since = now, time.monotonic()
            return False
        return time.monotonic() - since >= quiet

    await until(still, timeout, "the transfer to stall")
    return last


# --- pods and clients (threads, for the subprocess tests) -----------------------------


class _EchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        tag = cast(EchoServer, self.server).tag
        for line in self.rfile:
            self.wfile.write(tag + line)


class EchoServer(socketserver.ThreadingTCPServer):
    """A pod on a loopback address: answers every line with its tag and the line."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, tag: bytes, port: int = 0) -> None:
        self.tag = tag
        super().__init__((host, port), _EchoHandler)
        self.port: int = self.server_address[1]
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class Client:
    """A downstream connection to a sidelink listener, speaking the echo servers' lines."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.reader = self.sock.makefile("rb")

    def ask(self, text: str = "ping") -> str:
        self.sock.sendall(text.encode() + b"\n")
        return self.reader.readline().decode()

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
