"""What a :class:`~node.core.session.ConnectionSession` asks its actor to do.

Each command is a small value; the actor executes them in the order the session queued
them (``ConnectionSession.commands_to_send``) and feeds the results back through the session's
``receive_*`` methods. Nothing here does anything by itself.

Nothing changes a command once it is made, but the classes are not ``frozen``: a frozen
dataclass sets each field through ``object.__setattr__``, which made a command ~3x dearer to
build (~0.3 us; a publish makes two, a connect about ten).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.core.admission import Admitted
from node.protocol.tokens import Principal

__all__ = [
    "AdmitConnection",
    "AnnouncePresence",
    "CallRpc",
    "CancelTimer",
    "Close",
    "Command",
    "CommandQueue",
    "JoinPlainRoom",
    "JoinRoom",
    "LeavePlainRoom",
    "LeaveRoom",
    "PresenceAdd",
    "PresenceOffline",
    "PresenceRemove",
    "PresenceWatch",
    "ReadHistory",
    "ReadPresence",
    "RegisterRpc",
    "RespondRpc",
    "SendFrame",
    "SendVolatile",
    "StartTimer",
    "Stop",
    "StorePublish",
    "TimerKey",
    "UnregisterRpc",
]

#: A timer's name: (kind, detail), e.g. ("connect", ""), ("held", room), ("rpc-out", call).
TimerKey = tuple[str, str]


@dataclass(slots=True)
class SendFrame:
    """Send ``frame`` to the client (through its outbox)."""

    frame: dict[str, Any]


@dataclass(slots=True)
class Close:
    """Send a ``disconnect`` frame, close the transport with ``code`` and stop the actor."""

    code: int
    reason: str
    reconnect: bool


@dataclass(slots=True)
class Stop:
    """Stop the actor without a word (the transport is already gone)."""


@dataclass(slots=True)
class AdmitConnection:
    """Check the node takes ``principal`` (not draining, under the per-user connection limit)
    and count it; answer with ``ConnectionSession.receive_admitted``."""

    principal: Principal


@dataclass(slots=True)
class RegisterRpc:
    """Route rpcs for ``targets`` to this connection; done before anything queued after it."""

    tenant: str
    targets: list[str]


@dataclass(slots=True)
class UnregisterRpc:
    """Stop routing rpcs for ``targets`` to this connection."""

    tenant: str
    targets: list[str]


@dataclass(slots=True)
class StartTimer:
    """Call ``receive_timer(key)`` at ``deadline`` (replaces a timer of the same key)."""

    key: TimerKey
    deadline: float


@dataclass(slots=True)
class CancelTimer:
    """Forget the timer ``key``, if any."""

    key: TimerKey


@dataclass(slots=True)
class JoinRoom:
    """Become a member of ``room``; the room answers ``joined`` unless ``silent``, and the
    actor calls ``receive_room_joined`` once the room has taken the member in."""

    room: str
    since_seq: int | None
    since_epoch: str | None
    request_id: Any
    presence: bool
    silent: bool
    rewind: int | None = None  # replay the room's last ``rewind`` events first (no since)


@dataclass(slots=True)
class LeaveRoom:
    """Stop being a member of ``room`` (no reply)."""

    room: str


@dataclass(slots=True)
class JoinPlainRoom:
    """Join ``room`` for the plain subscriber ``source`` (None: the one already there)."""

    room: str
    since_seq: int | None
    since_epoch: str | None
    source: Any


@dataclass(slots=True)
class LeavePlainRoom:
    """End the plain subscription to ``room``; what the room already delivered still goes out."""

    room: str


@dataclass(slots=True)
class StorePublish:
    """Store an admitted event; answer with ``receive_stored`` or ``receive_failed``."""

    admitted: Admitted
    request_id: Any


@dataclass(slots=True)
class SendVolatile:
    """Send an admitted volatile event, fire and forget."""

    admitted: Admitted


@dataclass(slots=True)
class ReadHistory:
    """Read history; answer with ``receive_history`` or ``receive_failed``."""

    request_id: Any
    tenant: str
    room: str
    since: int | None
    limit: int
    reverse: bool


@dataclass(slots=True)
class ReadPresence:
    """Read a room's presence; answer with ``receive_presence`` or ``receive_failed``."""

    request_id: Any
    tenant: str
    room: str


@dataclass(slots=True)
class PresenceWatch:
    """Start (``on``) or stop watching a room's presence for presence events."""

    room: str
    on: bool


@dataclass(slots=True)
class PresenceAdd:
    """Add this connection to a room's presence."""

    room: str
    member: dict[str, Any]


@dataclass(slots=True)
class PresenceRemove:
    """Remove this connection from a room's presence."""

    room: str


@dataclass(slots=True)
class PresenceOffline:
    """Keep this connection in a room's presence as offline (``member`` has ``online:
    false``) for ``ttl_s`` seconds, instead of removing it (``PresencePort.mark_offline``)."""

    room: str
    member: dict[str, Any]
    ttl_s: float


@dataclass(slots=True)
class AnnouncePresence:
    """Send a ``presence:join``/``presence:leave`` volatile event about ``member``."""

    room: str
    name: str
    member: dict[str, Any]


@dataclass(slots=True)
class CallRpc:
    """Call ``method`` on ``to`` (``server`` or a client target), with ``request`` for a
    client; answer with ``receive_rpc_result`` or ``receive_rpc_failed``."""

    call: str
    to: str
    method: str
    params: Any
    timeout_s: float
    request: dict[str, Any]


@dataclass(slots=True)
class RespondRpc:
    """Answer an rpc that another connection sent to this one."""

    reply_to: str
    answer: dict[str, Any]


Command = (
    SendFrame | Close | Stop | AdmitConnection | RegisterRpc | UnregisterRpc | StartTimer
    | CancelTimer | JoinRoom | LeaveRoom | JoinPlainRoom | LeavePlainRoom | StorePublish
    | SendVolatile | ReadHistory | ReadPresence | PresenceWatch | PresenceAdd | PresenceRemove
    | PresenceOffline | AnnouncePresence | CallRpc | RespondRpc
)


class CommandQueue:
    """The commands a session queued and not yet handed out; the base of the session's parts."""

    # Slots, here and in ConnectionSession (all its state): an idle connection holds one
    # session, and a __dict__ of its 30-odd attributes was ~1.5 KB of it. (Its parts have no
    # slots of their own: their __dict__ stays unallocated while every attribute is a slot.)
    __slots__ = ("_commands",)

    def __init__(self) -> None:
        self._commands: list[Command] = []

    def commands_to_send(self) -> list[Command]:
        """Return (and forget) the commands queued since the last call, oldest first.

        Call it after every ``receive_*``/``start``/``stop`` and execute the commands in order.
        """
        commands, self._commands = self._commands, []
        return commands

    def _send(self, frame: dict[str, Any]) -> None:
        self._commands.append(SendFrame(frame))

    def _reply(self, request_id: Any, frame: dict[str, Any]) -> None:
        if request_id is not None:  # requests without an id get no typed reply
            frame["id"] = request_id
            self._commands.append(SendFrame(frame))
