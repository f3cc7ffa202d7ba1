"""Requests go through the node's lane (actors/lane.py), over the real network against a real
node and NATS (issue 11: the onset of a flood).

Twenty clients that each send a burst of requests at once (joins, leaves, history and presence
requests, all within their limits) used to line up a whole burst per connection ahead of every
other step of the node: a member's event published right after them waited for most of them.
In the lane the requests go one per turn of the node's loop, and an event on its way to its
members goes at its own pace meanwhile: it arrives while most of the burst is still waiting.
Every request is still answered (slowed, never refused).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from tests.integration.test_request_limits import OPEN
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

CLIENTS = 20
REQUESTS = 40  # each, in one WebSocket message


def _burst(rng: random.Random, room: str) -> list[dict[str, Any]]:
    """``REQUESTS`` requests about ``room``: join and leave in turn, with history and presence
    requests between (ids 0..REQUESTS-1)."""
    frames: list[dict[str, Any]] = []
    joined = False
    for i in range(REQUESTS):
        kind = rng.choice(("toggle", "toggle", "history", "presence"))
        if kind == "toggle":
            frames.append({"type": "leave" if joined else "join", "room": room, "id": i})
            joined = not joined
        elif kind == "history":
            frames.append({"type": "history", "room": room, "limit": 1, "id": i})
        else:
            frames.append({"type": "presence", "room": room, "id": i})
    return frames


@pytest.mark.parametrize("seed", [11, 12])
async def test_a_members_event_does_not_wait_for_a_burst_of_requests(make_node,
                                                                     seed: int) -> None:
    rng = random.Random(seed)
    node = await make_node(**OPEN, heavy_requests_per_s=10000)
    calm = unique("calm")
    member = await RawClient.connected(ws_url(node), token("calm-member"))
    await member.request({"type": "join", "room": calm})
    publisher = await RawClient.connected(ws_url(node), token("calm-publisher"))
    clients = [await RawClient.connected(ws_url(node), token(f"burst-{i}"))
               for i in range(CLIENTS)]
    rooms = [unique(f"burst{i}") for i in range(CLIENTS)]
    for c, room in zip(clients, rooms, strict=True):  # each room started: joins are cheap
        await c.request({"type": "join", "room": room})
        await c.request({"type": "leave", "room": room})
    answered = 0
    problems: list[Any] = []

    async def read(c: RawClient) -> None:
        nonlocal answered
        left = set(range(REQUESTS))
        while left:
            f = await c.recv(30.0)
            if f.get("type") == "disconnect" or f.get("type") == "error":
                problems.append(f)
            if f.get("id") in left:
                left.discard(f["id"])
                answered += 1

    readers = [asyncio.create_task(read(c)) for c in clients]
    for c, room in zip(clients, rooms, strict=True):
        await c.send(*_burst(rng, room))
    await publisher.send({"type": "publish", "room": calm, "event": "tick", "data": seed,
                          "id": "p"})
    got = await member.events(1, calm)
    answered_before = answered
    await asyncio.wait_for(asyncio.gather(*readers), 60)
    assert got[0]["data"] == seed
    assert not problems, problems[:3]  # every request answered, none refused
    assert answered == CLIENTS * REQUESTS
    # Without the lane, the event came after most of the burst (each connection's whole
    # burst went in one go ahead of it); in it, after a small part.
    assert answered_before < CLIENTS * REQUESTS // 8, answered_before
    for c in (member, publisher, *clients):
        await c.close()
