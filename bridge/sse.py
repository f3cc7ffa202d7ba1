"""The SSE bridge (``GET /sse``): read-only subscribers, PROTOCOL.md section 7.

A stream is a :class:`~node.core.connection.ConnectionActor` with a pre-authenticated principal that
joins the stream's rooms, exactly as a WebSocket client would (with ``since`` when the request
carries a ``Last-Event-ID``; with ``rewind`` for the other rooms when the request has ``?rewind=N``:
the first connect shows the last N events, a reconnect resumes exactly). Its rooms push JSON frames
into its outbox (a state room's ``state`` frame, after its ``joined``, becomes one
``event: state`` message before any event); the transport here turns them into SSE messages with
:class:`SseSession` (pure: frames in, bytes out) and writes them straight to the socket, so slow
readers meet the same slow-consumer rule (4008).

The response uses HTTP/1.1 chunked transfer encoding, as aiohttp does by default for a body of
unknown length; the outbox writes synchronously, so each outbound message is framed as one
chunk here and written to the asyncio transport without a coroutine hop. An HTTP/1.0 client
gets the body unframed, ended by closing the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion11

from actors.errors import ActorDeadError
from bridge.api import bearer_token, error_response
from node.core.connection import ConnectionActor, NodeContext, TransportClosed
from node.protocol.errors import ProtocolError
from node.protocol.frames import JSON, REWIND_MAX, ROOM_PATTERN, SEQ_MAX, Join, parse_frame
from node.protocol.tokens import Principal

__all__ = [
    "PING",
    "RESYNC_EVENT",
    "SseBridge",
    "SseSession",
    "cors_headers",
    "format_cursor",
    "join_frames",
    "longest_cursor",
    "parse_cursor",
    "parse_rewind",
    "parse_rooms",
    "sse_message",
]

log = logging.getLogger("bridge.sse")

#: The heartbeat: an SSE comment, ignored by EventSource, that keeps proxies from timing out.
PING = b": ping\n\n"
#: The message of a resumed room the node could not recover (docs/protocol-notes.md, SSE).
RESYNC_EVENT = "rtnode:resync"

_ROOM = re.compile(ROOM_PATTERN)
_EVENT_PREFIX = b'{"type":"event",'
_MAX_SEQ_DIGITS = 20


def cors_headers(origin: str | None, allowed: Sequence[str]) -> dict[str, str]:
    """The CORS headers of a stream answered to a page of ``origin``.

    A stream is authorised by its token (query or ``Authorization``), never by a cookie, and
    CORS never allows credentials here: with no allow-list, ``*`` lets any page read a stream
    it holds a token for, exactly as it could without CORS by proxying the token, and nothing
    of the request's ``Origin`` is reflected. With an allow-list, only a listed origin (the
    request was refused otherwise) is named, with ``Vary: Origin`` for caches.
    """
    if not allowed:
        return {"Access-Control-Allow-Origin": "*"}
    if origin is not None and origin in allowed:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {"Vary": "Origin"}


def sse_message(event: str, data: bytes, id: str | None = None) -> bytes:
    """One SSE message: ``event:``, optional ``id:``, one ``data:`` line, a blank line.

    ``data`` must be one line (compact JSON is). Line breaks in ``event`` (possible in events a
    backend stored directly in the stream) become spaces: they would start new SSE fields.
    """
    name = event.replace("\r", " ").replace("\n", " ").encode()
    head = b"event: " + name + b"\n"
    if id is not None:
        head += b"id: " + id.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


def format_cursor(rooms: Iterable[str], cursor: Mapping[str, int]) -> str:
    """The stream's cursor as an SSE ``id``: ``room:seq`` for every room, joined with ``,``."""
    return ",".join(f"{room}:{cursor[room]}" for room in rooms)


def longest_cursor(max_rooms: int) -> int:
    """The most bytes a stream's cursor (its ``id``, and so a ``Last-Event-ID``) may take:
    ``max_rooms`` pairs of a room of 128 characters and a seq of 19 digits, and their commas.
    Some 60 long rooms already took more than the 8190 bytes the HTTP server read of a header,
    and their stream could not be resumed (400)."""
    return max_rooms * (128 + 1 + len(str(SEQ_MAX)) + 1)


