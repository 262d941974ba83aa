"""The benchmark's child processes, and what /proc says about them: CPU time and memory."""

from __future__ import annotations

import http.client
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO

CLK_TCK = os.sysconf("SC_CLK_TCK")
# A stopped process gets this long after SIGTERM before its process group is killed.
STOP_TIMEOUT = 5.0
# How often a wait re-checks its condition.
POLL_INTERVAL = 0.005
# Enough descriptors for 1,000 idle client sockets plus the proxies' upstream sides;
# children inherit the limit, so the proxies get it too.
WANTED_NOFILE = 65536


class BenchError(Exception):
    """Something the benchmark itself needs failed: a process did not start, a tool broke."""


def raise_nofile_limit(wanted: int = WANTED_NOFILE) -> int:
    """Raise RLIMIT_NOFILE to ``wanted`` (root may raise the hard limit too); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(wanted, hard)), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (all held open together so they are distinct)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Process:
    """One child process in its own session, its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.env = env  # None: this process's own environment
        self.started_at = 0.0
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        state = "not started" if self._popen is None else f"pid={self.pid} alive={self.alive}"
        return f"<Process {self.name} {state}>"

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise BenchError(f"{self.name} was never started")
        return self._popen.pid

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self._popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            env=self.env,
            # Its own process group, so stop() can end exactly this process and its workers.
            start_new_session=True,
        )

    def tree(self) -> list[int]:
        """This process and its descendants (nginx: the master and its worker)."""
        return [self.pid, *descendants(self.pid)]

    def stop(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self._popen.pid, signal.SIGKILL)
                self._popen.wait(STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name, which may hold spaces and parentheses."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of the processes (not of their reaped children)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        # Fields 14 and 15 of stat(5) (utime, stime); the slice starts at field 3.
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {key}")


def rss_bytes(pids: Iterable[int]) -> int:
    """Summed VmRSS (shared pages of an nginx master and worker count twice)."""
    return sum(_status_kib(pid, "VmRSS") for pid in pids) * 1024


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, process: Process | None = None
) -> float:
    """Poll ``check`` until it holds; return the seconds it took. Fails fast if ``process`` dies."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if check():
            return time.monotonic() - start
        if process is not None and not process.alive:
            raise BenchError(
                f"{process.name} exited while waiting for {what}:\n{process.log_tail()}"
            )
        if time.monotonic() > deadline:
            tail = f":\n{process.log_tail()}" if process is not None else ""
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}{tail}")
        time.sleep(POLL_INTERVAL)


def http_get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes] | None:
    """One GET on a fresh connection to 127.0.0.1: (status, body), or None if it failed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def answers_200(port: int, path: str = "/") -> Callable[[], bool]:
    def check() -> bool:
        result = http_get(port, path, timeout=1.0)
        return result is not None and result[0] == 200

    return check


def machine_cpu_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy since boot, and of those stolen by the host."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that were waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])
