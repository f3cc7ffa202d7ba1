"""The HTTP listener: one aiohttp application for the probes, metrics and (later) WebSocket,
SSE and the HTTP API, all on one port.

The routes call back into the composition root through :class:`HttpHooks`; this module knows
nothing of how readiness is decided or metrics are counted. Connections are admitted and put
under a head deadline by :class:`~bridge.http_guard.HttpGuard` (limits in :class:`HttpLimits`);
every response carries the headers of :func:`security_headers`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from bridge.http_guard import GuardedSite, HttpGuard, LogThrottle

__all__ = [
    "API_CSP",
    "CONSOLE_CSP",
    "HttpBridge",
    "HttpHooks",
    "HttpLimits",
    "security_headers",
]

log = logging.getLogger("bridge.http")

#: The console's pages: their scripts, styles and images come from the node, they talk to it
#: (fetch, WebSocket: CSP 3 'self' covers ws/wss to the same host and port), nothing is inline,
#: no eval (cbor-x detects that and decodes without generated readers), and no page may frame
#: them.
CONSOLE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
#: Everything else (JSON, scripts, event streams) is data, never a document with rights.
API_CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

_SECURITY = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def security_headers(content_type: str) -> dict[str, str]:
    """The security headers of a response whose media type is ``content_type``."""
    csp = CONSOLE_CSP if content_type == "text/html" else API_CSP
    return {**_SECURITY, "Content-Security-Policy": csp}


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare runs for every response, streamed ones and WebSocket upgrades too,
    # before its head is written; a handler's own choice is kept.
    for name, value in security_headers(response.content_type).items():
        response.headers.setdefault(name, value)


class _UnreadableRequests(logging.Filter):
    """aiohttp logs each request it cannot parse at ERROR, with a traceback: any peer could
    fill the log with them. They become one line (at most every ``LOG_EVERY_S``), no traceback;
    the client still gets aiohttp's 400."""

    def __init__(self) -> None:
        super().__init__()
        self._throttle = LogThrottle(log)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        self._throttle.log(logging.INFO, "unreadable", "x HTTP request refused (%d): %s",
                           exc.code, str(exc.message).splitlines()[0][:200])
        return False


_UNREADABLE = _UnreadableRequests()


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP connection may hold (settings of the same names, in brackets).

    Attributes:
        header_timeout_s: From the accept to the first request head read whole
            (``http_header_timeout_s``).
        keepalive_s: An idle kept-alive connection is closed after this long, and a later
            head must be read whole within it (``http_keepalive_s``). aiohttp also runs this
            timer from the accept: the first head's deadline is the smaller of the two.
        max_per_peer: Open connections per peer address (``max_connections_per_ip``).
        failures_per_min: Connections per peer address per minute that may end refused
            before new ones from it are refused at accept (``peer_failures_per_min``).
        max_field_size: The longest header value read (aiohttp's own bound is 8190 bytes):
            the node makes it as long as the longest SSE cursor (``bridge.sse.longest_cursor``)
            so that a reconnecting EventSource's ``Last-Event-ID`` is read.
    """

    header_timeout_s: float = 5.0
    keepalive_s: float = 5.0
    max_per_peer: int = 1000
    failures_per_min: int = 60
    max_field_size: int = 8190


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
        limits: Deadlines and caps of the connections.
        reuse_port: Bind with SO_REUSEPORT, so that the workers of ``rtnode run --workers N``
            share the port (the kernel spreads the connections among them).
    """

    def __init__(
        self,
        host: str,
        port: int,
        hooks: HttpHooks,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: HttpLimits | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.host = host
        self.reuse_port = reuse_port
        self.port = port
        self.hooks = hooks
        self.ssl_context = ssl_context
        self.limits = limits or HttpLimits()
        self.guard = HttpGuard(self.limits.header_timeout_s, self.limits.max_per_peer,
                               failures_per_min=self.limits.failures_per_min)
        self.app = web.Application(client_max_size=1024 * 1024,
                                   middlewares=[self.guard.middleware])
        self.app.on_response_prepare.append(_add_security_headers)
        logging.getLogger("aiohttp.server").addFilter(_UNREADABLE)  # once: it is a set
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
        # auto_decompress off: aiohttp inflated each body as it arrived, on the loop and before
        # any handler (a 200 KB gzip of zeros to any path held the loop ~1 s); the API inflates
        # its bodies itself, within the body limit (bridge.api.decode_body).
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     keepalive_timeout=self.limits.keepalive_s,
                                     max_field_size=self.limits.max_field_size,
                                     auto_decompress=False)
        await self._runner.setup()
        site = GuardedSite(self._runner, self.host, self.port, self.guard,
                           ssl_context=self.ssl_context, reuse_port=self.reuse_port)
        await site.start()
        self.port = site.port
        self.listening = True
        log.info("= HTTP listening on %s://%s:%s (%d connections at most, %d per address)",
                 self.scheme, self.host, self.port, self.guard.max_open, self.limits.max_per_peer)

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
