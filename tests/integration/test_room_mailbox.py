"""A room whose mailbox is full drops no join and no leave: every client that joins gets
``joined`` (or, when the room cannot take it in in time, an ``error`` with ``retry``, and its
join again succeeds), and every client that leaves gets no more events.

Real node (in-process, so the test can hold its room actor and make its mailbox small), real
nats-server, real WebSocket clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from node.core import room as room_module
from node.core.room import RoomActor
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

MAILBOX = 8
CLIENTS = 20


class _Filler:
    """A message the held room ignores: it fills the mailbox."""


@pytest.fixture
def holdable_rooms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rooms spawned from now on have a mailbox of MAILBOX, and a told ``asyncio.Event`` holds
    one in its handler until it is set."""
    original = RoomActor.on_receive

    async def on_receive(self: RoomActor, message: Any) -> Any:
        if isinstance(message, asyncio.Event):
            await message.wait()
            return None
        if isinstance(message, _Filler):
            return None
        return await original(self, message)

    monkeypatch.setattr(RoomActor, "mailbox_size", MAILBOX)
    monkeypatch.setattr(RoomActor, "on_receive", on_receive)


class Held:
    """A room actor held with its mailbox full, while ``act`` makes its clients tell it
    ``expected`` messages (each finds the mailbox full)."""

    def __init__(self, node: Any, room: str) -> None:
        self.node = node
        self.ref = node.system.get(f"room:default:{room}")
        assert self.ref is not None

    def overflows(self) -> int:
        return int(self.node.system.stats()["room"].overflows)

    async def run(self, act: Callable[[], Awaitable[None]], expected: int,
                  hold_s: float = 0.0) -> None:
        release = asyncio.Event()
        self.ref.tell(release)
        try:
            async with asyncio.timeout(10):
                while self.ref.queued:  # noqa: ASYNC110 (the room takes the hold)
                    await asyncio.sleep(0.005)
            for _ in range(MAILBOX):
                self.ref.tell(_Filler())
            before = self.overflows()
            await act()
            async with asyncio.timeout(10):
                while self.overflows() - before < expected:  # noqa: ASYNC110 (a counter)
                    await asyncio.sleep(0.005)
            await asyncio.sleep(hold_s)
        finally:
            release.set()


@pytest.fixture
async def clients(make_node: Any, holdable_rooms: None) -> AsyncIterator[Any]:
    node = await make_node()
    room = unique("full")
    observer = await RawClient.connected(ws_url(node), token("observer"))
    assert (await observer.request({"type": "join", "room": room}))["type"] == "joined"
    members = [await RawClient.connected(ws_url(node), token(f"m{i}"))
               for i in range(CLIENTS)]
    yield node, room, observer, members
    for c in (observer, *members):
        await c.close()


async def _publish(c: RawClient, room: str, data: Any) -> int:
    reply = await c.request({"type": "publish", "room": room, "event": "e", "data": data})
    assert reply["type"] == "published", reply
    return int(reply["seq"])


async def test_joins_and_leaves_that_find_the_mailbox_full_are_not_dropped(clients: Any) -> None:
    node, room, observer, members = clients
    held = Held(node, room)

    async def join_all() -> None:
        for i, c in enumerate(members):
            await c.send({"type": "join", "room": room, "id": f"j{i}"})

    await held.run(join_all, CLIENTS)
    for i, c in enumerate(members):
        reply = await c.until("joined")
        assert reply["id"] == f"j{i}", reply
    seq = await _publish(observer, room, "in")
    for c in (observer, *members):
        [event] = await c.events(1, room)
        assert event["seq"] == seq

    async def leave_all() -> None:
        for i, c in enumerate(members):
            await c.send({"type": "leave", "room": room, "id": f"l{i}"})

    await held.run(leave_all, CLIENTS)
    for i, c in enumerate(members):
        assert (await c.until("left"))["id"] == f"l{i}"
    seq = await _publish(observer, room, "out")
    [event] = await observer.events(1, room)
    assert event["seq"] == seq
    # No ghost: the event was pushed to every member's outbox in one step; a pong sent after
    # it comes after it on the wire.
    for c in members:
        assert (await c.request({"type": "ping"}))["type"] == "pong"
        assert [f for f in c.buffer if f.get("type") == "event"] == []
    presence = await observer.request({"type": "presence", "room": room})
    assert [m["user"] for m in presence["members"]] == ["observer"]


async def test_a_join_the_room_cannot_take_in_is_refused_then_succeeds(
        clients: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    node, room, observer, members = clients
    monkeypatch.setattr(room_module, "JOIN_RETRY_S", 0.3)
    held = Held(node, room)
    c = members[0]

    async def join() -> None:
        await c.send({"type": "join", "room": room, "id": "j"})

    # Held well past JOIN_RETRY_S: each try of the join finds the mailbox full.
    await held.run(join, 1, hold_s=1.0)
    error = await c.until("error")
    assert (error["id"], error["code"], error["retry"]) == ("j", 4500, True), error
    # As the error says: join again. Every event after it arrives once.
    joined = await c.request({"type": "join", "room": room})
    assert joined["type"] == "joined", joined
    seqs = [await _publish(observer, room, i) for i in range(3)]
    got = [e["seq"] for e in await c.events(3, room)]
    assert got == seqs
    assert (await c.request({"type": "ping"}))["type"] == "pong"
    assert [f for f in c.buffer if f.get("type") == "event"] == []
