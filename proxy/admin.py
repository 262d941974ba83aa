"""The admin server (aiohttp): /metrics, /healthz, /readyz, /routes. Read-only."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from proxy.server import Server

# aiohttp's own error reports (a malformed request, say) go through sidelink's logger,
# so they follow --log-format instead of reaching stderr as bare tracebacks.
log = logging.getLogger("sidelink.admin")


class AdminServer:
    def __init__(self, server: Server) -> None:
        self.server = server
        app = web.Application(logger=log)
        # GET routes answer HEAD too; every other method gets 405 from aiohttp.
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/routes", self.routes)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=log)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        sockname = server.sockets[0].getsockname()  # type: ignore[attr-defined]
        return sockname[0], sockname[1]

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.server.metrics.render(request.headers.get("Accept"))
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


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=2) + "\n", status=status, content_type="application/json"
    )
