"""Config files of the upstream and of every proxy under test, rendered as text.

Each proxy gets the settings an operator would use for a fair fight on one core:
one worker/thread, upstream keep-alive, no access logging, generous limits. Every
proxy forwards to the same nginx upstream; its TCP route/frontend forwards to the
same nginx port, so "tcp" scenarios are HTTP spoken through a layer-4 proxy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The body the upstream answers every small request with: exactly 100 bytes.
SMALL_BODY = ("sidelink benchmark upstream response " * 3)[:99] + "\n"
BULK_NAME = "bulk.bin"
# Connections a single nginx worker or HAProxy accepts; well above the 1,000 idle sockets.
MAX_CONNECTIONS = 20000
# Neither proxy nor upstream should close a busy keep-alive connection mid-run.
KEEPALIVE_REQUESTS = 100_000_000
DNS_DOMAIN = "bench.svc.cluster.local"
DNS_SERVICE = "bench-upstream"


DNS_H2_SERVICE = "bench-h2-upstream"
DNS_GRPC_SERVICE = "bench-grpc-upstream"
# The two HTTP/2 upstreams and the two gRPC servers: one port each pair, two loopback
# addresses, so a proxy (and sidelink's DNS answer) has two endpoints to balance over.
H2_UPSTREAM_HOSTS = ("127.0.0.2", "127.0.0.3")
GRPC_UPSTREAM_HOSTS = ("127.0.0.4", "127.0.0.5")
# Streams the upstreams accept on one connection: above any proxy's own per-connection limit.
H2_UPSTREAM_STREAMS = 1000
# sidelink's HTTP/2 settings for the h2 and gRPC routes (the configuration).
H2_MAX_CONCURRENT_STREAMS = 256
H2_MAX_STREAMS_PER_CONNECTION = 100
# Idle upstream connections NGINX keeps per worker: one per stream in flight (no multiplexing).
NGINX_H2_KEEPALIVE = 1024


@dataclass(frozen=True)
class NginxModules:
    """How the installed nginx gets its stream (layer 4) module, if at all, and whether it
    speaks HTTP/2 (``listen ... http2``) and has grpc_pass (HTTP/2 to upstreams)."""

    stream: bool
    load_line: str  # a ``load_module`` line for a dynamic module, else ""
    http2: bool = True
    grpc: bool = True


@dataclass(frozen=True)
class H2Ports:
    """Where the HTTP/2 side of the lab listens: the proxies' h2 and gRPC front ports are
    chosen per proxy; these are the upstreams' (same port on each of two addresses)."""

    h2: int  # the h2c upstreams, on H2_UPSTREAM_HOSTS
    h1: int  # the same upstreams over HTTP/1.1, for an NGINX without grpc_pass
    grpc: int | None  # the gRPC servers on GRPC_UPSTREAM_HOSTS; None without grpcio


def _nginx_common(tmp: Path, name: str, nofile: int) -> tuple[str, str]:
    """The main-context lines and the http-context lines every nginx here shares."""
    # Temp paths inside our directory: the Debian defaults may be unwritable or shared.
    temp = tmp / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\n"
        f"worker_rlimit_nofile {nofile};\n"
        f"pid {tmp / name}.pid;\n"
        f"error_log {tmp / name}.error.log warn;\n"
        f"events {{ worker_connections {MAX_CONNECTIONS}; }}\n"
    ), (
        f"    client_body_temp_path {temp}/body;\n"
        f"    proxy_temp_path {temp}/proxy;\n"
        f"    fastcgi_temp_path {temp}/fastcgi;\n"
        f"    uwsgi_temp_path {temp}/uwsgi;\n"
        f"    scgi_temp_path {temp}/scgi;\n"
        "    access_log off;\n"
        f"    keepalive_requests {KEEPALIVE_REQUESTS};\n"
        "    keepalive_timeout 300s;\n"
    )


def nginx_upstream(tmp: Path, www: Path, port: int, nofile: int) -> str:
    """The upstream: 200 with a 100-byte body on every path, and a 1 GiB file by sendfile."""
    main, http_common = _nginx_common(tmp, "upstream", nofile)
    return (
        main + "http {\n" + http_common + "    sendfile on;\n"
        "    tcp_nopush on;\n"
        "    default_type application/octet-stream;\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port} backlog=4096;\n"
        f"        root {www};\n"
        f"        location = /{BULK_NAME} {{ }}\n"
        f'        location / {{ default_type text/plain; return 200 "{SMALL_BODY}"; }}\n'
        "    }\n"
        "}\n"
    )


