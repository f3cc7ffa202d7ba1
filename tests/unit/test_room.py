"""RoomActor against an in-memory store and recording transports: no sockets, no NATS."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from typing import Any

import cbor2
import pytest

from actors import ActorSystem
from node.core import room as room_module
from node.core.outbox import Outbox
from node.core.ports import LiveMessage, StoredEvent
from node.core.room import (
    CheckGap,
    Join,
    Leave,
    Membership,
    RoomActor,
    RoomCounters,
    RoomSettings,
)
from node.protocol.frames import CBOR, JSON


class FakeStore:
    """RoomStore and LiveFeed in memory; live delivery is manual (``deliver``)."""

    epoch = "e1"

    def __init__(self) -> None:
        self.events: list[tuple[int, bytes]] = []
        self.callback: Callable[[list[LiveMessage]], None] | None = None
        self.reads = 0
        self.gate: asyncio.Event | None = None  # hold reads until set
        self.held = asyncio.Event()  # a read is being held by the gate


    def add(self, n: int) -> list[int]:
        seqs = []
        for _ in range(n):
            seq = len(self.events) * 2 + 1  # seqs are not contiguous, as in a shared stream
            self.events.append((seq, cbor2.dumps({"event": "e", "data": seq})))
            seqs.append(seq)
        return seqs

    def deliver(self, seq: int) -> None:
        index = [s for s, _ in self.events].index(seq)
        prev = self.events[index - 1][0] if index else 0
        assert self.callback is not None
        self.callback([LiveMessage(seq, prev, self.events[index][1])])

    async def subscribe(self, tenant: str, room: str, callback: Any) -> Any:
        self.callback = callback

        class Sub:
            async def unsubscribe(self) -> None:
                pass

        return Sub()

    def publish_volatile(self, tenant: str, room: str, body: bytes, *,
                         later: bool = False) -> None:
        raise NotImplementedError

    async def last_seq(self, tenant: str, room: str, *, after_subscribe: bool = False) -> int:
        return self.events[-1][0] if self.events else 0

    async def read(self, tenant: str, room: str, after: int, limit: int, *,
                   before: int | None = None) -> list[StoredEvent]:
        self.reads += 1
        if self.gate is not None:
            self.held.set()
            await self.gate.wait()
        out = [StoredEvent(s, b) for s, b in self.events
               if s > after and (before is None or s < before)]
        return out[:limit]

    async def history(self, tenant: str, room: str, *, since: int | None, limit: int,
                      reverse: bool) -> list[StoredEvent]:
        if since is not None and not reverse:
            return [StoredEvent(s, b) for s, b in self.events if s > since][:limit]
        out = [StoredEvent(s, b) for s, b in self.events if since is None or s < since]
        out = out[-limit:] if limit > 0 else []
        return out[::-1] if reverse else out

    async def count_from(self, tenant: str, room: str, seq: int) -> int:
        return sum(1 for s, _ in self.events if s >= seq)

    async def count(self, tenant: str, room: str) -> int:
        return len(self.events)

    async def has(self, tenant: str, room: str, seq: int) -> bool:
        return any(s == seq for s, _ in self.events)

    async def trim(self, tenant: str, room: str, keep: int) -> None:
        pass


class Recording:
    """A transport that records messages (several frames each, JSON lines or CBOR)."""

    def __init__(self, codec: Any) -> None:
        self.codec = codec
        self.frames: list[Any] = []
        self.arrived = asyncio.Event()

    def write_message(self, payload: bytes) -> None:
        self.frames.extend(self.codec.decode(payload))
        self.arrived.set()

    def buffered_bytes(self) -> int:
        return 0

    def events(self) -> list[int]:
        return [f["seq"] for f in self.frames if f.get("type") == "event"]

    async def joined(self) -> dict[str, Any]:
        while not any(f.get("type") == "joined" for f in self.frames):
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5)
        return next(f for f in self.frames if f.get("type") == "joined")

    async def until(self, n: int) -> list[int]:
        while len(self.events()) < n:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5)
        return self.events()


def member(codec: Any = JSON) -> tuple[Membership, Recording]:
    rec = Recording(codec)
    outbox = Outbox(codec, rec, limit=1 << 20, on_slow=lambda: None)
    return Membership("c", outbox, lambda room, member: None), rec


@pytest.fixture
async def room() -> Any:
    store = FakeStore()
    async with ActorSystem() as system:
        ref = system.spawn(lambda: RoomActor("t", "r", store, store, RoomSettings(),
                                             RoomCounters()))
        yield store, ref


async def test_live_in_order_and_gaps_repaired(room: Any) -> None:
    store, ref = room
    m, rec = member()
    ref.tell(Join(m))
    await rec.joined()
    seqs = store.add(5)
    store.deliver(seqs[0])
    store.deliver(seqs[0])  # a duplicate on the live path
    store.deliver(seqs[3])  # seqs[1], seqs[2] lost on the live path: read back
    store.deliver(seqs[4])
    assert await rec.until(5) == seqs
    assert rec.frames[0]["type"] == "joined"


@pytest.mark.parametrize("seed", [int(os.environ.get("RTNODE_TEST_LIVE_LISTS_SEED", "5417")),
                                  *range(12)])
async def test_live_lists_of_any_shape_deliver_every_event_once_in_order(
        room: Any, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded: the live path hands the room lists of events (what one read of NATS brought),
    of any length, with events lost, repeated or already delivered among them; members (JSON,
    CBOR), one joining midway, one joining midway with ``since`` (its replay read while lists
    keep coming), each get every event from their join on once, in order. A list's runs of
    events in order are fanned out at once (``_on_live_many``), the rest one by one."""
    rng = random.Random(seed)
    store, ref = room
    first, first_rec = member()
    ref.tell(Join(first))
    await first_rec.joined()
    late, late_rec = member(CBOR)
    since, since_rec = member()
    seqs = store.add(300)
    prev = {s: (seqs[i - 1] if i else 0) for i, s in enumerate(seqs)}
    i = 0
    since_at, since_asked = rng.randrange(20, 280), False
    runs = []
    fan_out = RoomActor._fan_out
    monkeypatch.setattr(RoomActor, "_fan_out",
                        lambda self, run: runs.append(len(run)) or fan_out(self, run))
    while i < len(seqs):
        if i >= 150 and not late_rec.frames:
            ref.tell(Join(late))
            await late_rec.joined()
        if i >= since_at and not since_asked:
            ref.tell(Join(since, since_seq=seqs[since_at // 2], since_epoch="e1"))
            since_asked = True  # not waited for: lists arrive while it replays
        n = rng.randint(1, 12)
        chunk = seqs[i:i + n]
        i += n
        loss = 0.1 if rng.random() < 0.4 else 0.0
        sent = [s for s in chunk if rng.random() >= loss]  # some lost: read back
        if rng.random() < 0.3 and i > n:
            sent.insert(0, seqs[i - n - 1])  # one delivered already
        if sent and rng.random() < 0.2:
            sent.append(sent[-1])  # a repeat
        store.callback([LiveMessage(s, prev[s], store.events[seqs.index(s)][1]) for s in sent])
        if sent and rng.random() < 0.5:  # now and then a repair ends before the next list
            await first_rec.until(seqs.index(max(sent)) + 1)
    # The last ones, if lost, are read back by the next event's gap: send one more.
    last = store.add(1)[0]
    store.callback([LiveMessage(last, seqs[-1], store.events[-1][1])])
    assert await first_rec.until(301) == [*seqs, last]
    late_events = late_rec.events()
    while not late_events or late_events[-1] != last:
        late_rec.arrived.clear()
        await asyncio.wait_for(late_rec.arrived.wait(), 5)
        late_events = late_rec.events()
    start = late_events[0]
    assert late_events == [s for s in [*seqs, last] if s >= start]
    since_events = await since_rec.until(1)
    while since_events[-1] != last:
        since_rec.arrived.clear()
        await asyncio.wait_for(since_rec.arrived.wait(), 5)
        since_events = since_rec.events()
    assert since_events == [*seqs, last][since_at // 2 + 1:]
    assert max(runs) > 1  # the lists' runs in order were fanned out at once


async def test_a_list_in_order_reaches_each_member_from_its_own_position(room: Any) -> None:
    """One list of events in order, fanned out at once: a live member gets all of it, a member
    whose replay read past the room's position only what it has not had, a member still
    replaying has it held, then gets what its replay did not bring."""
    store, ref = room

    def live(seqs: list[int]) -> None:
        assert store.callback is not None
        store.callback([LiveMessage(s, s - 2 if s > 1 else 0, store.events[(s - 1) // 2][1])
                        for s in seqs])

    a, a_rec = member()
    ref.tell(Join(a))
    await a_rec.joined()
    old = store.add(2)
    live(old)
    await a_rec.until(2)
    ahead = store.add(3)  # stored, not yet live here
    b, b_rec = member(CBOR)
    ref.tell(Join(b, since_seq=old[0], since_epoch="e1"))
    assert await b_rec.until(4) == [old[1], *ahead]
    store.gate = asyncio.Event()  # c's replay read waits
    c, c_rec = member()
    ref.tell(Join(c, since_seq=old[1], since_epoch="e1"))
    await asyncio.wait_for(store.held.wait(), 5)  # c's replay read, waiting
    new = store.add(2)
    live([*ahead, *new])  # one run of 5: held for c
    store.gate.set()
    await c_rec.until(1)
    last = store.add(1)
    live(last)  # a barrier: anything sent twice would come before it
    assert await a_rec.until(8) == [*old, *ahead, *new, *last]
    assert await b_rec.until(7) == [old[1], *ahead, *new, *last]
    assert await c_rec.until(6) == [*ahead, *new, *last]


async def test_join_since_replays_then_goes_live_without_a_seam(room: Any) -> None:
    store, ref = room
    old = store.add(3)
    store.gate = asyncio.Event()  # the replay read waits while live events arrive
    m, rec = member()
    ref.tell(Join(m, since_seq=old[0], since_epoch="e1", request_id=7))
    live = store.add(2)
    store.deliver(live[0])
    store.deliver(live[1])
    store.gate.set()
    assert await rec.until(4) == old[1:] + live
    joined = rec.frames[0]
    # the two live events were stored before the replay read: replayed, then skipped live
    assert (joined["id"], joined["recovered"], joined["replayed"], joined["seq"]) == (
        7, True, 4, live[-1])


async def test_wrong_epoch_goes_live_from_latest(room: Any) -> None:
    store, ref = room
    store.add(3)
    m, rec = member()
    ref.tell(Join(m, since_seq=1, since_epoch="other"))
    await rec.joined()
    new = store.add(1)
    store.deliver(new[0])
    assert await rec.until(1) == new
    assert rec.frames[0]["recovered"] is False


async def test_encoded_once_per_codec(room: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store, ref = room
    calls: dict[str, int] = {"json": 0, "cbor": 0}
    for codec in (JSON, CBOR):
        original = codec.encode

        def counting(frame: Any, codec: Any = codec, original: Any = original) -> bytes:
            if frame.get("type") == "event":
                calls[codec.name] += 1
            return bytes(original(frame))

        monkeypatch.setattr(codec, "encode", counting)
    members = [member(JSON) for _ in range(50)] + [member(CBOR) for _ in range(50)]
    # The joins and the events reach the room's mailbox together: the events arrive while every
    # member is still joining, so they are held for each and sent after its (empty) replay.
    for m, _ in members:
        ref.tell(Join(m))
    seqs = store.add(3)
    for seq in seqs:
        store.deliver(seq)
    for _, rec in members:
        assert await rec.until(3) == seqs
    assert calls == {"json": 3, "cbor": 3}, "each event encoded once per codec, not per member"


async def test_leave_stops_delivery(room: Any) -> None:
    store, ref = room
    m, rec = member()
    ref.tell(Join(m))
    await rec.joined()
    first = store.add(1)
    store.deliver(first[0])
    await rec.until(1)
    ref.tell(Leave(m))
    later = store.add(1)
    store.deliver(later[0])
    other, other_rec = member()
    ref.tell(Join(other))  # handled after the live event: a barrier
    await other_rec.arrived.wait()
    assert rec.events() == first


@pytest.mark.parametrize("trimmed", [False, True])
async def test_a_silent_rejoin_that_cannot_recover_is_cut_off_not_skipped(trimmed: bool) -> None:
    # A silent join from a cursor (a room restarted under its member, a device's persistent
    # session) that would miss more than recovery_max events, or whose last event was
    # trimmed, must not be joined at the room's position (events skipped without a word):
    # the member is cut off as a slow consumer, and nothing is delivered to it.
    store = FakeStore()
    async with ActorSystem() as system:
        ref = system.spawn(lambda: RoomActor("t", "r", store, store,
                                             RoomSettings(recovery_max=3), RoomCounters()))
        seqs = store.add(10)
        if trimmed:
            store.events = [(s, b) for s, b in store.events if s != seqs[5]]
        since = seqs[5] if trimmed else seqs[0]
        rec = Recording(JSON)
        slow = asyncio.Event()
        outbox = Outbox(JSON, rec, limit=1 << 20, on_slow=slow.set)
        ref.tell(Join(Membership("c", outbox, lambda room, member: None), since_seq=since,
                      since_epoch="e1", silent=True))
        await asyncio.wait_for(slow.wait(), 5)
        later = [seqs[-1] + 2]  # (store.add would reuse a seq once one was trimmed)
        store.events.append((later[0], cbor2.dumps({"event": "e", "data": later[0]})))
        store.deliver(later[0])
        # A member that can recover is served as before, next to it.
        m, ok = member()
        ref.tell(Join(m, since_seq=seqs[-1], since_epoch="e1", silent=True))
        store.deliver(later[0])
        assert await ok.until(1) == later
        assert rec.events() == []


# -- a full mailbox ---------------------------------------------------------------------------
# The room is told messages in one synchronous step (it runs only when the test awaits), so a
# small mailbox is full exactly when the test says so.


class SmallRoom(RoomActor):
    """A room with a mailbox of 4 that a told ``asyncio.Event`` holds until it is set."""

    mailbox_size = 4

    async def on_receive(self, message: Any) -> Any:
        if isinstance(message, asyncio.Event):
            await message.wait()
            return None
        return await super().on_receive(message)


@pytest.fixture
async def small_room() -> Any:
    store = FakeStore()
    rooms: list[RoomActor] = []

    def make() -> RoomActor:
        rooms.append(SmallRoom("t", "r", store, store, RoomSettings(), RoomCounters()))
        return rooms[-1]

    async with ActorSystem() as system:
        ref = system.spawn(make)
        # Started and idle: a first member is in.
        first, rec = member()
        ref.tell(Join(first))
        await rec.joined()
        yield store, ref, rooms, first, rec


async def hold(ref: Any) -> asyncio.Event:
    """Hold the room in a handler until the returned event is set (its mailbox then fills)."""
    held = asyncio.Event()
    ref.tell(held)
    for _ in range(100):
        if not ref.queued:
            return held
        await asyncio.sleep(0)
    raise AssertionError("the room did not take the hold")


def fill(store: FakeStore, ref: Any, free: int = 0) -> list[int]:
    """Fill the room's mailbox with live events (each one stored), but ``free`` places; return
    their seqs. The room must be held (:func:`hold`): an idle one takes a live event at once
    (``ActorRef.handle_now``), which queues nothing."""
    seqs = store.add(SmallRoom.mailbox_size - free - ref.queued)
    for seq in seqs:
        store.deliver(seq)
    assert ref.queued == SmallRoom.mailbox_size - free
    return seqs


async def test_joins_that_find_the_mailbox_full_are_taken_in(small_room: Any) -> None:
    store, ref, rooms, _first, first_rec = small_room
    held = await hold(ref)
    before = fill(store, ref)
    joiners = [member() for _ in range(10)]
    for i, (m, _rec) in enumerate(joiners):
        ref.tell(Join(m, request_id=i))  # each finds the mailbox full
    held.set()
    for i, (_m, rec) in enumerate(joiners):
        joined = await rec.joined()
        assert joined["id"] == i
    assert await first_rec.until(len(before)) == before
    later = store.add(1)
    store.deliver(later[0])
    for _m, rec in joiners:
        assert await rec.until(1) == later
    assert len(rooms[0].members) == 11


async def test_leaves_that_find_the_mailbox_full_leave_no_ghost(small_room: Any) -> None:
    store, ref, rooms, _first, first_rec = small_room
    leavers = [member() for _ in range(10)]
    for m, _rec in leavers:
        ref.tell(Join(m))
    for _m, rec in leavers:
        await rec.joined()
    held = await hold(ref)
    seqs = fill(store, ref)
    for m, _rec in leavers:
        ref.tell(Leave(m))  # each finds the mailbox full
    assert len(rooms[0].members) == 1
    held.set()
    assert await first_rec.until(len(seqs)) == seqs
    later = store.add(1)
    store.deliver(later[0])
    assert await first_rec.until(len(seqs) + 1) == seqs + later
    for _m, rec in leavers:
        assert rec.events() == []


async def test_a_leave_before_its_join_is_not_undone(small_room: Any) -> None:
    store, ref, rooms, first, first_rec = small_room
    held = await hold(ref)
    seqs = fill(store, ref, free=1)
    queued, queued_rec = member()  # its Join fits, its Leave does not
    retold, retold_rec = member()  # neither fits: the Leave is taken before the Join
    ref.tell(Join(queued))
    ref.tell(Join(retold))
    ref.tell(Leave(queued))
    ref.tell(Leave(retold))
    assert ref.queued == SmallRoom.mailbox_size
    held.set()
    await first_rec.until(len(seqs))
    await asyncio.sleep(3 * room_module.RETELL_S)  # past the retold Join's first try
    later = store.add(1)
    store.deliver(later[0])
    barrier, barrier_rec = member()
    ref.tell(Join(barrier))
    await barrier_rec.joined()
    assert await first_rec.until(len(seqs) + 1) == seqs + later
    assert queued_rec.frames == [] and retold_rec.frames == []
    assert list(rooms[0].members.values()) == [first, barrier]


async def test_a_join_the_room_cannot_take_in_is_refused_to_its_member(
        small_room: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store, ref, rooms, _first, _first_rec = small_room
    monkeypatch.setattr(room_module, "JOIN_RETRY_S", 0.3)
    held = await hold(ref)  # its mailbox stays full
    try:
        await _refused(store, ref, rooms)
    finally:
        held.set()
    barrier, barrier_rec = member()
    ref.tell(Join(barrier))
    await barrier_rec.joined()
    assert len(rooms[0].members) == 2  # the first member and the barrier


async def _refused(store: FakeStore, ref: Any, rooms: list[RoomActor]) -> None:
    seqs = fill(store, ref)
    lost: dict[str, asyncio.Event] = {"plain": asyncio.Event(), "silent": asyncio.Event()}
    plain_rec, silent_rec = Recording(JSON), Recording(JSON)
    plain = Membership("p", Outbox(JSON, plain_rec, limit=1 << 20, on_slow=lambda: None),
                       lambda room, member: lost["plain"].set())
    silent = Membership("s", Outbox(JSON, silent_rec, limit=1 << 20, on_slow=lambda: None),
                        lambda room, member: lost["silent"].set())
    ref.tell(Join(plain, request_id=9))
    ref.tell(Join(silent, since_seq=seqs[0], since_epoch="e1", silent=True))
    for event in lost.values():
        await asyncio.wait_for(event.wait(), 5)
    # Told, with where its connection's rejoin starts: the join's since, else the room's
    # position (nothing the room delivered after it is skipped).
    await plain_rec.arrived.wait()
    [error] = plain_rec.frames
    assert (error["type"], error["code"], error["id"], error["retry"]) == ("error", 4500, 9, True)
    assert plain.cursor == rooms[0].last_seq
    assert silent.cursor == seqs[0] and silent_rec.frames == []
    # the client of the refused join joins again itself; the silent one is rejoined
    assert plain.refused and not silent.refused


async def test_a_join_retold_to_a_stopped_room_is_refused(small_room: Any) -> None:
    store, ref, _rooms, _first, _first_rec = small_room
    held = await hold(ref)
    fill(store, ref)
    lost = asyncio.Event()
    m = Membership("c", member()[0].outbox, lambda room, member: lost.set())
    ref.tell(Join(m, silent=True))  # finds the mailbox full: told again later
    stopping = asyncio.create_task(ref.stop(drain=False))
    await asyncio.sleep(0)
    held.set()
    await stopping
    await asyncio.wait_for(lost.wait(), 5)


async def test_a_gap_check_that_finds_the_mailbox_full_is_not_dropped(small_room: Any) -> None:
    store, ref, _rooms, _first, first_rec = small_room
    held = await hold(ref)
    seqs = fill(store, ref)
    missed = store.add(2)  # stored, lost on the live path: only a gap check finds them
    ref.tell(CheckGap())
    held.set()
    assert await first_rec.until(len(seqs) + 2) == seqs + missed


async def test_a_join_waiting_to_be_told_again_keeps_an_empty_room_running() -> None:
    # A room without members stops after idle_s once its mailbox is empty: not while a join
    # that found it full waits to be told again (it would be refused, not taken in).
    store = FakeStore()
    async with ActorSystem() as system:
        ref = system.spawn(lambda: SmallRoom("t", "r", store, store, RoomSettings(idle_s=0.1),
                                             RoomCounters()))
        held = await hold(ref)  # from before its first join: empty since it started
        try:
            fill(store, ref)
            lost = asyncio.Event()
            m, rec = member()
            m.on_room_lost = lambda room, member: lost.set()
            ref.tell(Join(m))
            await asyncio.sleep(0.3)  # empty for longer than idle_s
        finally:
            held.set()
        await rec.joined()
        assert ref.is_alive and not lost.is_set()


async def test_presence_events_reach_watchers_only_and_other_volatile_ones_everyone() -> None:
    """Seeded runs of volatile events (presence ones and others, some with their map kept in
    the node's recent events, some undecodable) into a room whose members come and go, some
    of them watching presence: each member gets every non-presence volatile event and, if it
    watches, every presence event, in order, from its join to its leave; nothing else.
    Presence events that no member here watches are counted in and built for nobody (their
    recent maps are still taken)."""
    import random

    from node.core.events import RecentEvents

    rng = random.Random(41)
    store = FakeStore()
    recent = RecentEvents()
    counters = RoomCounters()
    async with ActorSystem() as system:
        ref = system.spawn(lambda: RoomActor("t", "r", store, store, RoomSettings(), counters,
                                             recent=recent))
        joined: list[tuple[Membership, Recording, int]] = []  # member, recording, events before
        left: list[tuple[Membership, Recording, int, int]] = []  # ... and events before its leave
        sent: list[tuple[str, int]] = []  # (event name, n) of every decodable event sent
        broken = 0
        for step in range(120):
            what = rng.random()
            if what < 0.15 or not joined:
                m, rec = member(rng.choice([JSON, CBOR]))
                m.presence = bool(joined) and rng.random() < 0.4  # the first one does not
                ref.tell(Join(m))
                await rec.joined()
                joined.append((m, rec, len(sent)))
                continue
            if what < 0.22 and len(joined) > 1:
                m, rec, since = joined.pop(rng.randrange(len(joined)))
                ref.tell(Leave(m))
                left.append((m, rec, since, len(sent)))
                continue
            name = rng.choice(["presence:join", "presence:leave", "cursor", "typing"])
            as_map = {"room": "r", "event": name, "data": {"n": step}, "ts": 1,
                      "from": {"user": "u", "kind": "user"}}
            body = CBOR.encode(as_map)
            if rng.random() < 0.05:
                body = b"\xff\x00"  # not an event map: counted undeliverable, sent to nobody
                broken += 1
            else:
                sent.append((name, step))
                if rng.random() < 0.5:
                    recent.put(body, as_map)
            assert store.callback is not None
            store.callback([LiveMessage(None, None, body)])
        barrier, barrier_rec = member()
        ref.tell(Join(barrier))  # handled after every event told before it
        await barrier_rec.joined()
        assert any(m.presence for m, *_ in left), "a watcher left (seed)"
        for m, rec, since, until in [*((m, rec, since, len(sent)) for m, rec, since in joined),
                                     *left]:
            want = [(name, n) for name, n in sent[since:until]
                    if m.presence or not name.startswith("presence:")]
            got = [(f["event"], f["data"]["n"]) for f in rec.frames if f.get("type") == "event"]
            assert got == want
        assert len(recent) == 0, "every kept map was taken by its delivery"
        assert counters.events_in == len(sent), "every decodable event counted in, once"
        assert counters.undeliverable == broken


@pytest.mark.parametrize("error", ["nats", "store"])
async def test_a_start_without_nats_is_one_line_and_the_restart_serves(
        error: str, caplog: pytest.LogCaptureFixture) -> None:
    """NATS down (or the node stopping) while a room starts: the live feed's subscribe raises
    NatsUnavailable, the store a StoreError. Each failure is one warning, no traceback (the
    outside world's doing, not a bug); the restart subscribes once NATS answers, and the
    member's join is answered."""
    import logging

    from node.core.ports import StoreError
    from node.protocol.errors import NatsUnavailable

    class Flaky(FakeStore):
        def __init__(self) -> None:
            super().__init__()
            self.fails = 2

        async def subscribe(self, tenant: str, room: str, callback: Any) -> Any:
            if self.fails:
                self.fails -= 1
                raise (NatsUnavailable("not connected to NATS") if error == "nats"
                       else StoreError("leader read failed", retry=True))
            return await super().subscribe(tenant, room, callback)

    caplog.set_level(logging.WARNING)
    store = Flaky()
    store.add(2)
    async with ActorSystem() as system:
        ref = system.spawn(lambda: RoomActor("t", "r", store, store, RoomSettings(),
                                             RoomCounters()))
        m, rec = member()
        ref.tell(Join(m))
        assert (await rec.joined())["seq"] == store.events[-1][0]
    failed = [r for r in caplog.records if "failed in on_start" in r.getMessage()]
    assert len(failed) == 2, [r.getMessage() for r in caplog.records]
    assert all((r.levelname, r.exc_info) == ("WARNING", None) for r in failed)


async def test_joins_queued_in_a_room_that_gives_up_starting_are_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NATS away longer than a room's restart budget while the room starts (5 restarts within
    60 s: about 33 s with a killed server, each try waiting out a 5 s leader read; see
    test_recovery_faults.py): the room escalates. The joins queued in its
    mailbox were dropped with it, so their members waited for ever, in a room that no longer
    ran (a Join is never dropped). Now each is refused as one the room could not take in: the
    client's own join gets 4500 ``retry``, a silent one (a personal room, a rejoin) is rejoined
    by its connection, live as it began or from its ``since``."""
    from actors import RestartPolicy
    from node.protocol.errors import NatsUnavailable

    class Away(FakeStore):
        async def subscribe(self, tenant: str, room: str, callback: Any) -> Any:
            raise NatsUnavailable("not connected to NATS")

    monkeypatch.setattr(RoomActor, "restart", RestartPolicy(
        max_restarts=2, min_backoff_s=0.001, max_backoff_s=0.001))
    store = Away()
    lost: dict[str, asyncio.Event] = {k: asyncio.Event() for k in ("asked", "silent", "since")}
    recs = {k: Recording(JSON) for k in lost}

    def joining(key: str) -> Membership:
        outbox = Outbox(JSON, recs[key], limit=1 << 20, on_slow=lambda: None)
        return Membership(key, outbox, lambda room, member: lost[key].set(), live=True)

    asked, silent, since = joining("asked"), joining("silent"), joining("since")
    since.live = False
    async with ActorSystem() as system:
        ref = system.spawn(lambda: RoomActor("t", "r", store, store, RoomSettings(),
                                             RoomCounters()))
        ref.tell(Join(asked, request_id=7))
        ref.tell(Join(silent, silent=True))
        ref.tell(Join(since, since_seq=5, since_epoch="e1", silent=True))
        for event in lost.values():
            await asyncio.wait_for(event.wait(), 5)
        assert not ref.is_alive
    [error] = recs["asked"].frames
    assert (error["type"], error["code"], error["id"], error["retry"]) == ("error", 4500, 7, True)
    assert asked.refused and not silent.refused and not since.refused
    assert recs["silent"].frames == [] and recs["since"].frames == []
    # Where the connections rejoin (ConnectionActor._room_lost): live (it had no position yet),
    # and from its since.
    assert silent.live and silent.replaying and not silent.cursor
    assert since.cursor == 5
