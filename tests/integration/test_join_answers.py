"""Every join gets exactly one answer, whatever follows it, over the real network against a
real node and NATS.

A join left (or joined again) before its room took it in used to get no answer at all: the room
drops what it would send a member that left, and the client waited for its ``joined`` for ever.
Now such a join is answered 4009 ``retry`` before the leave's ``left`` (docs/protocol-notes.md).
Seeded random sequences of joins, rejoins and leaves of a few rooms, some rooms new and some
running, sent in bursts and one by one, check that each request gets one answer, and that the
rooms the client is in at the end deliver its events to it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import pytest

from tests.integration.test_request_limits import OPEN
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


async def _answers(c: RawClient, ids: set[int], timeout: float = 20.0) -> list[dict[str, Any]]:
    """Every frame with an id in ``ids``, until each has one, then a ping's worth more (a second
    answer to any of them would come before the pong)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not ids <= {f["id"] for f in out} and time.monotonic() < deadline:
        f = await c.recv(max(0.01, deadline - time.monotonic()))
        assert f.get("type") != "disconnect", f
        if f.get("id") in ids:
            out.append(f)
    pong = await c.request({"type": "ping", "id": "last"})
    assert pong["type"] == "pong", pong
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_every_join_gets_one_answer(make_node, seed: int) -> None:
    rng = random.Random(seed)
    node = await make_node(**OPEN, heavy_requests_per_s=rng.choice([5, 50, 10000]))
    rooms = [unique(f"ans{i}") for i in range(4)]
    keeper = await RawClient.connected(ws_url(node), token("keeper"))
    for room in rooms[:2]:  # two running rooms, two that the client starts
        await keeper.request({"type": "join", "room": room})
    c = await RawClient.connected(ws_url(node), token("toggler"))
    inside: set[str] = set()
    ids: set[int] = set()
    kinds: dict[int, str] = {}
    burst: list[dict[str, Any]] = []
    for i in range(rng.randint(40, 80)):
        room = rng.choice(rooms)
        kind = "leave" if room in inside and rng.random() < 0.6 else "join"
        (inside.discard if kind == "leave" else inside.add)(room)
        burst.append({"type": kind, "room": room, "id": i})
        ids.add(i)
        kinds[i] = kind
        if rng.random() < 0.3:  # now and then, what was gathered goes, and a short pause
            await c.send(*burst)
            burst = []
            await asyncio.sleep(rng.choice([0, 0, 0.001, 0.01]))
    if burst:
        await c.send(*burst)
    got = await _answers(c, ids)
    per_id = Counter(f["id"] for f in got)
    assert set(per_id) == ids, sorted(ids - set(per_id))[:10]
    assert max(per_id.values()) == 1, [i for i, n in per_id.items() if n > 1][:10]
    for f in got:
        if kinds[f["id"]] == "leave":
            assert f["type"] == "left", f
        else:
            assert f["type"] == "joined" or (f["type"] == "error" and f["code"] == 4009
                                             and f["retry"] is True), f
    # The rooms it is in at the end deliver to it (the first events it gets are theirs).
    for room in rooms:
        pub = await keeper.request({"type": "publish", "room": room, "event": "e",
                                    "data": room})
        assert pub["type"] == "published", pub
    seen = [e["room"] for e in await c.events(len(inside), timeout=10.0)] if inside else []
    assert sorted(seen) == sorted(inside)
    for x in (keeper, c):
        await x.close()
