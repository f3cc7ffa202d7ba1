"""A room without members stops after ``idle_s``, live traffic or not, and never while a join
waits in its mailbox; ``RoomCounters.rooms`` counts the rooms that run. In-memory store (the
one of test_room.py), a real actor system, no sockets."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from actors import ActorSystem
from node.core.room import Join, Leave, RoomActor, RoomCounters, RoomSettings, _IdleCheck
from tests.unit.test_room import FakeStore, member

IDLE = 0.05


async def stopped(ref: Any, timeout: float = 2.0) -> float:
    """Wait until ``ref`` no longer runs; return how long that took."""
    start = time.monotonic()
    while ref.is_alive:
        assert time.monotonic() - start < timeout, "the room did not stop"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def spawn(system: ActorSystem, store: FakeStore, counters: RoomCounters,
          name: str = "room:t:r", idle_s: float = IDLE) -> Any:
    return system.get_or_spawn(name, lambda: RoomActor(
        "t", name, store, store, RoomSettings(idle_s=idle_s), counters))


async def test_an_empty_room_stops_after_idle_s_and_is_uncounted() -> None:
    store, counters = FakeStore(), RoomCounters()
    async with ActorSystem() as system:
        ref = spawn(system, store, counters)
        m, rec = member()
        ref.tell(Join(m))
        await rec.joined()
        assert counters.rooms == 1
        await asyncio.sleep(IDLE * 3)
        assert ref.is_alive, "a room with members never stops"
        ref.tell(Leave(m))
        took = await stopped(ref)
        assert IDLE * 0.5 <= took < IDLE + 1.0
        assert system.get("room:t:r") is None
        for _ in range(100):
            if counters.rooms == 0:
                break
            await asyncio.sleep(0.01)
        assert counters.rooms == 0


async def test_live_traffic_does_not_keep_an_empty_room_alive() -> None:
    store, counters = FakeStore(), RoomCounters()
    async with ActorSystem() as system:
        ref = spawn(system, store, counters)
        m, rec = member()
        ref.tell(Join(m))
        await rec.joined()
        ref.tell(Leave(m))
        start = time.monotonic()
        while ref.is_alive and time.monotonic() - start < 2.0:
            store.deliver(store.add(1)[0])  # traffic faster than idle_s
            await asyncio.sleep(IDLE / 5)
        assert not ref.is_alive


async def test_a_join_queued_behind_the_idle_look_keeps_the_room() -> None:
    store, counters = FakeStore(), RoomCounters()
    async with ActorSystem() as system:
        for i in range(20):
            name = f"room:t:r{i}"
            spawn(system, store, counters, name, idle_s=0.001 * (i % 4))
            m, rec = member()
            await asyncio.sleep(0.001 * (i % 5))
            # whatever the timing, a join told to the ref the name gives is taken in
            ref = spawn(system, store, counters, name, idle_s=0.001)
            ref.tell(Join(m))
            await rec.joined()
            assert ref.is_alive and system.get(name) is ref
            ref.tell(Leave(m))
            await stopped(ref)
        assert not system.names("room:")


class CountingRoom(RoomActor):
    """A room that counts the idle looks it is told while it has members."""

    idle_looks_with_members = 0

    async def on_receive(self, message: Any) -> Any:
        if isinstance(message, _IdleCheck) and self.members:
            CountingRoom.idle_looks_with_members += 1
        return await super().on_receive(message)


@pytest.mark.parametrize("seed", range(3))
async def test_a_room_with_members_is_told_no_idle_look(seed: int) -> None:
    """Seeded joins and leaves of a few members, with pauses beyond idle_s: no idle look
    reaches the room while it has members (its timer is cancelled when the first one joins,
    a message saved per personal room), and it still stops idle_s after the last leaves."""
    rng = random.Random(seed)
    CountingRoom.idle_looks_with_members = 0
    store, counters = FakeStore(), RoomCounters()
    async with ActorSystem() as system:
        ref = system.get_or_spawn("room:t:c", lambda: CountingRoom(
            "t", "room:t:c", store, store, RoomSettings(idle_s=IDLE), counters))
        inside: list[Any] = []
        for _ in range(12):
            if inside and rng.random() < 0.4:
                ref.tell(Leave(inside.pop(rng.randrange(len(inside)))))
            else:
                m, rec = member()
                ref.tell(Join(m))
                await rec.joined()
                inside.append(m)
            await asyncio.sleep(rng.choice([0.0, IDLE * 0.5, IDLE * 2]))
            assert ref.is_alive or not inside
            if not ref.is_alive:  # emptied for longer than idle_s: stopped, as it should
                ref = system.get_or_spawn("room:t:c", lambda: CountingRoom(
                    "t", "room:t:c", store, store, RoomSettings(idle_s=IDLE), counters))
        for m in inside:
            ref.tell(Leave(m))
        took = await stopped(ref)
        assert took < IDLE + 1.0
    assert CountingRoom.idle_looks_with_members == 0
