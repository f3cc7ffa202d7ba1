"""State rooms over a real node (issue 13): a publish with ``key`` sets the room's value, a late
joiner gets ``joined``, then ``state`` with the current values, then live events; ``unset``
removes a key; a lower seq never overwrites a higher one; SSE sends ``event: state`` first;
``GET /api/state``; ``key``/``unset`` refused outside a state room; a full room refuses a new key;
after the stream is recreated (a new epoch, seqs from 1 again), the new life's values.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from typing import Any

import aiohttp
import nats
import pytest

from bridge.replay import ReplayConsumer
from bridge.webhook import webhook_body
from node.protocol.subjects import STREAM_NAME
from tests.integration.test_sse import data, open_sse
from tests.servers import NatsProcess
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

STATE = {"namespaces": {"st": {"state": True}}, "rate_per_s": 1e6, "rate_burst": 1_000_000}


async def api(node: Any, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token('backend', kind='service')}"}
    async with aiohttp.ClientSession() as http, http.request(
            method, f"http://127.0.0.1:{node.http.port}{path}", headers=headers, **kw) as resp:
        return resp.status, await resp.json()


async def publish(c: RawClient, room: str, event: str = "reading", **fields: Any) -> int:
    reply = await c.request({"type": "publish", "room": room, "event": event, **fields})
    assert reply["type"] == "published", reply
    seq: int = reply["seq"]
    return seq


async def next_of(c: RawClient, room: str, *types: str) -> dict[str, Any]:
    """The next frame of ``room`` (joined, state or event), skipping replies of other rooms."""
    while True:
        f = await c.recv(10)
        if f.get("room") == room and f.get("type") in types:
            return dict(f)


async def test_keys_state_frame_late_joiner_unset_and_api(make_node: Any) -> None:
    node = await make_node(**STATE)
    room = unique("st")
    dev = await RawClient.connected(ws_url(node), token("dev-1"))
    s1 = await publish(dev, room, data={"t": 20})                      # key = the sub
    s2 = await publish(dev, room, "setpoint", data=21, key="target")
    s3 = await publish(dev, room, data={"t": 22})                      # dev-1 again, higher
    status, body = await api(node, "GET", "/api/state", params={"room": room})
    assert status == 200, body
    assert body["room"] == room and body["seq"] == s3
    assert [(v["key"], v["seq"], v["data"]) for v in body["values"]] == [
        ("dev-1", s3, {"t": 22}), ("target", s2, 21)]
    assert body["values"][0]["from"]["user"] == "dev-1" and "ts" in body["values"][0]
    assert s1 < s2 < s3

    # A late joiner: joined, then state (ordered by key), then live events carrying their key.
    late = await RawClient.connected(ws_url(node), token("browser"))
    await late.send({"type": "join", "room": room, "id": "j"})
    joined = await next_of(late, room, "joined", "state", "event")
    assert joined["type"] == "joined" and joined["seq"] == s3
    state = await next_of(late, room, "joined", "state", "event")
    assert state["type"] == "state"
    assert [(v["key"], v["seq"]) for v in state["values"]] == [("dev-1", s3), ("target", s2)]
    s4 = await publish(dev, room, "setpoint", data=23, key="target")
    live = await next_of(late, room, "joined", "state", "event")
    assert (live["type"], live["seq"], live["key"], live["data"]) == ("event", s4, "target", 23)
    assert "unset" not in live

    # A rewind (or recovery) join gets the state too, right after joined, before the replay.
    rewound = await RawClient.connected(ws_url(node), token("browser-2"))
    await rewound.send({"type": "join", "room": room, "id": "r", "rewind": 2})
    frames = [await next_of(rewound, room, "joined", "state", "event") for _ in range(4)]
    assert [f["type"] for f in frames] == ["joined", "state", "event", "event"]
    assert [v["seq"] for v in frames[1]["values"]] == [s3, s4]
    assert [f["seq"] for f in frames[2:]] == [s3, s4]
    await rewound.close()

    # unset removes the key: the event carries unset, the state no longer holds it.
    s5 = await publish(dev, room, "setpoint:unset", key="target", unset=True)
    live = await next_of(late, room, "event")
    assert (live["seq"], live["key"], live["unset"]) == (s5, "target", True)
    status, body = await api(node, "GET", "/api/state", params={"room": room})
    assert [v["key"] for v in body["values"]] == ["dev-1"] and body["seq"] == s5

    # HTTP publishes with key and unset as well; history items carry the key.
    status, answer = await api(node, "POST", "/api/publish", json={
        "room": room, "event": "setpoint", "data": 5, "key": "target"})
    assert status == 200, answer
    status, body = await api(node, "GET", "/api/state", params={"room": room})
    assert [(v["key"], v["seq"], v["from"]["user"]) for v in body["values"]] == [
        ("dev-1", s3, "dev-1"), ("target", answer["seq"], "backend")]
    status, hist = await api(node, "GET", "/api/history", params={"room": room})
    assert [e.get("key") for e in hist["events"]][-2:] == ["target", "target"]
    status, answer = await api(node, "POST", "/api/publish", json={
        "room": room, "event": "setpoint:unset", "key": "target", "unset": True})
    assert status == 200, answer
    status, body = await api(node, "GET", "/api/state", params={"room": room})
    assert [v["key"] for v in body["values"]] == ["dev-1"]
    for c in (dev, late):
        await c.close()


async def test_lower_seq_never_overwrites_a_higher_one(make_node: Any) -> None:
    # Two nodes on one NATS: each writes the state of what it stores, in a race.
    node, other = await make_node(**STATE), await make_node(**STATE)
    room = unique("st")
    a = await RawClient.connected(ws_url(node), token("a"))
    b = await RawClient.connected(ws_url(other), token("b"))

    async def burst(c: RawClient, who: str) -> list[int]:
        # Pipelined: 40 publishes of one key in one message, their acks collected after.
        await c.send(*({"type": "publish", "id": i, "room": room, "event": "e",
                        "data": {"by": who, "i": i}, "key": "shared"} for i in range(40)))
        seqs: list[int] = []
        while len(seqs) < 40:
            f = await c.recv(10)
            assert f["type"] in ("published", "event"), f
            if f["type"] == "published":
                seqs.append(f["seq"])
        return seqs

    seqs_a, seqs_b = await asyncio.gather(burst(a, "a"), burst(b, "b"))
    top = max(seqs_a + seqs_b)
    _, body = await api(node, "GET", "/api/state", params={"room": room})
    [value] = body["values"]
    assert value["seq"] == top, (value, top)

    # The port itself: an older put arriving late changes nothing, nor resurrects an unset key.
    assert node.state is not None
    await node.state.put("default", room, "shared", top - 1, {"event": "old", "data": 0,
                                                               "key": "shared"}, False)
    [value] = await node.state.values("default", room)
    assert value["seq"] == top
    await node.state.put("default", room, "shared", top + 100, {"event": "x", "key": "shared"},
                         True)
    await node.state.put("default", room, "shared", top + 50, {"event": "y", "data": 1,
                                                                "key": "shared"}, False)
    assert await node.state.values("default", room) == []

    # Two nodes' stores racing on one key, seqs in a shuffled order: the highest wins.
    assert other.state is not None
    seqs = list(range(1, 201))
    random.Random(7).shuffle(seqs)
    await asyncio.gather(*(
        (node if seq % 2 else other).state.put(
            "default", room, "raced", seq, {"event": "e", "data": seq, "key": "raced"}, False)
        for seq in seqs))
    [value] = await other.state.values("default", room)
    assert (value["seq"], value["data"]) == (200, 200)
    for c in (a, b):
        await c.close()


async def test_sse_sends_state_first(make_node: Any) -> None:
    node = await make_node(**STATE)
    room, chat = unique("st"), unique("chat")
    dev = await RawClient.connected(ws_url(node), token("dev-9"))
    s1 = await publish(dev, room, data=1)
    async with open_sse(node, [chat, room]) as sse:
        await sse.joined()
        first = await sse.message()
        assert first["event"] == "state" and "id" not in first
        assert data(first) == {"room": room, "values": [
            {"room": room, "seq": s1, "event": "reading", "data": 1, "key": "dev-9",
             "ts": data(first)["values"][0]["ts"], "from": {"user": "dev-9", "kind": "user",
                                                          "client_id": dev.info["client_id"]}}]}  # type: ignore[attr-defined]
        s2 = await publish(dev, room, data=2)
        event = await sse.message()
        assert event["event"] == "reading" and data(event)["seq"] == s2
        assert data(event)["key"] == "dev-9"
    await dev.close()


async def test_key_refused_outside_state_rooms_and_full_rooms(make_node: Any) -> None:
    node = await make_node(state_max_keys=2, **STATE)
    plain, room = unique("chat"), unique("st")
    c = await RawClient.connected(ws_url(node), token("u"))
    for fields in ({"key": "k"}, {"unset": True}):
        reply = await c.request({"type": "publish", "room": plain, "event": "e", **fields})
        assert (reply["type"], reply["code"]) == ("error", 4000), reply
        assert reply["reason"] == "key/unset need a state room (namespace with state = true)"
        status, body = await api(node, "POST", "/api/publish",
                                 json={"room": plain, "event": "e", **fields})
        assert (status, body["code"]) == (400, 4000)
        assert body["reason"] == reply["reason"]
    reply = await c.request({"type": "publish", "room": room, "event": "e", "data": 1,
                             "unset": True})
    assert (reply["type"], reply["code"]) == ("error", 4000), reply
    for bad in ("", "x" * 129, "a\nb", 5):
        reply = await c.request({"type": "publish", "room": room, "event": "e", "key": bad})
        assert (reply["type"], reply["code"]) == ("error", 4000), (bad, reply)
    status, body = await api(node, "GET", "/api/state", params={"room": plain})
    assert (status, body["code"]) == (404, 4004)

    await publish(c, room, key="k1")
    await publish(c, room, key="k2")
    await publish(c, room, key="k2")  # an existing key: still fine
    reply = await c.request({"type": "publish", "room": room, "event": "e", "key": "k3"})
    assert (reply["type"], reply["code"], reply["reason"]) == ("error", 4009,
                                                               "state room full"), reply
    await publish(c, room, key="k1", unset=True)
    await publish(c, room, key="k3")  # room again once a key is unset
    status, body = await api(node, "GET", "/api/state", params={"room": room})
    assert [v["key"] for v in body["values"]] == ["k2", "k3"]
    await c.close()


async def test_new_keys_in_a_full_room_do_not_read_the_room_each(make_node: Any) -> None:
    # A full room refuses new keys; each refusal must not read every key of the room again
    # (a publisher naming new keys would make the node scan a 10,000-key room per publish).
    node = await make_node(state_max_keys=2, max_errors_per_min=1000, **STATE)
    room = unique("st")
    c = await RawClient.connected(ws_url(node), token("u"))
    await publish(c, room, key="k1")
    await publish(c, room, key="k2")
    scans = 0
    scan = node.state._scan

    async def counted(*args: Any) -> Any:
        nonlocal scans
        scans += 1
        return await scan(*args)

    node.state._scan = counted
    for i in range(20):
        reply = await c.request({"type": "publish", "room": room, "event": "e", "key": f"n{i}"})
        assert (reply["type"], reply["code"]) == ("error", 4009), reply
    assert scans <= 2, scans
    await c.close()


async def _join_state(node: Any, room: str) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    """A late joiner's ``joined`` and its ``state`` values as (key, seq, data)."""
    c = await RawClient.connected(ws_url(node), token("browser"))
    await c.send({"type": "join", "room": room, "id": "j"})
    joined = await next_of(c, room, "joined", "state", "event")
    state = await next_of(c, room, "joined", "state", "event")
    await c.close()
    assert (joined["type"], state["type"]) == ("joined", "state"), (joined, state)
    return joined, [(v["key"], v["seq"], v.get("data")) for v in state["values"]]


