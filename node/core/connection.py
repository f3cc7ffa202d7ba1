"""``ConnectionActor``: one per client connection, whatever the transport (WebSocket, MQTT tunnel).

The protocol rules live in :class:`~node.core.session.ConnectionSession` (no I/O); the actor is
the glue around it: it feeds the session each frame and each result, and executes the commands
the session hands back (frames into the outbox, joins and leaves of room actors, stores and
reads as tasks, timers with ``loop.call_later``, rpc routes and presence through the ports).
Publishes are pipelined: the actor hands them to the store and goes on with the next frame; the
``published`` reply is sent when the store acknowledges.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actors.actor import Actor
from actors.deadlines import Deadline
from actors.errors import ActorDeadError, ActorError
from actors.mailbox import Overflow
from node.core.context import (
    ConnectionIndex,
    ConnTransport,
    Invalid,
    NodeContext,
    PlainJoin,
    PlainLeave,
    Shutdown,
    TransportClosed,
)
from node.core.events import event_map, fit_history, read_history
from node.core.index import IndexedConnection
from node.core.limits import TokenBucket
from node.core.outbox import Outbox
from node.core.ports import RpcError, StoreError
from node.core.room import Join, Leave, Membership
from node.core.session import ConnectionSession
from node.core.session_commands import (
    AdmitConnection,
    AnnouncePresence,
    CallRpc,
    CancelTimer,
    Close,
    JoinPlainRoom,
    JoinRoom,
    LeavePlainRoom,
    LeaveRoom,
    PresenceAdd,
    PresenceOffline,
    PresenceRemove,
    PresenceWatch,
    ReadHistory,
    ReadPresence,
    RegisterRpc,
    RespondRpc,
    SendFrame,
    SendVolatile,
    StartTimer,
    Stop,
    StorePublish,
    TimerKey,
    UnregisterRpc,
)
from node.core.unwritten import UNWRITTEN
from node.protocol import frames
from node.protocol.errors import ProtocolError
from node.protocol.frames import CBOR, error_frame
from node.protocol.tokens import Principal

#: What a connection handles in the node's lane, one per turn of the loop (``NodeContext.lane``):
#: the requests, whose cost (a token to verify, a room to start, a read) a burst of clients may
#: multiply. Publishes, replies, acks and pings are not: they are what members are waiting for,
#: and have limits of their own.
_LANE_KINDS = frozenset({
    frames.Connect, frames.Join, frames.Leave, frames.History, frames.Presence, frames.Rpc,
    frames.Refresh, PlainJoin, PlainLeave,
})

__all__ = [
    "ConnTransport",
    "ConnectionActor",
    "ConnectionIndex",
    "Invalid",
    "KeepOffline",
    "NodeContext",
    "PlainJoin",
    "PlainLeave",
    "Shutdown",
    "TransportClosed",
]

log = logging.getLogger("node.core.connection")


@dataclass(frozen=True, slots=True)
class _RpcIn:
    request: dict[str, Any]
    reply_to: str


@dataclass(frozen=True, slots=True)
class _RoomLost:
    room: str
    member: Membership
    plain: bool = False


@dataclass(frozen=True, slots=True)
class _InRoom:
    """The room fixed the position of ``member``'s join (its publishes held may go)."""

    room: str
    member: Membership


@dataclass(frozen=True, slots=True)
class KeepOffline:
    """Tell a connection whether it stays in its plain rooms' presence as offline when it ends
    (``ttl_s``: a persistent MQTT session's expiry) or goes (None: e.g. its session was
    deleted); see ``ConnectionSession.keep_offline``."""

    ttl_s: float | None


@dataclass(frozen=True, slots=True)
class _TimerFired:
    key: TimerKey
    serial: int  # of the timer that fired: one armed again or cancelled since makes it stale


async def _after(written: asyncio.Future[bool], send: Callable[[], None]) -> None:
    """``send()`` once ``written`` is done, unless it says that nothing was written (a
    successor has the entry: its join was announced, and this leave must not follow it)."""
    await asyncio.wait([written])
    if written.cancelled() or written.exception() is not None or written.result():
        with contextlib.suppress(Exception):  # fire and forget, as every presence event
            send()


