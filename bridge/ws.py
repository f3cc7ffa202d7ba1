"""The WebSocket bridge (``/ws``): read, decode, validate, ``tell``; write what actors hand back.

Outbound messages are written as ready-made WebSocket frames straight to the socket's transport:
server frames are not masked, so the bytes a room encoded once need only a 2-10 byte header per
connection, and no coroutine runs per recipient. Control frames (ping, pong, close) stay with
aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import Counter
from typing import Any

from aiohttp import WSMsgType, web

from actors.connection import ConnectionActor, Invalid, NodeContext, TransportClosed
from actors.errors import ActorDeadError
from node.errors import CodecError, ProtocolError
from node.protocol import CODECS, JSON, parse_frame, request_id_of

__all__ = ["WebSocketBridge", "ws_frame_header"]

log = logging.getLogger("bridge.ws")

_OP_TEXT = 0x1
_OP_BINARY = 0x2
_CLOSE_TIMEOUT_S = 2.0


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

    kind = "ws"

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport, binary: bool):
        self.ws = ws
        self.raw = transport
        self.opcode = _OP_BINARY if binary else _OP_TEXT
        self._closing = False

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
        asyncio.get_running_loop().create_task(self._close(code, reason), name="ws.close")

    async def _close(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(
                self.ws.close(code=code, message=reason.encode()[:120]), _CLOSE_TIMEOUT_S
            )
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            if not self.raw.is_closing():
                self.raw.abort()  # a peer that does not read cannot hold the socket open


class WebSocketBridge:
    """Serves ``/ws`` for one node.

    Args:
        ctx: The node's shared context (settings, rooms, store).
    """

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
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
        ws = web.WebSocketResponse(
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
        return ws

    async def _read(self, ws: web.WebSocketResponse, ref: Any, codec: Any) -> None:
        limit = self.settings.max_frame_bytes
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            data = msg.data
            try:
                if len(data) > limit:
                    ref.tell(Invalid(4013, "frame too large"))
                    continue
                try:
                    frames = codec.decode(data)
                except CodecError as exc:
                    ref.tell(Invalid(exc.code, exc.reason))
                    continue
                for raw in frames:
                    try:
                        frame = parse_frame(raw)
                    except ProtocolError as exc:
                        ref.tell(Invalid(exc.code, exc.reason, request_id_of(raw)))
                        continue
                    ref.tell(frame)
            except ActorDeadError:
                break
