"""Publishes sent in the same message as the join before them come back to their publisher, over
the real network against a real node and NATS, whichever way the join goes in.

A room answers a join that reads nothing (no ``since``, no ``rewind``) in the step that takes it
in, and tells the connection it took it in at once when the connection is idle (``handle_now``);
a join with ``since`` or ``rewind`` reads first. Either way the connection holds the publishes
sent right after the join until the room has it, so that each is stored after the member's
position and comes back to it. Seeded bursts of joins (rooms new and running; plain, with
``since``, with ``rewind``), publishes right after them, leaves, and a second member publishing
meanwhile check, burst by burst: one answer per request; each publish stored after its join's
position; each comes back to its publisher once; and after each ``joined`` the room's events
arrive in seq order, none twice.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from typing import Any

import pytest

from tests.integration.test_request_limits import OPEN
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

SEEDS = [int(os.environ["RTNODE_TEST_JOIN_SEED"])] if os.environ.get(
    "RTNODE_TEST_JOIN_SEED") else [1, 2, 3]


async def _read(c: RawClient, seen: list[dict[str, Any]], done: Any, timeout: float) -> None:
    """Append frames to ``seen`` in arrival order until ``done(seen)``."""
    deadline = time.monotonic() + timeout
    while not done(seen):
        f = await c.recv(max(0.01, deadline - time.monotonic()))
        assert f.get("type") != "disconnect", f
        seen.append(f)


@pytest.mark.parametrize("seed", SEEDS)
async def test_publishes_right_after_a_join_come_back_to_their_publisher(
        make_node, seed: int) -> None:
    rng = random.Random(seed)
    node = await make_node(**OPEN, heavy_requests_per_s=rng.choice([5, 10000]))
    rooms = [unique(f"jp{i}") for i in range(5)]
    other = await RawClient.connected(ws_url(node), token("other"))
    for room in rooms[:2]:  # running rooms, with history; the others the client starts
        await other.request({"type": "join", "room": room})
        await other.request({"type": "publish", "room": room, "event": "old", "data": 0})
    c = await RawClient.connected(ws_url(node), token("joiner"))
    inside: set[str] = set()
    position: dict[str, int] = {}  # the last seq the client saw of each room
    for burst in range(rng.randint(6, 10)):
        frames: list[dict[str, Any]] = []
        joins: dict[str, str] = {}  # room -> id of its join in this burst
        mine: dict[str, str] = {}  # publish id -> its room
        kinds: dict[str, dict[str, Any]] = {}  # join id -> its frame
        for room in rng.sample(rooms, rng.randint(1, 3)):
            if room in inside and rng.random() < 0.3:
                frames.append({"type": "leave", "room": room, "id": f"l{burst}-{room}"})
                inside.discard(room)
                continue
            join: dict[str, Any] = {"type": "join", "room": room, "id": f"j{burst}-{room}"}
            how = rng.choice(["plain", "plain", "since", "rewind"])
            if how == "since" and room in position:
                join["since"] = {"seq": position[room], "epoch": node.ctx.store.epoch}
            elif how == "rewind":
                join["rewind"] = rng.randint(1, 3)
            frames.append(join)
            joins[room] = join["id"]
            kinds[join["id"]] = join
            inside.add(room)
            for k in range(rng.randint(0, 3)):  # in the same message as the join
                pid = f"p{burst}-{k}-{room}"
                frames.append({"type": "publish", "room": room, "event": "mine", "data": pid,
                               "id": pid})
                mine[pid] = room
        if rng.random() < 0.5:  # the other member publishes meanwhile
            await other.send({"type": "publish", "room": rng.choice(rooms[:2]),
                              "event": "theirs", "data": burst})
        ids = {f["id"] for f in frames}
        await c.send(*frames)
        seen: list[dict[str, Any]] = []

        pids = frozenset(mine)

        def answered_and_back(fs: list[dict[str, Any]], ids: set[str] = ids,
                              pids: frozenset[str] = pids) -> bool:
            return (ids <= {f.get("id") for f in fs}
                    and pids <= {f.get("data") for f in fs if f.get("type") == "event"})

        try:
            await _read(c, seen, answered_and_back, 10.0)
        except TimeoutError:
            missing = set(mine) - {f.get("data") for f in seen if f.get("type") == "event"}
            raise AssertionError(("never came back to their publisher", missing,
                                  [kinds[joins[mine[m]]] for m in missing])) from None
        pong_id = f"ping{burst}"
        await c.send({"type": "ping", "id": pong_id})  # anything doubled comes before its pong
        await _read(c, seen, lambda fs, pid=pong_id: any(f.get("id") == pid for f in fs), 10.0)
        replies = Counter(f["id"] for f in seen if f.get("id") in ids)
        assert set(replies) == ids and max(replies.values()) == 1, replies
        by_id = {f["id"]: f for f in seen if f.get("id") in ids}
        for rid, f in by_id.items():
            expected = {"j": "joined", "l": "left", "p": "published"}[rid[0]]
            assert f["type"] == expected, f
        back = Counter(f["data"] for f in seen if f.get("type") == "event"
                       and f.get("event") == "mine" and f.get("data") in mine)
        for pid, room in mine.items():
            seq = by_id[pid]["seq"]
            assert seq > by_id[joins[room]]["seq"], (pid, "stored before its join's position",
                                                     kinds[joins[room]], by_id[joins[room]])
            assert back[pid] == 1, (pid, back[pid], "times back to its publisher")
        for room, jid in joins.items():  # from its joined on: the room's events in seq order
            at = next(i for i, f in enumerate(seen) if f.get("id") == jid)
            seqs = [f["seq"] for f in seen[at:] if f.get("type") == "event"
                    and f.get("room") == room]
            assert seqs == sorted(set(seqs)), (room, seqs)
        for f in seen:
            if f.get("type") == "event" and f.get("seq"):
                position[f["room"]] = max(position.get(f["room"], 0), f["seq"])
    for x in (other, c):
        await x.close()
