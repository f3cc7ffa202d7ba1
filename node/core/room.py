"""``RoomActor``: one per active room per node. It owns the room's local members and is the
single sequencer of what they receive.

Every event, from any node, reaches a room the same way: from the store's live feed, in stream
order. The room keeps ``last_seq`` (the highest seq it has delivered) and repairs gaps: a live
message whose ``prev`` (the room's previous seq, from the stream's RePublish headers) is beyond
``last_seq`` means something was missed on the at-most-once live path, and the missing events
are read from the store before going on.

Fan-out is encode-once: a frame is encoded once per codec in use, and the same bytes are pushed
to each member's :class:`~node.core.outbox.Outbox` (no coroutine hop per member). A member joining
with ``since`` is held while its replay is read; live events arriving meanwhile are kept for it
and sent after the replay, filtered by its cursor, so the switch-over has no gap and no duplicate.

Members joining with ``since`` are served in batches (a reconnect storm brings thousands within
a second or two): the joins the room takes in within one loop turn, or while the batch before is
read, share one ask for the stream's latest seq and one paged read from the lowest ``since``,
each getting its slice of the same events, decoded once and encoded once per codec
(:class:`~node.core.room_recovery.RecoveryBatch`; at most ``recovery_max + 1`` events and a page
held, whatever the number of members).

A room without members stops after ``RoomSettings.idle_s`` (``room_idle_s``, default 1 s), live
traffic or not: an empty room costs two NATS subscriptions and its actor, and a client
churning through rooms must not keep thousands of them alive. It stops only when its mailbox
is empty, in the same step as the decision (a join told a moment earlier keeps it running; one
told later finds the name free and starts a fresh room). ``RoomCounters.rooms`` counts the
room actors that run, for the node's ``max_rooms``.

A full mailbox (a flood of live messages, thousands of clients joining at once after a restart)
drops live messages only: what they carried is read back from the stream by the next repair.
Nothing that changes who is in the room is dropped. A Leave is taken at once, in its sender's
step. A Join is told again a moment later, behind what was queued before it (a leave of the
connection's previous membership among it), and, if the room cannot take it in within
``JOIN_RETRY_S``, refused to its member: ``error`` 4500 with ``retry`` and ``on_room_lost`` with
the member marked ``refused`` (its client joins again; its connection leaves the room), or, for
a silent join, ``on_room_lost`` alone (its connection rejoins). The room's own results
(replays, recovery batches, repairs, state reads) and gap checks are told again until they get
in.

A state room (``RoomSettings.state``) answers a non-silent join with ``joined`` and then its
``state`` frame (several for a large room, all but the last with ``more``): the values as of
``joined.seq``, so that every event after it comes live, and is newer than the value of its
key. The room reads the values from the :class:`~node.core.ports.StatePort` once (its first
state join waits for the read) and then keeps them up to date with every event it delivers:
later joins cost no read (a dashboard of 10,000 devices opened by a hundred browsers reads the
bucket once, not a hundred times), and take a copy of the room's values in the same step as
their ``joined.seq``. Two races are closed. The state of an event is written by the node that
stored it, right after the stream's ack: an event this room has delivered may not be in the
read yet, so the room merges in the events it delivered in the last ``STATE_GRACE_S`` seconds,
and, at its first read, those stored in the ``STATE_INFLIGHT_S`` before its position, read from
the stream (stored before the room started, they never reach it live).
And the read may hold a value this room has not delivered yet: the waiting joins go on once the
room has delivered up to it (at most ``STATE_WAIT_S``, with a gap check meanwhile). The values
are read again, in the background, at a join once older than ``STATE_GRACE_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from actors.actor import Actor, RestartPolicy
from actors.errors import ActorError
from actors.mailbox import Overflow
from node.core.events import RecentEvents, event_frame
from node.core.outbox import FrameCodec
from node.core.ports import (
    LiveFeed,
    LiveMessage,
    RoomStore,
    StatePort,
    StoredEvent,
    StoreError,
    Subscription,
)
from node.core.room_messages import (
    CheckGap,
    Join,
    Leave,
    Live,
    Membership,
    RoomCounters,
    RoomSettings,
)
from node.core.room_recovery import RecoveryBatch
from node.core.room_state import RoomValues
from node.protocol.errors import CodecError, NatsUnavailable
from node.protocol.frames import cbor_loads_strict, error_frame, state_frames

__all__ = [
    "JOIN_RETRY_S",
    "RETELL_S",
    "STATE_GRACE_S",
    "STATE_INFLIGHT_S",
    "STATE_WAIT_S",
    "CheckGap",
    "Join",
    "Leave",
    "Live",
    "Membership",
    "RoomActor",
    "RoomCounters",
    "RoomSettings",
    "stored_lately",
]

log = logging.getLogger("node.core.room")

#: How long a state room keeps the events it delivered, for joiners whose read of the state
#: may not hold them yet: the state is written within the store's deadlines (a KV put, ~1 ms,
#: at most a few seconds while a leader is elected), far within this.
STATE_GRACE_S = 30.0
#: How long the first state joins of a room wait for it to deliver what the read holds.
STATE_WAIT_S = 2.0
#: How far back a room's first read of its state also reads the stream (by the events' ``ts``),
#: up to its position: the events stored before the room started, whose state another node may
#: still be writing (its publisher not answered yet). The state store's write deadline (10 s)
#: bounds such a write; the room's history (``history_size``) bounds the read.
STATE_INFLIGHT_S = 10.0
#: Events per page of that read (newest first, until one older than STATE_INFLIGHT_S).
STATE_INFLIGHT_PAGE = 500
#: How long a Join that found the room's mailbox full is told again (after 50 ms, then twice as
#: long each time, at most 0.5 s apart: about a dozen tries) before it is refused to its member.
#: The same as the connection's wait for a join to be taken in (``session_rooms.JOIN_WAIT_S``).
JOIN_RETRY_S = 5.0
#: The first delay before a message that found the mailbox full is told again.
RETELL_S = 0.05


@dataclass(frozen=True, slots=True)
class _IdleCheck:
    """The room may have been empty for ``idle_s``: look (see ``RoomActor._idle``)."""


@dataclass(frozen=True, slots=True)
class _Latest:
    seq: int


@dataclass(frozen=True, slots=True)
class _JoinAgain:
    """A Join that found the mailbox full, told again; refused once past ``deadline``
    (monotonic), else told again after ``delay`` if the mailbox is still full."""

    join: Join
    deadline: float
    delay: float


@dataclass(frozen=True, slots=True)
class _ReplayDone:
    member: Membership
    join: Join
    target: int
    recovered: bool
    events: list[StoredEvent] | None
    error: str | None = None
    #: A state room's join: the values to send after joined (as of the join's seq).
    values: list[dict[str, Any]] | None = None
    #: Where the member's events start in ``events`` (a batch's events, shared).
    start: int = 0
    #: A batch's frames and encodings by seq, shared by its members (each event is decoded
    #: once and encoded once per codec, not once per member).
    cache: dict[int, tuple[dict[str, Any] | None, dict[str, bytes]]] | None = None


@dataclass(frozen=True, slots=True)
class _BatchDone:
    joins: list[Join]
    target: int
    batch: RecoveryBatch | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _StateRead:
    """The state port's values, asked for at ``at`` (monotonic), or the read's error."""

    at: float
    values: list[dict[str, Any]]
    error: str | None = None
    #: The first read's latest stored events up to the room's position (event frames).
    stored: list[dict[str, Any]] | None = None


async def stored_lately(store: RoomStore, tenant: str, room: str,
                        upto: int) -> list[dict[str, Any]]:
    """A state room's events up to ``upto`` stored within the last ``STATE_INFLIGHT_S`` (by
    their ``ts``), as event frames in seq order: their state may still be being written by the
    node that stored them (its publisher not answered yet), so a read of the state port may not
    hold them. Pages are read backwards from ``upto`` until one holds an older event, or the
    room's first. A reader that takes the state as of ``upto`` (and the events after it as they
    come) applies them over its read (:func:`~node.core.room_state.with_stored`).

    Raises:
        StoreError: The stream did not answer.
    """
    since_ms = (time.time() - STATE_INFLIGHT_S) * 1000
    frames: list[dict[str, Any]] = []
    before = upto + 1
    while before > 1:
        page = await store.history(tenant, room, since=before, limit=STATE_INFLIGHT_PAGE,
                                   reverse=True)
        older = False
        for ev in page:  # newest first
            try:
                frame = event_frame(room, ev.seq, cbor_loads_strict(ev.body))
            except CodecError:
                frame = None
            if frame is None:
                continue
            frames.append(frame)
            ts = frame.get("ts")
            if not isinstance(ts, int | float) or ts < since_ms:
                older = True
        if older or len(page) < STATE_INFLIGHT_PAGE:
            break
        before = page[-1].seq
    frames.reverse()
    return frames


@dataclass(frozen=True, slots=True)
class _StateWaitOver:
    """The first state joins waited ``STATE_WAIT_S``: go on with what the room has."""


@dataclass(frozen=True, slots=True)
class _RepairDone:
    upto: int
    events: list[StoredEvent]


def _encoded(item: tuple[int | None, dict[str, Any], dict[str, bytes]], codec: FrameCodec) -> bytes:
    """An event's frame in ``codec``, encoded once however many members take it."""
    encoded = item[2]
    data = encoded.get(codec.name)
    if data is None:
        data = encoded[codec.name] = codec.encode(item[1])
    return data