def parse_cursor(text: str) -> dict[str, int]:
    """Parse a ``Last-Event-ID`` (``room:seq,room:seq``) into room -> seq.

    Room names may hold ``:``: each pair is split on its last one.

    Raises:
        ProtocolError: 4000 when a pair is not ``<room>:<seq>``.
    """
    out: dict[str, int] = {}
    for pair in text.split(","):
        room, sep, seq = pair.strip().rpartition(":")
        if (not sep or not _ROOM.fullmatch(room) or not seq.isascii() or not seq.isdigit()
                or len(seq) > _MAX_SEQ_DIGITS or int(seq) > SEQ_MAX):
            raise ProtocolError(4000, "bad Last-Event-ID: expected room:seq[,room:seq...]")
        out[room] = int(seq)
    return out


def parse_rooms(values: Iterable[str]) -> list[str]:
    """The rooms of ``?room=a&room=b`` (``?room=a,b`` too), in order, without repeats.

    Raises:
        ProtocolError: 4000 when there is none, or one is not a valid room name.
    """
    rooms: dict[str, None] = {}
    for value in values:
        for room in value.split(","):
            if not _ROOM.fullmatch(room):
                raise ProtocolError(4000, f"bad room name {room[:64]!r}")
            rooms[room] = None
    if not rooms:
        raise ProtocolError(4000, "no room: use ?room=<room>")
    return list(rooms)


def parse_rewind(value: str | None) -> int | None:
    """The ``?rewind=N`` of a stream (None without it); its range is checked by the ``join``.

    Raises:
        ProtocolError: 4000 when it is not a decimal integer.
    """
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.lstrip("-").isdigit() or len(text) > _MAX_SEQ_DIGITS:
        raise ProtocolError(4000, f"bad field rewind: expected an integer from 1 to {REWIND_MAX}")
    return int(text)


def join_frames(rooms: Sequence[str], since: Mapping[str, int],
                rewind: int | None) -> list[Join]:
    """The stream's ``join`` frames, validated like a client's: ``since`` for the rooms of the
    ``Last-Event-ID``, ``rewind`` for the others.

    Raises:
        ProtocolError: 4000 naming the bad field (``rewind`` out of range).
    """
    frames: list[Join] = []
    for room in rooms:
        join: dict[str, Any] = {"type": "join", "room": room}
        if room in since:
            join["since"] = {"seq": since[room]}
        elif rewind is not None:
            join["rewind"] = rewind
        frame = parse_frame(join)
        assert isinstance(frame, Join)
        frames.append(frame)
    return frames


