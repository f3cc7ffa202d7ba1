"""A room without members stops after ``idle_s``, live traffic or not, and never while a join
waits in its mailbox; ``RoomCounters.rooms`` counts the rooms that run. In-memory store (the
one of test_room.py), a real actor system, no sockets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from actors import ActorSystem
from node.core.room import Join, Leave, RoomActor, RoomCounters, RoomSettings
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
