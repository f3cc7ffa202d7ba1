"""``ConnectionActor``: one per client connection, whatever the transport (WebSocket, MQTT tunnel).

It holds the principal from the token, the rooms joined (one :class:`Membership` each), the rate
limiter and the error tolerance. Every frame reaching it is already validated (``parse_frame``);
it checks rights on every action and answers each request exactly once, through its outbox.
Publishes are pipelined: the actor hands them to the store and goes on with the next frame; the
``published`` reply is sent when the store acknowledges.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from actors.actor import Actor
from actors.errors import ActorDeadError, ActorError
from actors.mailbox import Overflow
from actors.system import ActorSystem
from node.core.admission import Admission, Admitted, VolatilePublisher
from node.core.events import event_body, read_history
from node.core.limits import ErrorWindow, TokenBucket
from node.core.outbox import Outbox
from node.core.ports import LiveFeed, PresencePort, RoomStore, RpcError, RpcPort, StoreError
from node.core.room import Join, Leave, Membership, RoomActor, RoomCounters, RoomSettings
from node.core.rpc import RpcRegistry, default_registry
from node.protocol.errors import AuthError, ProtocolError
from node.protocol.frames import (
    Ack,
    ClientFrame,
    Connect,
    History,
    Ping,
    Presence,
    Publish,
    Refresh,
    Reply,
    Rpc,
    error_frame,
)
from node.protocol.frames import (
    Join as JoinFrame,
)
from node.protocol.frames import (
    Leave as LeaveFrame,
)
from node.protocol.settings import Settings
from node.protocol.tokens import Principal, TokenVerifier
from node.protocol.values import check_value

__all__ = [
    "ConnTransport",
    "ConnectionActor",
    "ConnectionIndex",
    "Invalid",
    "NodeContext",
    "PlainJoin",
    "PlainLeave",
    "Shutdown",
    "TransportClosed",
]

log = logging.getLogger("node.core.connection")

# How long publishes right after a join wait for the room to take the join in (a room starts
# in ~1 ms; one that cannot start answers the join with an error).
_JOIN_WAIT_S = 5.0


class ConnTransport(Protocol):
    """The bridge side of a connection."""

    kind: str  # "ws", "mqtt", ...

    def write_message(self, payload: bytes) -> None: ...

    def buffered_bytes(self) -> int: ...

    def close(self, code: int, reason: str) -> None:
        """Close the transport with ``code`` (never blocks)."""


class ConnectionIndex:
    """Connections of this node by user, for the per-user limit and for targeting."""

    def __init__(self) -> None:
        self.by_user: dict[tuple[str, str], set[str]] = {}
        self.by_id: dict[str, Any] = {}
        self._empty_waiters: list[asyncio.Future[None]] = []

    async def wait_empty(self) -> None:
        """Return once no connection is left (for a drain)."""
        if self.by_id:
            fut = asyncio.get_running_loop().create_future()
            self._empty_waiters.append(fut)
            await fut

    def add(self, principal: Principal, client_id: str, ref: Any, limit: int) -> bool:
        key = (principal.tenant, principal.sub)
        ids = self.by_user.setdefault(key, set())
        if len(ids) >= limit:
            if not ids:
                del self.by_user[key]
            return False
        ids.add(client_id)
        self.by_id[client_id] = ref
        return True

    def remove(self, principal: Principal, client_id: str) -> None:
        key = (principal.tenant, principal.sub)
        ids = self.by_user.get(key)
        if ids is not None:
            ids.discard(client_id)
            if not ids:
                del self.by_user[key]
        self.by_id.pop(client_id, None)
        if not self.by_id:
            waiters, self._empty_waiters = self._empty_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)


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
    draining: bool = False
    presence: PresencePort | None = None
    rpc: RpcPort | None = None
    rpc_server: RpcRegistry = field(default_factory=lambda: default_registry)
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings, self.store, self.feed)

    def room_ref(self, tenant: str, room: str) -> Any:
        """The room actor of ``room``, spawned on first local interest."""
        policy = self.settings.room_policy(room)
        stream_size = self.settings.history_size
        settings = RoomSettings(
            history_size=policy.history_size, recovery_max=policy.recovery_max,
            presence=policy.presence,
            trim_to=policy.history_size if 0 < policy.history_size < stream_size else None,
        )
        return self.system.get_or_spawn(
            f"room:{tenant}:{room}",
            lambda: RoomActor(tenant, room, self.store, self.feed, settings, self.counters),
        )


@dataclass(frozen=True, slots=True)
class Invalid:
    """A frame the bridge could not decode or validate, or a request that failed later."""

    code: int
    reason: str
    request_id: str | int | None = None
    retry: bool = False


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
class _RpcIn:
    request: dict[str, Any]
    reply_to: str


@dataclass(frozen=True, slots=True)
class _RpcExpired:
    rpc_id: str


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


@dataclass(frozen=True, slots=True)
class _RoomLost:
    room: str
    plain: bool = False


@dataclass(frozen=True, slots=True)
class _InRoom:
    """The room took ``member``'s join in (None: stop holding publishes for the room)."""

    room: str
    member: Membership | None


