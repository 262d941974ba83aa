"""The lab: the nginx upstream, the DNS server sidelink resolves it through, and each proxy
under test on its own loopback ports, all inside one temporary directory."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import configs
from benchmarks.procs import BenchError, Process, answers_200, free_ports, wait_until
from benchmarks.tools import STREAM_HINT, Tools, nginx_modules
from proxy.dnsserver import ThreadedDnsServer

PROXIES = ("sidelink", "haproxy", "nginx")
DIRECT = "direct"
START_TIMEOUT = 30.0
DNS_TTL = 30
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Target:
    """One thing wrk points at: a proxy's listeners, or the upstream itself (direct)."""

    name: str
    http_port: int
    tcp_port: int | None  # None: this proxy cannot do tcp here
    process: Process | None  # None for the direct path, whose process is the upstream's
    startup_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def pids(self) -> list[int]:
        return self.process.tree() if self.process is not None else []


class Lab:
    def __init__(
        self, tools: Tools, tmp: Path, proxies: tuple[str, ...], bulk_bytes: int, nofile: int
    ) -> None:
        self.tools = tools
        self.tmp = tmp
        self.proxies = proxies
        self.bulk_bytes = bulk_bytes
        self.nofile = nofile
        self.upstream: Process | None = None
        self.dns: ThreadedDnsServer | None = None
        self.targets: list[Target] = []
        self.failed: dict[str, str] = {}  # proxy -> why it did not start
        self.nginx_stream = False
        self.sidelink_admin_port: int | None = None
        self._processes: list[Process] = []

    @property
    def bulk_path(self) -> str:
        return f"/{configs.BULK_NAME}"

    def target(self, name: str) -> Target:
        for target in self.targets:
            if target.name == name:
                return target
        raise KeyError(name)

    def start(self) -> None:
        """Upstream first, then each proxy alone, so each startup time is measured unloaded."""
        self.tmp.chmod(0o755)  # nginx workers may run as another user and must read www/
        upstream_port = self._start_upstream()
        for name in self.proxies:
            start = getattr(self, f"_start_{name}")
            try:
                self.targets.append(start(upstream_port))
            except BenchError as e:
                # One broken proxy must not hide the others' numbers: report it and go on.
                self.failed[name] = str(e)
                for process in self._processes:
                    if process.name.startswith(name):
                        process.stop()
        self.targets.append(Target(DIRECT, upstream_port, upstream_port, None))

    def stop(self) -> None:
        for process in reversed(self._processes):
            process.stop()
        if self.dns is not None:
            self.dns.stop()
            self.dns = None

    def _spawn(self, name: str, argv: list[str]) -> Process:
        process = Process(name, argv, self.tmp / f"{name}.log", cwd=REPO)
        self._processes.append(process)
        process.start()
        return process

    def _nginx_argv(self, name: str, config: str) -> list[str]:
        path = self.tmp / f"{name}.conf"
        path.write_text(config)
        return [
            self.tools.nginx,
            "-p",
            str(self.tmp),
            "-c",
            str(path),
            "-e",
            str(self.tmp / f"{name}.error.log"),
            "-g",
            "daemon off;",
        ]

    def _start_upstream(self) -> int:
        www = self.tmp / "www"
        www.mkdir()
        www.chmod(0o755)
        bulk = www / configs.BULK_NAME
        # Sparse: instant to create, and served from the page cache after the first read.
        with bulk.open("wb") as f:
            f.truncate(self.bulk_bytes)
        bulk.chmod(0o644)
        (port,) = free_ports(1)
        config = configs.nginx_upstream(self.tmp, www, port, self.nofile)
        self.upstream = self._spawn("upstream", self._nginx_argv("upstream", config))
        wait_until(answers_200(port), START_TIMEOUT, "the nginx upstream", self.upstream)
        return port

    def _start_sidelink(self, upstream_port: int) -> Target:
        self.dns = ThreadedDnsServer()
        self.dns.start()
        self.dns.set_a(f"{configs.DNS_SERVICE}.{configs.DNS_DOMAIN}", ["127.0.0.1"], ttl=DNS_TTL)
        http_port, tcp_port, admin_port = free_ports(3)
        path = self.tmp / "sidelink.yaml"
        path.write_text(configs.sidelink(self.dns.port, upstream_port, http_port, tcp_port))
        argv = [sys.executable, "-m", "proxy", "run", "-c", str(path)]
        argv += ["--admin", f"127.0.0.1:{admin_port}", "--log-level", "warning"]
        process = self._spawn("sidelink", argv)
        ready = wait_until(
            answers_200(admin_port, "/readyz"), START_TIMEOUT, "sidelink /readyz 200", process
        )
        target = Target("sidelink", http_port, tcp_port, process, startup_s=ready)
        target.notes.append(f"admin 127.0.0.1:{admin_port}")
        self._check_routes(target)
        self.sidelink_admin_port = admin_port
        return target

    def _start_haproxy(self, upstream_port: int) -> Target:
        if self.tools.haproxy is None:
            raise BenchError("haproxy is not installed")
        http_port, tcp_port = free_ports(2)
        # HAProxy wants about two descriptors per connection and refuses more than it has.
        maxconn = max(1000, min(configs.MAX_CONNECTIONS, (self.nofile - 100) // 2))
        path = self.tmp / "haproxy.cfg"
        path.write_text(configs.haproxy(upstream_port, http_port, tcp_port, maxconn))
        process = self._spawn("haproxy", [self.tools.haproxy, "-f", str(path), "-db"])
        ready = wait_until(answers_200(http_port), START_TIMEOUT, "haproxy answering", process)
        target = Target("haproxy", http_port, tcp_port, process, startup_s=ready)
        self._check_routes(target)
        return target

    def _start_nginx(self, upstream_port: int) -> Target:
        modules = nginx_modules(self.tools.nginx)
        self.nginx_stream = modules.stream
        http_port, tcp_port = free_ports(2)
        config = configs.nginx_proxy(
            self.tmp,
            upstream_port=upstream_port,
            http_port=http_port,
            tcp_port=tcp_port if modules.stream else None,
            modules=modules,
            nofile=self.nofile,
        )
        process = self._spawn("nginx-proxy", self._nginx_argv("nginx-proxy", config))
        ready = wait_until(answers_200(http_port), START_TIMEOUT, "nginx answering", process)
        target = Target(
            "nginx", http_port, tcp_port if modules.stream else None, process, startup_s=ready
        )
        if not modules.stream:
            target.notes.append(f"no nginx stream module: tcp n/a ({STREAM_HINT})")
        self._check_routes(target)
        return target

    def _check_routes(self, target: Target) -> None:
        """Both routes carry a request before any measurement starts."""
        for port in (target.http_port, target.tcp_port):
            if port is not None:
                what = f"{target.name} 127.0.0.1:{port} answering 200"
                wait_until(answers_200(port), START_TIMEOUT, what, target.process)
