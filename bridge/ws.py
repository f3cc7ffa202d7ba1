"""The WebSocket bridge (``/ws``): read, decode, validate, ``tell``; write what actors hand back.

A ``GET /ws`` upgrade never reaches aiohttp: the HTTP port's guard (bridge/http_guard.py) hands
its head to :meth:`WebSocketBridge.take`, and from the 101 on the socket belongs to a
:class:`WsConnection`, an ``asyncio.Protocol`` around websockets' sans-I/O
:class:`~websockets.server.ServerProtocol` (handshake checks, subprotocol and permessage-deflate
negotiation, frame parsing and unmasking, ping answers, the close handshake, ``max_size``). An
idle connection is then that protocol, this object and its actor: no task, no request object,
no reader queue. Whatever is not a clean upgrade of ``/ws`` goes to aiohttp as before.

Inbound, each message is decoded and told to the connection's actor from ``data_received``, with
no task or coroutine per message. Input is flow-controlled: while the actor has
``inbound_high`` messages queued, the socket stops being read until it is down to
``inbound_low``, so a fast client is slowed by TCP, never cut.

Outbound messages are written as ready-made WebSocket frames straight to the transport: server
frames are not masked, so the bytes a room encoded once need only a 2-10 byte header per
connection (uncompressed, which permessage-deflate allows for any message).

Heartbeat: one timer per node, every ``heartbeat_s``, pings each connection that sent nothing
since the last round and closes one that has sent nothing since its ping (PROTOCOL.md: pings
every ``heartbeat_s``, closed after ``heartbeat_s`` more).

Closing sends the close frame, then reads and discards the client's input until its close frame
comes back (at most ``_CLOSE_DRAIN_S``): a socket closed with unread input is reset, and the
reset makes the client's TCP stack discard our close frame. What is still unsent then gets
``_CLOSE_FLUSH_S`` before an abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import struct
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any, cast

from aiohttp import web
from websockets.datastructures import Headers
from websockets.exceptions import InvalidState
from websockets.exceptions import ProtocolError as WsProtocolError
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from actors.errors import ActorDeadError
from bridge.http import security_headers
from bridge.ws_frames import OTHER, PARTIAL, SIMPLE, apply_mask, scan
from node.core.connection import (
    ConnectionActor,
    Invalid,
    NodeContext,
    Shutdown,
    TransportClosed,
)
from node.protocol.errors import CodecError, ProtocolError
from node.protocol.frames import (
    CODECS,
    JSON,
    MIN_FRAME_BYTES,
    is_reply,
    parse_frame,
    request_id_of,
    salvage_frames,
)

__all__ = ["WS_PATH", "WebSocketBridge", "WsConnection", "ws_frame_header"]

log = logging.getLogger("bridge.ws")

#: The path served here; every other path (and a ``/ws`` request that is not an upgrade) is
#: aiohttp's.
WS_PATH = "/ws"
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_PING = b"\x89\x00"  # a final ping frame with no payload, unmasked
# Input kept before the 101 is out (the node's lane may hold it a moment); beyond it, the
# socket is not read until then.
_EARLY_MAX = 65536
# After our close frame, the client's input is read and discarded for at most this long while
# waiting for its close frame (a client busy sending sees ours once it reads).
_CLOSE_DRAIN_S = 5.0
# Then what we wrote gets this long to reach a client that does not read, before an abort.
_CLOSE_FLUSH_S = 2.0
# Close codes of a connection that ended refused for what its client did (a bad token, errors
# beyond the tolerance, limits): they count against its peer address (HttpGuard.failed). Not
# 4008 (slow), 4010 (a token that ran out), 4500 or 4503 (the node's).
_FAILED = frozenset({4000, 4001, 4003, 4009, 4013, 4029})
# websockets' own log lines ("connection open" per connect) are not wanted at INFO.
_WS_LOG = logging.getLogger("bridge.ws.protocol")
_WS_LOG.setLevel(logging.WARNING)
_DATA = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)
#: Whether whole simple frames are read here, not by websockets (bridge/ws_frames.py); off,
#: websockets reads every frame (the tests compare the two).
SPLIT = True
_MAX_SIMPLE = 1 << 20  # a protocol without max_size: the longest frame split here
_SUBPROTOCOLS = [Subprotocol(name) for name in CODECS]  # one list for every connection


def ws_frame_header(opcode: int, length: int) -> bytes:
    """The header of one unmasked, final WebSocket frame (RFC 6455 section 5.2)."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def _uncycle(proto: ServerProtocol) -> None:
    """Cut the cycles of websockets' protocol object once its socket is gone, so that
    refcounting frees it at once rather than a full collection, much later: its parser is a
    generator whose frame holds the protocol (closed, a generator drops its frame), the
    exception that ended a cut or broken stream holds that frame in its traceback, and the
    subprotocol chooser is a method bound to it (11 objects a connection in all). Nothing
    reads from or writes through the protocol afterwards."""
    proto.parser.close()
    proto.parser_exc = None
    proto.__dict__.pop("select_subprotocol", None)


