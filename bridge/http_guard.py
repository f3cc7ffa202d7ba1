"""The edge of the HTTP port: what a connection may hold before it has said anything useful.

aiohttp closes an idle keep-alive connection after its ``keepalive_timeout`` and bounds line and
header sizes, but it has no deadline for a request head measured from the TCP accept, no cap per
peer address and no notion of the process's descriptor limit. :class:`HttpGuard` adds these as a
thin protocol wrapper around aiohttp's request handler (:class:`GuardedSite` serves it):

- **Head deadline**: from the accept (after the TLS handshake, itself bounded by the same
  deadline) until aiohttp dispatches the first request, ``header_timeout_s``. A silent socket or
  a head trickled one line at a time is answered 408 and closed when it expires: bytes that
  arrive do not extend it. Later heads on a kept-alive connection are bounded by aiohttp's
  keep-alive timer, which runs from the end of the previous response and is not reset by input
  either. A WebSocket upgrade is a request head like any other; once upgraded, the socket is
  the WebSocket's (heartbeat, connect deadline) and no keep-alive applies.
- **Per-peer cap**: at most ``max_per_peer`` open connections per peer address; beyond it a new
  connection gets a 503 (``Retry-After``) and is closed at once.
- **Descriptor reserve**: HTTP connections never take the last descriptors of the process
  (``RLIMIT_NOFILE`` minus a reserve for NATS, MQTT and files): beyond that, 503 too.
- **Failing peers**: each connection that ends refused (a bad token, cut off for errors or
  limits: :meth:`HttpGuard.failed`) takes a token of its peer address's bucket
  (``failures_per_min``); while that bucket is empty, new connections from the address get a
  503 at accept, before any handshake or token check. A client that is cut off and reconnects
  at once, over and over, then costs the node almost nothing; the others from that address
  that keep their connections are not touched.

What happens at these limits is counted (read by ``/metrics``) and logged at most once per
``LOG_EVERY_S`` per kind, never a line per attacking socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

from node.core.limits import KeyedBuckets

__all__ = [
    "LOG_EVERY_S",
    "REFUSED_LINGER_S",
    "GuardedSite",
    "HttpGuard",
    "LogThrottle",
    "open_files",
    "open_files_limit",
    "raise_open_files_limit",
]

log = logging.getLogger("bridge.http")

#: At most one log line per kind of refusal in this many seconds.
LOG_EVERY_S = 10.0
#: How long a refused connection is kept for its client to send its request and read the 503.
REFUSED_LINGER_S = 1.0
# Descriptors kept back from HTTP connections: at least this many, or a tenth of the limit.
_RESERVE_MIN = 64
# A head that may be an upgrade is kept by the guard up to this size; a longer one is refused
# (431), however it was cut into reads.
_MAX_SNIFFED = 16384
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"X-Content-Type-Options: nosniff\r\nRetry-After: 1\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
    b"X-Content-Type-Options: nosniff\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"X-Content-Type-Options: nosniff\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _canned(template: bytes, code: int, reason: str) -> bytes:
    body = b'{"code":%d,"reason":"%s"}' % (code, reason.encode())
    return template % (len(body), body)


def open_files_limit() -> int:
    """The process's soft ``RLIMIT_NOFILE`` (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one (a node holds a socket per client).

    Returns:
        The soft limit before and after (equal when it could not or need not be raised).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit (macOS) still has a kernel ceiling: ask for a generous number.
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if target <= soft:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def open_files() -> int:
    """Descriptors open in this process (-1 where ``/proc`` is not available)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


class LogThrottle:
    """Logs one line per kind of event at most every ``every_s``, with the count in between.

    Args:
        logger: Where the lines go.
        every_s: The least time between two lines of the same kind.
        clock: Seconds, monotonic.
    """

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._skipped: Counter[str] = Counter()

    def log(self, level: int, kind: str, msg: str, *args: Any) -> None:
        """Log ``msg % args`` unless a line of this ``kind`` went out less than every_s ago."""
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.every_s:
            self._skipped[kind] += 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        if skipped:
            msg += " (and %d more in the last %.0f s)"
            args = (*args, skipped, now - last if last is not None else 0.0)
        self.logger.log(level, msg, *args)


class HttpGuard:
    """Admission and deadlines of the HTTP port's connections, and their counters.

    Args:
        header_timeout_s: From the accept to the first request head, read whole.
        max_per_peer: Open connections allowed per peer address.
        fd_limit: The descriptor limit (default: the process's soft ``RLIMIT_NOFILE``).

    Attributes:
        max_open: Open HTTP connections allowed in all (the limit minus a reserve).
        accepted: Connections admitted since start.
        refused: Connections refused at once, by reason (``per_peer``, ``descriptors``,
            ``failing_peer``).
        head_timeouts: Connections closed because their first head did not arrive in time.
    """

    def __init__(self, header_timeout_s: float, max_per_peer: int,
                 fd_limit: int | None = None, *, failures_per_min: int = 60) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_per_peer = max_per_peer
        self._failures = KeyedBuckets(failures_per_min / 60.0, failures_per_min)
        self.fd_limit = open_files_limit() if fd_limit is None else fd_limit
        self.max_open = max(self.fd_limit - max(_RESERVE_MIN, self.fd_limit // 10), 16)
        #: Refused connections kept open for a moment (see ``REFUSED_LINGER_S``), and at most.
        self.lingering = 0
        self.max_lingering = max(8, self.fd_limit // 20)
        self.accepted = 0
        self.refused: Counter[str] = Counter()
        self.head_timeouts = 0
        self._open = 0
        #: The most connections open at once since someone last set it back (node/memory.py).
        self.high_water = 0
        self._per_peer: Counter[str] = Counter()
        self._waiting: dict[object, _GuardedProtocol] = {}  # aiohttp handler -> its wrapper
        #: Takes a socket whose whole first head (and what came after it) asks for an upgrade
        #: of ``upgrade_prefix``'s path: returns the protocol that serves it from then on, or
        #: None to leave it to aiohttp (bridge/ws.py).
        self.upgrade: Callable[[asyncio.Transport, str, bytes], asyncio.Protocol | None] | None
        self.upgrade = None
        self.upgrade_prefix = b"GET /ws"
        self._log = LogThrottle(log)

    @property
    def open(self) -> int:
        """Open HTTP connections (admitted, not yet closed)."""
        return self._open

    @property
    def peers(self) -> int:
        """Distinct peer addresses with an open connection."""
        return len(self._per_peer)

    def protocol_factory(self, make_handler: Callable[[], asyncio.Protocol]
                         ) -> Callable[[], asyncio.Protocol]:
        """The factory ``loop.create_server`` takes: aiohttp's handlers, guarded."""
        return lambda: _GuardedProtocol(self, make_handler)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the connection's head as read: its deadline no longer applies."""
        conn = self._waiting.pop(request.protocol, None)
        if conn is not None:
            conn.head_read()
        return await handler(request)

    def failed(self, peer: str) -> None:
        """A connection from ``peer`` ended refused (see the module docstring)."""
        self._failures.get(peer, time.monotonic()).take(time.monotonic())

    def _admit(self, peer: str) -> str | None:
        """None when a connection from ``peer`` may open, else the reason it may not."""
        failures = self._failures.find(peer)
        now = time.monotonic()
        # A peer that used up its failures is refused; one that used more than half of them
        # (a client that keeps failing, not a NAT with a few failed clients) spends one of
        # what is left on every new connection: waiting clients of a failing peer come in one
        # per token, not all at once the moment one is there.
        if failures is not None and (
                failures.level(now) < 1
                or (failures.level(now) < failures.burst / 2 and not failures.take(now))):
            self.refused["failing_peer"] += 1
            self._log.log(logging.WARNING, "failing_peer", "! HTTP connection from %s refused: "
                          "its connections keep being refused (peer_failures_per_min)", peer)
            return "too many refused connections from this address, retry later"
        if self._per_peer[peer] >= self.max_per_peer:
            self.refused["per_peer"] += 1
            self._log.log(logging.WARNING, "per_peer", "! HTTP connection from %s refused: %d "
                          "open from that address (max_connections_per_ip)", peer,
                          self.max_per_peer)
            return "too many connections from this address"
        if self._open >= self.max_open:
            self.refused["descriptors"] += 1
            self._log.log(logging.WARNING, "descriptors", "! HTTP connection from %s refused: "
                          "%d open, the most the descriptor limit (%d) allows", peer,
                          self._open, self.fd_limit)
            return "node at its connection limit"
        self._per_peer[peer] += 1
        self._open += 1
        self.high_water = max(self.high_water, self._open)
        self.accepted += 1
        return None

    def _release(self, peer: str) -> None:
        self._open -= 1
        left = self._per_peer[peer] - 1
        if left > 0:
            self._per_peer[peer] = left
        else:
            del self._per_peer[peer]

    def _timed_out(self, peer: str) -> None:
        self.head_timeouts += 1
        # INFO: browsers open spare connections they may never use; those end here too.
        self._log.log(logging.INFO, "head", "x HTTP connection from %s closed: no request head "
                      "within %.1f s (http_header_timeout_s)", peer, self.header_timeout_s)


def _peer_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "?")


