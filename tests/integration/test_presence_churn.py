"""Seeded presence churn across two nodes: the presence state and the watchers' events converge.

docs/protocol-notes.md: "The presence state (``presence`` requests, ``/api/presence``) changes on
every join and leave", and ``presence:join`` / ``presence:leave`` are throttled, "the latest state
wins and is sent when the window ends"; "when a connection ends, watchers get its leave at
once". Two nodes on one NATS, three rooms, a watcher per node and room (``presence: true``),
and clients that connect to a node drawn at random, join and leave rooms, and go away by a
clean close or by a TCP reset (no close frame), at times right after sending a join, before its
answer; some of them share a user. After the churn:
on both nodes the ``presence`` reply of every room lists exactly the clients that are in it
(by client id, with their user and node), and each watcher's events, folded (a join adds the
client, a leave removes it), give the same set. ``RTNODE_TEST_PRESENCE_CHURN_SEED`` repeats a
run's choices (printed first; random by default).
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import pytest

from tests.integration.test_request_limits import OPEN
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("RTNODE_TEST_PRESENCE_CHURN_SEED") or random.randrange(1 << 32))
STEPS = 160
USERS = ("ann", "bob", "cy", "dee", "eve", "fox", "gus")


class Watcher:
    """A member of one room with ``presence: true``: folds the presence events it gets."""

    def __init__(self, client: RawClient, room: str, node: str) -> None:
        self.client, self.room, self.node = client, room, node
        self.seen: dict[str, tuple[str, str]] = {}  # client id -> (user, node)
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            f = await self.client.recv(timeout=3600)
            if not (isinstance(f, dict) and f.get("type") == "event"
                    and f.get("room") == self.room):
                continue
            data = f.get("data") or {}
            if f["event"] == "presence:join":
                self.seen[data["client_id"]] = (data["user"], data["node"])
            elif f["event"] == "presence:leave":
                self.seen.pop(data["client_id"], None)
            self.changed.set()


async def _converged(what: str, current: Any, want: dict[str, tuple[str, str]],
                     wait: Any) -> None:
    """Wait (up to 15 s) until ``await current()`` equals ``want``, each change or 0.1 s."""
    got = None
    try:
        async with asyncio.timeout(15):
            while (got := await current()) != want:
                await wait()
    except TimeoutError:
        raise AssertionError(f"seed {SEED}, {what}: {got} != {want}") from None


async def test_seeded_presence_churn_converges_on_both_nodes(make_node: Any) -> None:
    print(f"\npresence churn: seed {SEED} (RTNODE_TEST_PRESENCE_CHURN_SEED={SEED})")
    rng = random.Random(SEED)
    nodes = [await make_node(**OPEN, volatile_throttle_ms=50) for _ in range(2)]
    rooms = [unique("pc") for _ in range(3)]
    watchers: list[Watcher] = []
    askers = {}  # node -> a client that asks for presence (a watcher's reads are its task's)
    for node in nodes:
        askers[node.settings.node_name] = await RawClient.connected(
            ws_url(node), token("ask", rooms={"*": ["join", "presence"]}))
        for room in rooms:
            c = await RawClient.connected(ws_url(node), token("watch", rooms={"*": [
                "join", "presence"]}))
            joined = await c.request({"type": "join", "room": room, "presence": True})
            assert joined["type"] == "joined", joined
            watchers.append(Watcher(c, room, node.settings.node_name))
    # client id -> (client, user, node name, rooms it is in)
    live: dict[str, tuple[RawClient, str, str, set[str]]] = {}
    counts = {"connect": 0, "join": 0, "leave": 0, "close": 0, "reset": 0, "join+reset": 0,
              "join+close": 0}
    try:
        for _ in range(STEPS):
            op = rng.choices(["connect", "join", "leave", "close", "reset", "join+reset",
                              "join+close"],
                             weights=[3 if len(live) < 12 else 0, 5, 3, 1, 1, 1, 1])[0]
            if op == "connect" or not live:
                node = rng.choice(nodes)
                user = rng.choice(USERS)
                c = await RawClient.connected(ws_url(node), token(user))
                live[c.info["client_id"]] = (c, user, node.settings.node_name, set())
                counts["connect"] += 1
                continue
            cid = rng.choice(sorted(live))
            c, user, _, in_rooms = live[cid]
            if op == "join":
                room = rng.choice(rooms)
                r = await c.request({"type": "join", "room": room})
                assert r["type"] == "joined", r
                in_rooms.add(room)
            elif op == "leave" and in_rooms:
                room = rng.choice(sorted(in_rooms))
                r = await c.request({"type": "leave", "room": room})
                assert r["type"] == "left", r
                in_rooms.discard(room)
            elif op == "close":
                await c.close()
                del live[cid]
            elif op == "reset":
                c.ws.transport.abort()  # a RST, no close frame: the node sees the socket go
                del live[cid]
            elif op in ("join+reset", "join+close"):  # gone before the join is answered
                await c.send({"type": "join", "id": "last", "room": rng.choice(rooms)})
                if op == "join+reset":
                    c.ws.transport.abort()
                else:
                    await c.ws.close()
                del live[cid]
            counts[op] += 1
        print("presence churn: " + ", ".join(f"{k} {n}" for k, n in counts.items())
              + f"; {len(live)} clients left in")
        for room in rooms:
            want = {cid: (user, node) for cid, (_, user, node, in_rooms) in live.items()
                    if room in in_rooms}
            for w in watchers:
                if w.room != room:
                    continue

                async def members(w: Watcher = w) -> dict[str, tuple[str, str]]:
                    r = await askers[w.node].request({"type": "presence", "room": w.room})
                    assert r["type"] == "presence", r
                    return {m["client_id"]: (m["user"], m["node"]) for m in r["members"]
                            if m["user"] != "watch"}

                async def folded(w: Watcher = w) -> dict[str, tuple[str, str]]:
                    return {k: v for k, v in w.seen.items() if v[0] != "watch"}

                async def wait_change(w: Watcher = w) -> None:
                    w.changed.clear()
                    try:
                        await asyncio.wait_for(w.changed.wait(), 0.1)
                    except TimeoutError:
                        pass  # a presence request reads the state again

                await _converged(f"presence of {room} asked on {w.node}", members, want,
                                 lambda: asyncio.sleep(0.1))
                await _converged(f"presence events of {room} at {w.node}'s watcher", folded,
                                 want, wait_change)
    finally:
        for w in watchers:
            w.task.cancel()
        for c, *_ in live.values():
            await c.close()
        for a in askers.values():
            await a.close()
