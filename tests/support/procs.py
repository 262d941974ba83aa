"""Processes: sidelink as a subprocess, the system tools interop tests need, free ports.

Also this process's own memory (RSS), which the streaming tests bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from .wait import until_sync

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


# Every port free_port has handed out in this run: the kernel may give a port just closed
# to the next bind, and two ports asked for one after the other (a route's, then the
# admin's) came back the same.
_HANDED_OUT: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at host now: for a process to bind, or to be refused on.
    Never one it gave before in this run."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if (host, port) not in _HANDED_OUT:
            _HANDED_OUT.add((host, port))
            return port


def clean_environ() -> dict[str, str]:
    """This process's environment without SIDELINK_*: a developer's settings stay out of tests."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SIDELINK_")}


class Sidelink:
    """sidelink as a subprocess (`python -m proxy ...`), for lifecycle and CLI tests."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.admin_port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args, "--admin", f"127.0.0.1:{self.admin_port}"],
            env={**clean_environ(), **(env or {})},
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
    """This process's resident memory, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@contextlib.contextmanager
def peak_rss() -> Iterator[Callable[[], int]]:
    """The highest RSS seen while the block runs, sampled from a thread (not the loop)."""
    peak = rss()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.01):
            peak = max(peak, rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak
    finally:
        stop.set()
        thread.join()
