"""The lab: the nginx upstream, the DNS server sidelink resolves it through, and each proxy
under test on its own loopback ports, all inside one temporary directory. With the HTTP/2
suite, also two h2c nginx upstreams (127.0.0.2 and 127.0.0.3, one port) and two gRPC
servers (127.0.0.4 and 127.0.0.5), and an h2c and a gRPC front end on every proxy."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import configs, grpcbench
from benchmarks.h2 import accepts, h2_answers_200, h2_get
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
    # HTTP/2 front ends (None: not run, or this proxy cannot do it here); the direct path's
    # hosts are the first upstream's.
    h2_port: int | None = None
    grpc_port: int | None = None
    h2_host: str = "127.0.0.1"
    grpc_host: str = "127.0.0.1"

    def pids(self) -> list[int]:
        return self.process.tree() if self.process is not None else []


class Lab:
    def __init__(
        self,
        tools: Tools,
        tmp: Path,
        proxies: tuple[str, ...],
        bulk_bytes: int,
        nofile: int,
        *,
        h2: bool = False,
    ) -> None:
        self.tools = tools
        self.h2 = h2
        self.h2_ports: configs.H2Ports | None = None
        self.h2_upstreams: list[Process] = []
        self.grpc_servers: list[Process] = []
        self.tmp = tmp
        self.proxies = proxies
        self.bulk_bytes = bulk_bytes
        self.nofile = nofile
        self.upstream: Process | None = None
        self.dns: ThreadedDnsServer | None = None
        self.targets: list[Target] = []
        self.failed: dict[str, str] = {}  # proxy -> why it did not start
        self.notes: list[str] = []  # about the lab as a whole, for the report
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
        if self.h2 and not nginx_modules(self.tools.nginx).http2:
            # The h2c upstreams are nginx too: without HTTP/2 there is nothing to proxy to.
            self.h2 = False
            self.notes.append("this nginx has no http_v2_module: the HTTP/2 scenarios did not run")
        if self.h2:
            self._start_h2_upstreams()
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
        direct = Target(DIRECT, upstream_port, upstream_port, None)
        if self.h2_ports is not None:
            direct.h2_port, direct.h2_host = self.h2_ports.h2, configs.H2_UPSTREAM_HOSTS[0]
            direct.grpc_port, direct.grpc_host = self.h2_ports.grpc, configs.GRPC_UPSTREAM_HOSTS[0]
        self.targets.append(direct)

    def upstream_pids(self, kind: str) -> list[int]:
        """The direct path's own processes for a kind of scenario: "h1", "h2" or "grpc"."""
        if kind == "h2":
            return self.h2_upstreams[0].tree() if self.h2_upstreams else []
        if kind == "grpc":
            return self.grpc_servers[0].tree() if self.grpc_servers else []
        return self.upstream.tree() if self.upstream is not None else []

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

    def _start_h2_upstreams(self) -> None:
        """Two h2c nginx upstreams, and two gRPC servers when grpcio is installed."""
        h2_port, h1_port, grpc_port = free_ports(3)
        has_grpc = grpcbench.available()
        self.h2_ports = configs.H2Ports(h2_port, h1_port, grpc_port if has_grpc else None)
        for i, host in enumerate(configs.H2_UPSTREAM_HOSTS, 1):
            name = f"h2-upstream{i}"
            config = configs.nginx_h2_upstream(self.tmp, name, host, self.h2_ports, self.nofile)
            process = self._spawn(name, self._nginx_argv(name, config))
            self.h2_upstreams.append(process)
            what = f"the h2c upstream {host}:{h2_port}"
            wait_until(h2_answers_200(host, h2_port), START_TIMEOUT, what, process)
        if not has_grpc:
            return
        for i, host in enumerate(configs.GRPC_UPSTREAM_HOSTS, 1):
            argv = [sys.executable, "-m", "benchmarks.grpcbench", "server"]
            process = self._spawn(
                f"grpc-upstream{i}", [*argv, "--host", host, "--port", str(grpc_port)]
            )
            self.grpc_servers.append(process)
            what = f"the gRPC server {host}:{grpc_port}"
            wait_until(accepts(host, grpc_port), START_TIMEOUT, what, process)

    def _front_ports(self, count: int, h2: bool = True) -> tuple[list[int], int | None, int | None]:
        """``count`` ports for a proxy, and its h2c and gRPC front ends' (None where the lab,
        or the proxy (``h2``), has no such upstream): all taken at once, so all distinct."""
        if self.h2_ports is None or not h2:
            return free_ports(count), None, None
        *ports, h2_port, grpc_port = free_ports(count + 2)
        return ports, h2_port, grpc_port if self.h2_ports.grpc is not None else None

    def _start_sidelink(self, upstream_port: int) -> Target:
        self.dns = ThreadedDnsServer()
        self.dns.start()
        self.dns.set_a(f"{configs.DNS_SERVICE}.{configs.DNS_DOMAIN}", ["127.0.0.1"], ttl=DNS_TTL)
        for service, hosts in (
            (configs.DNS_H2_SERVICE, configs.H2_UPSTREAM_HOSTS),
            (configs.DNS_GRPC_SERVICE, configs.GRPC_UPSTREAM_HOSTS),
        ):
            self.dns.set_a(f"{service}.{configs.DNS_DOMAIN}", list(hosts), ttl=DNS_TTL)
        (http_port, tcp_port, admin_port), h2_port, grpc_port = self._front_ports(3)
        path = self.tmp / "sidelink.yaml"
        path.write_text(
            configs.sidelink(
                self.dns.port,
                upstream_port,
                http_port,
                tcp_port,
                h2_port=h2_port,
                grpc_port=grpc_port,
                h2_ports=self.h2_ports,
            )
        )
        argv = [sys.executable, "-m", "proxy", "run", "-c", str(path)]
        argv += ["--admin", f"127.0.0.1:{admin_port}", "--log-level", "warning"]
        process = self._spawn("sidelink", argv)
        ready = wait_until(
            answers_200(admin_port, "/readyz"), START_TIMEOUT, "sidelink /readyz 200", process
        )
        target = Target("sidelink", http_port, tcp_port, process, startup_s=ready)
        target.h2_port, target.grpc_port = h2_port, grpc_port
        target.notes.append(f"admin 127.0.0.1:{admin_port}")
        self._check_routes(target)
        self.sidelink_admin_port = admin_port
        return target

    def _start_haproxy(self, upstream_port: int) -> Target:
        if self.tools.haproxy is None:
            raise BenchError("haproxy is not installed")
        (http_port, tcp_port), h2_port, grpc_port = self._front_ports(2)
        # HAProxy wants about two descriptors per connection and refuses more than it has.
        maxconn = max(1000, min(configs.MAX_CONNECTIONS, (self.nofile - 100) // 2))
        path = self.tmp / "haproxy.cfg"
        config = configs.haproxy(
            upstream_port,
            http_port,
            tcp_port,
            maxconn,
            h2_port=h2_port,
            grpc_port=grpc_port,
            h2_ports=self.h2_ports,
        )
        path.write_text(config)
        process = self._spawn("haproxy", [self.tools.haproxy, "-f", str(path), "-db"])
        ready = wait_until(answers_200(http_port), START_TIMEOUT, "haproxy answering", process)
        target = Target("haproxy", http_port, tcp_port, process, startup_s=ready)
        target.h2_port, target.grpc_port = h2_port, grpc_port
        self._check_routes(target)
        return target

    def _start_nginx(self, upstream_port: int) -> Target:
        modules = nginx_modules(self.tools.nginx)
        self.nginx_stream = modules.stream
        (http_port, tcp_port), h2_port, grpc_port = self._front_ports(2, h2=modules.http2)
        if not modules.grpc:
            grpc_port = None  # gRPC needs HTTP/2 to the upstream: grpc_pass
        config = configs.nginx_proxy(
            self.tmp,
            upstream_port=upstream_port,
            http_port=http_port,
            tcp_port=tcp_port if modules.stream else None,
            modules=modules,
            nofile=self.nofile,
            h2_port=h2_port,
            grpc_port=grpc_port,
            h2_ports=self.h2_ports,
        )
        process = self._spawn("nginx-proxy", self._nginx_argv("nginx-proxy", config))
        ready = wait_until(answers_200(http_port), START_TIMEOUT, "nginx answering", process)
        target = Target(
            "nginx", http_port, tcp_port if modules.stream else None, process, startup_s=ready
        )
        target.h2_port, target.grpc_port = h2_port, grpc_port
        if not modules.stream:
            target.notes.append(f"no nginx stream module: tcp n/a ({STREAM_HINT})")
        if self.h2_ports is not None and not modules.http2:
            target.notes.append("this nginx has no HTTP/2 (http_v2_module): h2 n/a")
        elif self.h2_ports is not None and not modules.grpc:
            target.notes.append("no grpc_pass in this nginx: h2c upstream over HTTP/1.1, gRPC n/a")
        elif self.h2_ports is not None:
            target.notes.append("h2c and gRPC upstream via grpc_pass (HTTP/2, no multiplexing)")
        self._check_routes(target)
        return target

    def _check_routes(self, target: Target) -> None:
        """Both routes carry a request before any measurement starts. The h2c front end is
        asked once: one that does not answer is noted, and its scenarios show the errors."""
        for port in (target.http_port, target.tcp_port):
            if port is not None:
                what = f"{target.name} 127.0.0.1:{port} answering 200"
                wait_until(answers_200(port), START_TIMEOUT, what, target.process)
        if target.h2_port is not None:
            answer = h2_get(target.h2_host, target.h2_port)
            if answer != 200:
                target.notes.append(f"h2c GET / on 127.0.0.1:{target.h2_port}: {answer}")