class _Pacer:
    """Runs a connection's heavy actions (history, presence and rpc requests, joins that start a
    room) at most ``rate`` a second after a burst of ``burst``, in order, so that a burst of
    them cannot hold up the node's other work. The connection goes on reading meanwhile: its
    limits (request_rate_per_s, rooms_per_min, max_rooms_per_connection) still count requests
    as they arrive and refuse beyond them, which bounds what waits here.

    Each action comes with ``live``: an action no longer live when its turn comes (a join left
    meanwhile, a connection that ended) is dropped, and costs no turn.
    """

    __slots__ = ("_bucket", "_queue", "_task")

    def __init__(self, rate: float, burst: int) -> None:
        self._bucket = TokenBucket(rate, burst, time.monotonic())
        self._queue: deque[tuple[Callable[[], bool], Callable[[], None]]] = deque()
        self._task: asyncio.Task[None] | None = None

    def submit(self, live: Callable[[], bool], run: Callable[[], None], name: str) -> bool:
        """Run ``run`` now if its turn has come and nothing waits (True), else in its turn if
        ``live()`` still holds then (False). ``name`` names the task that waits."""
        now = time.monotonic()
        if not self._queue and self._bucket.take(now):
            run()
            return True
        self._queue.append((live, run))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain(), name=name)
        return False

    async def _drain(self) -> None:
        bucket, queue = self._bucket, self._queue
        try:
            while queue:
                if not queue[0][0]():
                    queue.popleft()
                    continue
                now = time.monotonic()
                level = bucket.level(now)
                if level < 1:
                    await asyncio.sleep((1 - level) / bucket.rate)
                    continue
                live, run = queue.popleft()
                if live():
                    bucket.take(now)
                    run()
        finally:
            self._task = None

    def close(self) -> None:
        """Drop what waits (the connection ended)."""
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()


