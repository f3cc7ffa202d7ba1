"""A room's own results (a gap repair, a state read) that find its mailbox full are told again,
not dropped: a dropped one left the room waiting for it for good."""

from __future__ import annotations

import asyncio

from actors import ActorSystem
from node.core.room import Join, RoomActor, RoomCounters, RoomSettings
from tests.unit.test_room import FakeStore, member
from tests.unit.test_state_rooms import Log, State, _body, _frames


class _SmallRoom(RoomActor):
    mailbox_size = 4


async def _until_read(reads: object, what: str) -> None:
    for _ in range(500):
        if getattr(reads, what):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {what}")


async def test_a_state_read_that_finds_the_mailbox_full_is_told_again() -> None:
    store, state = FakeStore(), State(Log())
    store.events += [(1, _body("a", 1))]
    state.values_ = [{"seq": 1, "key": "a", "data": 1}]
    state.gate = asyncio.Event()
    async with ActorSystem() as system:
        ref = system.spawn(lambda: _SmallRoom(
            "t", "st:r", store, store,  # type: ignore[arg-type]  # reads only
            RoomSettings(state=True), RoomCounters(), state))
        m, rec = member()
        ref.tell(Join(m))
        await _until_read(state, "reads")
        # The read's answer comes while the mailbox is full (a burst of live events).
        state.gate.set()
        for _ in range(_SmallRoom.mailbox_size + 2):
            store.deliver(1)
        joined, values = await _frames(rec, 2)  # not left waiting for good
        assert (joined["type"], values["type"]) == ("joined", "state")


async def test_a_gap_repair_that_finds_the_mailbox_full_is_told_again() -> None:
    store = FakeStore()
    async with ActorSystem() as system:
        ref = system.spawn(lambda: _SmallRoom(
            "t", "r", store, store,  # type: ignore[arg-type]  # reads only
            RoomSettings(), RoomCounters()))
        m, rec = member()
        ref.tell(Join(m))
        await rec.joined()
        seqs = store.add(3)
        store.gate = asyncio.Event()
        store.deliver(seqs[-1])  # a gap: the room reads back what came before
        await _until_read(store, "reads")
        store.gate.set()
        for _ in range(_SmallRoom.mailbox_size + 2):
            store.deliver(seqs[-1])
        assert await rec.until(3) == seqs  # the repair is delivered, live goes on
