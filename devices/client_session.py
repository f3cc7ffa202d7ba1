"""The protocol state of one rtnode client, without I/O (PROTOCOL.md sections 1, 2 and 5).

:class:`ClientSession` builds the frames a client sends and turns each frame the node sends
into typed results (:data:`SessionEvent`). It keeps what must survive a reconnect: the rooms,
their cursors (last seq and epoch) and the request id counter. It never awaits and never
touches a socket: :class:`devices.client.Client` does the I/O around it::

    session = ClientSession()
    send(session.connect_frame(token))
    for raw in codec.decode(message):
        for item in session.receive(raw):
            ...  # Connected, Reply, Error, Event, Resync, StateValues, Disconnect, RpcRequest

State rooms (a namespace with ``state = true``): every event carries a ``key``, and a
``state`` frame follows each ``joined`` with the room's current values. The session keeps a
map key -> latest :class:`Event` per room (:meth:`ClientSession.values`): a value or an event
applies to its key only if its seq is higher than the one held for that key, and an event with
``unset`` removes the key.

Errors of the client library form one tree:

* ClientError          (code, reason, retry: an ``error``/``disconnect`` of the node, or local)
    * ConnectionLost   (the connection closed before the reply came; 1006 unless the node said)
    * RequestTimeout   (no reply in time; also a TimeoutError; 4504)
    * ClientClosed     (the client was closed by the application; 1000)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "CLIENT_VERSION",
    "ClientClosed",
    "ClientError",
    "ClientSession",
    "Connected",
    "ConnectionLost",
    "Disconnect",
    "Error",
    "Event",
    "Reply",
    "RequestTimeout",
    "Resync",
    "RoomState",
    "RpcRequest",
    "SessionEvent",
    "StateValues",
    "backoff_cap",
]

CLIENT_VERSION = "0.1.0"

# Close codes after which reconnecting cannot help (PROTOCOL.md section 5), used when the
# transport closes without a ``disconnect`` frame saying so.
NO_RECONNECT_CODES = frozenset({4000, 4001, 4003, 4013, 4029})


class ClientError(Exception):
    """Root of the client's errors: a protocol code, a one-line reason and a retry hint.

    Args:
        code: A PROTOCOL.md section 5 code, or a WebSocket close code (1000, 1006).
        reason: One line, as the node sent it.
        retry: Whether the same request may succeed later.
    """

    def __init__(self, code: int, reason: str, retry: bool = False) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.retry = retry


class ConnectionLost(ClientError):
    """The connection closed before the reply to a request arrived."""

    def __init__(self, reason: str = "connection lost", code: int = 1006) -> None:
        super().__init__(code, reason, retry=True)


class RequestTimeout(ClientError, TimeoutError):
    """No reply arrived in time."""

    def __init__(self, reason: str = "request timed out") -> None:
        super().__init__(4504, reason, retry=True)


class ClientClosed(ClientError):
    """The application closed the client."""

    def __init__(self, reason: str = "client closed") -> None:
        super().__init__(1000, reason, retry=False)


# ---------------------------------------------------------------------------------------------
# What receive() returns


@dataclass(frozen=True, slots=True)
class Connected:
    """The node accepted ``connect``: ``frame`` is the ``connected`` frame."""

    frame: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reply:
    """The typed reply (``joined``, ``published``, ``pong``...) to the request ``id``."""

    id: int
    frame: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Error:
    """An ``error`` frame; ``id`` is the request's, or None for fire-and-forget frames."""

    id: int | str | None
    code: int
    reason: str
    retry: bool

    def to_exception(self) -> ClientError:
        """The error as a :class:`ClientError` to raise."""
        return ClientError(self.code, self.reason, self.retry)


@dataclass(frozen=True, slots=True)
class Event:
    """An ``event`` frame; ``seq`` is None for volatile events."""

    room: str
    seq: int | None
    event: str
    data: Any
    ts: int | None
    from_: dict[str, Any]
    msg_id: str | None = None
    key: str | None = None
    unset: bool = False