class ConnectionActor(Actor):
    """One client connection: the I/O around its :class:`ConnectionSession`.

    Args:
        ctx: The node's shared context.
        transport: The bridge's side of the connection.
        codec: The connection's codec (``node.protocol.JSON`` or ``CBOR``).
        principal: Already authenticated (MQTT); None when a ``connect`` frame must come first.
        client_id: The connection's id (default: a random one).
        offline_ttl_s: A persistent MQTT session's expiry: when the connection ends, it stays
            in the presence of its plain rooms as offline that long (default: it is gone).
    """

    kind = "connection"
    mailbox_size = 1024
    on_overflow = Overflow.CALLBACK
    # Flow control of the client's input (bridge/ws.py, bridge/mqtt.py): its bridge tells
    # frames while fewer than inbound_high are queued, then stops reading the socket until the
    # actor is down to inbound_low (ActorRef.wait_for_room; the client's TCP window then slows
    # it down). The other 512 slots are for the actor's own messages: timers, failures of
    # background work, rpc requests, a shutdown; only those can overflow the mailbox.
    inbound_high = 512
    inbound_low = 256

    __slots__ = (
        "_due", "_indexed", "_joined_at_ms", "_loop", "_member_hooks", "_offline_writes",
        "_pacer", "_stopped", "_tasks", "_timer", "_timer_key", "_timer_serial", "_timers",
        "_volatile_tasks",
        "_waiting", "client_id", "ctx", "members", "outbox", "plain", "session", "settings",
        "transport",
    )

    def __init__(self, ctx: NodeContext, transport: ConnTransport, codec: Any,
                 principal: Principal | None = None, client_id: str | None = None,
                 offline_ttl_s: float | None = None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.transport = transport
        self.client_id = client_id or secrets.token_hex(8)
        self._indexed: IndexedConnection | None = None  # once admitted
        self.outbox = Outbox(
            codec, transport, limit=self.settings.slow_consumer_bytes, on_slow=self._on_slow,
            flush_turn=ctx.flush_turn,
        )
        # Its presence entries carry it; removing them compares it (a takeover's successor
        # has the same client id, and entries of its own).
        self._joined_at_ms = int(time.time() * 1000)
        self.session = ConnectionSession(
            ctx.settings, node_name=ctx.node_name, client_id=self.client_id,
            verify=ctx.verify_token, admit=ctx.admit, principal=principal,
            door="ws" if transport.kind == "ws" else "tunnel", now=time.monotonic(),
            joined_at_ms=self._joined_at_ms, presence=ctx.presence is not None,
            rpc=ctx.rpc is not None, may_open_room=ctx.may_open,
            room_buckets=ctx.room_buckets, carry=ctx.carry,
        )
        self.session.keep_offline(offline_ttl_s)
        self.members: dict[str, Membership] = {}
        # Plain subscriptions (MQTT rooms/<room>), each with its own outbox: a device may also
        # join the same room on its tunnel.
        self.plain: dict[str, Membership] = UNWRITTEN  # node/core/unwritten.py
        # On the node's Deadlines: one loop timer for all (each of its own was ~800 bytes).
        # The first timer armed is kept in two slots (an idle connection has one: its token's
        # expiry), the others in a map made for them (a dict is ~0.24 KB).
        self._timer: Deadline | None = None
        self._timer_key: TimerKey | None = None
        self._timers: dict[TimerKey, Deadline] = UNWRITTEN  # node/core/unwritten.py
        # Each timer armed gets a serial; one that fired waits here with its serial until its
        # message is handled, and is stale if armed again or cancelled meanwhile.
        self._timer_serial = 0
        self._due: dict[TimerKey, int] = UNWRITTEN  # node/core/unwritten.py
        # Both sets are made at their first task: an empty set is ~200 bytes per connection.
        self._tasks: set[asyncio.Task[None]] | None = None
        self._stopped = False  # on_stop ran: what comes back from the store is dropped
        # Volatile sends are not cancelled when the connection ends: a typing notice sent just
        # before a close still goes out. Referenced until done (the loop keeps weak ones only).
        self._volatile_tasks: set[asyncio.Task[None]] | None = None
        self._pacer: _Pacer | None = None  # made at the first heavy action
        # Offline presence entries being written, by room: their announcements wait for them.
        self._offline_writes: dict[str, asyncio.Future[bool]] | None = None
        # Joins waiting for their turn: their member -> the join's request id.
        self._waiting: dict[Membership, Any] | None = None
        self._loop = asyncio.get_running_loop()
        self._member_hooks: tuple[Callable[[str, Membership], None],
                                  Callable[[str, Membership], None]] | None = None

    @property
    def principal(self) -> Principal | None:
        """Who the connection is (None until a ``connect`` succeeded)."""
        return self.session.principal

    # -- life ------------------------------------------------------------------------------

    async def on_start(self) -> None:
        self.session.start(time.monotonic())
        await self._execute()

    async def on_stop(self) -> None:
        self._stopped = True
        self._member_hooks = None  # bound methods of this actor: a cycle left to the collector
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_key = None
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self._tasks or ():
            task.cancel()
        if self._pacer is not None:
            self._pacer.close()
        self.outbox.flush()
        self.session.stop()
        self._execute_now()
        if self._indexed is not None:  # its own entry only, never a successor's (same id)
            self.ctx.index.remove(self._indexed)
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
        if self.session.closing:
            return
        self.session.receive_overflow()
        for command in self.session.commands_to_send():
            if isinstance(command, Close):
                self._loop.call_soon(self._close_now, command.code, command.reason,
                                     command.reconnect)
        self._stop(None)

    def _tell(self, message: Any) -> None:
        try:
            self.ref.tell(message)
        except ActorDeadError:
            pass

    def _on_slow(self) -> None:
        self.ctx.slow_consumers += 1
        self._tell(Shutdown(4008, "slow consumer", True))

    def _on_room_lost(self, room: str, member: Membership) -> None:
        self._tell(_RoomLost(room, member))

    def _on_in_room(self, room: str, member: Membership) -> None:
        message = _InRoom(room, member)
        if not self.ref.handle_now(message):
            self._tell(message)

    def _on_plain_room_lost(self, room: str, member: Membership) -> None:
        self._tell(_RoomLost(room, member, plain=True))

    def _on_rpc_request(self, request: dict[str, Any], reply_to: str) -> None:
        self._tell(_RpcIn(request, reply_to))

    def _spawn(self, coro: Any, name: str) -> None:
        task = self._loop.create_task(coro, name=f"conn[{self.client_id}].{name}")
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks = _without(self._tasks, task)

    def _close_now(self, code: int, reason: str, reconnect: bool) -> None:
        self.outbox.send_now(
            {"type": "disconnect", "code": code, "reason": reason, "reconnect": reconnect}
        )
        self.outbox.close()
        self.transport.close(code, reason)

    # -- messages --------------------------------------------------------------------------

    def receive_now(self, message: Any) -> bool:
        """A publish (in the reader's step), or a room's news that a join's position is fixed
        (in the room's), handled at once when the actor is idle (``ActorRef.handle_now``): what
        ``on_receive`` does with them, none of which waits."""
        kind = type(message)
        if kind is frames.Publish:
            session = self.session
            if not session.closing:
                session.receive_frame(message, time.monotonic())
                self._execute_now()
            return True
        if kind is _InRoom:
            if not self.session.closing and self.members.get(message.room) is message.member:
                self.session.receive_room_joined(message.room)
                self._execute_now()
            return True
        return False

    async def on_receive(self, message: Any) -> Any:
        session = self.session
        if session.closing:
            if isinstance(message, TransportClosed):
                self._stop(None)
            return None
        kind = type(message)
        if kind in _LANE_KINDS and not self.ctx.lane.take():
            await self.ctx.lane.wait()  # its turn of the loop (actors/lane.py)
            if session.closing:  # closed meanwhile (cut off as a slow consumer, drained)
                return None
        if kind is Invalid:
            session.receive_invalid(message.code, message.reason, message.request_id,
                                    message.retry, time.monotonic(), reply=message.reply)
        elif kind is TransportClosed:
            session.receive_transport_closed()
        elif kind is Shutdown:
            session.receive_shutdown(message.code, message.reason, message.reconnect)
        elif kind is _TimerFired:
            if self._due.get(message.key) == message.serial:  # else armed again or cancelled
                del self._due[message.key]
                session.receive_timer(message.key, time.monotonic())
        elif kind is _InRoom:
            if self.members.get(message.room) is message.member:  # else an older join's
                session.receive_room_joined(message.room)
        elif kind is _RoomLost:
            self._room_lost(message)
        elif kind is PlainJoin:
            session.receive_plain_join(message.room, (message.codec, message.transport),
                                       time.monotonic())
        elif kind is PlainLeave:
            session.receive_plain_leave(message.room, time.monotonic())
        elif kind is KeepOffline:
            session.keep_offline(message.ttl_s)
        elif kind is _RpcIn:
            session.receive_rpc_request(message.request, message.reply_to, time.monotonic())
        else:
            session.receive_frame(message, time.monotonic())
        await self._execute()
        return None

    def _room_lost(self, msg: _RoomLost) -> None:
        epoch = self.ctx.store.epoch
        if msg.plain:
            plain = self.plain.get(msg.room)
            if plain is msg.member:  # else a membership the connection ended since
                # A first join lost before its replay ended delivered nothing (cursor 0): it
                # starts live again, as it began, rather than replaying the room from its start.
                since = None if plain.replaying and not plain.cursor else plain.cursor
                log.info("= %s rejoins %s (plain) from seq %s", self.client_id, msg.room, since)
                self.session.receive_plain_room_lost(msg.room, since, epoch)
            return
        member = self.members.get(msg.room)
        if member is not msg.member:
            return  # a membership the connection ended since (left, or joined again)
        if member.refused:
            # The client was told to join again (4500 retry): rejoining by itself too could
            # deliver events twice (once live, once in the client's own rejoin's replay).
            del self.members[msg.room]
            self.session.receive_join_refused(msg.room, time.monotonic())
            return
        # A live join lost before its replay ended delivered nothing (cursor 0): it starts
        # live again, as it began, rather than replaying the room from its start. A join
        # with ``since`` rejoins from there (its cursor starts at its since).
        since = None if member.live and member.replaying and not member.cursor else member.cursor
        log.info("= %s rejoins %s from seq %s", self.client_id, msg.room, since)
        del self.members[msg.room]  # out of the room: its rejoin answers its join if need be
        # A join not answered yet (its replay still read): its rejoin answers it (``joined``,
        # its id).
        unanswered = member.announce and not member.answered
        self.session.receive_room_lost(msg.room, since, epoch, time.monotonic(),
                                       answer=unanswered, request_id=member.request_id)

    # -- executing commands ----------------------------------------------------------------

    async def _execute(self) -> None:
        """Execute what the session queued, in order; awaits only to register rpc routes."""
        for command in self.session.commands_to_send():
            if isinstance(command, AdmitConnection):
                self._admit_connection(command)
                await self._execute()  # what the admission queued comes before the rest
            elif isinstance(command, RegisterRpc):
                assert self.ctx.rpc is not None
                # Awaited: once a client has its ``connected``, rpcs to it find it.
                await self.ctx.rpc.register(command.tenant, command.targets,
                                            self._on_rpc_request)
            else:
                _RUN[type(command)](self, command)

    def _execute_now(self) -> None:
        """Execute what the session queued outside a message (a result of background work,
        the stop) or for a publish: everything there is synchronous."""
        for command in self.session.commands_to_send():
            if type(command) in (AdmitConnection, RegisterRpc):
                log.error("! %s: %r outside a message", self.client_id, command)
                continue
            _RUN[type(command)](self, command)

    def _admit_connection(self, command: AdmitConnection) -> None:
        refused, reason = 0, ""
        principal, now = command.principal, time.monotonic()
        if self.ctx.draining:
            refused, reason = 4503, "node draining"
        elif not self.ctx.connect_buckets.get((principal.tenant, principal.sub), now).take(now):
            refused, reason = 4009, "too many connections opened, retry later"
        else:
            try:
                self._indexed = self.ctx.index.add(
                    command.principal, self.client_id, self.ref,
                    per_user=self.settings.max_connections_per_user,
                    total=self.settings.max_connections)
            except ProtocolError as exc:  # 4503 node full, 4029 user's limit
                refused, reason = exc.code, exc.reason
        self.session.receive_admitted(now, refused, reason)

    def _send_frame(self, command: SendFrame) -> None:
        self.outbox.send(command.frame)

    def _close(self, command: Close) -> None:
        self._close_now(command.code, command.reason, command.reconnect)
        self._stop(None)

    def _stop(self, command: Stop | None) -> None:
        self._loop.create_task(self.ref.stop(drain=False), name=f"conn[{self.client_id}].stop")

    def _start_timer(self, command: StartTimer) -> None:
        self._cancel_timer(CancelTimer(command.key))
        delay = max(0.0, command.deadline - time.monotonic())
        self._timer_serial += 1
        # The function and the actor as its argument: no bound method per timer.
        timer = self.ctx.deadlines.call_later(delay, ConnectionActor._fire, self, command.key,
                                              self._timer_serial)
        if self._timer is None:
            self._timer, self._timer_key = timer, command.key
        else:
            if self._timers is UNWRITTEN:
                self._timers = {}
            self._timers[command.key] = timer

    def _pop_timer(self, key: TimerKey) -> Deadline | None:
        timer = self._timer
        if timer is not None and self._timer_key == key:
            self._timer = self._timer_key = None
            return timer
        return self._timers.pop(key, None)

    def _fire(self, key: TimerKey, serial: int) -> None:
        self._pop_timer(key)
        if key[0] == "held" and self._waiting:
            member = self.members.get(key[1])
            if member is not None and member in self._waiting:
                return  # its join waits for its turn: armed again once told (join_sent)
        if self._due is UNWRITTEN:
            self._due = {}
        self._due[key] = serial
        self._tell(_TimerFired(key, serial))

    def _cancel_timer(self, command: CancelTimer) -> None:
        timer = self._pop_timer(command.key)
        if timer is not None:
            timer.cancel()
        self._due.pop(command.key, None)  # fired, its message not handled yet: now stale

    # -- rooms -----------------------------------------------------------------------------

    def _tell_room(self, room: str, message: Any) -> None:
        """Tell ``room`` (spawned for a join; a leave goes only to a room that runs: one that
        stopped has forgotten the member already)."""
        assert self.principal is not None
        tenant = self.principal.tenant
        try:
            if isinstance(message, Leave):
                ref = self.ctx.running_room(tenant, room)
                if ref is not None:
                    ref.tell(message)
            else:
                self.ctx.room_ref(tenant, room).tell(message)
        except ActorError:  # the room is stopping, or the whole system is
            log.debug("! room %s unavailable for %s", room, self.client_id)

    def _join_room(self, command: JoinRoom) -> None:
        room = command.room
        hooks = self._member_hooks
        if hooks is None:  # bound once, shared by its memberships (64 bytes each)
            hooks = self._member_hooks = (self._on_room_lost, self._on_in_room)
        member = Membership(self.client_id, self.outbox, hooks[0], presence=command.presence)
        if not command.silent:
            member.announce, member.request_id = True, command.request_id
        if command.since_seq is None:
            member.live = True
        elif command.since_epoch in (None, self.ctx.store.epoch):
            member.cursor = command.since_seq  # lost before its replay: rejoined from there
        member.on_in_room = hooks[1]
        self.members[room] = member
        join = Join(member, command.since_seq, command.since_epoch, command.request_id,
                    command.silent, command.rewind)
        if command.silent:  # a rejoin after a room actor restart: never held up
            self._tell_room(room, join)
        else:
            self._join_in_turn(room, join, self.members)

    def _join_in_turn(self, room: str, join: Join, members: dict[str, Membership]) -> None:
        """Tell ``room`` the join now if the room runs on this node, else when the connection's
        pace allows (starting a room costs the node and NATS work). A join left or replaced
        before its turn is withdrawn (:meth:`_withdraw`)."""
        assert self.principal is not None
        if self.ctx.running_room(self.principal.tenant, room) is not None:
            self._tell_room(room, join)
            return
        member = join.member
        if self._waiting is None:
            self._waiting = {}
        self._waiting[member] = join.request_id
        waiting = self._waiting

        def live() -> bool:
            return members.get(room) is member and not self.session.closing

        def run() -> None:
            waiting.pop(member, None)
            self._tell_room(room, join)
            if members is self.members:  # publishes held for it wait from now on
                self.session.receive_join_sent(room, time.monotonic())
                self._execute_now()

        self._in_turn(live, run)

    def _withdraw(self, member: Membership) -> bool:
        """Whether ``member``'s join was still waiting for its turn: then it is withdrawn (no
        room is started for it) and answered with 4009 ``retry``."""
        if self._waiting is None or member not in self._waiting:
            return False
        request_id = self._waiting.pop(member)
        if request_id is not None:
            self.outbox.send(error_frame(4009, "left before its turn to join "
                                               "(heavy_requests_per_s)", id=request_id,
                                         retry=True))
        return True

    def _in_turn(self, live: Callable[[], bool], run: Callable[[], None]) -> None:
        """Run a heavy action in the connection's pace (``heavy_requests_per_s``)."""
        if self._pacer is None:
            rate = self.settings.heavy_requests_per_s
            self._pacer = _Pacer(rate, max(1, int(rate / 10)))
        if not self._pacer.submit(live, run, f"conn[{self.client_id}].pace"):
            self.ctx.paced += 1

    def _spawn_in_turn(self, make: Callable[[], Any], name: str) -> None:
        """Start the task ``make()`` (a request's work) in the connection's pace."""
        self._in_turn(lambda: not self.session.closing, lambda: self._spawn(make(), name))

    def _leave_room(self, command: LeaveRoom) -> None:
        member = self.members.pop(command.room, None)
        if member is not None and not self._withdraw(member):
            self._answer_left(member)
            self._tell_room(command.room, Leave(member))

    def _answer_left(self, member: Membership) -> None:
        """A join the room has not answered yet (not taken in yet, or its replay still read)
        when the client leaves the room: the room no longer answers a member that left, so the
        join is answered here, 4009 ``retry`` as a join withdrawn before its turn, before the
        leave's ``left``. Every request gets its answer."""
        if member.announce and not member.answered and not member.refused:
            member.left = True  # from now on the room sends this member nothing
            if member.request_id is not None:
                self.outbox.send(error_frame(4009, "left or joined again before it was joined",
                                             id=member.request_id, retry=True))

    def _join_plain_room(self, command: JoinPlainRoom) -> None:
        room = command.room
        if command.source is None:
            old = self.plain.get(room)
            if old is None:
                return
            outbox = old.outbox
        since_seq, since_epoch = command.since_seq, command.since_epoch
        if command.source is not None:
            codec, transport = command.source
            outbox = Outbox(codec, transport, limit=self.settings.slow_consumer_bytes,
                            on_slow=self._on_slow, flush_turn=self.ctx.flush_turn)
            # A QoS 1 subscription of a persistent MQTT session joins from its position
            # (the bridge sent what came before it: bridge.mqtt_session).
            resume = getattr(transport, "resume_from", None)
            if resume is not None and since_seq is None:
                since_seq, since_epoch = resume
        member = Membership(self.client_id, outbox, self._on_plain_room_lost)
        if since_seq is not None:
            member.cursor = since_seq
        if self.plain is UNWRITTEN:
            self.plain = {}
        self.plain[room] = member
        join = Join(member, since_seq, since_epoch, None, silent=True)
        if command.source is None:  # a rejoin after a room actor restart
            self._tell_room(room, join)
        else:
            self._join_in_turn(room, join, self.plain)

    def _leave_plain_room(self, command: LeavePlainRoom) -> None:
        member = self.plain.pop(command.room, None)
        if member is not None:
            if not self._withdraw(member):
                self._tell_room(command.room, Leave(member))
            member.outbox.flush()  # what the room already delivered still goes out
            member.outbox.close()

    # -- presence --------------------------------------------------------------------------

    def _tenant(self) -> str:
        assert self.principal is not None
        return self.principal.tenant

    def _presence_port(
        self, command: PresenceWatch | PresenceAdd | PresenceRemove | PresenceOffline
    ) -> None:
        presence = self.ctx.presence
        if presence is None:
            return
        tenant = self._tenant()
        if isinstance(command, PresenceOffline):
            # Not every presence port keeps offline members (bridge.presence does): else gone.
            mark = getattr(presence, "mark_offline", None)
            if mark is not None:
                written = mark(tenant, command.room, command.member, command.ttl_s)
                if written is not None:  # its announcement waits for it (_announce_presence)
                    if self._offline_writes is None:
                        self._offline_writes = {}
                    self._offline_writes[command.room] = written
            else:
                presence.remove(tenant, command.room, self.client_id, self._joined_at_ms)
        elif isinstance(command, PresenceWatch):
            presence.watch(tenant, command.room, command.on)
        elif isinstance(command, PresenceAdd):
            presence.add(tenant, command.room, command.member)
        else:
            presence.remove(tenant, command.room, self.client_id, self._joined_at_ms)

    def _announce_presence(self, command: AnnouncePresence) -> None:
        assert self.principal is not None
        as_map = event_map(command.room, command.name, command.member, self.principal,
                           self.client_id, None)
        body = CBOR.encode(as_map)
        tenant, feed = self.principal.tenant, self.ctx.feed
        written = (self._offline_writes or {}).pop(command.room, None)
        if written is None:
            self.ctx.admission.keep_for_room(tenant, command.room, body, as_map)
            with contextlib.suppress(Exception):  # fire and forget, as every presence event
                feed.publish_volatile(tenant, command.room, body, later=True)
        else:
            # A device gone offline: its watchers hear of it once its entry says so (a
            # presence request right after the leave lists it offline), and not at all if a
            # successor (a takeover) has the entry by then. Not cancelled with the
            # connection, which ends right after.
            self._spawn_kept(_after(written, lambda: feed.publish_volatile(
                tenant, command.room, body, later=True)), command.name)

    # -- publish and reads -----------------------------------------------------------------

    def _publish(self, command: StorePublish) -> None:
        # A busy node's store gathers publishes into batches: then no task per publish.
        if not self.ctx.admission.store_soon(command.admitted,
                                             functools.partial(self._stored, command)):
            self._spawn(self._store(command), "publish")

    async def _store(self, command: StorePublish) -> None:
        try:
            seq = await self.ctx.admission.store(command.admitted)
        except ProtocolError as exc:
            self._stored(command, 0, exc)
        else:
            self._stored(command, seq, None)

    def _stored(self, command: StorePublish, seq: int, error: ProtocolError | None) -> None:
        if self._stopped:  # a task of _store is cancelled then; a callback comes anyway
            return
        if error is not None:
            self._tell(Invalid(error.code, error.reason, command.request_id, error.retry))
            return
        # Fed back at once, not through the mailbox: a pipelining client may have thousands of
        # publishes in flight, and their acks would overflow the slots left for the actor's
        # own messages (see inbound_high).
        self.session.receive_stored(command.request_id, command.admitted.room, seq)
        self._execute_now()

    def _send_volatile(self, command: SendVolatile) -> None:
        self.ctx.admission.send_volatile_quietly(command.admitted)

    def _spawn_kept(self, coro: Any, name: str) -> None:
        """A task that is not cancelled when the connection ends (referenced until done)."""
        task = self._loop.create_task(coro, name=name)
        if self._volatile_tasks is None:
            self._volatile_tasks = set()
        self._volatile_tasks.add(task)
        task.add_done_callback(self._kept_task_done)

    def _kept_task_done(self, task: asyncio.Task[None]) -> None:
        self._volatile_tasks = _without(self._volatile_tasks, task)

    async def _read_history(self, command: ReadHistory) -> None:
        try:
            events, latest = await read_history(
                self.ctx.store, command.tenant, command.room, since=command.since,
                limit=command.limit, reverse=command.reverse,
            )
        except StoreError:
            self._tell(Invalid(4500, "could not read history", command.request_id))
            return
        # Half the slow-consumer budget: the page is one frame, which the outbox must take.
        events, more = fit_history(events, self.outbox.codec.encode,
                                   self.settings.slow_consumer_bytes // 2,
                                   keep_last=command.since is None and not command.reverse)
        self.session.receive_history(command.request_id, command.room, events, latest, more)
        self._execute_now()

    async def _read_presence(self, command: ReadPresence) -> None:
        assert self.ctx.presence is not None
        try:
            members = await self.ctx.presence.members(command.tenant, command.room)
        except StoreError:
            self._tell(Invalid(4500, "could not read presence", command.request_id))
            return
        self.session.receive_presence(command.request_id, command.room, members)
        self._execute_now()

    # -- rpc -------------------------------------------------------------------------------

    def _call_in_turn(self, command: CallRpc) -> None:
        """An rpc in the connection's pace; its timeout counts from its arrival (a call that
        waited it out is answered 4504 and never made)."""
        arrived = time.monotonic()
        self._spawn_in_turn(lambda: self._call(command, arrived), "rpc")

    async def _call(self, command: CallRpc, arrived: float) -> None:
        principal = self.principal
        assert principal is not None
        left = command.timeout_s - (time.monotonic() - arrived)
        try:
            if left <= 0:
                raise TimeoutError
            if command.to == "server":
                result = await asyncio.wait_for(
                    self.ctx.rpc_server.call(command.method, command.params, principal), left)
            elif self.ctx.rpc is None:
                raise RpcError(4004, "rpc is not available")
            else:
                result = await self.ctx.rpc.request(principal.tenant, command.to,
                                                    command.request, left)
        except TimeoutError:
            self.session.receive_rpc_failed(command.call, 4504, "rpc timed out")
        except (RpcError, ProtocolError) as exc:
            self.session.receive_rpc_failed(command.call, exc.code, exc.reason, exc.retry)
        else:
            self.session.receive_rpc_result(command.call, result)
        self._execute_now()

    def _respond_rpc(self, command: RespondRpc) -> None:
        if self.ctx.rpc is not None:
            self.ctx.rpc.respond(command.reply_to, command.answer)

    def _unregister_rpc(self, command: UnregisterRpc) -> None:
        if self.ctx.rpc is not None:
            self.ctx.rpc.unregister(command.tenant, command.targets, self._on_rpc_request)


# Per class, not per actor: a per-instance dict of bound methods would be a reference cycle
# (actor -> dict -> method -> actor), freed only by a full garbage collection.
_RUN: dict[type, Callable[[ConnectionActor, Any], None]] = {
    SendFrame: ConnectionActor._send_frame,
    StorePublish: ConnectionActor._publish,
    Close: ConnectionActor._close, Stop: ConnectionActor._stop,
    StartTimer: ConnectionActor._start_timer,
    CancelTimer: ConnectionActor._cancel_timer, JoinRoom: ConnectionActor._join_room,
    LeaveRoom: ConnectionActor._leave_room, JoinPlainRoom: ConnectionActor._join_plain_room,
    LeavePlainRoom: ConnectionActor._leave_plain_room, SendVolatile: ConnectionActor._send_volatile,
    ReadHistory: lambda a, c: a._spawn_in_turn(lambda: a._read_history(c), "history"),
    ReadPresence: lambda a, c: a._spawn_in_turn(lambda: a._read_presence(c), "presence"),
    CallRpc: ConnectionActor._call_in_turn,
    PresenceWatch: ConnectionActor._presence_port, PresenceAdd: ConnectionActor._presence_port,
    PresenceRemove: ConnectionActor._presence_port,
    PresenceOffline: ConnectionActor._presence_port,
    AnnouncePresence: ConnectionActor._announce_presence,
    RespondRpc: ConnectionActor._respond_rpc, UnregisterRpc: ConnectionActor._unregister_rpc,
}


def _without(tasks: set[asyncio.Task[None]] | None,
             task: asyncio.Task[None]) -> set[asyncio.Task[None]] | None:
    """``tasks`` less ``task``, or None once empty: a set that held one is ~200 bytes, which
    every idle connection would keep."""
    if tasks is not None:
        tasks.discard(task)
        if tasks:
            return tasks
    return None
