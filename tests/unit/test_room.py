"""RoomActor against an in-memory store and recording transports: no sockets, no NATS."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import cbor2
import pytest

from actors import ActorSystem
from node.core.outbox import Outbox
from node.core.ports import LiveMessage, StoredEvent
from node.core.room import Join, Leave, Membership, RoomActor, RoomCounters, RoomSettings
from node.protocol.frames import CBOR, JSON


class FakeStore:
    """RoomStore and LiveFeed in memory; live delivery is manual (``deliver``)."""

    epoch = "e1"

    def __init__(self) -> None:
        self.events: list[tuple[int, bytes]] = []
        self.callback: Callable[[LiveMessage], None] | None = None
        self.reads = 0
        self.gate: asyncio.Event | None = None  # hold reads until set


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
        self.callback(LiveMessage(seq, prev, self.events[index][1]))

    async def subscribe(self, tenant: str, room: str, callback: Any) -> Any:
        self.callback = callback

        class Sub:
            async def unsubscribe(self) -> None:
                pass

        return Sub()

    async def publish_volatile(self, tenant: str, room: str, body: bytes) -> None:
        raise NotImplementedError

    async def last_seq(self, tenant: str, room: str) -> int:
        return self.events[-1][0] if self.events else 0

    async def read(self, tenant: str, room: str, after: int, limit: int, *,
                   before: int | None = None) -> list[StoredEvent]:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        out = [StoredEvent(s, b) for s, b in self.events
               if s > after and (before is None or s < before)]
        return out[:limit]

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
    return Membership("c", outbox, lambda room: None), rec


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
        ref.tell(Join(Membership("c", outbox, lambda room: None), since_seq=since,
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