class _GuardedProtocol(asyncio.Protocol):
    """One accepted connection: admitted or refused, then its handler under a deadline.

    The handler is aiohttp's, or the one :attr:`HttpGuard.upgrade` returns for a WebSocket
    upgrade of its path: until the first bytes show which (``_head``), they are kept here.
    Everything after that is forwarded to the handler unchanged; the only extra work per read
    is one attribute test.
    """

    __slots__ = ("_deadline", "_discarding", "_guard", "_handler", "_head", "_make_handler",
                 "_peer", "_transport")

    def __init__(self, guard: HttpGuard, make_handler: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._make_handler = make_handler
        self._handler: asyncio.Protocol | None = None
        self._head: bytes | None = None  # admitted, its handler not chosen yet: what came so far
        self._discarding = False  # refused after admission (431): input is dropped
        self._peer = ""
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        guard = self._guard
        peer = _peer_of(transport)
        refusal = guard._admit(peer)
        if refusal is not None:
            self._refuse(transport, refusal)
            return
        self._peer = peer
        self._transport = transport
        self._deadline = asyncio.get_running_loop().call_later(
            guard.header_timeout_s, self._head_expired)
        if guard.upgrade is None:
            self._to_aiohttp(b"")
        else:
            self._head = b""

    def _to_aiohttp(self, data: bytes) -> None:
        self._head = None
        handler = self._handler = self._make_handler()
        self._guard._waiting[handler] = self
        handler.connection_made(cast(asyncio.Transport, self._transport))
        if data:
            handler.data_received(data)

    def _sniff(self, data: bytes) -> None:
        # A head that can still be "GET <upgrade path>[ ?]" is kept until it is whole; then
        # HttpGuard.upgrade may take the socket. Anything else goes to aiohttp at once.
        head = cast(bytes, self._head) + data
        guard = self._guard
        prefix = guard.upgrade_prefix
        start = head[:len(prefix) + 1]
        if not (prefix.startswith(start) or (start[:-1] == prefix and start[-1:] in b" ?")):
            self._to_aiohttp(head)
            return
        end = head.find(b"\r\n\r\n")
        if (end if end >= 0 else len(head)) > _MAX_SNIFFED:
            self._head_too_large()
            return
        if end < 0:
            self._head = head
            return
        assert guard.upgrade is not None
        handler = guard.upgrade(cast(asyncio.Transport, self._transport), self._peer, head)
        if handler is None:
            self._to_aiohttp(head)
            return
        self._head = None
        self.head_read()
        self._handler = handler

    def _head_too_large(self) -> None:
        # However the head was cut into reads: an upgrade head longer than the bound is refused.
        # The 431, our FIN, then what the client still sends is dropped until it closes (or
        # REFUSED_LINGER_S): closing with input unread would reset the socket, and the reset
        # can make the client drop the 431.
        self._head = b""
        self._discarding = True
        self.head_read()
        transport = cast(asyncio.Transport, self._transport)
        transport.write(_canned(_TOO_LARGE, 4013, "request head too large"))
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._deadline = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)

    def _refuse(self, transport: asyncio.Transport, refusal: str) -> None:
        # The 503, then our FIN; the socket is closed once the client's request has arrived
        # (read and dropped) or after REFUSED_LINGER_S. Closing with its request unread would
        # reset the connection, and a reset can make the client drop the 503 it was sent.
        transport.write(_canned(_REFUSED, 4503, refusal))
        guard = self._guard
        if guard.lingering >= guard.max_lingering or not transport.can_write_eof():
            transport.close()  # descriptors come first: no lingering beyond the bound
            return
        guard.lingering += 1
        transport.write_eof()
        self._transport = transport
        self._deadline = asyncio.get_running_loop().call_later(
            REFUSED_LINGER_S, transport.close)

    def head_read(self) -> None:
        """The first request head was read whole: the deadline is off."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_expired(self) -> None:
        self._deadline = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._guard._waiting.pop(self._handler, None)
        self._guard._timed_out(self._peer)
        transport.write(_canned(_TIMED_OUT, 4008, "request head not received in time"))
        transport.close()

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)
        elif self._discarding:
            return
        elif self._head is not None:
            self._sniff(data)
        elif self._transport is not None:  # refused: its request is read, now it may go
            self._transport.close()

    def eof_received(self) -> bool | None:
        if self._discarding:
            return None  # the client is done: close
        if self._head is not None:
            self._to_aiohttp(self._head)  # what it makes of a head cut short, as before
        if self._handler is not None:
            return self._handler.eof_received()
        return None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        handler, self._handler = self._handler, None
        if self._head is not None:  # admitted, lost before its handler was chosen
            self._head = None
            self.head_read()
            self._guard._release(self._peer)
            self._transport = None
            return
        if handler is None:  # refused: never admitted
            if self._transport is not None:  # it lingered
                self._guard.lingering -= 1
                self._transport = None
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            return
        self.head_read()
        self._guard._waiting.pop(handler, None)
        self._guard._release(self._peer)
        self._transport = None
        handler.connection_lost(exc)


class GuardedSite(web.BaseSite):
    """aiohttp's ``TCPSite``, serving through an :class:`HttpGuard`.

    Args:
        runner: The set-up runner.
        host: Bind address.
        port: Port (0 picks a free one; see ``port`` after ``start``).
        guard: Admission and deadlines.
        ssl_context: Serve TLS; the handshake is bounded by the guard's head deadline.
    """

    __slots__ = ("_guard", "_host", "_port", "_reuse_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: HttpGuard, *,
                 ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        self._host = host
        self._port = port
        self._guard = guard
        self._reuse_port = reuse_port  # SO_REUSEPORT: the workers of one rtnode share the port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The bound port (the requested one before ``start``)."""
        return self._port

    async def start(self) -> None:
        """Bind and start accepting."""
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server),
            self._host, self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._guard.header_timeout_s if self._ssl_context else None,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
        )
        sockets = self._server.sockets
        if sockets:
            self._port = int(sockets[0].getsockname()[1])
