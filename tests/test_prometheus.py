"""Interop: a real Prometheus server scrapes sidelink's /metrics and can query the series."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

from support.inproc import resolver_yaml, running_server
from support.procs import free_port, require_tool

from proxy.dnsserver import DnsServer


def _query(port: int, expr: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=2) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    result: list[dict[str, object]] = body["data"]["result"]
    return result


async def test_prometheus_scrapes_sidelink(tmp_path: Path, dns: DnsServer) -> None:
    binary = require_tool("prometheus")
    dns.set_a("app1.ns1.svc.cluster.local", ["127.0.0.2"], ttl=5)
    async with running_server(resolver_yaml(dns.port), routes=["0=app1:9/tcp"]) as server:
        assert server.admin_address is not None
        admin_port = server.admin_address[1]
        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
            "scrape_configs:\n  - job_name: sidelink\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{admin_port}']\n"
        )
        proc = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            async def series(expr: str) -> list[dict[str, object]]:
                try:
                    return await asyncio.to_thread(_query, prom_port, expr)
                except OSError:
                    return []

            found: list[dict[str, object]] = []

            async def scraped() -> bool:
                found[:] = await series('up{job="sidelink"} == 1')
                return bool(found)

            deadline = asyncio.get_running_loop().time() + 30
            while not await scraped():
                assert asyncio.get_running_loop().time() < deadline, "prometheus never scraped"
                await asyncio.sleep(0.2)
            info = await series("sidelink_build_info")
            assert info and info[0]["metric"]["version"] == "0.1.0"  # type: ignore[index]
            assert info[0]["metric"]["build"] in ("compiled", "python")  # type: ignore[index]
            ok = await series('sidelink_dns_lookups_total{service="app1",result="ok"} >= 1')
            assert ok, "the DNS lookups were counted and scraped"
            opened = await series('sidelink_connections_opened_total{side="downstream"}')
            assert opened, "per-route series are scraped"
            assert proc.returncode is None, "prometheus is still running"
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
