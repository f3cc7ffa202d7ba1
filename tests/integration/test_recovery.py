"""Recovery (PROTOCOL.md section 2): exactly what was missed, never partial."""

from __future__ import annotations

import asyncio
import os
import random

import nats
import pytest

from node.protocol.subjects import STREAM_NAME, live_subject
from tests.servers import NatsProcess
from tests.wsclient import RawClient, publish_many, token, unique, ws_url

pytestmark = pytest.mark.integration

# These tests publish hundreds of events quickly: no rate limit in the way.
FAST = {"rate_per_s": 1e6, "rate_burst": 1_000_000}



@pytest.mark.parametrize("codec", ["json", "cbor"])
async def test_reconnect_gets_exactly_the_missed_events(make_node, codec: str) -> None:
    node = await make_node(**FAST)
    room = unique("rec")
    member = await RawClient.connected(ws_url(node), token("m"), codec=codec)
    joined = await member.request({"type": "join", "room": room})
    writer = await RawClient.connected(ws_url(node), token("w"))
    [s0] = await publish_many(writer, room, 1)
    [ev] = await member.events(1)
    assert ev["seq"] == s0
    await member.close()

    missed = await publish_many(writer, room, 500, start=1)
    member = await RawClient.connected(ws_url(node), token("m"), codec=codec)
    # live events keep coming while the member rejoins (over a few hundred ms, in ten
    # batches, so that the rejoin falls among them): the switch-over must be exact
    async def live_events() -> list[int]:
        seqs: list[int] = []
        for batch in range(10):
            seqs += await publish_many(writer, room, 10, start=501 + 10 * batch)
            await asyncio.sleep(0.02)
        return seqs

    live_task = asyncio.create_task(live_events())
    rejoined = await member.request(
        {"type": "join", "room": room, "since": {"seq": s0, "epoch": joined["epoch"]}})
    assert rejoined["recovered"] is True
    # events stored but still in flight on the live path when the member rejoined come live;
    # the last live ones, published well after the rejoin, come live too (the switch-over)
    assert 0 < rejoined["replayed"] < 600
    live = await live_task
    events = await member.events(600, room)
    seqs = [e["seq"] for e in events]
    assert seqs == missed + live, "every missed event, then live ones, in order, once"
    assert [e["data"] for e in events] == list(range(1, 601))
    assert (await member.request({"type": "ping"}))["type"] == "pong"
    assert not [f for f in member.buffer if f.get("type") == "event"], "no duplicate after"


async def test_wrong_epoch_is_not_recovered(make_node) -> None:
    node = await make_node(**FAST)
    room = unique("ep")
    c = await RawClient.connected(ws_url(node))
    [s0, s1] = await publish_many(c, room, 2)
    r = await c.request({"type": "join", "room": room, "since": {"seq": s0, "epoch": "other"}})
    assert (r["recovered"], r["replayed"], r["seq"]) == (False, 0, s1)
    await publish_many(c, room, 1)
    [ev] = await c.events(1)
    assert ev["seq"] > s1, "after recovered:false it goes live from the latest seq"
    r = await c.request({"type": "join", "room": room, "since": {"seq": s0}})
    assert r["recovered"] is True, "no epoch given: only the seq is checked"


async def test_recovery_max(make_node) -> None:
    node = await make_node(recovery_max=10, **FAST)
    room = unique("rm")
    c = await RawClient.connected(ws_url(node))
    [s0] = await publish_many(c, room, 1)
    await publish_many(c, room, 11)
    r = await c.request({"type": "join", "room": room, "since": {"seq": s0}})
    assert (r["recovered"], r["replayed"]) == (False, 0)
    room2 = unique("rm")
    [t0] = await publish_many(c, room2, 1)
    await publish_many(c, room2, 10)
    r = await c.request({"type": "join", "room": room2, "since": {"seq": t0}})
    assert (r["recovered"], r["replayed"]) == (True, 10)


async def test_trimmed_history_is_not_recovered(nats_proc: NatsProcess, make_node) -> None:
    node = await make_node(nats_url=nats_proc.url, history_size=20, **FAST)
    room = unique("trim")
    c = await RawClient.connected(ws_url(node))
    [s0] = await publish_many(c, room, 1)
    await publish_many(c, room, 30)
    r = await c.request({"type": "join", "room": room, "since": {"seq": s0}})
    assert (r["recovered"], r["replayed"]) == (False, 0)
    hist = await c.request({"type": "history", "room": room, "limit": 1000})
    assert len(hist["events"]) == 20
    r = await c.request({"type": "join", "room": room, "since": {"seq": 0}})
    assert r["recovered"] is False, "a full room may have been trimmed"
    recent = hist["events"][-5]["seq"]
    r = await c.request({"type": "join", "room": room, "since": {"seq": recent}})
    assert (r["recovered"], r["replayed"]) == (True, 4)