def _first_offered(protocol: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    # The client's order decides; one that offers none of ours gets the default (JSON), as
    # PROTOCOL.md section 1 says, instead of websockets' 400.
    for name in offered:
        if name in CODECS:
            return name
    return None


def http_error(status: int, code: int, reason: str) -> bytes:
    """A complete JSON error response that closes the connection, with the security headers."""
    body = json.dumps({"code": code, "reason": reason}).encode()
    phrase = {400: "Bad Request", 403: "Forbidden", 426: "Upgrade Required",
              500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
    headers = {"Content-Type": "application/json; charset=utf-8",
               **security_headers("application/json"), "Connection": "close",
               "Content-Length": str(len(body))}
    if status == 426:
        headers["Upgrade"] = "websocket"
    if status == 503:
        headers["Retry-After"] = "1"
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"HTTP/1.1 {status} {phrase}\r\n{head}\r\n".encode() + body


class WsConnection(asyncio.Protocol):
    """One upgraded socket: the transport of its :class:`ConnectionActor` and its reader.

    Created by :meth:`WebSocketBridge.take` with the parsed handshake; it answers it (at once,
    or once the node's lane lets it: :meth:`_open`) and serves the socket until it is closed.
    """

    __slots__ = (
        "_bridge", "_buffered", "_carry", "_codec", "_drain", "_failure", "_held", "_parts",
        "_ref", "_text", "_waiter", "close_code", "closing", "opcode", "peer", "ping_out", "proto",
        "quiet", "raw",
    )
    kind = "ws"

    def __init__(self, bridge: WebSocketBridge, transport: asyncio.Transport, peer: str,
                 proto: ServerProtocol) -> None:
        self._bridge = bridge
        self.raw = transport
        self.peer = peer
        self.proto = proto
        self._codec: Any = JSON
        self.opcode = _OP_TEXT
        self._ref: Any = None
        self._buffered: bytes = b""  # input that came before the 101 went out
        self._held: deque[Any] | None = None  # decoded, waiting for room in the actor's mailbox
        # The backpressure task, or before the 101 the lane's turn its opening waits for.
        self._waiter: asyncio.Future[None] | None = None
        self._parts: list[bytes] | None = None  # a fragmented message so far
        # Input split at frame boundaries here (bridge/ws_frames.py): the start of a frame not
        # all here yet (b"": none). None: websockets reads all input (SPLIT off, or after
        # something that is websockets' alone to read to the end: the close, a broken frame).
        self._carry: bytes | bytearray | None = b"" if SPLIT else None
        self._text = False
        self._drain: asyncio.TimerHandle | None = None
        self._failure: list[bytes] | None = None  # websockets' close for a broken frame, held
        #: The close code the node sent (None: the peer closed first, or the socket was lost).
        self.close_code: int | None = None
        self.closing = False
        #: Heartbeat: nothing received since the last round; a ping is out and unanswered.
        self.quiet = False
        self.ping_out = False

    # -- the handshake

    def _open(self, request: Request) -> None:
        """Answer the handshake: 101 and the connection's actor, or an error and the close."""
        bridge, ctx = self._bridge, self._bridge.ctx
        if self.raw.is_closing():
            return
        if ctx.draining:
            self._refuse(503, 4503, "node draining")
            return
        proto = self.proto
        response = proto.accept(request)
        if response.status_code != 101:
            self._refuse(response.status_code, 4000, _reason_of(response))
            return
        response.headers.update(bridge.extra_headers)
        proto.send_response(response)
        # websockets' server parser reads the request, then frames in a generator whose frame
        # keeps the request (its headers) for as long as the connection lives (~0.5 KB). The
        # frame parser it goes on to is started afresh without it, as websockets itself
        # replaces its parser (by discard() at a close). Nothing is buffered or half read
        # here: the parser was given the request head alone (take()).
        proto.parser = Protocol.parse(proto)
        next(proto.parser)
        self._flush()
        codec = self._codec = CODECS.get(proto.subprotocol or "", JSON)
        self.opcode = _OP_BINARY if codec.binary else _OP_TEXT
        actor = ConnectionActor(ctx, self, codec)
        self._ref = ctx.system.spawn(lambda: actor, name=f"conn:{actor.client_id}")
        bridge.open[codec.name] += 1
        bridge.connections[self] = None
        early, self._buffered = self._buffered, b""
        if len(early) > _EARLY_MAX:
            self.raw.resume_reading()
        if early:
            self.data_received(early)

    def _refuse(self, status: int, code: int, reason: str) -> None:
        self.closing = True
        self.raw.write(http_error(status, code, reason))
        self.raw.close()

    def _open_in_turn(self, request: Request, turn: asyncio.Future[None]) -> None:
        # The upgrade and the connection's start: one per turn of the node's lane. Called by
        # the turn's future, no task each (cancelled when the socket went first).
        self._waiter = None
        if not turn.cancelled():
            self._open(request)

    # -- asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self._ref is None:  # before the 101: kept until then (a client should not send yet)
            if not self.closing:
                self._buffered += data
                if len(self._buffered) > _EARLY_MAX:
                    self.raw.pause_reading()  # read on once the 101 is out
            return
        self.quiet = False
        carry = self._carry
        if carry is None:
            self._receive(data)
        elif carry:  # the rest of a frame (appended in place: a frame trickling in costs O(n))
            carry += data
            self._split(carry)
        else:  # websockets' parser is at a frame boundary: split here
            self._split(data)

    def _split(self, buf: bytes | bytearray) -> None:
        """Read the frames of ``buf`` from the first: each ``SIMPLE`` one here (the common
        case, see bridge/ws_frames.py), every other one whole by websockets; a partial frame
        waits for the rest. Once something is not for splitting (a length beyond max_size,
        the close handshake), everything left goes to websockets, from then on."""
        proto = self.proto
        max_size = proto.max_size or _MAX_SIMPLE
        pos, size = 0, len(buf)
        while pos < size:
            if self._failure is not None or self.closing or proto.state is not State.OPEN:
                break
            kind, start, end = scan(buf, pos, max_size)
            if kind == SIMPLE and self._parts is None:  # else: websockets refuses it
                payload = apply_mask(bytes(buf[start:end]), bytes(buf[start - 4:start]))
                self._complete(payload, buf[pos] == 0x81)
            elif kind == SIMPLE or kind == OTHER:
                if not self._receive(bytes(buf[pos:end])):
                    self._carry = None
                    return
            elif kind == PARTIAL:
                self._carry = buf if not pos and type(buf) is bytearray else bytearray(buf[pos:])
                return
            else:
                break
            pos = end
        else:
            self._carry = b""
            return
        self._carry = None  # websockets reads everything from here on
        self._receive(bytes(buf[pos:]))

    def _receive(self, data: bytes) -> bool:
        """websockets reads ``data``; the messages it yields are delivered. Returns False
        once the connection is closing (nothing more is read for it)."""
        proto = self.proto
        proto.receive_data(data)
        events = proto.events_received()
        broken = proto.parser_exc is not None and not self.closing and self._failure is None
        if proto.writes and not broken:
            self._flush()  # pongs, the answer to a close
        if self.closing or self._failure is not None:
            return False  # input after our close frame (or a broken frame) is read and dropped
        for event in events:
            frame = cast(Frame, event)  # after the handshake, websockets yields only frames
            if frame.opcode in _DATA:
                self._message(frame)
                if self._failure is not None or self.closing:
                    return False
            elif frame.opcode is Opcode.CLOSE:
                self.closing = True
                return False
        if broken:
            self._hold_failure()
            return False
        return True

    def _fail(self, code: int, reason: str) -> None:
        self.proto.fail(code, reason)
        self._hold_failure()

    def _hold_failure(self) -> None:
        # A broken frame or message (RFC 6455: 1002, 1007, 1009): websockets queued its close
        # frame. The replies owed to the messages before it go out first: the actor gets a
        # Shutdown behind them and closes the transport (close() writes the held frame).
        proto = self.proto
        self._failure = proto.data_to_send()
        close = proto.close_sent
        code = close.code if close is not None else CloseCode.PROTOCOL_ERROR
        reason = (close.reason if close is not None else "") or "protocol error"
        self._drain = asyncio.get_running_loop().call_later(_CLOSE_DRAIN_S, self._drain_expired)
        self._deliver([Shutdown(code, reason, False)])

    def _message(self, frame: Frame) -> None:
        data = cast(bytes, frame.data)  # websockets' parser yields bytes
        if frame.opcode is not Opcode.CONT:
            self._text = frame.opcode is Opcode.TEXT
            if not frame.fin:
                self._parts = [data]
                return
        else:
            parts = self._parts
            assert parts is not None  # websockets refuses a continuation out of place
            parts.append(data)
            if not frame.fin:
                return
            data = b"".join(parts)
            self._parts = None
        self._complete(data, self._text)

    def _complete(self, data: bytes, text: bool) -> None:
        """A whole message: decoded, and its frames told to the actor."""
        message: str | bytes = data
        if text:
            try:
                message = data.decode()
            except UnicodeDecodeError:
                self._fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
                return
        self._deliver(self._bridge.decode(message, self._codec))

    def _deliver(self, items: list[Any]) -> None:
        ref = self._ref
        held = self._held
        for item in items:
            if held is None and ref.queued < ConnectionActor.inbound_high:
                if ref.handle_now(item):  # a publish to an idle actor: no wake-up
                    continue
                try:
                    ref.tell(item)
                except ActorDeadError:
                    self._actor_gone()
                    return
                continue
            # Backpressure: no read while the actor catches up to inbound_low.
            if held is None:
                held = self._held = deque()
                self.raw.pause_reading()
                self._waiter = asyncio.get_running_loop().create_task(
                    self._wait_for_room(), name="ws.backpressure")
            held.append(item)

    async def _wait_for_room(self) -> None:
        ref = self._ref
        try:
            while self._held:
                await ref.wait_for_room(ConnectionActor.inbound_low)
                held = self._held
                while held and ref.queued < ConnectionActor.inbound_high:
                    ref.tell(held.popleft())
        except ActorDeadError:
            self._actor_gone()
            return
        finally:
            self._waiter = None
        self._held = None
        if not self.raw.is_closing():
            self.raw.resume_reading()

    def _actor_gone(self) -> None:
        # The actor stopped (it closes its transport as it goes): nothing more is read for it.
        self._held = None
        if self._failure is not None:
            self._write_failure()
        if not self.closing:
            self.closing = True
            self.raw.close()

    def eof_received(self) -> bool | None:
        if self._ref is not None:
            carry, self._carry = self._carry, None
            if carry:  # a partial frame: websockets has it before the end, as it would have
                self._receive(bytes(carry))
            self.proto.receive_eof()
            self._flush()
        return None  # close our side too

    def pause_writing(self) -> None:
        pass  # the outbox watches buffered_bytes()

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        _uncycle(self.proto)
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        if self._waiter is not None:
            self._waiter.cancel()
            self._waiter = None
        self._held = None
        ref = self._ref
        if ref is None:
            return
        bridge = self._bridge
        bridge.open[self._codec.name] -= 1
        bridge.connections.pop(self, None)
        with contextlib.suppress(ActorDeadError):
            ref.tell(TransportClosed())
        if self.close_code in _FAILED:
            bridge.on_failed(self.peer)

    # -- ConnTransport, for the actor and its outbox

    def write_message(self, payload: bytes) -> None:
        if self.closing or self.raw.is_closing():
            raise ConnectionResetError("websocket closing")
        self.raw.writelines((ws_frame_header(self.opcode, len(payload)), payload))

    def buffered_bytes(self) -> int:
        return self.raw.get_write_buffer_size()

    def close(self, code: int, reason: str) -> None:
        if self.close_code is not None or self.raw.is_closing():
            return
        self.close_code = code
        self.closing = True
        if self._failure is not None:  # websockets' close frame for a broken frame, then the end
            self._write_failure()
            return
        try:
            self.proto.send_close(code, reason.encode()[:120].decode(errors="ignore"))
        except (InvalidState, WsProtocolError):
            self.raw.close()  # the client's close came first (answered), or a code out of range
            return
        self._flush()
        if self._held is not None or self._waiter is not None:
            self._held = None
            if self._waiter is not None:
                self._waiter.cancel()
            self.raw.resume_reading()  # read (and drop) input until the client's close frame
        self._drain = asyncio.get_running_loop().call_later(_CLOSE_DRAIN_S, self._drain_expired)

    # -- the rest

    def ping(self) -> None:
        """Send a heartbeat ping (the heartbeat round decides when)."""
        if not self.closing and not self.raw.is_closing():
            self.raw.write(_PING)

    def _flush(self) -> None:
        raw = self.raw
        for data in self.proto.data_to_send():
            if data:
                raw.write(data)
            elif not raw.is_closing():  # websockets' end of stream: the close handshake is done
                self._close_transport()

    def _drain_expired(self) -> None:
        # Our close went out _CLOSE_DRAIN_S ago, or the actor never closed after a broken
        # frame: whatever is held goes now, and the socket closes.
        self._drain = None
        if self._failure is not None:
            self._write_failure(drain=False)
        self._close_transport()

    def _write_failure(self, *, drain: bool = True) -> None:
        failure, self._failure = self._failure or [], None
        self.closing = True
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        raw = self.raw
        if raw.is_closing():
            return
        for data in failure:
            if data:
                raw.write(data)
        if not drain:
            return  # the caller closes
        if not raw.can_write_eof():  # TLS: no half-close
            self._close_transport()
            return
        # FIN after the close frame; what the client still sends is read and dropped until it
        # closes too (at most _CLOSE_DRAIN_S): closing with unread input would reset the socket
        # and the reset can make the client's stack drop the close frame.
        raw.write_eof()
        self._drain = asyncio.get_running_loop().call_later(_CLOSE_DRAIN_S, self._drain_expired)

    def _close_transport(self) -> None:
        raw = self.raw
        if raw.is_closing():
            return
        raw.close()
        # A closing transport sends what it holds, then FIN; a client that never reads would
        # hold it open, so it gets _CLOSE_FLUSH_S, then an abort.
        if raw.get_write_buffer_size():
            asyncio.get_running_loop().call_later(_CLOSE_FLUSH_S, raw.abort)


def _reason_of(response: Response) -> str:
    # websockets' reason for refusing the handshake, as one line.
    text = response.body.decode(errors="replace").strip().splitlines()
    reason = text[0] if text else response.reason_phrase
    return reason.removeprefix("Failed to open a WebSocket connection: ").rstrip(".")


class WebSocketBridge:
    """Serves ``/ws`` for one node.

    Args:
        ctx: The node's shared context (settings, rooms, store).
    """

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        #: Told the peer address of each connection that ended refused (``_FAILED``).
        self.on_failed: Callable[[str], None] = lambda peer: None
        self.settings = s = ctx.settings
        self.open: Counter[str] = Counter()  # open connections by codec
        #: Open connections (insertion-ordered, for the heartbeat and for stop).
        self.connections: dict[WsConnection, None] = {}
        self.extra_headers = Headers(security_headers("application/octet-stream"))
        # Messages above max_frame_bytes get a 4013 error frame; only far larger ones are cut
        # (1009) before they are buffered whole.
        self._max_size = max(4 * s.max_frame_bytes, 1 << 20)
        self._heartbeat: asyncio.TimerHandle | None = None

    def compact(self) -> None:
        """Size the table of open connections to what there is now (see ``node/memory.py``)."""
        self.connections = dict(self.connections)

    def take(self, transport: asyncio.Transport, peer: str, head: bytes
             ) -> asyncio.Protocol | None:
        """The protocol that takes over a socket whose first request head is ``head`` (whole,
        with any bytes after it), or None when it is not a WebSocket upgrade of ``/ws``
        (aiohttp answers it then)."""
        end = head.find(b"\r\n\r\n") + 4
        proto = ServerProtocol(
            extensions=[ServerPerMessageDeflateFactory()] if self.settings.ws_compression
            else None,
            subprotocols=_SUBPROTOCOLS, select_subprotocol=_first_offered,
            max_size=self._max_size, logger=_WS_LOG)
        proto.receive_data(head[:end])
        events = proto.events_received()
        if not events:
            return None  # not a request websockets can read: aiohttp's answer
        request = cast(Request, events[0])
        if request.path.partition("?")[0] != WS_PATH or (
                "websocket" not in request.headers.get("Upgrade", "").lower()):
            return None
        conn = WsConnection(self, transport, peer, proto)
        conn._buffered = head[end:]
        s = self.settings
        origin = request.headers.get("Origin")
        if s.allowed_origins and origin is not None and origin not in s.allowed_origins:
            conn._refuse(403, 4003, "origin not allowed")
        elif self.ctx.lane.take():
            conn._open(request)
        else:
            turn = conn._waiter = self.ctx.lane.turn()
            turn.add_done_callback(functools.partial(conn._open_in_turn, request))
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().call_later(
                s.heartbeat_s, self._heartbeat_round)
        return conn

    def decode(self, data: str | bytes, codec: Any) -> list[Any]:
        """One message's frames, or ``Invalid`` for what cannot be decoded or validated."""
        if len(data) > self.settings.max_frame_bytes:
            return [Invalid(4013, "frame too large")]
        most = len(data) // MIN_FRAME_BYTES + 1
        try:
            frames = codec.decode(data, most)
        except CodecError as exc:
            # A tag, a NaN, a lone surrogate: each frame is still answered by its id.
            salvaged = salvage_frames(data, codec.binary, most)
            if salvaged is None:
                return [Invalid(exc.code, exc.reason)]
            frames = salvaged
        items: list[Any] = []
        refused = 0
        tolerance = self.settings.max_errors_per_min
        for raw in frames:
            try:
                items.append(parse_frame(raw))
            except ProtocolError as exc:
                items.append(Invalid(exc.code, exc.reason, request_id_of(raw),
                                     reply=is_reply(raw)))
                refused += 1
                if refused > tolerance:
                    # These end the connection (max_errors_per_min), whatever follows: it is
                    # not validated. A 60 KB message of 60,000 one-byte items held the loop
                    # ~0.5 s, with or without a token, as each became an error for the actor.
                    break
        return items

    async def not_an_upgrade(self, request: web.Request) -> web.StreamResponse:
        """aiohttp's handler of ``GET /ws``: reached only by what is not a WebSocket upgrade."""
        return web.json_response(
            {"code": 4000, "reason": "a WebSocket upgrade was expected (Upgrade: websocket, "
                                     "Connection: Upgrade, Sec-WebSocket-Key, "
                                     "Sec-WebSocket-Version: 13)"},
            status=426, headers={"Upgrade": "websocket", "Connection": "Upgrade"})

    def _heartbeat_round(self) -> None:
        if not self.connections:
            self._heartbeat = None  # the next connection starts the rounds again
            return
        for conn in list(self.connections):
            if not conn.quiet:
                conn.quiet = True
                conn.ping_out = False
            elif conn.ping_out:  # nothing since its ping, a whole round ago
                log.debug("x %s: no answer to the heartbeat", conn.peer)
                conn.closing = True
                conn.raw.abort()
            else:
                conn.ping_out = True
                conn.ping()
        self._heartbeat = asyncio.get_running_loop().call_later(
            self.settings.heartbeat_s, self._heartbeat_round)

    def stop(self) -> None:
        """Cut what is left (after the node's drain) and the heartbeat."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        for conn in list(self.connections):
            conn.raw.abort()