class SseSession:
    """What one SSE stream writes, from the frames its connection's outbox hands over.

    Pure: feed each outbox message with :meth:`receive_message`, then write
    :meth:`data_to_send`; once :attr:`ended` is true, end the response.

    The stream holds its output until every room has answered its ``join`` (the ``joined``
    frame gives the room's cursor), so that every ``id`` names every room. Events of a room that
    arrive before its ``joined`` come from an earlier membership (the personal room every user
    connection is joined to without asking) and are dropped: the join replays what they hold.

    Args:
        rooms: The stream's rooms, in the order of its cursor.
        since: Room -> seq from ``Last-Event-ID`` (the rooms joined with ``since``).
        rewound: The rooms joined with ``rewind``: their replayed events (seq up to the
            ``joined`` seq) come right after ``joined``, and are written.
        state_rooms: The state rooms among ``rooms``: the stream also waits for their
            ``state`` frame, and writes one ``event: state`` message per state room (data
            ``{room, values}``, no id) before any event.
    """

    def __init__(self, rooms: Sequence[str], since: Mapping[str, int] | None = None,
                 rewound: Iterable[str] = (), state_rooms: Iterable[str] = ()) -> None:
        self.rooms = tuple(rooms)
        self.since = dict(since or {})
        self.rewound = frozenset(rewound)
        self.state_rooms = frozenset(state_rooms) & frozenset(self.rooms)
        self._states: dict[str, bytes] = {}  # state room -> its state message, until ready
        self._values: dict[str, list[Any]] = {}  # state room -> values of frames with more
        self.cursor: dict[str, int] = {}
        self.ready = False
        self.ended = False
        self.held_bytes = 0
        self._wanted = frozenset(self.rooms)
        self._resync: list[dict[str, Any]] = []  # resumes the node could not honour
        self._held: list[tuple[dict[str, Any], bytes]] = []
        self._out: list[bytes] = []

    def receive_message(self, payload: bytes) -> None:
        """Feed one outbox message: JSON frames separated by ``\\n``."""
        for line in payload.split(b"\n"):
            if line.strip() and not self.ended:
                self._receive_frame(line)

    def data_to_send(self) -> bytes:
        """The SSE bytes produced since the last call."""
        out, self._out = self._out, []
        return b"".join(out)

    def cursor_text(self) -> str:
        """The current cursor (every room must have joined)."""
        return format_cursor(self.rooms, self.cursor)

    def _receive_frame(self, raw: bytes) -> None:
        try:
            frame = json.loads(raw)
        except ValueError:
            log.warning("! undecodable frame for an SSE stream skipped")
            return
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        if kind == "event":
            room = frame.get("room")
            if room not in self.cursor:
                return  # not a room of this stream, or from before its join
            if self.ready:
                self._write_event(frame, raw)
            else:
                self._held.append((frame, raw))
                self.held_bytes += len(raw)
        elif kind == "joined":
            self._joined(frame)
        elif kind == "state":
            self._state(frame)
        elif kind in ("error", "disconnect"):
            data = {k: v for k, v in frame.items() if k not in ("type", "id")}
            self._out.append(sse_message(str(kind), JSON.encode(data)))
            self.ended = True
            self._held.clear()
            self.held_bytes = 0

    def _joined(self, frame: dict[str, Any]) -> None:
        room, seq = frame.get("room"), frame.get("seq")
        if room not in self._wanted or room in self.cursor or type(seq) is not int:
            return
        since = self.since.get(room)
        # Recovered: the replay follows, from since on. Rewound: the last events follow, in
        # order (the room never sends one twice). Otherwise live from the room's seq.
        if since is not None and frame.get("recovered"):
            self.cursor[room] = since
        elif room in self.rewound and frame.get("replayed"):
            self.cursor[room] = 0
        else:
            self.cursor[room] = seq
            if since is not None and since != seq:
                # Resumed, but not recovered (trimmed, too far behind, a new stream): events
                # between since and seq may be missing. Said, not skipped in silence.
                self._resync.append({"room": room, "since": since, "seq": seq,
                                     "epoch": frame.get("epoch")})
        self._ready_when_complete()

    def _state(self, frame: dict[str, Any]) -> None:
        room = frame.get("room")
        if room not in self.cursor:
            return  # not a room of this stream, or before its joined
        values = self._values.setdefault(room, [])
        if isinstance(frame.get("values"), list):
            values.extend(frame["values"])
        if frame.get("more"):
            return  # one message per room: the values of every frame, once the last came
        del self._values[room]
        message = sse_message("state", JSON.encode({"room": room, "values": values}))
        if self.ready:
            self._out.append(message)  # a later one (a rejoin): the client keeps higher seqs
            return
        self._states[room] = message
        self._ready_when_complete()

    def _ready_when_complete(self) -> None:
        """Start writing once every room has joined and every state room sent its state."""
        if len(self.cursor) < len(self.rooms) or len(self._states) < len(self.state_rooms):
            return
        self.ready = True
        self._out.append(b": joined " + self.cursor_text().encode() + b"\n\n")
        states, self._states = self._states, {}
        self._out.extend(states[room] for room in self.rooms if room in states)
        if self._resync:
            # With the cursor as id: a reconnect before the next event resumes from here.
            cursor = self.cursor_text()
            self._out.extend(sse_message(RESYNC_EVENT, JSON.encode(r), cursor)
                             for r in self._resync)
            self._resync = []
        held, self._held = self._held, []
        self.held_bytes = 0
        for event, raw in held:
            self._write_event(event, raw)

    def _write_event(self, frame: dict[str, Any], raw: bytes) -> None:
        room, seq = frame["room"], frame.get("seq")
        id: str | None = None
        if type(seq) is int:
            if seq <= self.cursor[room]:
                return  # already written (or replayed): never twice
            self.cursor[room] = seq
            id = self.cursor_text()
        if raw.startswith(_EVENT_PREFIX):
            data = b"{" + raw[len(_EVENT_PREFIX):]  # the frame without "type", not re-encoded
        else:
            data = JSON.encode({k: v for k, v in frame.items() if k != "type"})
        self._out.append(sse_message(str(frame.get("event", "message")), data, id))


class _SseTransport:
    """A connection's side of one SSE response, for its actor and outbox."""

    kind = "sse"

    def __init__(self, raw: asyncio.Transport, session: SseSession, *, chunked: bool) -> None:
        self.raw = raw
        self.session = session
        self.chunked = chunked
        self.done = asyncio.Event()

    def _write(self, data: bytes) -> None:
        if self.chunked:
            self.raw.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.raw.write(data)

    def gone(self) -> bool:
        """Whether the stream has ended; notices a client that closed its connection."""
        if self.done.is_set():
            return True
        if self.raw.is_closing():
            self.done.set()
            return True
        return False

    def write_message(self, payload: bytes) -> None:
        if self.gone():
            raise ConnectionResetError("SSE stream closed")
        session = self.session
        session.receive_message(payload)
        data = session.data_to_send()
        if data:
            self._write(data)
        if session.ended:
            self.done.set()

    def ping(self) -> None:
        """Write a heartbeat comment; notices a client that went away."""
        if not self.gone():
            self._write(PING)

    def buffered_bytes(self) -> int:
        return self.raw.get_write_buffer_size() + self.session.held_bytes

    def close(self, code: int, reason: str) -> None:
        self.done.set()

    async def run(self, heartbeat_s: float) -> None:
        """Until the stream ends: a heartbeat every ``heartbeat_s``."""
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(heartbeat_s):
                    await self.done.wait()
            self.ping()