async def _delete_stream(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(STREAM_NAME)
    finally:
        await nc.close()


async def test_state_after_the_stream_is_recreated(nats_proc: NatsProcess,
                                                   make_node: Any) -> None:
    # The stream deleted and created again (a new epoch) numbers events from 1 again: the new
    # life's values replace the old life's whatever their seqs, a tombstone of the old life
    # does not hide a new value, and a key not written since is gone (for joins and the API).
    node = await make_node(nats_url=nats_proc.url, **STATE)
    room = unique("st")
    dev = await RawClient.connected(ws_url(node), token("dev-1"))
    for i in range(5):
        await publish(dev, room, data=f"old-{i}", key="a")
    old_b = await publish(dev, room, data="old-b", key="b")
    await publish(dev, room, data="old-c", key="c")
    old_top = await publish(dev, room, "c:unset", key="c", unset=True)
    old_joined, values = await _join_state(node, room)
    assert [v[:1] + v[2:] for v in values] == [("a", "old-4"), ("b", "old-b")]
    await dev.close()
    await node.stop()
    await _delete_stream(nats_proc.url)

    node = await make_node(nats_url=nats_proc.url, **STATE)
    dev = await RawClient.connected(ws_url(node), token("dev-1"))
    s1 = await publish(dev, room, data="new-a", key="a")
    s2 = await publish(dev, room, data="new-c", key="c")
    assert s2 < old_b < old_top, "the new life's seqs are lower than the old one's"
    status, body = await api(node, "GET", "/api/state", params={"room": room})
    assert status == 200, body
    assert [(v["key"], v["seq"], v["data"]) for v in body["values"]] == [
        ("a", s1, "new-a"), ("c", s2, "new-c")], body
    assert all("epoch" not in v for v in body["values"])
    joined, values = await _join_state(node, room)
    assert joined["epoch"] != old_joined["epoch"] and joined["seq"] == s2
    assert values == [("a", s1, "new-a"), ("c", s2, "new-c")]

    # An unset in the new life removes the key; an older seq of the new life changes nothing.
    s3 = await publish(dev, room, "a:unset", key="a", unset=True)
    assert node.state is not None
    await node.state.put("default", room, "c", s2 - 1, {"event": "late", "data": 0,
                                                         "key": "c"}, False)
    status, body = await api(node, "GET", "/api/state", params={"room": room})
    assert [(v["key"], v["seq"]) for v in body["values"]] == [("c", s2)] and body["seq"] == s3
    await dev.close()


async def test_state_written_by_a_running_node_after_a_recreation(
        nats_proc: NatsProcess, make_node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A node that keeps running while the stream is recreated (by another node) remembers its
    # last write of a key (revision and seq of the old life): once it knows the new epoch
    # (its readiness probe), its writes of the new life must still replace the old value.
    from bridge.nats_link import NatsLink

    async def lost(link: NatsLink, msg: Any) -> None:
        pass  # the stream's advisories (core NATS) lost: the node learns at its probe

    monkeypatch.setattr(NatsLink, "_on_stream_advisory", lost)
    first = await make_node(nats_url=nats_proc.url, **STATE)
    room = unique("st")
    dev = await RawClient.connected(ws_url(first), token("dev-2"))
    for i in range(5):
        old = await publish(dev, room, data=f"old-{i}", key="a")
    await _delete_stream(nats_proc.url)
    second = await make_node(nats_url=nats_proc.url, **STATE)
    assert second.store.epoch != first.store.epoch
    assert await first.readiness() is None
    assert first.store.epoch == second.store.epoch
    # the node told its clients to reconnect (test_stream_recreated.py): its client does
    bye = await dev.until("disconnect")
    assert (bye["code"], bye["reconnect"]) == (4503, True), bye
    dev = await RawClient.connected(ws_url(first), token("dev-2"))
    s1 = await publish(dev, room, data="new-a", key="a")
    assert s1 < old
    for node in (first, second):
        _, body = await api(node, "GET", "/api/state", params={"room": room})
        assert [(v["key"], v["seq"], v["data"]) for v in body["values"]] == [
            ("a", s1, "new-a")], body
    _, values = await _join_state(second, room)
    assert values == [("a", s1, "new-a")]
    await dev.close()


async def test_coalesced_writes_of_one_key_across_an_epoch_change(make_node: Any) -> None:
    # Writes of one key waiting on a node are coalesced into the highest seq; a put of a later
    # epoch wins over a waiting one of an earlier epoch whatever the seqs, and both publishers
    # are answered. (The link's epoch is set by hand here: the stream is not really recreated.)
    node = await make_node(**STATE)
    assert node.state is not None and node.nats is not None
    state, link = node.state, node.nats
    room, old = unique("st"), link.epoch

    async def later_epoch() -> None:
        link.epoch = "e-test-" + room
        await state.put("default", room, "k", 2, {"event": "new", "data": 2, "key": "k"}, False)

    try:
        await asyncio.wait_for(asyncio.gather(
            state.put("default", room, "k", 50, {"event": "old", "data": 50, "key": "k"}, False),
            later_epoch()), 10)
        [value] = await state.values("default", room)
        assert (value["seq"], value["data"]) == (2, 2) and "epoch" not in value
    finally:
        link.epoch = old
    assert await state.values("default", room) == []  # of another epoch than the node's: gone


async def test_replay_and_webhook_readers_get_key_and_unset(make_node: Any) -> None:
    """A durable replay consumer (and so a webhook, and ``rtnode replay``) hands out a state
    room's events as its members get them: with ``key``, and ``unset`` when the event removes
    it. They were dropped: a backend could not tell which key an event set, nor a removal
    from a set to null."""
    node = await make_node(**STATE)
    room = unique("st")
    member = await RawClient.connected(ws_url(node), token("member"))
    assert (await member.request({"type": "join", "room": room}))["type"] == "joined"
    dev = await RawClient.connected(ws_url(node), token("dev-1"))
    seqs = [await publish(dev, room, data={"t": 20}),
            await publish(dev, room, "setpoint", data=21, key="target"),
            await publish(dev, room, "setpoint", key="target", unset=True)]
    live = [dict(await next_of(member, room, "event")) for _ in seqs]
    fields = ("room", "seq", "event", "data", "key", "unset")
    want = [{k: e[k] for k in fields if k in e} for e in live]
    assert [e.get("key") for e in want] == ["dev-1", "target", "target"]
    assert want[2].get("unset") is True and "unset" not in want[1]
    async with ReplayConsumer(node.settings.nats_url, rooms=room,
                              durable=f"st-{uuid.uuid4().hex[:8]}") as consumer:
        got = []
        for _ in seqs:
            ev = await consumer.next(timeout=10)
            assert ev is not None
            got.append(ev)
            await ev.ack()
    assert [{k: v for k, v in ev.as_map().items() if k in fields} for ev in got] == want
    hooks = [json.loads(webhook_body(ev)) for ev in got]
    assert [{k: h[k] for k in fields if k in h} for h in hooks] == want
