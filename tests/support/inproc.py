"""sidelink in this process: a server on free ports, its config text, its addresses."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator, Iterator, Sequence

from proxy.cli import settle_collector
from proxy.config import Overrides, parse
from proxy.server import Server

from .wait import until


def resolver_yaml(dns_port: int, **extra: object) -> str:
    """A resolver section naming the in-process DNS server, with a pod's search list."""
    lines = [
        "resolver:",
        f'  nameservers: ["127.0.0.1:{dns_port}"]',
        "  search: [ns1.svc.cluster.local, svc.cluster.local, cluster.local]",
        "  ndots: 5",
        "  timeout: 500ms",
    ]
    lines += [f"  {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def collector_as_served() -> Iterator[None]:
    """The garbage collector as `sidelink run` sets it once serving, for a test that times
    requests: what the test process already holds (pytest, every module it loaded) frozen,
    so an oldest-generation collection walks only what the test made. Unfrozen on exit."""
    thresholds = gc.get_threshold()
    settle_collector()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


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


def route_address(server: Server, name: str | None = None) -> tuple[str, int]:
    """Where a route listens (the first route's when no name is given)."""
    route = server.routes[name] if name else next(iter(server.routes.values()))
    assert route.bound is not None
    return route.bound


async def no_connections(
    server: Server, route: str = "app1", *, upstream: bool = False, timeout: float = 5.0
) -> None:
    """Wait until the route holds no downstream connection (with upstream, none upstream either).

    HTTP keeps idle upstream connections pooled, so only TCP asks for upstream=True.
    """
    r = server.routes[route]
    stats = r.stats
    what = "no connections" if upstream else "no downstream connections"
    await until(
        lambda: (
            not r.connections
            and stats.active_downstream == 0
            and (not upstream or stats.active_upstream == 0)
        ),
        timeout,
        f"route {route} to have {what}",
    )