class SseBridge:
    """Serves ``GET /sse`` for one node.

    aiohttp does not tell a running handler that its client went away, and a stream never
    reads: one timer per node looks at every open stream's socket each ``sweep_s`` (1 s: a
    leaving subscriber leaves its rooms and presence within a second, not at the next
    heartbeat), at the cost of one attribute read per stream per second.

    Args:
        ctx: The node's shared context (settings, tokens, rooms).
    """

    sweep_s = 1.0

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self._streams: set[_SseTransport] = set()
        self._sweep_timer: asyncio.TimerHandle | None = None

    @property
    def open(self) -> int:
        """Open streams."""
        return len(self._streams)

    def _schedule_sweep(self) -> None:
        if self._sweep_timer is None and self._streams:
            self._sweep_timer = asyncio.get_running_loop().call_later(self.sweep_s, self._sweep)

    def _sweep(self) -> None:
        self._sweep_timer = None
        for conn in self._streams:
            conn.gone()
        self._schedule_sweep()

    def _principal(self, request: web.Request) -> Principal:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            token = request.query.get("token")
        return self.ctx.tokens.verify(token, where="sse")

    def _check(self, principal: Principal, rooms: list[str]) -> None:
        """Rights and limits, checked before the stream starts (HTTP errors, not SSE ones)."""
        for room in rooms:
            if not principal.can("join", room):
                raise ProtocolError(4003, f"no join right on room {room}")
        # Counted as the connection actor counts: its personal room is one of its rooms.
        personal = principal.personal_room
        joined = set(rooms) | ({personal} if personal is not None else set())
        if len(joined) > self.settings.max_rooms_per_connection:
            raise ProtocolError(4029, "too many rooms for this connection")
        # The connection actor checks again when it is admitted (then a disconnect frame).
        self.ctx.index.check_room(principal, per_user=self.settings.max_connections_per_user,
                                  total=self.settings.max_connections)  # 4029, or 4503: 503

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler of ``GET /sse?room=<room>&room=<room2>[&rewind=N]``."""
        s = self.settings
        origin = request.headers.get("Origin")
        if s.allowed_origins and origin is not None and origin not in s.allowed_origins:
            return error_response(4003, "origin not allowed")
        if self.ctx.draining:
            return error_response(4503, "node draining")
        lane = self.ctx.lane  # the token, the stream's start and its joins: one per loop turn
        if not lane.take():
            await lane.wait()
            if self.ctx.draining:
                return error_response(4503, "node draining")
        try:
            principal = self._principal(request)
            rooms = parse_rooms(request.query.getall("room", []))
            self._check(principal, rooms)
            last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
            since = parse_cursor(last) if last else {}
            since = {room: seq for room, seq in since.items() if room in rooms}
            joins = join_frames(rooms, since, parse_rewind(request.query.get("rewind")))
        except ProtocolError as exc:
            return error_response(exc.code, exc.reason)

        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        })
        response.headers.update(cors_headers(origin, s.allowed_origins))
        if request.version >= HttpVersion11:
            response.enable_chunked_encoding()
        await response.prepare(request)
        raw = request.transport
        if raw is None:
            return response
        rewound = [join.room for join in joins if join.rewind is not None]
        state_rooms = [room for room in rooms if s.room_policy(room).state]
        conn = _SseTransport(raw, SseSession(rooms, since, rewound, state_rooms),
                             chunked=response.chunked)
        actor = ConnectionActor(self.ctx, conn, JSON, principal=principal)
        ref = self.ctx.system.spawn(lambda: actor, name=f"conn:{actor.client_id}")
        self._streams.add(conn)
        self._schedule_sweep()
        try:
            for join in joins:
                ref.tell(join)
            await conn.run(s.heartbeat_s)
        except ActorDeadError:
            pass  # refused at once (too many connections, draining): its frame is written
        finally:
            self._streams.discard(conn)
            with contextlib.suppress(ActorDeadError):
                ref.tell(TransportClosed())
        if not raw.is_closing():
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        return response
