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


@dataclass(frozen=True)
class NginxModules:
    """How the installed nginx gets its stream (layer 4) module, if at all."""

    stream: bool
    load_line: str  # a ``load_module`` line for a dynamic module, else ""


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


def nginx_proxy(
    tmp: Path,
    *,
    upstream_port: int,
    http_port: int,
    tcp_port: int | None,
    modules: NginxModules,
    nofile: int,
) -> str:
    """NGINX as a reverse proxy: pooled HTTP/1.1 upstream, and a stream proxy if it has one."""
    main, http_common = _nginx_common(tmp, "nginx-proxy", nofile)
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
        "    }\n"
        "}\n" + stream
    )


def haproxy(upstream_port: int, http_port: int, tcp_port: int, maxconn: int) -> str:
    """HAProxy, one thread, no logging: an http frontend reusing server connections, a tcp one."""
    return (
        "global\n"
        "    nbthread 1\n"
        f"    maxconn {maxconn}\n"
        "defaults\n"
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
        f"    server upstream 127.0.0.1:{upstream_port}\n"
    )


def sidelink(dns_port: int, upstream_port: int, http_port: int, tcp_port: int) -> str:
    """sidelink with an http and a tcp route to the upstream, found by a search-list DNS name."""
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
        "    protocol: tcp\n"
    )
