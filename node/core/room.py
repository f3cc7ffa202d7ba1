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

A room without members stops after ``RoomSettings.idle_s`` (``room_idle_s``, default 1 s), live
traffic or not: an empty room costs two NATS subscriptions and its actor, and a client
churning through rooms must not keep thousands of them alive. It stops only when its mailbox
is empty, in the same step as the decision (a join told a moment earlier keeps it running; one
told later finds the name free and starts a fresh room). ``RoomCounters.rooms`` counts the
room actors that run, for the node's ``max_rooms``.

A state room (``RoomSettings.state``) answers a non-silent join with ``joined`` and then its
``state`` frame (several for a large room, all but the last with ``more``): the current values,
read from the :class:`~node.core.ports.StatePort` in the same step as the join's replay, so
that no live event of the room comes between. The state
of an event is written by the node that stored it, right after the stream's ack: an event this
room has delivered may not be in the state yet when a joiner reads it, and the joiner's cursor
is already past it. So the room keeps, per key, the last event it delivered in the last
``STATE_GRACE_S`` seconds, and merges them into what it read (the higher seq of each key wins).
It then keeps the values it read up to date with every event it delivers, so the joins that
follow within ``STATE_GRACE_S`` cost no read (a dashboard of 10,000 devices opened by a hundred
browsers reads the bucket once, not a hundred times).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from actors.actor import Actor, RestartPolicy
from actors.errors import ActorError
from actors.mailbox import Overflow
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
    Membership,
    RoomCounters,
    RoomSettings,
)
from node.protocol.errors import CodecError
from node.protocol.frames import cbor_loads_strict, error_frame, state_frames

__all__ = [
    "STATE_GRACE_S",
    "CheckGap",
    "Join",
    "Leave",
    "Membership",
    "RoomActor",
    "RoomCounters",
    "RoomSettings",
]

log = logging.getLogger("node.core.room")

#: How long a state room keeps the events it delivered, for joiners whose read of the state
#: may not hold them yet: the state is written within the store's deadlines (a KV put, ~1 ms,
#: at most a few seconds while a leader is elected), far within this.
STATE_GRACE_S = 30.0


@dataclass(frozen=True, slots=True)
class _IdleCheck:
    """The room may have been empty for ``idle_s``: look (see ``RoomActor._idle``)."""


@dataclass(frozen=True, slots=True)
class _Latest:
    seq: int


@dataclass(frozen=True, slots=True)
class _ReplayDone:
    member: Membership
    join: Join
    target: int
    recovered: bool
    events: list[StoredEvent] | None
    error: str | None = None
    #: A state room's join: send the state after joined (with ``values``, read at ``values``'s
    #: time, when the room's copy was missing or too old to use).
    state: bool = False
    values: tuple[float, list[dict[str, Any]]] | None = None


@dataclass(frozen=True, slots=True)
class _RepairDone:
    upto: int
    events: list[StoredEvent]


