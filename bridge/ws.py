"""The WebSocket bridge (``/ws``): read, decode, validate, ``tell``; write what actors hand back.

Outbound messages are written as ready-made WebSocket frames straight to the socket's transport:
server frames are not masked, so the bytes a room encoded once need only a 2-10 byte header per
connection, and no coroutine runs per recipient. Control frames (ping, pong, close) stay with
aiohttp.

Input is flow-controlled: while the connection's actor has ``inbound_high`` messages queued, the
reader stops reading (aiohttp then pauses the socket once 128 KiB are buffered), so a fast
client is slowed by TCP, never cut. Closing sends the close frame, then reads and discards the
client's input until its close frame comes back (at most ``_CLOSE_DRAIN_S``): a socket closed
with unread input is reset, and the reset makes the client's TCP stack discard our close frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from actors.errors import ActorDeadError
from node.core.connection import ConnectionActor, Invalid, NodeContext, TransportClosed
from node.protocol.errors import CodecError, ProtocolError
from node.protocol.frames import CODECS, JSON, parse_frame, request_id_of

__all__ = ["WebSocketBridge", "ws_frame_header"]

log = logging.getLogger("bridge.ws")

_OP_TEXT = 0x1
_OP_BINARY = 0x2
# After our close frame, the client's input is read and discarded for at most this long while
# waiting for its close frame (a client busy sending sees ours once it reads).
_CLOSE_DRAIN_S = 5.0
# Close codes of a connection that ended refused for what its client did (a bad token, errors
# beyond the tolerance, limits): they count against its peer address (HttpGuard.failed). Not
# 4008 (slow), 4010 (a token that ran out), 4500 or 4503 (the node's).
_FAILED = frozenset({4000, 4001, 4003, 4009, 4013, 4029})
# Then what we wrote gets this long to reach a client that does not read, before an abort.
_CLOSE_FLUSH_S = 2.0


def ws_frame_header(opcode: int, length: int) -> bytes:
    """The header of one unmasked, final WebSocket frame (RFC 6455 section 5.2)."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


class _WsTransport:
    """A connection's side of one WebSocket, for its actor and outbox."""

    __slots__ = ("_close_task", "_closing", "close_code", "opcode", "raw", "ws")
    kind = "ws"

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport, binary: bool):
        self.ws = ws
        self.raw = transport
        self.opcode = _OP_BINARY if binary else _OP_TEXT
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        #: The close code the node sent (None: the peer closed first).
        self.close_code: int | None = None

    def write_message(self, payload: bytes) -> None:
        if self._closing or self.raw.is_closing():
            raise ConnectionResetError("websocket closing")
        self.raw.writelines((ws_frame_header(self.opcode, len(payload)), payload))

    def buffered_bytes(self) -> int:
        return self.raw.get_write_buffer_size()

    def close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self.close_code = code
        self._close_task = asyncio.get_running_loop().create_task(
            self._close(code, reason), name="ws.close")

    async def closed(self) -> None:
        """Wait until a close begun by :meth:`close` is over (at once if none was)."""
        if self._close_task is not None:
            await asyncio.shield(self._close_task)

    async def _close(self, code: int, reason: str) -> None:
        # The close frame follows what the outbox wrote (the disconnect frame) on the same
        # transport. drain=False: the client's input is read (and discarded) at once, without
        # first waiting for it to read ours; aiohttp reads until the client's close frame, for
        # at most the response's timeout (_CLOSE_DRAIN_S), then closes the transport.
        try:
            await asyncio.wait_for(
                self.ws.close(code=code, message=reason.encode()[:120], drain=False),
                _CLOSE_DRAIN_S + _CLOSE_FLUSH_S,
            )
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        raw = self.raw
        if not raw.is_closing():
            raw.close()
        # A closing transport sends what it holds, then FIN; a client that never reads would
        # hold it open, so it gets _CLOSE_FLUSH_S (polled every 50 ms), then an abort.
        for _ in range(int(_CLOSE_FLUSH_S / 0.05)):
            if not raw.get_write_buffer_size():
                return
            await asyncio.sleep(0.05)
        raw.abort()


class WebSocketBridge:
    """Serves ``/ws`` for one node.

    Args:
        ctx: The node's shared context (settings, rooms, store).
    """

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        #: Told the peer address of each connection that ended refused (``_FAILED``).
        self.on_failed: Callable[[str], None] = lambda peer: None
        self.settings = ctx.settings
        self.open: Counter[str] = Counter()  # open connections by codec

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler of ``GET /ws``."""
        s = self.settings
        origin = request.headers.get("Origin")
        if s.allowed_origins and origin is not None and origin not in s.allowed_origins:
            return web.json_response({"code": 4003, "reason": "origin not allowed"}, status=403)
        if self.ctx.draining:
            return web.json_response({"code": 4503, "reason": "node draining"}, status=503)
        lane = self.ctx.lane  # the upgrade and the connection's start: one per loop turn
        if not lane.take():
            await lane.wait()
            if self.ctx.draining:
                return web.json_response({"code": 4503, "reason": "node draining"}, status=503)
        ws = web.WebSocketResponse(
            timeout=_CLOSE_DRAIN_S,  # aiohttp's bound on reading after our close frame
            protocols=tuple(CODECS),
            heartbeat=s.heartbeat_s,
            # Messages above max_frame_bytes get a 4013 error frame from us; only far larger
            # ones are cut by aiohttp (1009) before they are buffered whole.
            max_msg_size=max(4 * s.max_frame_bytes, 1 << 20),
            compress=s.ws_compression,
            autoping=True,
        )
        await ws.prepare(request)
        transport = request.transport
        if transport is None:
            return ws
        codec = CODECS.get(ws.ws_protocol or "", JSON)
        conn = _WsTransport(ws, transport, codec.binary)
        actor = ConnectionActor(self.ctx, conn, codec)
        ref = self.ctx.system.spawn(lambda: actor, name=f"conn:{actor.client_id}")
        self.open[codec.name] += 1
        try:
            await self._read(ws, ref, codec)
        finally:
            self.open[codec.name] -= 1
            with contextlib.suppress(ActorDeadError):
                ref.tell(TransportClosed())
            # Returning hands the socket back to aiohttp, which would close it under a drain.
            await conn.closed()
            if conn.close_code in _FAILED and request.remote:
                self.on_failed(request.remote)
        return ws

    async def _read(self, ws: web.WebSocketResponse, ref: Any, codec: Any) -> None:
        high, low = ConnectionActor.inbound_high, ConnectionActor.inbound_low
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            try:
                for item in self._decode(msg.data, codec):
                    if ref.queued >= high:
                        # Backpressure: no read while the actor catches up to `low`.
                        await ref.wait_for_room(low)
                    ref.tell(item)
            except ActorDeadError:
                break

    def _decode(self, data: str | bytes, codec: Any) -> list[Any]:
        """One message's frames, or ``Invalid`` for what cannot be decoded or validated."""
        if len(data) > self.settings.max_frame_bytes:
            return [Invalid(4013, "frame too large")]
        try:
            frames = codec.decode(data)
        except CodecError as exc:
            return [Invalid(exc.code, exc.reason)]
        items: list[Any] = []
        for raw in frames:
            try:
                items.append(parse_frame(raw))
            except ProtocolError as exc:
                items.append(Invalid(exc.code, exc.reason, request_id_of(raw)))
        return items
