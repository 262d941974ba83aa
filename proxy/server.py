"""One object that owns the routes, their listeners, the admin server and the lifecycle.

Shutdown runs in order: readiness off -> keep serving for ``drain_delay`` -> stop
accepting -> idle connections close, busy ones finish -> wait up to
``drain_timeout`` -> abort the rest. :meth:`Server.shutdown` is the trigger, so
tests fire it directly and ``cli.py`` wires it to SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from proxy import __version__, admin, build
from proxy.addr import join_host_port
from proxy.config import Config, ConfigError, ConfigSource, RouteConfig
from proxy.http.h1 import downstream_factory
from proxy.logs import configure_logging
from proxy.metrics import NO_METRICS, Metrics
from proxy.resolver import Resolver
from proxy.route import Route
from proxy.tcp import TcpDownstream

# For each route protocol: the factory of a route's downstream connections.
FORWARDERS: dict[str, Callable[[Route], Callable[[], asyncio.Protocol]]] = {
    "tcp": lambda route: lambda: TcpDownstream(route),
    "http": downstream_factory,
}

log = logging.getLogger("sidelink.server")

# How often the config file is checked for a change on disk (a ConfigMap update
# swaps a symlink, which inotify on the file itself would miss).
CONFIG_POLL_INTERVAL = 1.0
# How often routes replaced by a reload are checked for their last connection.
RETIRED_SWEEP_INTERVAL = 0.5
# A reload error's log line is cut here (a MemoryError's or a bug's text may be huge).
MAX_ERROR_CHARS = 500


class StartupError(Exception):
    """Something outside the config stopped the server from starting (a port in use)."""


class BindError(OSError):
    """A listener that cannot bind, said in one line: who, where, why."""

    @classmethod
    def of(cls, e: OSError, who: str, address: str) -> BindError:
        why = os.strerror(e.errno) if e.errno else str(e)
        return cls(e.errno, f"{who}: cannot listen on {address}: {why}")

    def __str__(self) -> str:
        return str(self.strerror)


class Acceptor:
    """A listener's protocol factory; a reload may point it at a new Route in place."""

    def __init__(self, route: Route) -> None:
        self.point(route)

    def point(self, route: Route) -> None:
        """New connections go to ``route`` from now on."""
        self.route = route
        self._factory = FORWARDERS[route.config.protocol](route)

    def __call__(self) -> asyncio.Protocol:
        return self._factory()


