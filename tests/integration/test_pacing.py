"""Heavy requests are paced per connection (``heavy_requests_per_s``), over the real network
against a real node and NATS (issue 11, the flood of 20 hostile connections).

A join that starts a room, a history, presence or rpc request costs the node and NATS work
that can hold up everyone else's events. A connection sends them as fast as it likes; the node
runs them at most ``heavy_requests_per_s`` a second after a burst of a tenth of that, in order, and
goes on reading meanwhile: the limits (``rooms_per_min``, ``request_rate_per_s``) still count
requests as they arrive, and refuse with 4009 beyond them. Within them, a client is slowed,
never refused; a join withdrawn by a leave before its turn starts no room and is answered with
4009 ``retry``.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from tests.integration.test_hostile_input import still_serves
from tests.integration.test_request_limits import OPEN, Peak, replies, room_actors
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

RATE = 20  # heavy_requests_per_s of these tests: a burst of 2, then 20 a second


async def _bystander(node: Any) -> tuple[RawClient, RawClient, str]:
    """A member of its own room and a publisher of it."""
    room = unique("calm")
    member = await RawClient.connected(ws_url(node), token("calm-member"))
    await member.request({"type": "join", "room": room})
    publisher = await RawClient.connected(ws_url(node), token("calm-publisher"))
    return member, publisher, room


async def _publish_and_receive(member: RawClient, publisher: RawClient, room: str,
                               n: int) -> None:
    """``n`` events, one every 20 ms; the member gets every one, in order."""
    seqs = []
    for i in range(n):
        pub = await publisher.request({"type": "publish", "room": room, "event": "tick",
                                       "data": i})
        assert pub["type"] == "published", pub
        seqs.append(pub["seq"])
        await asyncio.sleep(0.02)
    got = await member.events(n, room)
    assert [e["seq"] for e in got] == seqs


async def _until_left(c: RawClient, pairs: int) -> dict[int, Any]:
    """Every reply (by id) until each of the ``pairs`` leaves (odd ids) is answered; a
    ``disconnect`` under key -1."""
    out: dict[int, Any] = {}
    leaves = {2 * i + 1 for i in range(pairs)}
    deadline = time.monotonic() + 20.0
    while not leaves <= out.keys() and time.monotonic() < deadline:
        f = await c.recv(max(0.01, deadline - time.monotonic()))
        if f.get("type") == "disconnect":
            out[-1] = f
            break
        if "id" in f:
            out[f["id"]] = f
    return out


async def test_a_burst_of_joins_of_new_rooms_is_slowed_not_refused(make_node) -> None:
    node = await make_node(**OPEN, heavy_requests_per_s=RATE)
    member, publisher, calm = await _bystander(node)
    joiner = await RawClient.connected(ws_url(node), token("joiner"))
    n = 60
    frames = [{"type": "join", "room": unique(f"many{i}"), "id": i} for i in range(n)]
    paced0 = node.ctx.paced

    async def join_all() -> dict[int, Any]:
        await joiner.send(*frames)  # one WebSocket message
        return await replies(joiner, set(range(n)), timeout=20.0)

    got, _ = await asyncio.gather(join_all(), _publish_and_receive(member, publisher, calm, 40))
    assert sorted(got) == list(range(n)), "every join answered"
    assert all(f["type"] == "joined" for f in got.values()), [
        f for f in got.values() if f["type"] != "joined"]
    # beyond the burst (2) and what refilled, they waited their turn
    assert node.ctx.paced - paced0 >= 30, node.ctx.paced - paced0
    pong = await joiner.request({"type": "ping"})
    assert pong["type"] == "pong", "slowed, not cut off"
    await still_serves(node, calm)


async def test_join_leave_churn_starts_no_room_beyond_the_pace(make_node) -> None:
    node = await make_node(**OPEN, heavy_requests_per_s=RATE)
    member, publisher, calm = await _bystander(node)
    baseline = room_actors(node)
    churner = await RawClient.connected(ws_url(node), token("churner"))
    rng = random.Random(1107)
    pairs = 300
    frames: list[dict[str, Any]] = []
    for i in range(pairs):  # one new room at a time, left at once
        room = f"churn{rng.randrange(10**9)}:r{i}"
        frames += [{"type": "join", "room": room, "id": 2 * i},
                   {"type": "leave", "room": room, "id": 2 * i + 1}]
    t0 = time.monotonic()
    async with Peak(node) as peak:
        await churner.send(*frames)
        got = await _until_left(churner, pairs)
    elapsed = time.monotonic() - t0
    assert -1 not in got, f"cut off: {got.get(-1)}"
    leaves = [got.get(2 * i + 1) for i in range(pairs)]
    assert all(f is not None and f["type"] == "left" for f in leaves), "every leave answered"
    # Every join is answered. One whose turn came started its room, and is answered with
    # ``joined``, or with 4009 when its leave came before the room took it in; the others were
    # withdrawn before their turn, with 4009 too.
    joins = [got.get(2 * i) for i in range(pairs)]
    assert all(f is not None and f["type"] in ("joined", "error") for f in joins), joins[:3]
    errors = [f for f in joins if f["type"] == "error"]
    assert all(f["code"] == 4009 and f["retry"] is True for f in errors), errors[:3]
    withdrawn = [f for f in errors if "its turn" in f["reason"]]
    started = pairs - len(withdrawn)
    # rooms started: the burst and what the pace refilled meanwhile, not one per join
    assert 0 < started <= RATE / 10 + RATE * elapsed + 1, (started, elapsed)
    assert peak.peak - baseline <= started + 1, peak.peak
    # the answers withdrawn by the node do not count as the client's errors
    pong = await churner.request({"type": "ping"})
    assert pong["type"] == "pong", pong
    await _publish_and_receive(member, publisher, calm, 10)


async def test_history_presence_and_rpc_requests_wait_their_turn(make_node) -> None:
    node = await make_node(**OPEN, heavy_requests_per_s=RATE)
    room = unique("reads")
    c = await RawClient.connected(ws_url(node), token("reader"))
    await c.request({"type": "join", "room": room})
    pub = await c.request({"type": "publish", "room": room, "event": "e", "data": 1})
    kinds = ("history", "presence")
    n = 40
    frames = [{"type": kinds[i % 2], "room": room, "id": i} for i in range(n)]
    paced0 = node.ctx.paced
    await c.send(*frames)
    got = await replies(c, set(range(n)), timeout=20.0)
    assert sorted(got) == list(range(n))
    for i, f in got.items():
        assert f["type"] == kinds[i % 2], f
        if f["type"] == "history":
            assert [e["seq"] for e in f["events"]] == [pub["seq"]]
    assert node.ctx.paced - paced0 >= 20, node.ctx.paced - paced0


async def test_a_publish_right_after_a_join_that_waits_its_turn_reaches_its_member(
        make_node, monkeypatch: pytest.MonkeyPatch) -> None:
    """Publishes sent right after a join are held until the room has taken the join in (so the
    member gets its own event), at most JOIN_WAIT_S: counted from when the join was told to
    the room, not from the publish (a join that waits its turn would miss its own events)."""
    from node.core import session_rooms

    monkeypatch.setattr(session_rooms, "JOIN_WAIT_S", 0.5)
    node = await make_node(**OPEN, heavy_requests_per_s=2)  # one at once, then one each 0.5 s
    c = await RawClient.connected(ws_url(node), token("joiner"))
    rooms = [unique(f"wait{i}") for i in range(4)]
    await c.send(*[{"type": "join", "room": r, "id": f"j{i}"} for i, r in enumerate(rooms)],
                 {"type": "publish", "room": rooms[-1], "event": "mine", "data": 1, "id": "p"})
    got = await replies_by_id(c, {f"j{i}" for i in range(4)} | {"p"})
    assert all(got[f"j{i}"]["type"] == "joined" for i in range(4)), got
    assert got["p"]["type"] == "published", got["p"]
    assert got["p"]["seq"] > got["j3"]["seq"], "stored after the join's position"
    [ev] = await c.events(1, rooms[-1])
    assert ev["seq"] == got["p"]["seq"]


async def replies_by_id(c: RawClient, ids: set[str], timeout: float = 20.0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    kept = []
    while not ids <= out.keys():
        f = await c.recv(max(0.01, deadline - time.monotonic()))
        if f.get("id") in ids:
            out[f["id"]] = f
        else:
            kept.append(f)
    c.buffer[:0] = kept
    return out