@dataclass(frozen=True, slots=True)
class _ConnectTimeout:
    pass


@dataclass(frozen=True, slots=True)
class _Expired:
    pass


class ConnectionActor(Actor):
    """One client connection.

    Args:
        ctx: The node's shared context.
        transport: The bridge's side of the connection.
        codec: The connection's codec (``node.protocol.JSON`` or ``CBOR``).
        principal: Already authenticated (MQTT); None when a ``connect`` frame must come first.
    """

    kind = "connection"
    mailbox_size = 1024
    on_overflow = Overflow.CALLBACK
    # Flow control of the client's input (bridge/ws.py, bridge/mqtt.py): its bridge tells
    # frames while fewer than inbound_high are queued, then stops reading the socket until the
    # actor is down to inbound_low (ActorRef.wait_for_room; the client's TCP window then slows
    # it down). The other 512 slots are for the actor's own messages: timers, results of
    # background work, rpc requests, a shutdown; only those can overflow the mailbox.
    inbound_high = 512
    inbound_low = 256

    def __init__(
        self,
        ctx: NodeContext,
        transport: ConnTransport,
        codec: Any,
        principal: Principal | None = None,
        client_id: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.transport = transport
        self.client_id = client_id or secrets.token_hex(8)
        self.outbox = Outbox(
            codec, transport, limit=self.settings.slow_consumer_bytes, on_slow=self._on_slow
        )
        self.principal = principal
        self.preauthenticated = principal is not None
        self._announced = False
        self.connected = False
        self.closing = False
        self.rooms: dict[str, Membership] = {}
        # Plain subscriptions (MQTT rooms/<room>), each with its own outbox: a device may also
        # join the same room on its tunnel.
        self.plain: dict[str, Membership] = {}
        now = time.monotonic()
        self.bucket = TokenBucket(self.settings.rate_per_s, self.settings.rate_burst, now)
        self.errors = ErrorWindow(self.settings.max_errors_per_min)
        self._timers: list[asyncio.TimerHandle] = []
        self._expiry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._joined_at = int(time.time() * 1000)
        self._rpc_pending: dict[str, tuple[str, asyncio.TimerHandle]] = {}
        # Rooms joined but not yet taken in by their room, and the publishes held for them.
        self._joining: set[str] = set()
        self._held: dict[str, list[tuple[Admitted, Any]]] = {}
        self._rpc_ids = 0
        self._volatile = VolatilePublisher(ctx.admission,
                                           self.settings.volatile_throttle_ms / 1000)
        self._door = "ws" if transport.kind == "ws" else "tunnel"

    # -- life ------------------------------------------------------------------------------

    async def on_start(self) -> None:
        if self.principal is not None:
            await self._accept(self.principal, request_id=None, announce=False)
        else:
            self._timers.append(self._loop.call_later(
                self.settings.connect_timeout_s, self._tell, _ConnectTimeout()))

    async def on_stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
        for task in self._tasks:
            task.cancel()
        self._volatile.close()
        self.outbox.flush()
        for room, member in self.rooms.items():
            self._tell_room(room, Leave(member))
            if self.connected:
                self._presence_off(room, member, announce=True)
        self.rooms.clear()
        for room in list(self.plain):
            self._plain_leave(room)
        if self.principal is not None and self.connected:
            self.ctx.index.remove(self.principal, self.client_id)
            if self.ctx.rpc is not None:
                self.ctx.rpc.unregister(self.principal.tenant, self._rpc_targets(),
                                        self._on_rpc_request)
                for reply_to, timer in self._rpc_pending.values():
                    timer.cancel()
                    self.ctx.rpc.respond(reply_to, {"error": {
                        "code": 4004, "reason": "rpc target went away", "retry": True}})
                self._rpc_pending.clear()
        self.outbox.close()

    async def on_failure(self, exc: BaseException) -> None:
        log.error("! connection %s failed: %r", self.client_id, exc)
        self.outbox.send_now({"type": "disconnect", "code": 4500, "reason": "internal error",
                              "reconnect": True})
        self.transport.close(4500, "internal error")

    def on_mailbox_full(self, message: Any) -> None:
        # Client frames never get here (their bridge waits for room, see inbound_high): this is
        # a flood of the actor's own messages (e.g. rpc requests from other clients). It is cut
        # off rather than queued without bound.
        if not self.closing:
            self.closing = True
            self._loop.call_soon(self._close_now, 4009, "too many frames", True)
            self._loop.create_task(self.ref.stop(drain=False),
                                   name=f"conn[{self.client_id}].stop")

    def _tell(self, message: Any) -> None:
        try:
            self.ref.tell(message)
        except ActorDeadError:
            pass

    def _on_slow(self) -> None:
        self.ctx.slow_consumers += 1
        self._tell(Shutdown(4008, "slow consumer", True))

    def _on_room_lost(self, room: str) -> None:
        self._tell(_RoomLost(room))

    def _on_plain_room_lost(self, room: str) -> None:
        self._tell(_RoomLost(room, plain=True))

    def _spawn(self, coro: Any, name: str) -> None:
        task = self._loop.create_task(coro, name=f"conn[{self.client_id}].{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _close_now(self, code: int, reason: str, reconnect: bool) -> None:
        self.outbox.send_now(
            {"type": "disconnect", "code": code, "reason": reason, "reconnect": reconnect}
        )
        self.outbox.close()
        self.transport.close(code, reason)

    def _disconnect(self, code: int, reason: str, reconnect: bool) -> None:
        if self.closing and code != 4008:
            return
        self.closing = True
        self._close_now(code, reason, reconnect)
        self._loop.create_task(self.ref.stop(drain=False), name=f"conn[{self.client_id}].stop")

    # -- messages --------------------------------------------------------------------------

    async def on_receive(self, message: Any) -> Any:
        if self.closing:
            if isinstance(message, TransportClosed):
                self._loop.create_task(self.ref.stop(drain=False))
            return None
        if isinstance(message, Invalid):
            if not self.connected:
                # PROTOCOL.md section 1: anything but a connect first ends the connection.
                self._disconnect(message.code, message.reason, False)
            else:
                self._error(message.code, message.reason, message.request_id, message.retry)
        elif isinstance(message, TransportClosed):
            self.closing = True
            self._loop.create_task(self.ref.stop(drain=False))
        elif isinstance(message, Shutdown):
            self._disconnect(message.code, message.reason, message.reconnect)
        elif isinstance(message, _ConnectTimeout):
            if not self.connected:
                self._disconnect(4001, "no connect frame in time", False)
        elif isinstance(message, _Expired):
            self._disconnect(4010, "token expired", True)
        elif isinstance(message, _InRoom):
            self._in_room(message)
        elif isinstance(message, _RoomLost):
            if not message.plain:  # what was held for the lost join goes to the store now
                self._in_room(_InRoom(message.room, None))
            if message.plain:
                self._rejoin_plain(message.room)
            else:
                self._rejoin(message.room)
        elif isinstance(message, PlainJoin):
            self._plain_join(message)
        elif isinstance(message, PlainLeave):
            self._plain_leave(message.room)
        elif isinstance(message, _RpcIn):
            self._rpc_in(message)
        elif isinstance(message, _RpcExpired):
            self._rpc_pending.pop(message.rpc_id, None)
        else:
            try:
                await self._handle(message)
            except ProtocolError as exc:
                self._error(exc.code, exc.reason, getattr(message, "id", None), exc.retry)
        return None

    def _error(self, code: int, reason: str, request_id: Any, retry: bool = False) -> None:
        if code in (4001,) or (code == 4010 and not self.connected):
            self._disconnect(code, reason, code == 4010)
            return
        self.outbox.send(error_frame(code, reason, id=request_id, retry=retry))
        if code in (4000, 4009) and self.errors.add(time.monotonic()):
            self._disconnect(code, "too many errors", code == 4009)

    def _reply(self, request_id: Any, frame: dict[str, Any]) -> None:
        if request_id is not None:
            frame["id"] = request_id
            self.outbox.send(frame)

    async def _handle(self, frame: ClientFrame) -> None:
        if isinstance(frame, Connect):
            if self.connected and self.preauthenticated and not self._announced:
                # MQTT: the transport authenticated; an explicit connect gets its answer.
                self._announced = True
                self._send_connected(frame.id)
                return
            if self.connected:
                raise ProtocolError(4000, "already connected")
            principal = self.ctx.tokens.verify(frame.token)
            await self._accept(principal, frame.id, announce=True)
            return
        if not self.connected:
            self._disconnect(4001, "connect must be the first frame", False)
            return
        if isinstance(frame, Publish):
            self._publish(frame)
        elif isinstance(frame, JoinFrame):
            self._join(frame)
        elif isinstance(frame, LeaveFrame):
            self._leave(frame)
        elif isinstance(frame, History):
            self._history(frame)
        elif isinstance(frame, Ping):
            self._reply(frame.id, {"type": "pong"})
        elif isinstance(frame, Ack):
            if frame.room not in self.rooms:
                raise ProtocolError(4004, "not joined to this room", retry=False)
        elif isinstance(frame, Refresh):
            self._refresh(frame)
        elif isinstance(frame, Presence):
            self._presence(frame)
        elif isinstance(frame, Rpc):
            self._rpc_out(frame)
        elif isinstance(frame, Reply):
            self._rpc_reply(frame)

    # -- connect, refresh, expiry ------------------------------------------------------------

    async def _accept(self, principal: Principal, request_id: Any, *, announce: bool) -> None:
        if self.ctx.draining:
            self._disconnect(4503, "node draining", True)
            return
        if principal.kind not in ("user", "device", "service"):
            raise AuthError("invalid kind")
        if not self.ctx.index.add(principal, self.client_id, self.ref,
                                  self.settings.max_connections_per_user):
            self._disconnect(4029, "too many connections for this user", False)
            return
        self.principal = principal
        self.connected = True
        if self.ctx.rpc is not None:
            # Awaited: once a client has its ``connected``, rpcs to it find it.
            await self.ctx.rpc.register(principal.tenant, self._rpc_targets(),
                                        self._on_rpc_request)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._schedule_expiry()
        personal = principal.personal_room
        if personal is not None:
            self._join_room(personal, None, None, None, silent=True)
        if announce:
            self._announced = True
            self._send_connected(request_id)

    def _send_connected(self, request_id: Any) -> None:
        # Answered even without an id: the handshake is what a connect is for.
        principal = self.principal
        assert principal is not None
        auto = [principal.personal_room] if principal.personal_room else []
        expires = principal.expires_in()
        connected: dict[str, Any] = {
            "type": "connected", "client_id": self.client_id, "node": self.ctx.node_name,
            "heartbeat_s": _number(self.settings.heartbeat_s),
            "expires_in_s": None if expires is None else int(expires),
            "rooms": auto,
        }
        if request_id is not None:
            connected["id"] = request_id
        self.outbox.send(connected)

    def _schedule_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        assert self.principal is not None
        left = self.principal.expires_in()
        if left is not None:
            self._expiry = self._loop.call_later(max(0.0, left), self._tell, _Expired())

    def _refresh(self, frame: Refresh) -> None:
        assert self.principal is not None
        try:
            principal = self.ctx.tokens.verify(frame.token)
        except AuthError as exc:
            if exc.expired:
                raise ProtocolError(4010, "token expired", retry=True) from None
            raise
        if (principal.sub, principal.tenant, principal.kind) != (
            self.principal.sub, self.principal.tenant, self.principal.kind
        ):
            raise ProtocolError(4003, "refresh token is for another principal")
        self.principal = principal
        self._schedule_expiry()
        left = principal.expires_in()
        self._reply(frame.id, {"type": "refreshed",
                               "expires_in_s": None if left is None else int(left)})

    # -- rooms -----------------------------------------------------------------------------

    def _tell_room(self, room: str, message: Any) -> None:
        assert self.principal is not None
        try:
            self.ctx.room_ref(self.principal.tenant, room).tell(message)
        except ActorError:  # the room is stopping, or the whole system is
            log.debug("! room %s unavailable for %s", room, self.client_id)

    def _join_room(self, room: str, since_seq: int | None, since_epoch: str | None,
                   request_id: Any, *, presence: bool = False, silent: bool = False) -> None:
        old = self.rooms.pop(room, None)
        if old is not None:
            self._tell_room(room, Leave(old))
            self._presence_off(room, old, announce=False)
        member = Membership(self.client_id, self.outbox, self._on_room_lost, presence=presence)
        member.on_in_room = functools.partial(self._tell, _InRoom(room, member))
        self._joining.add(room)
        self.rooms[room] = member
        self._tell_room(room, Join(member, since_seq, since_epoch, request_id, silent))
        self._presence_on(room, member, announce=old is None)

    def _tracked(self, room: str) -> bool:
        return (self.ctx.presence is not None and not room.startswith("@")
                and self.settings.room_policy(room).presence)

    def _member_info(self) -> dict[str, Any]:
        assert self.principal is not None
        return {"client_id": self.client_id, "user": self.principal.sub,
                "kind": self.principal.kind, "node": self.ctx.node_name,
                "joined_at": self._joined_at}

    def _presence_event(self, room: str, name: str) -> None:
        assert self.principal is not None
        body = event_body(room, name, self._member_info(), self.principal, self.client_id, None)
        self._spawn(self.ctx.feed.publish_volatile(self.principal.tenant, room, body), name)

    def _presence_on(self, room: str, member: Membership, *, announce: bool) -> None:
        presence = self.ctx.presence
        if presence is None or not self._tracked(room):
            return
        assert self.principal is not None
        if member.presence:
            presence.watch(self.principal.tenant, room, True)
        if announce:
            presence.add(self.principal.tenant, room, self._member_info())
            self._presence_event(room, "presence:join")

    def _presence_off(self, room: str, member: Membership, *, announce: bool) -> None:
        presence = self.ctx.presence
        if presence is None or not self._tracked(room):
            return
        assert self.principal is not None
        if member.presence:
            presence.watch(self.principal.tenant, room, False)
        if announce:
            presence.remove(self.principal.tenant, room, self.client_id)
            self._presence_event(room, "presence:leave")

    def _join(self, frame: JoinFrame) -> None:
        assert self.principal is not None
        if not self.principal.can("join", frame.room):
            raise ProtocolError(4003, "no join right on this room")
        if frame.presence and not self.principal.can("presence", frame.room):
            raise ProtocolError(4003, "no presence right on this room")
        limit = self.settings.max_rooms_per_connection
        if frame.room not in self.rooms and len(self.rooms) >= limit:
            raise ProtocolError(4029, "too many rooms for this connection")
        since = frame.since
        self._join_room(
            frame.room, since.seq if since else None, since.epoch if since else None,
            frame.id, presence=frame.presence,
        )

    def _rejoin(self, room: str) -> None:
        member = self.rooms.get(room)
        if member is None:
            return
        log.info("= %s rejoins %s from seq %s", self.client_id, room, member.cursor)
        self._join_room(room, member.cursor, self.ctx.store.epoch, None,
                        presence=member.presence, silent=True)

    def _plain_join(self, msg: PlainJoin) -> None:
        principal = self.principal
        if principal is None or not self.connected:
            return
        if not principal.can("join", msg.room):
            # The bridge checked it for its SUBACK; rights are checked on every action.
            log.warning("! %s: plain subscription to %s refused", self.client_id, msg.room)
            return
        if msg.room in self.plain:
            return  # a repeated SUBSCRIBE replaces the subscription: the membership goes on
        outbox = Outbox(msg.codec, msg.transport, limit=self.settings.slow_consumer_bytes,
                        on_slow=self._on_slow)
        self._join_plain_room(msg.room, outbox, None)

    def _join_plain_room(self, room: str, outbox: Outbox, since: int | None) -> None:
        member = Membership(self.client_id, outbox, self._on_plain_room_lost)
        self.plain[room] = member
        epoch = None if since is None else self.ctx.store.epoch
        self._tell_room(room, Join(member, since, epoch, None, silent=True))

    def _rejoin_plain(self, room: str) -> None:
        member = self.plain.get(room)
        if member is None:
            return
        # A first join lost before its replay ended delivered nothing (cursor 0): it starts
        # live again, as it began, rather than replaying the room from its first event.
        since = None if member.replaying and not member.cursor else member.cursor
        log.info("= %s rejoins %s (plain) from seq %s", self.client_id, room, since)
        self._join_plain_room(room, member.outbox, since)

    def _plain_leave(self, room: str) -> None:
        member = self.plain.pop(room, None)
        if member is not None:
            self._tell_room(room, Leave(member))
            member.outbox.flush()  # what the room already delivered still goes out
            member.outbox.close()

    def _leave(self, frame: LeaveFrame) -> None:
        self._in_room(_InRoom(frame.room, None))  # publishes sent before the leave are stored
        member = self.rooms.pop(frame.room, None)
        if member is not None:
            self._tell_room(frame.room, Leave(member))
            self._presence_off(frame.room, member, announce=True)
        self._reply(frame.id, {"type": "left", "room": frame.room})

    # -- publish and history ---------------------------------------------------------------

    def _publish(self, frame: Publish) -> None:
        admitted = self.ctx.admission.admit(self._door, self.principal, frame,
                                            client_id=self.client_id, bucket=self.bucket)
        if admitted.volatile:
            self._volatile.publish(admitted)  # throttled per room: the latest of a burst wins
            self._reply(frame.id, {"type": "published", "room": frame.room})
            return
        self._hold_or_store(admitted, frame.id)

    # -- rpc -------------------------------------------------------------------------------

    def _rpc_targets(self) -> list[str]:
        assert self.principal is not None
        targets = [f"client:{self.client_id}"]
        if self.principal.kind in ("user", "device"):
            targets.append(f"{self.principal.kind}:{self.principal.sub}")
        return targets

    def _on_rpc_request(self, request: dict[str, Any], reply_to: str) -> None:
        self._tell(_RpcIn(request, reply_to))

    def _rpc_out(self, frame: Rpc) -> None:
        principal = self.principal
        assert principal is not None
        if not principal.can_call(frame.to):
            raise ProtocolError(4003, "no rpc right for this target")
        if frame.id is None:
            raise ProtocolError(4000, "an rpc needs an id")
        check_value(frame.params, "params")  # the target may speak another codec
        self._spawn(self._call(frame, principal), "rpc")

    async def _call(self, frame: Rpc, principal: Principal) -> None:
        timeout = frame.timeout_ms / 1000
        try:
            if frame.to == "server":
                result = await asyncio.wait_for(
                    self.ctx.rpc_server.call(frame.method, frame.params, principal), timeout)
                try:
                    check_value(result, "result")
                except ProtocolError as exc:
                    log.error("! rpc method %s returned %s", frame.method, exc.reason)
                    raise RpcError(4500, "rpc method failed", retry=True) from None
            elif self.ctx.rpc is None:
                raise RpcError(4004, "rpc is not available")
            else:
                request = {
                    "method": frame.method, "params": frame.params, "timeout_ms":
                    frame.timeout_ms, "from": {"user": principal.sub, "kind": principal.kind,
                                               "client_id": self.client_id},
                }
                result = await self.ctx.rpc.request(principal.tenant, frame.to, request,
                                                    timeout)
        except TimeoutError:
            self._tell(Invalid(4504, "rpc timed out", frame.id))
        except (RpcError, ProtocolError) as exc:
            self.outbox.send(error_frame(exc.code, exc.reason, id=frame.id, retry=exc.retry))
        else:
            self._reply(frame.id, {"type": "result", "result": result})

    def _rpc_in(self, msg: _RpcIn) -> None:
        request = msg.request
        method = request.get("method")
        if not isinstance(method, str) or self.ctx.rpc is None:
            return
        try:  # checked by the caller's node too; an older one may not have
            check_value(request.get("params"), "params")
        except ProtocolError as exc:
            self.ctx.rpc.respond(msg.reply_to, {"error": {"code": 4000, "reason": exc.reason}})
            return
        self._rpc_ids += 1
        rpc_id = f"r{self._rpc_ids}"
        timeout_ms = request.get("timeout_ms")
        timeout = timeout_ms / 1000 if isinstance(timeout_ms, int) else 60.0
        timer = self._loop.call_later(timeout, self._tell, _RpcExpired(rpc_id))
        self._rpc_pending[rpc_id] = (msg.reply_to, timer)
        self.outbox.send({"type": "rpc", "id": rpc_id, "from": request.get("from"),
                          "method": method, "params": request.get("params")})

    def _rpc_reply(self, frame: Reply) -> None:
        pending = self._rpc_pending.pop(str(frame.id), None)
        if pending is None or self.ctx.rpc is None:
            return  # late, or not ours: the caller has had its timeout
        reply_to, timer = pending
        timer.cancel()
        if frame.error is not None:
            answer: dict[str, Any] = {"error": {"code": frame.error.code,
                                                "reason": frame.error.reason}}
            checked, where = frame.error.code, "error.code"
        else:
            answer = {"result": frame.result}
            checked, where = frame.result, "result"
        try:  # the caller may speak another codec
            check_value(checked, where)
        except ProtocolError:
            self.ctx.rpc.respond(reply_to, {"error": {
                "code": 4500, "reason": "rpc target sent an invalid reply", "retry": True}})
            raise
        self.ctx.rpc.respond(reply_to, answer)

    def _hold_or_store(self, admitted: Admitted, request_id: Any) -> None:
        room = admitted.room
        if room in self._joining:
            # Joined a moment ago: store once the room has taken the join in, so the event
            # comes after the room's position and reaches this member too. Held in order,
            # released in order (and after _JOIN_WAIT_S at the latest).
            held = self._held.setdefault(room, [])
            if not held:
                self._loop.call_later(_JOIN_WAIT_S, self._tell, _InRoom(room, None))
            held.append((admitted, request_id))
            return
        self._spawn(self._store(admitted, request_id), "publish")

    def _in_room(self, msg: _InRoom) -> None:
        if msg.member is not None and self.rooms.get(msg.room) is not msg.member:
            return  # an older join of the room: the current one is still on its way
        self._joining.discard(msg.room)
        for admitted, request_id in self._held.pop(msg.room, []):
            self._spawn(self._store(admitted, request_id), "publish")

    async def _store(self, admitted: Admitted, request_id: Any) -> None:
        try:
            seq = await self.ctx.admission.store(admitted)
        except ProtocolError as exc:
            self._tell(Invalid(exc.code, exc.reason, request_id, exc.retry))
            return
        self._reply(request_id, {"type": "published", "room": admitted.room, "seq": seq})

    def _history(self, frame: History) -> None:
        assert self.principal is not None
        if not self.principal.can("history", frame.room):
            raise ProtocolError(4003, "no history right on this room")
        self._spawn(self._read_history(frame, self.principal.tenant), "history")

    async def _read_history(self, frame: History, tenant: str) -> None:
        try:
            events, latest = await read_history(
                self.ctx.store, tenant, frame.room, since=frame.since.seq if frame.since else None,
                limit=frame.limit, reverse=frame.reverse,
            )
        except StoreError:
            self._tell(Invalid(4500, "could not read history", frame.id))
            return
        self._reply(frame.id, {"type": "history", "room": frame.room, "events": events,
                               "seq": latest})

    def _presence(self, frame: Presence) -> None:
        assert self.principal is not None
        if not self.principal.can("presence", frame.room):
            raise ProtocolError(4003, "no presence right on this room")
        if self.ctx.presence is None or not self._tracked(frame.room):
            raise ProtocolError(4004, "presence is off for this room")
        self._spawn(self._read_presence(frame, self.principal.tenant), "presence")

    async def _read_presence(self, frame: Presence, tenant: str) -> None:
        assert self.ctx.presence is not None
        try:
            members = await self.ctx.presence.members(tenant, frame.room)
        except StoreError:
            self._tell(Invalid(4500, "could not read presence", frame.id))
            return
        unique = len({(m.get("user"), m.get("kind")) for m in members})
        self._reply(frame.id, {"type": "presence", "room": frame.room, "members": members,
                               "unique_users": unique})


def _number(value: float) -> float | int:
    """25.0 -> 25: whole numbers go out as integers."""
    return int(value) if float(value).is_integer() else value