@dataclass(frozen=True, slots=True)
class StateValues:
    """The ``state`` frame of a state room, after its ``joined``: the room's current values.

    ``values`` maps each key to its latest event (the session's map after applying them).
    """

    room: str
    values: dict[str, Event]


@dataclass(frozen=True, slots=True)
class Resync:
    """A re-join could not recover the room: reload its state, the cursor moved to ``seq``."""

    room: str
    seq: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The connection ends with ``code``; reconnect only if ``reconnect`` is true."""

    code: int
    reason: str
    reconnect: bool


@dataclass(frozen=True, slots=True)
class RpcRequest:
    """A node-sent ``rpc`` that this client answers with a ``reply`` of the same ``id``."""

    id: int | str
    method: str
    params: Any
    from_: dict[str, Any]


SessionEvent = Connected | Reply | Error | Event | Resync | StateValues | Disconnect | RpcRequest


@dataclass(slots=True)
class RoomState:
    """What the client knows of one room.

    Attributes:
        presence: Whether the room was joined with ``presence: true``.
        last_seq: The last seq received, or None while nothing is known.
        epoch: The epoch of the last ``joined``, or None before it.
        joined: Whether a ``joined`` arrived at least once (only then it is re-joined).
        resuming: Whether a ``join`` with ``since`` is in flight.
        auto: Whether the node joined it by itself (personal rooms): such rooms are
            joined again by the node on each connection, not resumed.
        rewind: The ``rewind`` asked for: sent while no position is known (the first join,
            or a re-join before any event arrived), never with ``since``.
        rewinding: Whether a ``join`` with ``rewind`` is in flight.
        joined_seq: The seq of the last ``joined`` (what its ``state`` frame is at least).
        values: A state room's current values: key -> its latest event.
        key_seqs: The highest seq seen per key, removed ones included (the seq rule).
    """

    presence: bool = False
    last_seq: int | None = None
    epoch: str | None = None
    joined: bool = False
    resuming: bool = False
    auto: bool = False
    rewind: int | None = None
    rewinding: bool = False
    joined_seq: int = 0
    values: dict[str, Event] = field(default_factory=dict)
    key_seqs: dict[str, int] = field(default_factory=dict)
    #: Keys of the ``state`` frames received so far of a state sent in several (``more``).
    state_seen: set[str] = field(default_factory=set)

    def apply(self, ev: Event) -> bool:
        """Apply a keyed event with the seq rule; returns whether it changed the values."""
        if ev.key is None or ev.seq is None or ev.seq <= self.key_seqs.get(ev.key, 0):
            return False
        self.key_seqs[ev.key] = ev.seq
        if ev.unset:
            return self.values.pop(ev.key, None) is not None
        self.values[ev.key] = ev
        return True


class _Pending(NamedTuple):
    kind: str
    room: str | None


def backoff_cap(attempt: int, min_s: float, max_s: float) -> float:
    """The upper bound of the delay before reconnect ``attempt`` (0 for the first).

    It doubles from ``min_s`` at each attempt and saturates at ``max_s``.
    """
    # Beyond 2**64 the float would only overflow; the cap saturated long before.
    return min(max_s, min_s * math.ldexp(1.0, min(max(attempt, 0), 64)))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _map(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _event(room: str, frame: dict[str, Any]) -> Event:
    """An :class:`Event` of ``room`` from an event map (an ``event`` frame, a state value)."""
    msg_id, key = frame.get("msg_id"), frame.get("key")
    return Event(
        room=room,
        seq=_int(frame.get("seq")),
        event=_str(frame.get("event")),
        data=frame.get("data"),
        ts=_int(frame.get("ts")),
        from_=_map(frame.get("from")),
        msg_id=msg_id if isinstance(msg_id, str) else None,
        key=key if isinstance(key, str) else None,
        unset=frame.get("unset") is True,
    )


class ClientSession:
    """The protocol state of one client, kept across its connections.

    Build frames with the ``*_frame`` methods (requests get an ``id`` and are remembered until
    their reply), feed each decoded frame of the node to :meth:`receive` and act on what it
    returns, and call :meth:`connection_lost` when a connection ends.

    Args:
        min_backoff_s: Cap of the first reconnect delay.
        max_backoff_s: Largest cap of a reconnect delay.
        client_name: Sent in ``connect`` as ``client.name``.
    """

    def __init__(
        self,
        *,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 20.0,
        client_name: str = "rtnode-py",
    ) -> None:
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.client_name = client_name
        self.connected_info: dict[str, Any] | None = None
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._rooms: dict[str, RoomState] = {}

    # -- state -----------------------------------------------------------------------------

    @property
    def client_id(self) -> str | None:
        """The ``client_id`` of the current connection, None when not connected."""
        return None if self.connected_info is None else self.connected_info.get("client_id")

    @property
    def node(self) -> str | None:
        """The name of the node of the current connection."""
        return None if self.connected_info is None else self.connected_info.get("node")

    @property
    def rooms(self) -> list[str]:
        """The names of the rooms joined (or being joined), personal ones included."""
        return list(self._rooms)

    def last_seq(self, room: str) -> int:
        """The last seq received in ``room`` (0 when none)."""
        state = self._rooms.get(room)
        return 0 if state is None or state.last_seq is None else state.last_seq

    def values(self, room: str) -> dict[str, Event]:
        """A state room's current values, key -> latest event (a copy; empty otherwise)."""
        state = self._rooms.get(room)
        return {} if state is None else dict(sorted(state.values.items()))

    def pending(self) -> list[int]:
        """The ids of requests still waiting for their reply."""
        return list(self._pending)

    def backoff_delay(self, attempt: int, rand: Callable[[], float]) -> float:
        """The delay before reconnect ``attempt``, with full jitter.

        Args:
            attempt: 0 for the first attempt after a connection ended.
            rand: Returns a float in [0, 1), e.g. ``random.random``.

        Returns:
            A delay in [0, min(max_backoff_s, min_backoff_s * 2**attempt)].
        """
        return rand() * backoff_cap(attempt, self.min_backoff_s, self.max_backoff_s)

    # -- frames to send ----------------------------------------------------------------------

    def _request(self, frame: dict[str, Any], room: str | None = None) -> dict[str, Any]:
        self._next_id += 1
        frame["id"] = self._next_id
        self._pending[self._next_id] = _Pending(str(frame.get("type", "")), room)
        return frame

    def forget(self, request_id: int) -> None:
        """Stop waiting for the reply to ``request_id`` (timed out or abandoned)."""
        self._pending.pop(request_id, None)

    def connect_frame(self, token: str) -> dict[str, Any]:
        """The ``connect`` frame, the first one of each connection."""
        client = {"name": self.client_name, "version": CLIENT_VERSION}
        return {"type": "connect", "token": token, "client": client}

    def join_frame(self, room: str, presence: bool = False,
                   rewind: int | None = None) -> dict[str, Any]:
        """A ``join`` request; it carries ``since`` when the room's position is known, else
        ``rewind`` when one was asked for (None keeps the room's earlier one)."""
        state = self._rooms.get(room)
        if state is None or state.auto:
            state = self._rooms[room] = RoomState(presence=presence)
        state.presence = presence
        if rewind is not None:
            state.rewind = rewind
        frame: dict[str, Any] = {"type": "join", "room": room}
        if presence:
            frame["presence"] = True
        state.rewinding = False
        if state.joined and state.last_seq is not None and state.epoch is not None:
            frame["since"] = {"seq": state.last_seq, "epoch": state.epoch}
            state.resuming = True
        elif state.rewind is not None:
            frame["rewind"] = state.rewind
            state.rewinding = True
        return self._request(frame, room)

    def rejoin_frames(self) -> list[dict[str, Any]]:
        """One ``join`` with ``since`` per room joined before, for a new connection."""
        return [
            self.join_frame(name, state.presence)
            for name, state in list(self._rooms.items())
            if state.joined and not state.auto
        ]

    def leave_frame(self, room: str) -> dict[str, Any]:
        """A ``leave`` request; the room is forgotten now, so it is never re-joined."""
        self.drop_room(room)
        return self._request({"type": "leave", "room": room}, room)

    def drop_room(self, room: str) -> None:
        """Forget ``room`` without telling the node (its connection is gone)."""
        self._rooms.pop(room, None)

    def publish_frame(
        self, room: str, event: str, data: Any = None, msg_id: str | None = None,
        key: str | None = None, unset: bool = False,
    ) -> dict[str, Any]:
        """A ``publish`` request (send it again with the same ``msg_id`` to retry).

        ``key`` and ``unset`` are for state rooms only: the key to set (default: the
        publisher's own id) or, with ``unset``, to remove (the frame then has no ``data``).
        """
        frame: dict[str, Any] = {"type": "publish", "room": room, "event": event}
        if unset:
            frame["unset"] = True
        else:
            frame["data"] = data
        if key is not None:
            frame["key"] = key
        if msg_id is not None:
            frame["msg_id"] = msg_id
        return self._request(frame, room)

    def history_frame(
        self, room: str, since: int | None = None, limit: int | None = None, reverse: bool = False
    ) -> dict[str, Any]:
        """A ``history`` request."""
        frame: dict[str, Any] = {"type": "history", "room": room}
        if since is not None:
            frame["since"] = {"seq": since}
        if limit is not None:
            frame["limit"] = limit
        if reverse:
            frame["reverse"] = True
        return self._request(frame, room)

    def request_frame(self, frame: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of any request ``frame`` with a fresh ``id``."""
        return self._request(dict(frame), _str(frame.get("room")) or None)

    def ack_frame(self, room: str, seq: int) -> dict[str, Any]:
        """An ``ack`` (no reply)."""
        return {"type": "ack", "room": room, "seq": seq}

    def rpc_result_frame(self, request_id: int | str, result: Any) -> dict[str, Any]:
        """The ``reply`` to a node-sent rpc that succeeded."""
        return {"type": "reply", "id": request_id, "result": result}

    def rpc_error_frame(self, request_id: int | str, code: int, reason: str) -> dict[str, Any]:
        """The ``reply`` to a node-sent rpc that failed (``reason``: one line)."""
        line = (reason.splitlines() or [""])[0][:200]
        return {"type": "reply", "id": request_id, "error": {"code": code, "reason": line}}

    # -- frames received ---------------------------------------------------------------------

    def receive(self, frame: Any) -> list[SessionEvent]:
        """Feed one decoded frame of the node; returns what the client must act on.

        Frames of unknown type, or too malformed to use, give nothing (newer nodes may send
        more). Events older than the room's cursor are dropped; others move it.
        """
        if not isinstance(frame, dict):
            return []
        kind = frame.get("type")
        if kind == "event":
            return self._receive_event(frame)
        if kind == "error":
            return self._receive_error(frame)
        if kind == "disconnect":
            return [
                Disconnect(
                    _int(frame.get("code")) or 1006,
                    _str(frame.get("reason")),
                    frame.get("reconnect") is True,
                )
            ]
        if kind == "rpc":
            rid = frame.get("id")
            if not isinstance(rid, int | str) or isinstance(rid, bool):
                return []
            return [
                RpcRequest(rid, _str(frame.get("method")), frame.get("params"),
                           _map(frame.get("from")))
            ]
        if kind == "connected":
            return [self._receive_connected(frame)]
        if kind == "state":
            return self._receive_state(frame)
        rid = _int(frame.get("id"))
        if rid is None or rid not in self._pending:
            return []  # a reply we stopped waiting for
        del self._pending[rid]
        out: list[SessionEvent] = []
        if kind == "joined":
            out.extend(self._receive_joined(frame))
        out.append(Reply(rid, frame))
        return out

    def _receive_connected(self, frame: dict[str, Any]) -> Connected:
        self.connected_info = frame
        rooms = frame.get("rooms")
        for name in rooms if isinstance(rooms, list) else []:
            if isinstance(name, str) and name not in self._rooms:
                self._rooms[name] = RoomState(auto=True)
        return Connected(frame)

    def _receive_event(self, frame: dict[str, Any]) -> list[SessionEvent]:
        room = frame.get("room")
        if not isinstance(room, str):
            return []
        seq = _int(frame.get("seq"))
        state = self._rooms.get(room)
        if seq is not None and state is not None:
            if state.last_seq is not None and seq <= state.last_seq:
                return []  # a duplicate, or older than what was already received
            state.last_seq = seq
        ev = _event(room, frame)
        if state is not None and ev.key is not None:
            state.apply(ev)
        return [ev]

    def _receive_state(self, frame: dict[str, Any]) -> list[SessionEvent]:
        room, values = frame.get("room"), frame.get("values")
        state = self._rooms.get(room) if isinstance(room, str) else None
        if state is None or not isinstance(room, str) or not isinstance(values, list):
            return []  # left meanwhile, or malformed
        seen = state.state_seen
        for raw in values:
            if isinstance(raw, dict):
                ev = _event(room, raw)
                if ev.key is not None and not ev.unset:
                    seen.add(ev.key)
                    state.apply(ev)
        if frame.get("more") is True:
            return []  # a large state comes in several frames: the last has no ``more``
        state.state_seen = set()
        # A key held but absent from the values was removed while we were away: the values
        # are at least as recent as the joined seq, so only keys set after it are kept.
        for key in [k for k in state.values if k not in seen]:
            if state.key_seqs.get(key, 0) <= state.joined_seq:
                del state.values[key]
        return [StateValues(room, dict(sorted(state.values.items())))]

    def _receive_joined(self, frame: dict[str, Any]) -> list[SessionEvent]:
        room = _str(frame.get("room"))
        state = self._rooms.get(room)
        seq, epoch = _int(frame.get("seq")) or 0, _str(frame.get("epoch"))
        if state is None:
            return []  # left while the join was in flight
        out: list[SessionEvent] = []
        recovered = frame.get("recovered") is True
        if not recovered:
            # A failed resume loses events: the application must reload. A first join
            # (no since) is never recovered and starts at the latest seq by design.
            if state.resuming:
                out.append(Resync(room, seq, epoch))
            # A rewind's events (seq up to the joined seq) follow: they set the position.
            rewound = state.rewinding and bool(_int(frame.get("replayed")))
            state.last_seq = None if rewound else seq
        elif state.last_seq is None:
            state.last_seq = seq
        state.epoch, state.joined, state.resuming = epoch, True, False
        state.rewinding = False
        state.joined_seq = seq
        state.state_seen = set()  # the state frames of this join follow
        return out

    def _receive_error(self, frame: dict[str, Any]) -> list[SessionEvent]:
        raw_id = frame.get("id")
        rid = raw_id if isinstance(raw_id, int | str) and not isinstance(raw_id, bool) else None
        error = Error(rid, _int(frame.get("code")) or 4500, _str(frame.get("reason")),
                      frame.get("retry") is True)
        pending = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if pending is not None and pending.kind == "join" and pending.room is not None:
            state = self._rooms.get(pending.room)
            # A first join that failed leaves nothing; a refused re-join (rights changed)
            # drops the room, a retryable one keeps it for the next attempt.
            if state is not None and (not state.joined or not error.retry):
                del self._rooms[pending.room]
            elif state is not None:
                state.resuming = False
        return [error]

    def connection_lost(self) -> None:
        """Forget what belonged to the connection that ended.

        Pending requests are dropped (their callers get ConnectionLost from the client),
        rooms whose first join had no answer are dropped (their join is retried by its
        caller), personal rooms are dropped (the node joins them again at connect).
        """
        self._pending.clear()
        self.connected_info = None
        for name, state in list(self._rooms.items()):
            if state.auto or not state.joined:
                del self._rooms[name]
            else:
                state.resuming = False

    def close_outcome(self, code: int | None, reason: str = "") -> Disconnect:
        """What a transport close without a ``disconnect`` frame means.

        Args:
            code: The WebSocket close code received, None if none was (1006).
            reason: The close reason.
        """
        code = 1006 if code is None else code
        return Disconnect(code, reason or "connection closed", code not in NO_RECONNECT_CODES)