async def test_recreated_stream_changes_epoch(nats_proc: NatsProcess, make_node) -> None:
    node = await make_node(nats_url=nats_proc.url, **FAST)
    room = unique("re")
    c = await RawClient.connected(ws_url(node))
    j = await c.request({"type": "join", "room": room})
    [s0] = await publish_many(c, room, 1)
    await c.close()
    await node.stop()
    nc = await nats.connect(nats_proc.url)
    await nc.jetstream().delete_stream(STREAM_NAME)
    await nc.close()
    node = await make_node(nats_url=nats_proc.url, **FAST)
    c = await RawClient.connected(ws_url(node))
    await publish_many(c, room, 3)
    r = await c.request({"type": "join", "room": room, "since": {"seq": s0,
                                                                  "epoch": j["epoch"]}})
    assert r["epoch"] != j["epoch"]
    assert (r["recovered"], r["replayed"]) == (False, 0)


async def test_two_nodes_same_order(make_node) -> None:
    n1, n2 = await make_node(**FAST), await make_node(**FAST)
    room = unique("two")
    a = await RawClient.connected(ws_url(n1), token("a"))
    b = await RawClient.connected(ws_url(n2), token("b"))
    await a.request({"type": "join", "room": room})
    await b.request({"type": "join", "room": room})
    wa = await RawClient.connected(ws_url(n1), token("wa"))
    wb = await RawClient.connected(ws_url(n2), token("wb"))
    sa, sb = await asyncio.gather(publish_many(wa, room, 200), publish_many(wb, room, 200,
                                                                                start=1000))
    ea = [e["seq"] for e in await a.events(400)]
    eb = [e["seq"] for e in await b.events(400)]
    assert ea == eb == sorted(sa + sb)


async def test_namespace_history_limits(make_node) -> None:
    node = await make_node(namespaces={"short": {"history_size": 10, "history_ttl_s": 1}}, **FAST)
    room = unique("short")
    c = await RawClient.connected(ws_url(node))
    await c.request({"type": "join", "room": room})
    seqs = await publish_many(c, room, 25)
    await c.events(25)
    hist = await c.request({"type": "history", "room": room, "limit": 1000})
    assert [e["seq"] for e in hist["events"]][-10:] == seqs[-10:]
    assert len(hist["events"]) <= 12, "trimmed to about the namespace's history_size"
    # the namespace's history_ttl_s (1 s) is a per-event TTL: the room empties by itself
    for _ in range(50):  # expiry is time itself: poll, bounded (10 s)
        if not (await c.request({"type": "history", "room": room}))["events"]:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("events outlived their namespace's history_ttl_s")


async def test_room_actor_crash_is_invisible_to_members(make_node) -> None:
    node = await make_node(**FAST)
    room = unique("crash")
    c = await RawClient.connected(ws_url(node))
    await c.request({"type": "join", "room": room})
    before = await publish_many(c, room, 5)
    assert [e["seq"] for e in await c.events(5)] == before
    ref = node.system.get(f"room:default:{room}")
    assert ref is not None
    ref.tell(object())  # an unexpected message: the handler raises, supervision restarts it
    after = await publish_many(c, room, 5, start=5)
    events = await c.events(5)
    assert [e["seq"] for e in events] == after, "rejoined from its cursor: no gap, no duplicate"
    stats = node.system.stats()["room"]
    assert stats.restarts >= 1 and stats.failures >= 1


async def test_forged_live_messages_are_dropped_and_the_room_keeps_serving(
        nats_proc: NatsProcess, make_node) -> None:
    """What arrives on a room's live subject without valid sequence headers (read raw from the
    header bytes: bridge/_nats_patches.py) is dropped; an old seq is not delivered again; the
    member then gets exactly the stored events, in order, once. Seeded forgeries."""
    rng = random.Random(int(os.environ.get("RTNODE_TEST_FORGE_SEED", "31")))
    node = await make_node(nats_url=nats_proc.url, **FAST)
    room = unique("forged")
    member = await RawClient.connected(ws_url(node), token("m"))
    await member.request({"type": "join", "room": room})
    writer = await RawClient.connected(ws_url(node), token("w"))
    first = await publish_many(writer, room, 3)
    assert [e["seq"] for e in await member.events(3, room)] == first
    forged: list[dict[str, str] | None] = [
        None, {}, {"Nats-Sequence": "x"}, {"Nats-Sequence": ""}, {"X-Nats-Sequence": "9"},
        {"Nats-Sequence": "1e3", "Nats-Last-Sequence": "0"}, {"Nats-Last-Sequence": "1"},
        {"Nats-Sequence": str(first[0]), "Nats-Last-Sequence": str(first[0] - 1)},  # old
        {"Nats-Sequence": "7", "Nats-Last-Sequence": "six"}]
    nc = await nats.connect(nats_proc.url)
    try:
        for _ in range(60):
            headers = rng.choice(forged)
            body = rng.choice([b"", b"\xff\x00", rng.randbytes(rng.randrange(1, 300))])
            await nc.publish(live_subject("default", room), body, headers=headers)
        await nc.flush()
    finally:
        await nc.close()
    later = await publish_many(writer, room, 3, start=3)
    events = await member.events(3, room)
    assert [e["seq"] for e in events] == later
    assert [e["data"] for e in events] == [3, 4, 5]
    assert (await member.request({"type": "ping"}))["type"] == "pong"
    assert not [f for f in member.buffer if f.get("type") == "event"], "nothing forged came"
