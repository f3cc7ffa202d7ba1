"""What the bridges share with connection actors: the node's context, the connections index,
the transport side of a connection, and the messages a bridge tells a connection actor.

``node.core.connection`` re-exports every name here: bridges import them from there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from actors.deadlines import Deadlines
from actors.lane import Lane
from actors.system import ActorSystem
from node.core.admission import Admission, Admitted
from node.core.index import ConnectionIndex
from node.core.limits import KeyedBuckets, LimitCarry
from node.core.outbox import FlushTurn
from node.core.ports import LiveFeed, PresencePort, RoomStore, RpcPort, StatePort
from node.core.room import RoomActor, RoomCounters, RoomSettings
from node.core.rpc import RpcRegistry, default_registry
from node.protocol.settings import Settings
from node.protocol.tokens import Principal, TokenVerifier

__all__ = [
    "ConnTransport",
    "ConnectionIndex",
    "Invalid",
    "NodeContext",
    "PlainJoin",
    "PlainLeave",
    "Shutdown",
    "TransportClosed",
]


class ConnTransport(Protocol):
    """The bridge side of a connection."""

    kind: str  # "ws", "mqtt", ...

    def write_message(self, payload: bytes) -> None: ...

    def buffered_bytes(self) -> int: ...

    def close(self, code: int, reason: str) -> None:
        """Close the transport with ``code`` (never blocks)."""


@dataclass
class NodeContext:
    """What every connection of a node shares: settings, keys, the store and the rooms, and the
    admission pipeline every door calls (``admission``, built from settings, store and feed)."""

    settings: Settings
    node_name: str
    tokens: TokenVerifier
    system: ActorSystem
    store: RoomStore
    feed: LiveFeed
    counters: RoomCounters = field(default_factory=RoomCounters)
    index: ConnectionIndex = field(default_factory=ConnectionIndex)
    slow_consumers: int = 0
    #: Heavy requests that waited for their connection's turn (heavy_requests_per_s).
    paced: int = 0
    #: Requests of every connection go through it, one per turn of the loop: a burst of them
    #: from many connections at once cannot hold up the events on their way meanwhile.
    lane: Lane = field(default_factory=Lane)
    #: The connections' timers (token expiry, rpc and join deadlines...) on one loop timer.
    deadlines: Deadlines = field(default_factory=Deadlines)
    #: The connections' outboxes with frames to write, flushed by one callback per turn.
    flush_turn: FlushTurn = field(default_factory=FlushTurn)
    draining: bool = False
    presence: PresencePort | None = None
    rpc: RpcPort | None = None
    #: The values of state rooms (None without NATS: their events are stored, no values).
    state: StatePort | None = None
    rpc_server: RpcRegistry = field(default_factory=lambda: default_registry)
    #: Persistent MQTT sessions (``bridge.mqtt_sessions.SessionStore``; None without NATS).
    sessions: Any | None = None
    admission: Admission = field(init=False)
    #: Per-user buckets of room joins (``rooms_per_min``), shared by a user's connections.
    room_buckets: KeyedBuckets = field(init=False)
    #: Per-user buckets of connects (``connects_per_min``): a client that is cut off and
    #: reconnects at once, over and over, is refused before it costs a connection.
    connect_buckets: KeyedBuckets = field(init=False)
    #: What users' ended connections left of their limits, for their next connection.
    carry: LimitCarry = field(default_factory=LimitCarry)
    #: One RoomSettings per distinct policy, shared by the rooms that have it.
    _room_settings: dict[RoomSettings, RoomSettings] = field(default_factory=dict, init=False,
                                                             repr=False)
    #: ``tokens.verify``, ``admission.admit`` and ``may_open_room`` bound once, for every
    #: connection's session (a bound method made per connection is 64 bytes it keeps).
    verify_token: Callable[..., Principal] = field(init=False, repr=False)
    admit: Callable[..., Admitted] = field(init=False, repr=False)
    may_open: Callable[[str, str], bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings, self.store, self.feed, self.state)
        self.admission.room_here = self._room_here
        self.verify_token = self.tokens.verify
        self.admit = self.admission.admit
        self.may_open = self.may_open_room
        per_min = self.settings.rooms_per_min
        self.room_buckets = KeyedBuckets(per_min / 60.0, per_min)
        per_min = self.settings.connects_per_min
        self.connect_buckets = KeyedBuckets(per_min / 60.0, per_min)

    def sweep_limits(self, now: float) -> None:
        """Forget the limits that bind no one any more (refilled buckets, ended users' limits
        past their minute): what they held can be given back (node/memory.py)."""
        self.room_buckets.sweep(now)
        self.connect_buckets.sweep(now)
        self.carry.sweep(now)

    def room_ref(self, tenant: str, room: str) -> Any:
        """The room actor of ``room``, spawned on first local interest."""
        return self.system.get_or_spawn(_room_name(tenant, room), _RoomFactory(self, tenant, room))

    def _new_room(self, tenant: str, room: str) -> RoomActor:
        # Only when the room is spawned: a join of a running room builds nothing.
        policy = self.settings.room_policy(room)
        stream_size = self.settings.history_size
        settings = RoomSettings(
            history_size=policy.history_size, recovery_max=policy.recovery_max,
            presence=policy.presence,
            trim_to=policy.history_size if 0 < policy.history_size < stream_size else None,
            idle_s=self.settings.room_idle_s, state=policy.state,
        )
        # One object per distinct policy (a handful of namespaces), not one per room.
        settings = self._room_settings.setdefault(settings, settings)
        return RoomActor(tenant, room, self.store, self.feed, settings, self.counters,
                         self.state, self.admission.recent)

    def running_room(self, tenant: str, room: str) -> Any:
        """The room actor of ``room`` if it runs, else None (nothing is spawned)."""
        return self.system.get(_room_name(tenant, room))

    def _room_here(self, tenant: str, room: str) -> bool:
        return self.system.get(_room_name(tenant, room)) is not None  # for every event admitted

    def may_open_room(self, tenant: str, room: str) -> bool:
        """Whether a join of ``room`` may go ahead: its room actor runs already, or the node
        runs fewer than ``max_rooms`` (a join beyond it is refused with 4503)."""
        return (self.counters.rooms < self.settings.max_rooms
                or self.running_room(tenant, room) is not None)


class _RoomFactory:
    """Builds a room actor (again after a restart): kept by the room's actor cell for the
    room's life, so one small object, not a closure (~0.3 KB with its cells; a node with
    10,000 users has 10,000 personal rooms)."""

    __slots__ = ("ctx", "room", "tenant")

    def __init__(self, ctx: NodeContext, tenant: str, room: str) -> None:
        self.ctx, self.tenant, self.room = ctx, tenant, room

    def __call__(self) -> RoomActor:
        return self.ctx._new_room(self.tenant, self.room)


def _room_name(tenant: str, room: str) -> str:
    return f"room:{tenant}:{room}"


@dataclass(frozen=True, slots=True)
class Invalid:
    """A frame the bridge could not decode or validate, or a request that failed later."""

    code: int
    reason: str
    request_id: str | int | None = None
    retry: bool = False
    #: It was a ``reply`` (to an rpc the node sent): its caller is answered 4500 at once.
    reply: bool = False


@dataclass(frozen=True, slots=True)
class TransportClosed:
    """The peer went away."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """End the connection with a ``disconnect`` frame."""

    code: int
    reason: str
    reconnect: bool



@dataclass(frozen=True, slots=True)
class PlainJoin:
    """Join ``room`` for a plain subscriber (MQTT ``rooms/<room>``): the room's events go to
    ``transport`` in ``codec``, not to the connection's frames. Like any membership of the
    connection, it rejoins from its cursor when the room actor is rebuilt, and ends with the
    connection. Silent: the bridge answered the subscription itself."""

    room: str
    codec: Any
    transport: ConnTransport


@dataclass(frozen=True, slots=True)
class PlainLeave:
    """End the plain subscription to ``room`` (nothing if there is none)."""

    room: str
