"""The HTTP listener: one aiohttp application for the probes, metrics and (later) WebSocket,
SSE and the HTTP API, all on one port.

The routes call back into the composition root through :class:`HttpHooks`; this module knows
nothing of how readiness is decided or metrics are counted.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

__all__ = ["HttpBridge", "HttpHooks"]

log = logging.getLogger("bridge.http")


@dataclass
class HttpHooks:
    """What the HTTP routes ask of the node.

    Attributes:
        readiness: Returns None when ready, else a one-line reason.
        metrics: Returns the Prometheus exposition and its content type.
    """

    readiness: Callable[[], Awaitable[str | None]]
    metrics: Callable[[], tuple[bytes, str]]


class HttpBridge:
    """Serves the node's HTTP port.

    Args:
        host: Bind address.
        port: Port (0 picks a free one; see ``port`` after ``start``).
        hooks: Callbacks into the node.
        ssl_context: Serve https/wss when given.
    """

    def __init__(
        self,
        host: str,
        port: int,
        hooks: HttpHooks,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.hooks = hooks
        self.ssl_context = ssl_context
        self.app = web.Application(client_max_size=1024 * 1024)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self._runner: web.AppRunner | None = None
        self.listening = False

    @property
    def scheme(self) -> str:
        """``https`` when TLS is on, else ``http``."""
        return "https" if self.ssl_context else "http"

    async def start(self) -> None:
        """Bind and start serving."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context,
                           reuse_address=True)
        await site.start()
        server = site._server
        if self.port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            self.port = int(sockets[0].getsockname()[1])
        self.listening = True
        log.info("= HTTP listening on %s://%s:%s", self.scheme, self.host, self.port)

    async def stop(self) -> None:
        """Stop accepting and close every HTTP connection."""
        self.listening = False
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def add_route(
        self, method: str, path: str,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> None:
        """Add a route (before ``start``)."""
        self.app.router.add_route(method, path, handler)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        reason = None if self.listening else "listeners not up"
        if reason is None:
            reason = await self.hooks.readiness()
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": reason}, status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.hooks.metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})