def nginx_h2_upstream(tmp: Path, name: str, host: str, ports: H2Ports, nofile: int) -> str:
    """One HTTP/2 upstream: h2c (prior knowledge) on ``host:ports.h2``, HTTP/1.1 on ports.h1;
    200 with the 100-byte body on every path."""
    main, http_common = _nginx_common(tmp, name, nofile)
    answer = f'location / {{ default_type text/plain; return 200 "{SMALL_BODY}"; }}'
    return (
        main
        + "http {\n"
        + http_common
        + f"    http2_max_concurrent_streams {H2_UPSTREAM_STREAMS};\n"
        "    server {\n"
        f"        listen {host}:{ports.h2} http2 backlog=4096;\n"
        f"        {answer}\n"
        "    }\n"
        "    server {\n"
        f"        listen {host}:{ports.h1} backlog=4096;\n"
        f"        {answer}\n"
        "    }\n"
        "}\n"
    )


def _nginx_h2_servers(
    h2_port: int | None, grpc_port: int | None, ports: H2Ports | None, grpc: bool
) -> str:
    """NGINX's HTTP/2 front ends: h2c on ``h2_port`` (grpc_pass to the h2c upstreams where
    this nginx has it, else HTTP/1.1 to them) and gRPC on ``grpc_port`` (grpc_pass)."""
    if ports is None or h2_port is None:
        return ""
    keepalive = (
        f"        keepalive {NGINX_H2_KEEPALIVE};\n"
        f"        keepalive_requests {KEEPALIVE_REQUESTS};\n"
        "        keepalive_timeout 300s;\n"
    )
    upstream_port = ports.h2 if grpc else ports.h1
    text = "    upstream bench_h2 {\n"
    text += "".join(f"        server {host}:{upstream_port};\n" for host in H2_UPSTREAM_HOSTS)
    text += keepalive + "    }\n"
    if grpc:
        forward = "grpc_pass grpc://bench_h2;"
    else:
        forward = (
            'proxy_pass http://bench_h2; proxy_http_version 1.1; proxy_set_header Connection "";'
        )
    text += (
        "    server {\n"
        f"        listen 127.0.0.1:{h2_port} http2 backlog=4096;\n"
        f"        http2_max_concurrent_streams {H2_MAX_CONCURRENT_STREAMS};\n"
        f"        location / {{ {forward} }}\n"
        "    }\n"
    )
    if grpc and grpc_port is not None and ports.grpc is not None:
        text += "    upstream bench_grpc {\n"
        text += "".join(f"        server {host}:{ports.grpc};\n" for host in GRPC_UPSTREAM_HOSTS)
        text += keepalive + "    }\n"
        text += (
            "    server {\n"
            f"        listen 127.0.0.1:{grpc_port} http2 backlog=4096;\n"
            f"        http2_max_concurrent_streams {H2_MAX_CONCURRENT_STREAMS};\n"
            "        location / { grpc_pass grpc://bench_grpc; }\n"
            "    }\n"
        )
    return text


def nginx_proxy(
    tmp: Path,
    *,
    upstream_port: int,
    http_port: int,
    tcp_port: int | None,
    modules: NginxModules,
    nofile: int,
    h2_port: int | None = None,
    grpc_port: int | None = None,
    h2_ports: H2Ports | None = None,
) -> str:
    """NGINX as a reverse proxy: pooled HTTP/1.1 upstream, and a stream proxy if it has one;
    with ``h2_ports``, HTTP/2 front ends too (see _nginx_h2_servers)."""
    main, http_common = _nginx_common(tmp, "nginx-proxy", nofile)
    h2 = _nginx_h2_servers(h2_port, grpc_port, h2_ports, modules.grpc) if modules.http2 else ""
    stream = ""
    if tcp_port is not None:
        stream = (
            "stream {\n"
            "    server {\n"
            f"        listen 127.0.0.1:{tcp_port} backlog=4096;\n"
            f"        proxy_pass 127.0.0.1:{upstream_port};\n"
            "    }\n"
            "}\n"
        )
    return (
        modules.load_line + main + "http {\n" + http_common + "    upstream bench_upstream {\n"
        f"        server 127.0.0.1:{upstream_port};\n"
        "        keepalive 64;\n"
        f"        keepalive_requests {KEEPALIVE_REQUESTS};\n"
        "        keepalive_timeout 300s;\n"
        "    }\n"
        "    server {\n"
        f"        listen 127.0.0.1:{http_port} backlog=4096;\n"
        "        location / {\n"
        "            proxy_pass http://bench_upstream;\n"
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        # Stream the 1 GiB body through memory buffers instead of spooling it to disk.
        "            proxy_max_temp_file_size 0;\n"
        "        }\n"
        "    }\n" + h2 + "}\n" + stream
    )