class Server:
    def __init__(
        self,
        config: Config,
        source: ConfigSource | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.config = config
        self.source = source
        self.environ = environ
        self.metrics = Metrics()
        self.resolver = Resolver(config.resolver, self.metrics, environ)
        self.routes: dict[str, Route] = {}
        self.acceptors: dict[str, Acceptor] = {}
        self.retired: list[Route] = []  # replaced by a reload, finishing their connections
        self.draining = False
        self.admin_address: tuple[str, int] | None = None
        self._admin: admin.AdminServer | None = None
        self._shutdown_requested = asyncio.Event()
        self._force = asyncio.Event()
        self._done = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        # The config file as last read, by whichever trigger: the poller compares with this.
        self._file_seen: tuple[str, int, int, int] | None = None

    def __repr__(self) -> str:
        return f"<Server routes={len(self.routes)} draining={self.draining}>"

    # --- start -------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener now (traffic waits for DNS inside the forwarders)."""
        try:
            for rc in self.config.routes:
                await self._add_route(rc)
            self._admin = admin.AdminServer(self)
            try:
                self.admin_address = await self._admin.start(
                    self.config.admin.host, self.config.admin.port
                )
            except OSError as e:
                raise BindError.of(e, "admin", self.config.admin.listen) from e
        except OSError as e:
            await self._close_everything()
            raise StartupError(str(e)) from e
        if self.source is not None and self.source.path is not None:
            self._file_seen = _file_signature(self.source.path)
            self._watch_task = asyncio.get_running_loop().create_task(
                self._watch_config(self.source.path)
            )
        log.info(
            "sidelink %s (%s) serving %d route(s)%s",
            __version__,
            build(),
            len(self.routes),
            f", admin on {self.admin_address[0]}:{self.admin_address[1]}"
            if self.admin_address
            else "",
        )
        for route in self.routes.values():
            log.info("listening: %s", _describe(route))
        if build() != "compiled":
            log.warning(
                "the forwarding hot path runs as pure Python, at about three quarters of the "
                "compiled speed: it was installed without a C compiler (apt-get install gcc "
                "python3-dev, then pip install sidelink again)"
            )
        if NO_METRICS:
            log.warning(
                "SIDELINK_BENCH_NO_METRICS is set: requests are not counted or timed"
                " (a benchmark switch, never for production)"
            )

    async def _add_route(self, rc: RouteConfig, reuse: Route | None = None) -> None:
        acceptor = self.acceptors.get(rc.name) if reuse is not None else None
        if reuse is not None and acceptor is not None and reuse.listener is not None:
            # Same address and protocol: keep the socket, point new connections here.
            route = Route(rc, self.resolver, self.metrics, self.config.logging.access_log)
            route.listener, route.bound = reuse.listener, reuse.bound
            reuse.listener = None
            acceptor.point(route)
        else:
            route, acceptor = await self._listen(rc, self.config)
        self.routes[rc.name] = route
        self.acceptors[rc.name] = acceptor

    async def _listen(self, rc: RouteConfig, config: Config) -> tuple[Route, Acceptor]:
        """A new route with its own listener; OSError (naming the route) when it cannot bind."""
        route = Route(rc, self.resolver, self.metrics, config.logging.access_log)
        acceptor = Acceptor(route)
        try:
            await route.listen(acceptor)
        except OSError as e:
            route.close()
            raise BindError.of(e, f"route {rc.name}", rc.listen) from e
        return route, acceptor

    # --- state for admin ------------------------------------------------------------

    def readiness(self) -> list[str]:
        """Why the server is not ready; empty when it is."""
        reasons = ["draining: shutting down"] if self.draining else []
        reasons += [r for route in self.routes.values() if (r := route.not_ready_reason())]
        return reasons

    def in_flight(self) -> int:
        return sum(len(r.connections) for r in self._all_routes())

    def _all_routes(self) -> list[Route]:
        return [*self.routes.values(), *self.retired]

    # --- lifecycle -----------------------------------------------------------------

    def shutdown(self) -> None:
        """The SIGTERM trigger: the first call drains, a second one ends everything now."""
        if self._shutdown_requested.is_set():
            log.warning("second shutdown signal: exiting now")
            self._force.set()
            return
        log.info(
            "shutting down: not ready; serving %.1fs more, then draining up to %.1fs",
            self.config.shutdown.drain_delay,
            self.config.shutdown.drain_timeout,
        )
        self.draining = True
        for route in self._all_routes():
            route.draining = True
        self._shutdown_requested.set()

    async def serve_until_shutdown(self) -> None:
        """Run (after start) until a shutdown has completed."""
        await self._shutdown_requested.wait()
        drain = asyncio.ensure_future(self._drain())
        force = asyncio.ensure_future(self._force.wait())
        await asyncio.wait({drain, force}, return_when=asyncio.FIRST_COMPLETED)
        for task in (drain, force):
            task.cancel()
        await self._close_everything()

    async def _drain(self) -> None:
        settings = self.config.shutdown
        await asyncio.sleep(settings.drain_delay)
        for route in self.routes.values():
            route.stop_listening()
        for route in self._all_routes():
            for conn in list(route.connections):
                conn.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.drain_timeout
        while self.in_flight() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight():
            log.warning("drain timeout: closing %d connection(s) still open", self.in_flight())

    async def _close_everything(self) -> None:
        for task in (self._watch_task, self._sweep_task):
            if task is not None:
                task.cancel()
        for route in self._all_routes():
            route.close()
            for conn in list(route.connections):
                conn.abort()
        if self._admin is not None:
            await self._admin.stop()
        self._done.set()

    # --- reload --------------------------------------------------------------------

    async def reload(self) -> bool:
        """Read the config source again and apply it; False (and logged) when invalid."""
        if self.source is None:
            return False
        if self.draining:
            # New listeners now would undo the drain; the process is on its way out.
            log.warning("config reload ignored: shutting down")
            return False
        async with self._reload_lock:
            if self.source.path is not None:
                # Before reading, so a write racing this read is seen by the next poll.
                self._file_seen = _file_signature(self.source.path)
            try:
                # Off the loop: a big file must not stall traffic and /healthz while it parses.
                config = await asyncio.to_thread(self.source.load)
            except ConfigError as e:  # (one line: a log collector keeps lines apart)
                problems = "; ".join(e.problems)
                return self._reload_failed("rejected, keeping the running config: %s", problems)
            except Exception as e:  # RecursionError, MemoryError, a bug: the same rule
                return self._reload_failed("failed, keeping the running config: %s", _one_line(e))
            try:
                await self._apply(config)
            except Exception as e:  # OSError: a port that cannot be bound; anything else a bug
                return self._reload_failed("failed: %s", _one_line(e))
            finally:
                self._forget_unused_stats()
            self.metrics.config_reloads["ok"] += 1
            log.info("config reloaded: %d route(s)", len(self.routes))
            return True

    def _reload_failed(self, message: str, error: object) -> bool:
        """Every failed reload is counted and logged once, and the running config stays."""
        self.metrics.config_reloads["error"] += 1
        log.error("config reload " + message, error)
        return False

    async def _apply(self, config: Config) -> None:
        """Switch to `config`; OSError when a listener cannot bind, having changed nothing."""
        old = self.config
        # Bind the addresses new to us before touching anything that serves, so a port
        # taken by another process fails the reload whole instead of half-applying it.
        # (An address we hold already is handed over below.)
        held = {_address(r.config) for r in self.routes.values()}
        fresh: dict[str, tuple[Route, Acceptor]] = {}
        try:
            for new in config.routes:
                if _address(new) not in held:
                    fresh[new.name] = await self._listen(new, config)
        except OSError:
            for route, _ in fresh.values():
                route.close()
            raise
        if config.admin != old.admin:
            log.warning("admin.listen changes take effect on restart")
        if config.logging != old.logging:
            configure_logging(config.logging.level, config.logging.format)
        if config.resolver != old.resolver:
            # In place: every route keeps its connections (a resolver of its own would make
            # every route a changed one, and close their idle keep-alive connections).
            self.resolver.configure(config.resolver)
        self.config = dataclasses.replace(config, admin=old.admin)
        wanted = {rc.name: rc for rc in config.routes}
        for name, route in list(self.routes.items()):
            rc = wanted.get(name)
            if rc is not None and rc == route.config:
                # Kept as it is, connections and all; logging.access_log is not part of
                # the route's config, so the kept route takes the new value here.
                route.access_log = config.logging.access_log
                continue
            del self.routes[name]
            if rc is None:
                busy = len(route.connections)
                log.info("removed: %s (%d connection(s) left to finish)", _describe(route), busy)
            if rc is not None and _same_socket(rc, route.config):
                await self._add_route(rc, reuse=route)
            else:
                route.stop_listening()
                self.acceptors.pop(name, None)
            self._retire(route)
        for name, rc in wanted.items():
            if name in fresh:
                self.routes[name], self.acceptors[name] = fresh[name]
            elif name not in self.routes:
                await self._add_route(rc)
            else:
                continue
            log.info("listening: %s", _describe(self.routes[name]))

    def _retire(self, route: Route) -> None:
        route.close()
        for conn in list(route.connections):
            conn.shutdown()
        if route.connections:
            self.retired.append(route)
            if self._sweep_task is None or self._sweep_task.done():
                self._sweep_task = asyncio.get_running_loop().create_task(self._sweep_retired())

    async def _sweep_retired(self) -> None:
        """Forget retired routes (and their series) as their last connections finish."""
        while self.retired:
            await asyncio.sleep(RETIRED_SWEEP_INTERVAL)
            done = [r for r in self.retired if not r.connections]
            if done:
                for route in done:
                    route.let_go()
                self.retired = [r for r in self.retired if r.connections]
                self._forget_unused_stats()

    def _forget_unused_stats(self) -> None:
        """Drop the series of routes gone from the config (once their connections are) and of
        services no route resolves any more, so a big reload and its revert leave /metrics as
        it was. A retired route has released its DNS watch already: only live routes count."""
        self.metrics.retain(
            routes={r.config.name for r in self._all_routes()},
            services={r.config.service for r in self.routes.values()},
        )

    async def _watch_config(self, path: str) -> None:
        while True:
            await asyncio.sleep(CONFIG_POLL_INTERVAL)
            try:
                if _file_signature(path) != self._file_seen and not self.draining:
                    log.info("config file %s changed on disk", path)
                    await self.reload()
            except Exception:  # reload() counts its own failures; this is a bug, not a config
                log.exception("config file watcher: unexpected error, still watching")


def _one_line(e: BaseException) -> str:
    """An error as one log line: OSErrors say it themselves, others need their class."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, OSError):
        return text or type(e).__name__
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _describe(route: Route) -> str:
    """Where a listener is and where it goes: ``127.0.0.1:8081 -> app1.ns:80 http (app1)``."""
    rc = route.config
    listen = join_host_port(*route.bound) if route.bound else rc.listen
    service = f"[{rc.service}]" if ":" in rc.service else rc.service
    target = f"{service}:{rc.port}"
    return f"{listen} -> {target} {rc.protocol} (route {rc.name})"


def _address(rc: RouteConfig) -> tuple[str, int]:
    return rc.listen_host, rc.listen_port


def _same_socket(a: RouteConfig, b: RouteConfig) -> bool:
    return _address(a) == _address(b) and a.protocol == b.protocol


def _file_signature(path: str) -> tuple[str, int, int, int] | None:
    with contextlib.suppress(OSError):
        real = os.path.realpath(path)
        st = Path(real).stat()
        return real, st.st_ino, st.st_mtime_ns, st.st_size
    return None