def _is_presence(event: Any) -> bool:
    """A ``presence:join`` or ``presence:leave`` event map (volatile; for watchers only)."""
    return isinstance(event, dict) and isinstance(name := event.get("event"), str) and (
        name.startswith("presence:"))


class RoomActor(Actor):
    """The members of one room on this node, and the room's live feed.

    Args:
        tenant: The room's tenant.
        room: The room's name.
        store: Durable events.
        feed: Live events.
        settings: The room's policy.
        counters: Node-wide counters to update.
        state: The values of state rooms (None: a state room's joiners get no values).
    """

    kind = "room"
    # Live messages must not be refused: when the mailbox is full, a live message is dropped
    # and the gap is repaired from the stream by the next one; joins, leaves and the room's
    # own results are not dropped (see on_mailbox_full).
    mailbox_size = 65536
    on_overflow = Overflow.CALLBACK
    batch_size = 256
    restart = RestartPolicy(max_restarts=5, window_s=60, min_backoff_s=0.1, max_backoff_s=5)
    # The store not answering (NATS down, paused, no stream leader yet) fails a start now and
    # then: the outside world's doing, logged in one line; the restart tries again. The live
    # feed's subscribe raises NatsUnavailable while NATS is down (or the node stops).
    routine_failures = (StoreError, NatsUnavailable)

    # Slots: there is a room per user on a node (its personal room).
    __slots__ = (
        "_backlog", "_batching", "_counted", "_empty_since", "_idle_timer", "_joins_waiting",
        "_reading", "_recovering", "_repairing", "_since_trim", "_state_need", "_state_timer",
        "_state_values", "_state_waiting", "_sub", "_tasks", "_watchers", "counters", "feed",
        "last_seq", "members", "recent", "room", "settings", "state", "store", "tenant",
    )
    # No passivation by the runtime: its idle timer restarts with every message, and an empty
    # room with live traffic would never stop. The room stops itself (``_idle``).
    idle_timeout_s = None

    def __init__(
        self,
        tenant: str,
        room: str,
        store: RoomStore,
        feed: LiveFeed,
        settings: RoomSettings,
        counters: RoomCounters,
        state: StatePort | None = None,
        recent: RecentEvents | None = None,
    ) -> None:
        self.tenant = tenant
        self.room = room
        self.store = store
        self.feed = feed
        self.settings = settings
        self.counters = counters
        self.state = state if settings.state else None
        # The maps of events this node admitted itself (none for a state room's events).
        self.recent = recent
        # A state room's values (see the module's docstring); the joins waiting for the first
        # read (until the room has delivered _state_need), and whether a read is in flight.
        self._state_values: RoomValues | None = None  # made at first use (state rooms only)
        # Lists made when first needed (None meanwhile): a node has a room per user.
        self._state_waiting: list[Join] | None = None
        self._state_need: int | None = None
        self._state_timer: asyncio.TimerHandle | None = None
        self._reading = False
        self.members: dict[int, Membership] = {}
        # The members that joined with presence (None while none): a presence event goes to
        # these only, without a pass over every member of a large room.
        self._watchers: dict[int, Membership] | None = None
        self.last_seq = 0
        self._sub: Subscription | None = None
        self._repairing = False
        self._backlog: list[LiveMessage] | None = None
        self._since_trim = 0
        # A set (a dict: 64 bytes empty, not 216), None while no task runs: one that held a
        # task keeps its table, which every idle room would hold.
        self._tasks: dict[asyncio.Task[None], None] | None = None
        # Joins with ``since`` waiting for the next recovery batch, and whether a batch is
        # scheduled or in flight (one at a time: joins arriving meanwhile wait for the next).
        self._recovering: list[Join] | None = None
        self._batching = False
        # When the room last became empty (loop time; None: it has members), and the timer
        # that looks again once it may have been empty for idle_s.
        self._empty_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        # Joins that found the mailbox full, waiting to be told again: the room does not stop
        # for being empty meanwhile (one of them would be refused instead of taken in).
        self._joins_waiting = 0
        # Counted from here to on_stop (or a failed on_start): what runs, restarts included.
        self._counted = True
        counters.rooms += 1

    # -- life ------------------------------------------------------------------------------

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.counters.rooms -= 1

    async def on_start(self) -> None:
        # Subscribe first, then read the latest seq: nothing stored in between can be missed,
        # and live messages already covered by last_seq are skipped (they precede every
        # member's joined seq). A client's own publishes sent right after its join are held by
        # its connection until the room has fixed the join's position (Membership.on_in_room),
        # so they are stored after it and reach the member.
        try:
            self._sub = await self.feed.subscribe(self.tenant, self.room, self._on_live_messages)
            self.last_seq = await self.store.last_seq(self.tenant, self.room,
                                                      after_subscribe=True)
        except BaseException:
            self._uncount()  # no on_stop for an instance that did not start
            raise
        self._empty_since = asyncio.get_running_loop().time()  # its first join is queued
        self._arm_idle(self.settings.idle_s)

    async def on_stop(self) -> None:
        self._uncount()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._state_timer is not None:
            self._state_timer.cancel()
            self._state_timer = None
        for task in self._tasks or ():
            task.cancel()
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def on_failure(self, exc: BaseException) -> None:
        # The next instance starts empty: tell members to rejoin from their cursors.
        members, self.members, self._watchers = list(self.members.values()), {}, None
        for member in members:
            member.on_room_lost(self.room, member)

    def on_mailbox_full(self, message: Any) -> None:
        """Only live messages (and idle checks) are dropped; nothing that changes who is in the
        room, or that someone waits for.

        Runs in the sender's step, on the instance a restart is replacing during its backoff.
        """
        if isinstance(message, Live):
            # Repaired from the stream by the next one.
            self.counters.live_dropped += len(message.messages)
        elif isinstance(message, Leave):
            # Taken at once (a Join that was queued before it is ignored when it comes, see
            # Membership.left): a Leave told again later would leave a ghost member meanwhile,
            # and could come after a retold Join of the same member.
            self._leave(message.member)
        elif isinstance(message, Join):
            self._join_again(_JoinAgain(message, time.monotonic() + JOIN_RETRY_S, RETELL_S))
        elif isinstance(message, _JoinAgain):
            if time.monotonic() >= message.deadline:
                self._refuse(message.join, "mailbox full")
            else:
                self._join_again(_JoinAgain(message.join, message.deadline,
                                            min(message.delay * 2, 0.5)))
        elif not isinstance(message, _IdleCheck):
            # Told again: the room waits for them (its later recoveries for a batch, a member
            # for its replay, the live path for a repair or a gap check's answer, the state
            # joins for a read or the end of their wait). Each is one per task or timer of the
            # room (a CheckGap one per NATS reconnect), so few wait at a time. (An idle check
            # is not needed: with the mailbox full, every message handled looks again.)
            asyncio.get_running_loop().call_later(RETELL_S, self._retell, message)

    def on_undelivered(self, message: Any) -> None:
        """A join still queued when the room stops for good (it escalated: NATS away for longer
        than its restarts take, say) is refused as one it could not take in: a Join is never
        dropped, and its member would wait for ever in a room that no longer runs. Nothing
        else queued needs anyone told (a Leave's member goes with the room; its own results
        and checks are for this room only).

        Runs on the last instance, which may never have started (its position unknown).
        """
        join = message.join if isinstance(message, _JoinAgain) else message
        if not isinstance(join, Join) or join.member.left:
            return
        member = join.member
        if not self.last_seq and join.since_seq is None and not member.cursor:
            # No position to give it: as a join lost before its replay ended, it is rejoined
            # live, as it began (ConnectionActor._room_lost), not from the room's start.
            member.replaying = True
        self._refuse(join, "room stopped")

    def _on_live_messages(self, messages: list[LiveMessage]) -> None:
        ref = self.ref
        live = Live(messages)
        if ref.handle_now(live):
            return
        try:
            ref.tell(live)
        except ActorError:
            pass  # stopped, its subscription not ended yet: it had no members

    def receive_now(self, message: Any) -> bool:
        """Live events for a room with members, handled in the NATS reader's step when the
        actor is idle (``ActorRef.handle_now``): what ``on_receive`` does with them."""
        if type(message) is not Live or not self.members:
            return False
        self._on_live_many(message.messages)
        if not self._in_use():  # gone meanwhile: on_receive's look, after an idle check
            self.ref.tell(_IdleCheck())
        return True

    def _retell(self, message: Any) -> None:
        try:
            self.ref.tell(message)
        except ActorError:
            pass  # stopped: its members rejoin a new instance

    def _join_again(self, again: _JoinAgain) -> None:
        # Told again after the messages queued before it (a Leave of the member's previous
        # membership among them: it comes first, never two memberships of one connection).
        self._joins_waiting += 1
        asyncio.get_running_loop().call_later(again.delay, self._tell_join_again, again)

    def _tell_join_again(self, again: _JoinAgain) -> None:
        self._joins_waiting -= 1
        if again.join.member.left:
            return
        try:
            self.ref.tell(again)
        except ActorError:  # the room stopped meanwhile (no restart left): rejoin a new one
            self._refuse(again.join, "room stopped")

    def _refuse(self, join: Join, why: str) -> None:
        """Tell the member of a Join the room could not take in, as when its replay cannot be
        read: ``error`` 4500 with ``retry`` and the member ``refused`` (its client joins again),
        or for a silent join its connection rejoining, from where this join would have
        started: its ``since``, else the room's position. Then ``on_room_lost``."""
        member = join.member
        if member.left:
            return
        log.warning("! room %s: join of %s refused (%s)", self.room, member.client_id, why)
        if join.since_seq is not None and self._epoch_ok(join):
            member.cursor = max(member.cursor, join.since_seq)
        else:
            member.cursor = max(member.cursor, self.last_seq)
        if not join.silent:
            member.refused = True  # the client joins again: its connection leaves the room
            member.outbox.send(error_frame(4500, "room busy, join again", id=join.request_id,
                                           retry=True))
        member.on_room_lost(self.room, member)

    def _leave(self, member: Membership) -> None:
        member.left = True
        self._drop(member)

    def _drop(self, member: Membership) -> None:
        """``member`` is no longer in the room."""
        self.members.pop(id(member), None)
        watchers = self._watchers
        if watchers is not None and watchers.pop(id(member), None) is not None and not watchers:
            self._watchers = None

    def _arm_idle(self, delay: float) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(delay, self._idle_due)

    def _idle_due(self) -> None:
        self._idle_timer = None
        try:
            self.ref.tell(_IdleCheck())
        except ActorError:
            pass  # stopping already

    async def _idle(self) -> None:
        """After each message of a room without members: stop once it has been empty for
        ``idle_s`` and nothing waits in its mailbox; else look again later."""
        now = asyncio.get_running_loop().time()
        if self._empty_since is None:
            self._empty_since = now
        left = self._empty_since + self.settings.idle_s - now
        if left > 0:
            if self._idle_timer is None:
                self._arm_idle(left)
            return
        if self.ref.queued:
            return  # looked at again after the queued messages (a join among them keeps it)
        if self._joins_waiting:
            self._arm_idle(RETELL_S)  # looked at again once they are told
            return
        log.debug("= room %s: no members for %.1f s, stopping", self.room, self.settings.idle_s)
        # Synchronous up to here and in stop(): no message can slip in between the look at the
        # mailbox and the name being freed.
        await self.ref.stop(drain=False)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"room[{self.room}].{name}")
        if self._tasks is None:
            self._tasks = {}
        self._tasks[task] = None
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        tasks = self._tasks
        if tasks is not None:
            tasks.pop(task, None)
            if not tasks:
                self._tasks = None
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, ActorError):
            # It ended as the room stopped (its cancel came too late, or was lost in a wait
            # that ended at the same time): its answer has nobody to go to.
            return
        if exc is not None:
            log.error("! room %s: %s failed", self.room, task.get_name(), exc_info=exc)

    @property
    def _values(self) -> RoomValues:
        """A state room's values, made at first use: a plain room never needs them."""
        values = self._state_values
        if values is None:
            values = self._state_values = RoomValues(STATE_GRACE_S)
        return values

    # -- messages --------------------------------------------------------------------------

    async def on_receive(self, message: Any) -> Any:
        if isinstance(message, Live):
            self._on_live_many(message.messages)
        elif isinstance(message, Join):
            self._on_join(message)
        elif isinstance(message, Leave):
            self._leave(message.member)
        elif isinstance(message, _JoinAgain):
            self._on_join(message.join)
        elif isinstance(message, _ReplayDone):
            self._on_replay_done(message)
        elif isinstance(message, _BatchDone):
            self._on_batch_done(message)
        elif isinstance(message, _RepairDone):
            self._on_repair_done(message)
        elif isinstance(message, _StateRead):
            self._on_state_read(message)
        elif isinstance(message, _StateWaitOver):
            self._state_timer = None
            if self._state_need is not None:
                log.warning("! room %s: state read ahead of the live path; joins go on",
                            self.room)
                self._state_go_on()
        elif isinstance(message, CheckGap):
            self._spawn(self._check_gap(), "check-gap")
        elif isinstance(message, _Latest):
            if message.seq > self.last_seq and not self._repairing:
                self._repairing = True
                self.counters.gap_repairs += 1
                self._spawn(self._repair(self.last_seq, message.seq + 1), "repair")
        elif not isinstance(message, _IdleCheck):
            raise TypeError(f"unexpected message {type(message).__name__}")
        if not self._in_use():
            await self._idle()
        return None

    def _in_use(self) -> bool:
        """After each message: False for a room without members (it looks whether it is idle),
        else it is no longer empty."""
        if not self.members:
            return False
        if self._empty_since is not None:
            # No idle look while it has members: the timer armed when it became empty (at its
            # start, for the join in its mailbox) is cancelled rather than told to the room
            # for nothing, a message per connect for a user's personal room.
            self._empty_since = None
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
        return True

    # -- live path -------------------------------------------------------------------------

    def _on_live_many(self, messages: list[LiveMessage]) -> None:
        """Live events that came together (the batch a node stored, read in one step): each
        run of them in order is fanned out at once, a member's frames of the run pushed in one
        call (:meth:`_fan_out`), not event by event; anything else goes through
        :meth:`_on_live` one by one, in its place."""
        if len(messages) == 1:
            self._on_live(messages[0])
            return
        run: list[tuple[int, dict[str, Any], dict[str, bytes]]] = []
        for msg in messages:
            seq = msg.seq
            if (seq is None or self._repairing or self._state_need is not None
                    or seq <= self.last_seq or (msg.prev is not None and msg.prev > self.last_seq)):
                if run:
                    self._fan_out(run)
                    run = []
                self._on_live(msg)
                continue
            frame = self._accept(seq, msg.body)
            if frame is not None:
                run.append((seq, frame, {}))
        if run:
            self._fan_out(run)

    def _on_live(self, msg: LiveMessage) -> None:
        if msg.seq is None:
            self._deliver(None, msg.body)
            return
        if self._repairing:
            self._hold_live(msg)
            return
        if msg.seq <= self.last_seq:
            return  # already delivered (e.g. read by a repair)
        if msg.prev is not None and msg.prev > self.last_seq:
            # The live path lost something between last_seq and this one: read it back.
            self._repairing = True
            self._hold_live(msg)
            self.counters.gap_repairs += 1
            self._spawn(self._repair(self.last_seq, msg.seq), "repair")
            return
        self._deliver(msg.seq, msg.body)

    def _hold_live(self, msg: LiveMessage) -> None:
        if self._backlog is None:
            self._backlog = [msg]
        else:
            self._backlog.append(msg)

    async def _check_gap(self) -> None:
        try:
            latest = await self.store.last_seq(self.tenant, self.room)
        except StoreError as exc:
            log.warning("! room %s: gap check failed: %s", self.room, exc)
            return
        self.ref.tell(_Latest(latest))

    async def _trim(self, keep: int) -> None:
        try:
            await self.store.trim(self.tenant, self.room, keep)
        except StoreError as exc:
            log.warning("! room %s not trimmed: %s", self.room, exc)

    async def _repair(self, after: int, before: int) -> None:
        # Retried until the store answers: moving on past a gap would lose events for good.
        # Live messages meanwhile wait in the backlog (bounded by the mailbox; what overflows is
        # counted as live_dropped and read back by the next repair).
        delay = 0.1
        while True:
            try:
                events = await self.store.read(self.tenant, self.room, after, 1_000_000,
                                               before=before)
                break
            except StoreError as exc:
                log.warning("! room %s gap repair failed (%s); retry in %.1f s", self.room, exc,
                            delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.ref.tell(_RepairDone(before, events))

    def _on_repair_done(self, done: _RepairDone) -> None:
        self._repairing = False
        for ev in done.events:
            if ev.seq > self.last_seq:
                self._deliver(ev.seq, ev.body)
        backlog, self._backlog = self._backlog or (), None
        for msg in backlog:
            self._on_live(msg)

    def _replay_frames(self, events: list[StoredEvent], start: int, after: int,
                       cache: dict[int, tuple[dict[str, Any] | None, dict[str, bytes]]] | None,
                       codec: FrameCodec) -> list[tuple[int, bytes]]:
        """(seq, encoded frame) of a member's replay: ``events[start:]`` past ``after``, each
        decoded once and encoded once per codec when a batch shares ``cache``; an event that
        does not decode is left out."""
        out: list[tuple[int, bytes]] = []
        for i in range(start, len(events)):
            ev = events[i]
            if ev.seq <= after:
                continue
            if cache is None:
                frame = self._frame(ev.seq, ev.body)
                if frame is not None:
                    out.append((ev.seq, codec.encode(frame)))
                continue
            hit = cache.get(ev.seq)
            if hit is None:
                hit = cache[ev.seq] = (self._frame(ev.seq, ev.body), {})
            frame, encoded = hit
            if frame is not None:
                data = encoded.get(codec.name)
                if data is None:
                    data = encoded[codec.name] = codec.encode(frame)
                out.append((ev.seq, data))
        return out

    def _frame(self, seq: int | None, body: bytes) -> dict[str, Any] | None:
        event = None if self.recent is None else self.recent.take(body)
        if event is None:
            try:
                event = cbor_loads_strict(body)
            except CodecError:
                event = None
        if seq is None and self._watchers is None and _is_presence(event):
            # Nobody here asked for presence events (most members): nothing to build or send.
            self.counters.events_in += 1
            return None
        frame = event_frame(self.room, seq, event)
        if frame is None:
            # Written to the stream by something else than a node (PROTOCOL.md section 9):
            # skipped and counted. Event maps with values outside the value model (stored by an
            # older node) are delivered: the codecs' encoders make them safe, never fail.
            self.counters.undeliverable += 1
            log.warning("! room %s: undecodable event at seq %s skipped", self.room, seq)
            return None
        return frame

    def _read_state(self) -> None:
        """Read the state port's values (unless a read is in flight); the actor is told."""
        if self._reading or self.state is None:
            return
        self._reading = True
        state, tenant, room = self.state, self.tenant, self.room
        # The first read also reads the events stored lately up to the room's position: those
        # stored before it started never reach it live, and their state may not be written yet
        # (the events after the position come live, and are merged as delivered ones).
        upto = None if self._values.known else self.last_seq

        async def read() -> None:
            at = time.monotonic()
            try:
                values = await state.values(tenant, room)
                stored = (None if upto is None
                          else await stored_lately(self.store, tenant, room, upto))
                done = _StateRead(at, values, stored=stored)
            except StoreError as exc:
                done = _StateRead(at, [], str(exc))
            self.ref.tell(done)

        self._spawn(read(), "state")

    def _on_state_read(self, read: _StateRead) -> None:
        self._reading = False
        if read.error is not None:
            log.warning("! room %s: state not read: %s", self.room, read.error)
            if not self._values.known:  # the waiting joins fail as a failed replay does
                waiting, self._state_waiting = self._state_waiting or (), None
                for join in waiting:
                    self._on_replay_done(_ReplayDone(join.member, join, self.last_seq, False,
                                                     None, error=read.error))
            return
        need = self._values.take_read(read.values, read.at, self.last_seq, time.monotonic(),
                                      read.stored)
        if need is None:
            return  # a refresh
        if need <= self.last_seq:
            self._state_go_on()
            return
        # The read holds events the live path has not brought yet: wait for them (a gap
        # check reads them back if the live path lost them), at most STATE_WAIT_S.
        self._state_need = need
        self._spawn(self._check_gap(), "check-gap")
        self._state_timer = asyncio.get_running_loop().call_later(
            STATE_WAIT_S, self._state_wait_over)

    def _state_wait_over(self) -> None:
        try:
            self.ref.tell(_StateWaitOver())
        except ActorError:
            pass  # stopping already

    def _state_go_on(self) -> None:
        """The room's values are complete up to its position: start the waiting joins."""
        self._state_need = None
        if self._state_timer is not None:
            self._state_timer.cancel()
            self._state_timer = None
        waiting, self._state_waiting = self._state_waiting or (), None
        for join in waiting:
            if self.members.get(id(join.member)) is join.member:
                self._start_replay(join)

    def _accept(self, seq: int | None, body: bytes) -> dict[str, Any] | None:
        """The room's part of delivering an event (its position, trimming, values, counter):
        its frame, or None when there is nothing to send."""
        if seq is not None:
            self.last_seq = seq
            trim_to = self.settings.trim_to
            if trim_to is not None:
                # The stream keeps node-wide history_size per room; a smaller namespace limit
                # is applied by purging, once per tenth of the limit (idempotent on any node).
                self._since_trim += 1
                if self._since_trim >= max(1, trim_to // 10):
                    self._since_trim = 0
                    self._spawn(self._trim(trim_to), "trim")
        frame = self._frame(seq, body)
        if frame is None:
            return None
        if self.state is not None and seq is not None:
            self._values.delivered(seq, frame, time.monotonic())
        self.counters.events_in += 1
        return frame

    def _fan_out(self, run: list[tuple[int, dict[str, Any], dict[str, bytes]]]) -> None:
        """Fan events in order out to the members, as :meth:`_deliver` does one: each encoded
        once per codec, and each member's frames of the run pushed in one call (a fan-out of
        batches costs a member once a batch, not once an event)."""
        if len(run) == 1:
            self._deliver_frame(*run[0])
            return
        first, last = run[0][0], run[-1][0]
        whole: dict[str, tuple[list[bytes], int]] = {}  # codec -> every frame of the run, bytes
        delivered = 0
        for member in self.members.values():
            if member.replaying:
                held = member.held
                assert isinstance(held, list)  # its own, from _on_join until the replay ends
                held.extend(run)
                continue
            cursor = member.cursor
            if cursor >= last:
                continue
            outbox = member.outbox
            codec = outbox.codec
            if cursor < first:
                got = whole.get(codec.name)
                if got is None:
                    frames = [_encoded(item, codec) for item in run]
                    got = whole[codec.name] = (frames, sum(map(len, frames)))
                frames, size = got
            else:
                frames = [_encoded(item, codec) for item in run if item[0] > cursor]
                size = sum(map(len, frames))
            member.cursor = last
            outbox.push_many(frames, size)
            delivered += len(frames)
        self.counters.delivered += delivered

    def _deliver(self, seq: int | None, body: bytes) -> None:
        """Fan one event out: encode once per codec, push the same bytes to each member."""
        frame = self._accept(seq, body)
        if frame is not None:
            self._deliver_frame(seq, frame, {})

    def _deliver_frame(self, seq: int | None, frame: dict[str, Any],
                       encoded: dict[str, bytes]) -> None:
        delivered = 0
        # Presence events reach only the members that asked for them.
        members = self.members
        if seq is None and frame["event"].startswith("presence:"):
            members = self._watchers or {}
        for member in members.values():
            if member.replaying:
                held = member.held
                assert isinstance(held, list)  # its own, from _on_join until the replay ends
                held.append((seq, frame, encoded))
                continue
            if seq is not None:
                if seq <= member.cursor:
                    continue
                member.cursor = seq
            outbox = member.outbox
            codec = outbox.codec
            data = encoded.get(codec.name)
            if data is None:
                data = encoded[codec.name] = codec.encode(frame)
            outbox.push(data)
            delivered += 1
        self.counters.delivered += delivered
        if self._state_need is not None and self.last_seq >= self._state_need:
            self._state_go_on()

    # -- joining ---------------------------------------------------------------------------

    def _on_join(self, join: Join) -> None:
        member = join.member
        if member.left:
            return  # its Leave came first (this Join found the mailbox full and was told again)
        member.replaying = True
        member.held = []
        self.members[id(member)] = member
        if member.presence:
            if self._watchers is None:
                self._watchers = {}
            self._watchers[id(member)] = member
        if self.state is not None and not join.silent:
            if not self._values.known:
                # Live events are held for it meanwhile.
                if self._state_waiting is None:
                    self._state_waiting = [join]
                else:
                    self._state_waiting.append(join)
                self._read_state()
                return
            if self._values.stale(time.monotonic()):
                self._read_state()  # a refresh, in the background
        self._start_replay(join)

    def _start_replay(self, join: Join) -> None:
        """Fix the join's position (the room's), copy a state room's values as of it, and read
        its replay."""
        target = self.last_seq
        values = None
        if self.state is not None and not join.silent:
            values = self._values.upto(target)
        if join.since_seq is not None and values is None:
            # A recovery: served with the others that arrive in the same loop turn, or while
            # the batch before is read (a reconnect storm: thousands within a second or two).
            if self._recovering is None:
                self._recovering = [join]
            else:
                self._recovering.append(join)
            if not self._batching:
                self._batching = True
                self._spawn(self._recover(), "recover")
            return
        if join.since_seq is None and not join.rewind:
            # A plain join reads nothing: answered in this step (what _replay would tell), with
            # no task and no message of its own (most joins; every connect's personal room).
            self._on_replay_done(_ReplayDone(join.member, join, target, False, [],
                                             values=values))
            return
        self._spawn(self._replay(join, target, values), "replay")

    async def _recover(self) -> None:
        """One batch: the stream's latest seq once, ``has`` only for a ``since`` beyond it,
        one paged read from the lowest ``since`` (see ``node.core.room_recovery``)."""
        # The task's first step runs in the loop turn after the join that spawned it, before
        # any await: it takes every recovering join the room has handled until then, in one
        # step with the room's position (no message can be handled in between).
        joins, self._recovering = self._recovering or [], None
        position = self.last_seq
        store, tenant, room, counters = self.store, self.tenant, self.room, self.counters
        counters.recovery_batches += 1
        target = position
        try:
            counters.recovery_reads += 1
            # The stream may be ahead of what this room has delivered: replay up to its latest
            # (what arrives live later is skipped by each member's cursor).
            target = max(position, await store.last_seq(tenant, room))
            sinces = [j.since_seq for j in joins
                      if j.since_seq is not None and self._epoch_ok(j)]
            batch = RecoveryBatch(sinces, target, self.settings.recovery_max,
                                  self.settings.history_size)
            for since in batch.has_to_ask:
                counters.recovery_reads += 1
                batch.take_has(since, await store.has(tenant, room, since))
            if batch.count_needed:
                counters.recovery_reads += 1
                batch.take_count(await store.count(tenant, room))
            while (after := batch.next_read()) is not None:
                counters.recovery_reads += 1
                batch.take_page(await store.read(tenant, room, after, batch.page,
                                                 before=target + 1))
            done = _BatchDone(joins, target, batch)
        except StoreError as exc:
            done = _BatchDone(joins, target, None, str(exc))
        except Exception as exc:  # never leave a batch unanswered: the next ones wait for it
            log.exception("! room %s: recovery batch failed", self.room)
            done = _BatchDone(joins, target, None, type(exc).__name__)
        self.ref.tell(done)

    def _epoch_ok(self, join: Join) -> bool:
        return join.since_epoch is None or join.since_epoch == self.store.epoch

    def _on_batch_done(self, done: _BatchDone) -> None:
        """Answer each join of a batch (its slice of the shared events), then start the next
        batch if joins queued meanwhile."""
        batch = done.batch
        cache: dict[int, tuple[dict[str, Any] | None, dict[str, bytes]]] = {}
        for join in done.joins:
            if batch is None:
                reply = _ReplayDone(join.member, join, done.target, False, None,
                                    error=done.error)
            elif join.since_seq is None or not self._epoch_ok(join):
                reply = _ReplayDone(join.member, join, done.target, False, [])
            else:
                recovered, start = batch.outcome(join.since_seq)
                reply = _ReplayDone(join.member, join, done.target, recovered,
                                    batch.events if recovered else [], start=start,
                                    cache=cache)
            self._on_replay_done(reply)
        self._batching = False
        if self._recovering:
            self._batching = True
            self._spawn(self._recover(), "recover")

    async def _replay(self, join: Join, target: int,
                      values: list[dict[str, Any]] | None = None) -> None:
        """Decide recovery and read what the member missed, up to ``target`` (delivered live)."""
        member = join.member
        position = target
        try:
            if join.since_seq is not None or (join.rewind and values is None):
                # A recovering (or rewinding) member: the stream may be ahead of what this
                # room has delivered (events in flight on the live path, or a live path that
                # was down). Replay up to the stream's latest; what arrives live later is
                # skipped by its cursor.
                # (A plain join keeps the room's own position, in order with the frames the
                # same client sent after it: its own publishes reach it. So does a rewind in
                # a state room: its last N events might not reach back to the room's
                # position, where its values were copied.)
                target = max(target, await self.store.last_seq(self.tenant, self.room))
            recovered, events = await self._recovery(join, target)
            if values is not None and not recovered:
                # Nothing replayed: join at the position of the values, the events after it
                # come live.
                target = min(target, position)
            done = _ReplayDone(member, join, target, recovered, events, values=values)
        except StoreError as exc:
            done = _ReplayDone(member, join, target, False, None, error=str(exc))
        self.ref.tell(done)

    async def _recovery(self, join: Join, target: int) -> tuple[bool, list[StoredEvent]]:
        since = join.since_seq
        if join.rewind and since is None:
            return False, await self._rewind(join.rewind, target)
        if since is None:
            return False, []
        if join.since_epoch is not None and join.since_epoch != self.store.epoch:
            return False, []
        if since >= target:
            # Nothing missed that this node has delivered; the rest comes live.
            ok = since in (0, target) or await self.store.has(self.tenant, self.room, since)
            return ok, []
        if since > 0:
            if not await self.store.has(self.tenant, self.room, since):
                return False, []  # the last event it saw was trimmed: more may have been
        else:
            total = await self.store.count(self.tenant, self.room)
            if self.settings.history_size and total >= self.settings.history_size:
                return False, []  # the room may have been trimmed: cannot prove nothing was
        # The read is complete up to target (the store checks it with the stream leader), so
        # more than recovery_max events means too many; counts are never trusted for this.
        events = await self.store.read(self.tenant, self.room, since,
                                       self.settings.recovery_max + 1, before=target + 1)
        if len(events) > self.settings.recovery_max:
            return False, []
        return True, events

    async def _rewind(self, n: int, target: int) -> list[StoredEvent]:
        """The room's last ``n`` stored events up to ``target``, oldest first (at most the
        namespace's ``recovery_max``): a join whose ``since`` is the seq before the first of
        them, decided here, in the same step as the room's position."""
        n = min(n, self.settings.recovery_max)
        if n <= 0 or target <= 0:
            return []
        # history with reverse pages backwards: the newest n events before target + 1.
        events = await self.store.history(self.tenant, self.room, since=target + 1, limit=n,
                                          reverse=True)
        return events[::-1]

    def _on_replay_done(self, done: _ReplayDone) -> None:
        member = done.member
        if self.members.get(id(member)) is not member or member.left:
            return  # left while its replay was read (its connection answered the join)
        join = done.join
        outbox = member.outbox
        if done.error is not None:
            self._drop(member)
            if not join.silent:
                member.refused = True  # the client joins again: its connection leaves the room
                outbox.send(error_frame(4500, "could not read the room", id=join.request_id,
                                        retry=True))
            member.on_room_lost(self.room, member)
            return
        # The join's position (done.target) is fixed: the publishes its connection held for
        # it go to the store now, after that position, and reach the member live. (Told at the
        # join, a replay that reads the stream's latest seq afterwards could take them in its
        # position: a rewind of the last N would then leave the client's own events out.)
        if member.on_in_room is not None:
            member.on_in_room(self.room, member)
        events = done.events or []
        start = min(done.start, len(events))
        codec = outbox.codec
        recovered = done.recovered
        since = (join.since_seq or 0) if recovered else 0
        replay = self._replay_frames(events, start, since, done.cache, codec)
        budget = outbox.limit // 2
        # The replay goes to the outbox at once, which takes at most its limit: more would cut
        # the member off (4008), and again each time it came back and joined.
        too_large = bool(replay) and sum(len(data) for _, data in replay) > budget
        if (join.silent and (not recovered or too_large) and join.since_seq is not None
                and join.since_seq < done.target
                and join.since_epoch in (None, self.store.epoch)):
            # A silent rejoin (this room restarted under a member, or a device's persistent
            # session joins from its cursor) that cannot be recovered here: more than
            # recovery_max events missed (or too many bytes), or the last one it got was
            # trimmed. Joining it at the room's position would skip events without a word; it
            # is cut off as a slow consumer (4008) instead. A client then rejoins with
            # ``since`` and is told ``recovered: false``; a persistent MQTT session resumes
            # from its cursor through the bridge's paged read (and a gap notice when events
            # were trimmed).
            self._drop(member)
            log.info("! room %s: %s's silent rejoin from %d not recoverable; cut off (4008)",
                     self.room, member.client_id, join.since_seq)
            outbox.slow = True
            outbox.on_slow()
            return
        if too_large:
            # A recovery is whole or not at all (recovered: false, live from the room's seq:
            # the client reloads, from history, paged); a rewind keeps its newest events that
            # fit.
            if recovered:
                replay, recovered = [], False
            else:
                replay = _newest_within(replay, budget)
            log.info("= room %s: %s's replay over half the outbox (%d B): %s", self.room,
                     member.client_id, budget, "rewind cut" if replay else "not recovered")
        if recovered:
            member.cursor = max(member.cursor, since)
        elif replay:  # a rewind: its events, then live from target on
            member.cursor = max(member.cursor, replay[0][0] - 1)
        else:
            member.cursor = done.target
        if not join.silent:
            joined: dict[str, Any] = {
                "type": "joined", "room": self.room, "seq": done.target,
                "epoch": self.store.epoch, "recovered": recovered,
                "replayed": len(replay),
            }
            if join.request_id is not None:
                joined["id"] = join.request_id
            outbox.send(joined)
            member.answered = True
            if done.values is not None:
                for state in state_frames(self.room, done.values):
                    outbox.send(state)
        for at, replayed in replay:
            if at <= member.cursor:
                continue
            member.cursor = at
            outbox.push(replayed)
        self.counters.replayed += len(replay)
        member.cursor = max(member.cursor, done.target)
        held, member.held = member.held, ()
        member.replaying = False
        for seq, frame, encoded in held:
            if seq is not None:
                if seq <= member.cursor:
                    continue
                member.cursor = seq
            data = encoded.get(codec.name)
            if data is None:
                data = encoded[codec.name] = codec.encode(frame)
            outbox.push(data)


def _newest_within(replay: list[tuple[int, bytes]], budget: int) -> list[tuple[int, bytes]]:
    """The newest frames of ``replay`` whose bytes stay within ``budget`` (maybe none)."""
    size, first = 0, len(replay)
    while first > 0 and size + len(replay[first - 1][1]) <= budget:
        first -= 1
        size += len(replay[first][1])
    return replay[first:]