def _apply(values: dict[str, dict[str, Any]], key: str, value: dict[str, Any]) -> None:
    """Apply one event (as a value, with its ``seq``) to a state: only over a lower seq; an
    unset removes the key."""
    held = values.get(key)
    if held is not None and held.get("seq", 0) >= value["seq"]:
        return
    if value.get("unset"):
        values.pop(key, None)
    else:
        values[key] = value


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
    # and the gap is repaired from the stream by the next one (see on_mailbox_full).
    mailbox_size = 65536
    on_overflow = Overflow.CALLBACK
    batch_size = 256
    restart = RestartPolicy(max_restarts=5, window_s=60, min_backoff_s=0.1, max_backoff_s=5)
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
    ) -> None:
        self.tenant = tenant
        self.room = room
        self.store = store
        self.feed = feed
        self.settings = settings
        self.counters = counters
        self.state = state if settings.state else None
        # A state room's recently delivered events: key -> (monotonic time, event map), the
        # oldest first (see the module's docstring).
        self._recent: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        # A state room's values as this room knows them (key -> value): read from the state
        # port at a join (at _values_at), merged with _recent, then kept up to date by every
        # event the room delivers; read again at a join once older than STATE_GRACE_S (an
        # event whose state write was in flight when the room started is then in the read).
        self._values: dict[str, dict[str, Any]] | None = None
        self._values_at = 0.0
        self._values_read: asyncio.Task[tuple[float, list[dict[str, Any]]]] | None = None
        self.members: dict[int, Membership] = {}
        self.last_seq = 0
        self._sub: Subscription | None = None
        self._repairing = False
        self._backlog: list[LiveMessage] = []
        self._since_trim = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # When the room last became empty (loop time; None: it has members), and the timer
        # that looks again once it may have been empty for idle_s.
        self._empty_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
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
        # its connection until this room has taken the join in (Membership.on_in_room), so
        # they are stored after this position and reach it.
        try:
            self._sub = await self.feed.subscribe(self.tenant, self.room, self._on_live_message)
            self.last_seq = await self.store.last_seq(self.tenant, self.room)
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
        for task in self._tasks:
            task.cancel()
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def on_failure(self, exc: BaseException) -> None:
        # The next instance starts empty: tell members to rejoin from their cursors.
        members, self.members = list(self.members.values()), {}
        for member in members:
            member.on_room_lost(self.room)

    def on_mailbox_full(self, message: Any) -> None:
        if isinstance(message, LiveMessage):
            self.counters.live_dropped += 1  # repaired from the stream by the next one
        else:
            log.warning("! room %s mailbox full: dropped %s", self.room, type(message).__name__)

    def _on_live_message(self, msg: LiveMessage) -> None:
        try:
            self.ref.tell(msg)
        except ActorError:
            pass  # stopped, its subscription not ended yet: it had no members

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
        log.debug("= room %s: no members for %.1f s, stopping", self.room, self.settings.idle_s)
        # Synchronous up to here and in stop(): no message can slip in between the look at the
        # mailbox and the name being freed.
        await self.ref.stop(drain=False)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"room[{self.room}].{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- messages --------------------------------------------------------------------------

    async def on_receive(self, message: Any) -> Any:
        if isinstance(message, LiveMessage):
            self._on_live(message)
        elif isinstance(message, Join):
            self._on_join(message)
        elif isinstance(message, Leave):
            self.members.pop(id(message.member), None)
        elif isinstance(message, _ReplayDone):
            self._on_replay_done(message)
        elif isinstance(message, _RepairDone):
            self._on_repair_done(message)
        elif isinstance(message, CheckGap):
            self._spawn(self._check_gap(), "check-gap")
        elif isinstance(message, _Latest):
            if message.seq > self.last_seq and not self._repairing:
                self._repairing = True
                self.counters.gap_repairs += 1
                self._spawn(self._repair(self.last_seq, message.seq + 1), "repair")
        elif not isinstance(message, _IdleCheck):
            raise TypeError(f"unexpected message {type(message).__name__}")
        if not self.members:
            await self._idle()
        elif self._empty_since is not None:
            self._empty_since = None
        return None

    # -- live path -------------------------------------------------------------------------

    def _on_live(self, msg: LiveMessage) -> None:
        if msg.seq is None:
            self._deliver(None, msg.body)
            return
        if self._repairing:
            self._backlog.append(msg)
            return
        if msg.seq <= self.last_seq:
            return  # already delivered (e.g. read by a repair)
        if msg.prev is not None and msg.prev > self.last_seq:
            # The live path lost something between last_seq and this one: read it back.
            self._repairing = True
            self._backlog.append(msg)
            self.counters.gap_repairs += 1
            self._spawn(self._repair(self.last_seq, msg.seq), "repair")
            return
        self._deliver(msg.seq, msg.body)

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
        backlog, self._backlog = self._backlog, []
        for msg in backlog:
            self._on_live(msg)

    def _frame(self, seq: int | None, body: bytes) -> dict[str, Any] | None:
        try:
            event = cbor_loads_strict(body)
        except CodecError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            # Written to the stream by something else than a node (PROTOCOL.md section 9):
            # skipped and counted. Event maps with values outside the value model (stored by an
            # older node) are delivered: the codecs' encoders make them safe, never fail.
            self.counters.undeliverable += 1
            log.warning("! room %s: undecodable event at seq %s skipped", self.room, seq)
            return None
        frame: dict[str, Any] = {"type": "event", "room": self.room}
        if seq is not None:
            frame["seq"] = seq
        for key in ("event", "data", "ts", "from", "msg_id", "key", "unset"):
            if key in event:
                frame[key] = event[key]
        return frame

    def _remember(self, seq: int, frame: dict[str, Any]) -> None:
        """Keep a state room's delivered event for :data:`STATE_GRACE_S` (by its key)."""
        key = frame.get("key")
        if not isinstance(key, str):
            return
        now = time.monotonic()
        recent = self._recent
        value = {k: v for k, v in frame.items() if k != "type"}
        value["seq"] = seq
        recent[key] = (now, value)
        recent.move_to_end(key)
        while recent:
            first = next(iter(recent.values()))
            if now - first[0] <= STATE_GRACE_S:
                break
            recent.popitem(last=False)

    def _set_values(self, at: float, values: list[dict[str, Any]]) -> None:
        """Take the values read at ``at`` as the room's, with its recent events merged in."""
        if self._values is not None and at < self._values_at:
            return  # an older read finishing after a newer one
        by_key: dict[str, dict[str, Any]] = {}
        for value in values:
            key = value.get("key")
            if isinstance(key, str):
                by_key[key] = value
        now = time.monotonic()
        for key, (delivered_at, value) in self._recent.items():
            if now - delivered_at <= STATE_GRACE_S:
                _apply(by_key, key, value)
        self._values, self._values_at = by_key, at

    async def _read_values(self) -> tuple[float, list[dict[str, Any]]]:
        """The state port's values and when they were asked for: one read at a time, shared
        by the joins waiting for it."""
        task = self._values_read
        if task is None:
            assert self.state is not None
            state, tenant, room = self.state, self.tenant, self.room

            async def read() -> tuple[float, list[dict[str, Any]]]:
                at = time.monotonic()
                return at, await state.values(tenant, room)

            task = self._values_read = asyncio.get_running_loop().create_task(
                read(), name=f"room[{self.room}].state")
            self._tasks.add(task)  # type: ignore[arg-type]  # cancelled with the room
            task.add_done_callback(self._values_read_done)
        return await asyncio.shield(task)

    def _values_read_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if self._values_read is task:
            self._values_read = None
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have gone

    def _deliver(self, seq: int | None, body: bytes) -> None:
        """Fan one event out: encode once per codec, push the same bytes to each member."""
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
            return
        if self.state is not None and seq is not None:
            self._remember(seq, frame)
            if self._values is not None and isinstance(frame.get("key"), str):
                _apply(self._values, frame["key"], self._recent[frame["key"]][1])
        self.counters.events_in += 1
        encoded: dict[str, bytes] = {}
        delivered = 0
        # Presence events reach only the members that asked for them.
        presence_only = seq is None and frame["event"].startswith("presence:")
        for member in self.members.values():
            if presence_only and not member.presence:
                continue
            if member.replaying:
                member.held.append((seq, frame, encoded))
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

    # -- joining ---------------------------------------------------------------------------

    def _on_join(self, join: Join) -> None:
        member = join.member
        member.replaying = True
        member.held = []
        self.members[id(member)] = member
        if member.on_in_room is not None:
            member.on_in_room(self.room, member)
        self._spawn(self._replay(join, self.last_seq), "replay")

    async def _replay(self, join: Join, target: int) -> None:
        """Decide recovery and read what the member missed, up to ``target`` (delivered live)."""
        member = join.member
        try:
            if join.since_seq is not None or join.rewind:
                # A recovering (or rewinding) member: the stream may be ahead of what this
                # room has delivered (events in flight on the live path, or a live path that
                # was down). Replay up to the stream's latest; what arrives live later is
                # skipped by its cursor.
                # (A plain join keeps the room's own position, in order with the frames the
                # same client sent after it: its own publishes reach it.)
                target = max(target, await self.store.last_seq(self.tenant, self.room))
            recovered, events = await self._recovery(join, target)
            values = None
            state = self.state is not None and not join.silent
            if state and (self._values is None
                          or time.monotonic() - self._values_at > STATE_GRACE_S):
                values = await self._read_values()
            done = _ReplayDone(member, join, target, recovered, events, state=state,
                               values=values)
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
        if self.members.get(id(member)) is not member:
            return  # left while its replay was read
        join = done.join
        outbox = member.outbox
        if done.error is not None:
            del self.members[id(member)]
            if not join.silent:
                outbox.send(error_frame(4500, "could not read the room", id=join.request_id,
                                        retry=True))
            member.on_room_lost(self.room)
            return
        events = done.events or []
        if done.recovered:
            member.cursor = max(member.cursor, join.since_seq or 0)
        elif events:  # a rewind: its events, then live from target on
            member.cursor = max(member.cursor, events[0].seq - 1)
        else:
            member.cursor = done.target
        if not join.silent:
            joined: dict[str, Any] = {
                "type": "joined", "room": self.room, "seq": done.target,
                "epoch": self.store.epoch, "recovered": done.recovered,
                "replayed": len(events),
            }
            if join.request_id is not None:
                joined["id"] = join.request_id
            outbox.send(joined)
            if done.state:
                if done.values is not None:
                    self._set_values(*done.values)
                values = self._values or {}
                for state in state_frames(self.room, [values[k] for k in sorted(values)]):
                    outbox.send(state)
        codec = outbox.codec
        for ev in events:
            if ev.seq <= member.cursor:
                continue
            frame = self._frame(ev.seq, ev.body)
            member.cursor = ev.seq
            if frame is not None:
                outbox.push(codec.encode(frame))
        self.counters.replayed += len(events)
        member.cursor = max(member.cursor, done.target)
        held, member.held = member.held, []
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

