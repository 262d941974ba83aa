"""The admin server (aiohttp): /, /metrics, /healthz, /readyz, /routes, /config. Read-only.

It shares the pod's file descriptors and the event loop with the traffic, so it is
bounded: at most MAX_CONNECTIONS open (a connection beyond is closed at once), small
request heads, a head (and keep-alive) timeout, /metrics rendered at a bounded share
of the loop, and a malformed request costs one debug line, not a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy import __version__, build
from proxy.metrics import BUILD_LABEL

if TYPE_CHECKING:
    from proxy.server import Server

# aiohttp's own error reports (a malformed request, say) go through sidelink's logger,
# so they follow --log-format instead of reaching stderr as bare tracebacks.
log = logging.getLogger("sidelink.admin")
# aiohttp's per-connection logger: refusals of malformed requests are condensed there.
http_log = logging.getLogger("sidelink.admin.http")

# Admin connections open at once; one beyond is closed on accept, so a flood of idle
# connections cannot take the pod's file descriptors (the proxy's traffic needs them).
MAX_CONNECTIONS: Final = 64
# A request head must arrive within this, from accept or from the previous answer;
# aiohttp's keep-alive timer covers both (it runs while no whole head has arrived), so a
# slowloris on the admin port is cut after this long.
HEAD_TIMEOUT: Final = 10.0
# The admin's requests are short GETs: small limits on the head.
MAX_LINE_BYTES: Final = 4096
MAX_FIELD_BYTES: Final = 4096
MAX_HEADERS: Final = 32
# After an answer, unread request body bytes are drained at most this long.
LINGER_SECONDS: Final = 1.0
# On shutdown, admin requests in progress get this long to finish.
STOP_TIMEOUT: Final = 2.0
# A rendered /metrics body is reused for METRICS_REUSE_FACTOR times what it cost to
# render (at most METRICS_REUSE_MAX seconds): however many scrapers ask, rendering takes
# at most about 1/(factor + 1) of the loop, and a cheap render stays fresh.
METRICS_REUSE_FACTOR: Final = 10.0
METRICS_REUSE_MAX: Final = 1.0
# A refused admin connection is logged at most this often.
REFUSAL_LOG_INTERVAL: Final = 10.0

ENDPOINTS: Final = (
    ("/", "this list"),
    ("/metrics", "Prometheus metrics (OpenMetrics when Accept asks for it)"),
    ("/healthz", "200 while the process serves"),
    ("/readyz", "200 once every listener is bound and every route resolved; else 503, why"),
    ("/routes", "JSON: each route, its DNS answer and its endpoints"),
    ("/config", "JSON: the running config (as `sidelink check` prints it), file, build"),
)


class _Refusals(logging.Filter):
    """aiohttp logs each malformed request with a traceback at ERROR: one debug line instead.

    Errors of sidelink's own handlers keep their traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        if log.isEnabledFor(logging.DEBUG):
            why = " ".join(str(error.message).split())[:200]
            log.debug("%s: %d %s", record.getMessage(), error.code, why)
        return False


http_log.addFilter(_Refusals())


class _Counted(asyncio.Protocol):
    """An aiohttp connection, counted against MAX_CONNECTIONS until it is lost."""

    __slots__ = ("_admin", "_inner")

    def __init__(self, admin: AdminServer, inner: asyncio.Protocol) -> None:
        self._admin = admin
        self._inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._admin.open_connections -= 1
        self._inner.connection_lost(exc)


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class AdminServer:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.open_connections = 0
        self.refused_connections = 0
        self._refusal_logged = -REFUSAL_LOG_INTERVAL
        self._listener: asyncio.Server | None = None
        # OpenMetrics or not -> (body, content type, reused until this loop time).
        self._rendered: dict[bool, tuple[bytes, str, float]] = {}
        app = web.Application(logger=log)
        # GET routes answer HEAD too; every other method gets 405 from aiohttp.
        app.router.add_get("/", self.index)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/routes", self.routes)
        app.router.add_get("/config", self.config)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            logger=http_log,
            shutdown_timeout=STOP_TIMEOUT,
            keepalive_timeout=HEAD_TIMEOUT,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_FIELD_BYTES,
            max_headers=MAX_HEADERS,
            lingering_time=LINGER_SECONDS,
        )

    def __repr__(self) -> str:
        return f"<AdminServer open={self.open_connections} refused={self.refused_connections}>"

    async def start(self, host: str, port: int) -> tuple[str, int]:
        await self._runner.setup()
        # Our own listener rather than a TCPSite, so each connection passes the cap.
        self._listener = await asyncio.get_running_loop().create_server(
            self._accept, host, port, reuse_address=True
        )
        sockname = self._listener.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        await self._runner.cleanup()

    def _accept(self) -> asyncio.Protocol:
        handlers = self._runner.server
        if handlers is None or self.open_connections >= MAX_CONNECTIONS:
            self.refused_connections += 1
            now = time.monotonic()
            if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL:
                self._refusal_logged = now
                log.warning(
                    "admin: %d connections open (the limit): closing new ones (%d so far)",
                    self.open_connections,
                    self.refused_connections,
                )
            return _Refused()
        self.open_connections += 1
        return _Counted(self, handlers())

    # --- endpoints -------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        width = max(len(path) for path, _ in ENDPOINTS)
        lines = [f"sidelink {__version__} ({build()}) admin", ""]
        lines += [f"{path:<{width}}  {what}" for path, what in ENDPOINTS]
        return web.Response(text="\n".join(lines) + "\n")

    async def metrics(self, request: web.Request) -> web.Response:
        accept = request.headers.get("Accept")
        openmetrics = bool(accept and "application/openmetrics-text" in accept)
        loop = asyncio.get_running_loop()
        cached = self._rendered.get(openmetrics)
        if cached is not None and loop.time() < cached[2]:
            body, content_type, _ = cached
        else:
            started = time.perf_counter()
            body, content_type = self.server.metrics.render(accept)
            cost = time.perf_counter() - started
            reuse = min(cost * METRICS_REUSE_FACTOR, METRICS_REUSE_MAX)
            self._rendered[openmetrics] = (body, content_type, loop.time() + reuse)
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        reasons = self.server.readiness()
        if reasons:
            return _json({"ready": False, "reasons": reasons}, status=503)
        return _json({"ready": True, "reasons": []})

    async def routes(self, request: web.Request) -> web.Response:
        return _json({"routes": [r.to_dict() for r in self.server.routes.values()]})

    async def config(self, request: web.Request) -> web.Response:
        config = self.server.config
        return _json(
            {
                "version": __version__,
                "build": BUILD_LABEL,
                "file": config.source,
                "config": config.to_dict(),
            }
        )


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=2) + "\n", status=status, content_type="application/json"
    )