def _haproxy_h2(name: str, port: int, hosts: tuple[str, ...], upstream_port: int) -> str:
    """An HTTP/2 frontend (h2c prior knowledge) and its backend speaking HTTP/2 to ``hosts``."""
    servers = "".join(
        f"    server {name}{i} {host}:{upstream_port} proto h2\n" for i, host in enumerate(hosts, 1)
    )
    return (
        f"frontend fe_{name}\n"
        f"    bind 127.0.0.1:{port} proto h2\n"
        f"    default_backend be_{name}\n"
        f"backend be_{name}\n"
        "    http-reuse always\n" + servers
    )


def haproxy(
    upstream_port: int,
    http_port: int,
    tcp_port: int,
    maxconn: int,
    *,
    h2_port: int | None = None,
    grpc_port: int | None = None,
    h2_ports: H2Ports | None = None,
) -> str:
    """HAProxy, one thread, no logging: an http frontend reusing server connections, a tcp one;
    with ``h2_ports``, HTTP/2 frontends (``proto h2`` on both sides) for h2c and gRPC."""
    h2 = ""
    if h2_ports is not None and h2_port is not None:
        h2 += _haproxy_h2("h2", h2_port, H2_UPSTREAM_HOSTS, h2_ports.h2)
        if grpc_port is not None and h2_ports.grpc is not None:
            h2 += _haproxy_h2("grpc", grpc_port, GRPC_UPSTREAM_HOSTS, h2_ports.grpc)
    streams = f"    tune.h2.max-concurrent-streams {H2_MAX_CONCURRENT_STREAMS}\n" if h2 else ""
    return (
        "global\n"
        "    nbthread 1\n"
        f"    maxconn {maxconn}\n" + streams + "defaults\n"
        "    mode http\n"
        "    timeout connect 5s\n"
        "    timeout client 300s\n"
        "    timeout server 300s\n"
        "    timeout http-keep-alive 300s\n"
        "frontend fe_http\n"
        f"    bind 127.0.0.1:{http_port}\n"
        "    default_backend be_http\n"
        "backend be_http\n"
        "    http-reuse always\n"
        f"    server upstream 127.0.0.1:{upstream_port}\n"
        "frontend fe_tcp\n"
        "    mode tcp\n"
        f"    bind 127.0.0.1:{tcp_port}\n"
        "    default_backend be_tcp\n"
        "backend be_tcp\n"
        "    mode tcp\n"
        f"    server upstream 127.0.0.1:{upstream_port}\n" + h2
    )


def _sidelink_h2_route(name: str, port: int, service: str, upstream_port: int) -> str:
    return (
        f"  - name: {name}\n"
        f'    listen: "127.0.0.1:{port}"\n'
        f"    service: {service}\n"
        f"    port: {upstream_port}\n"
        "    protocol: http\n"
        "    upstream_protocol: auto\n"
        "    http2:\n"
        f"      max_concurrent_streams: {H2_MAX_CONCURRENT_STREAMS}\n"
        f"      max_streams_per_connection: {H2_MAX_STREAMS_PER_CONNECTION}\n"
    )


def sidelink(
    dns_port: int,
    upstream_port: int,
    http_port: int,
    tcp_port: int,
    *,
    h2_port: int | None = None,
    grpc_port: int | None = None,
    h2_ports: H2Ports | None = None,
) -> str:
    """sidelink with an http and a tcp route to the upstream, found by a search-list DNS name;
    with ``h2_ports``, http routes whose services are the two h2c upstreams and the two gRPC
    servers (HTTP/2 is detected on an http route's port; ``upstream_protocol: auto`` sends
    it upstream as HTTP/2)."""
    h2 = ""
    if h2_ports is not None and h2_port is not None:
        h2 += _sidelink_h2_route("bench-h2", h2_port, DNS_H2_SERVICE, h2_ports.h2)
        if grpc_port is not None and h2_ports.grpc is not None:
            h2 += _sidelink_h2_route("bench-grpc", grpc_port, DNS_GRPC_SERVICE, h2_ports.grpc)
    return (
        "resolver:\n"
        f'  nameservers: ["127.0.0.1:{dns_port}"]\n'
        f"  search: [{DNS_DOMAIN}]\n"
        "  ndots: 5\n"
        "logging:\n"
        "  level: warning\n"
        "  access_log: false\n"
        "shutdown:\n"
        "  drain_delay: 0s\n"
        "  drain_timeout: 2s\n"
        "routes:\n"
        "  - name: bench-http\n"
        f'    listen: "127.0.0.1:{http_port}"\n'
        f"    service: {DNS_SERVICE}\n"
        f"    port: {upstream_port}\n"
        "    protocol: http\n"
        "  - name: bench-tcp\n"
        f'    listen: "127.0.0.1:{tcp_port}"\n'
        f"    service: {DNS_SERVICE}\n"
        f"    port: {upstream_port}\n"
        "    protocol: tcp\n" + h2
    )
