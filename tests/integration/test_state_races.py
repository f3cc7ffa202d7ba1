"""State rooms: the races the seeded ``test_state_faults.py`` found, each pinned with one step
held at the right moment: a room (and an MQTT QoS 1 subscription) that starts while another
node's state write is in flight, and a node that learns late of a recreation of the stream."""

from __future__ import annotations

import asyncio
from typing import Any

import cbor2
import pytest
from websockets.exceptions import ConnectionClosed

from tests.cluster import RawMqtt
from tests.servers import NatsProcess
from tests.wsclient import RawClient, token, unique

pytestmark = pytest.mark.integration

STATE = {"namespaces": {"st": {"state": True}}, "rate_per_s": 1e6, "rate_burst": 1_000_000}


async def test_a_room_started_while_a_state_write_is_in_flight(make_node: Any) -> None:
    """An event stored before a room starts on a node, whose state is still being written by
    the node that stored it (its publisher not answered yet), is in the joiners' state: the
    room's position (joined.seq) covers it, so it never comes to them live. Before, the room
    served the bucket's older value (until its refresh 30 s later), and its joiners kept it."""
    from tests.wsclient import ws_url

    a, b = await make_node(**STATE), await make_node(**STATE)
    assert a.state is not None
    room = unique("st")
    pub = await RawClient.connected(ws_url(a), token("dev-1"))
    reply = await pub.request({"type": "publish", "room": room, "event": "e", "data": 0,
                               "key": "k"})
    assert reply["type"] == "published", reply
    s0 = reply["seq"]
    watcher = await RawClient.connected(ws_url(a), token("watcher"))
    assert (await watcher.request({"type": "join", "room": room}))["type"] == "joined"

    held = asyncio.Event()
    write = a.state._write

    async def late_write(*args: Any) -> None:
        await held.wait()  # the state write of node a is slow (a busy server, an election)
        await write(*args)

    a.state._write = late_write
    try:
        await pub.send({"type": "publish", "id": "p1", "room": room, "event": "e", "data": 1,
                        "key": "k"})
        [ev] = await watcher.events(1, room)  # stored: node a's room delivered it
        s1 = ev["seq"]
        assert s1 > s0

        # A joiner on node b, whose room starts now: its position covers s1.
        for name in ("first", "second"):
            c = await RawClient.connected(ws_url(b), token(name))
            joined = await c.request({"type": "join", "room": room})
            assert joined["type"] == "joined" and joined["seq"] >= s1, joined
            state = await c.until("state")
            assert [(v["key"], v["seq"], v["data"]) for v in state["values"]] == [
                ("k", s1, 1)], (name, state)
            if name == "first":
                first = c
                held.set()
                assert (await pub.until("published"))["seq"] == s1
            else:
                await c.close()
        await first.close()
    finally:
        held.set()
        a.state._write = write
    for c in (pub, watcher):
        await c.close()


async def _publish_until_answered(node: Any, sub: str, frame: dict[str, Any]) -> int:
    """Publish ``frame`` (with a msg_id) through ``node`` until it is answered: a client told
    to reconnect (the node learnt of a new epoch) sends it again; its seq."""
    from tests.wsclient import ws_url

    for _ in range(5):
        c = await RawClient.connected(ws_url(node), token(sub))
        try:
            reply = await c.request(frame)
        except ConnectionClosed:
            continue
        finally:
            await c.close()
        if reply["type"] == "published":
            return int(reply["seq"])
        assert reply["type"] == "disconnect", reply
    raise AssertionError(f"{frame} not answered")


async def test_a_node_that_missed_a_recreation_tags_its_state_with_the_new_epoch(
        make_node: Any, nats_proc: NatsProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node learns of the stream's recreation from its first ack of the new life before it
    answers the publisher and tags a state value with its epoch, also when the new life has
    already passed the node's highest ack (another node published more meanwhile). Before, it
    learnt from the ack only for a seq at or below that one: the value was tagged with the old
    epoch, acknowledged, and skipped by every reader (the key gone) until written again."""
    from bridge.nats_link import NatsLink
    from node import app as app_module
    from tests.integration.test_state_rooms import _delete_stream, api

    async def suspect_only(link: NatsLink, msg: Any) -> None:
        link.epoch_suspect = True  # the advisory's own check is slow: the ack must ask

    monkeypatch.setattr(app_module, "EPOCH_CHECK_S", 3600.0)
    monkeypatch.setattr(NatsLink, "_on_stream_advisory", suspect_only)
    a = await make_node(nats_url=nats_proc.url, **STATE)
    assert a.nats is not None
    room = unique("st")
    for i in range(3):
        await _publish_until_answered(a, "dev-1", {"type": "publish", "room": room,
                                                   "event": "e", "data": f"old-{i}",
                                                   "key": "a", "msg_id": f"old-{i}"})
    await _delete_stream(nats_proc.url)
    b = await make_node(nats_url=nats_proc.url, **STATE)
    for i in range(5):  # the new life passes node a's highest ack (3)
        await _publish_until_answered(b, "dev-2", {"type": "publish", "room": room,
                                                   "event": "e", "data": i, "key": "b",
                                                   "msg_id": f"b-{i}"})
    s = await _publish_until_answered(a, "dev-1", {"type": "publish", "room": room,
                                                   "event": "e", "data": "new-a", "key": "a",
                                                   "msg_id": "new-a"})
    assert s == 6 and a.nats.epoch == b.nats.epoch
    for node in (a, b):
        _, body = await api(node, "GET", "/api/state", params={"room": room})
        assert [(v["key"], v["seq"]) for v in body["values"]] == [("a", 6), ("b", 5)], body


async def test_an_mqtt_subscription_while_a_state_write_is_in_flight(make_node: Any) -> None:
    """The MQTT face's QoS 1 subscription to a state room: its retained values are those up to
    the room's latest seq, and the events after it come as they are stored. An event stored
    before, whose state write is in flight on another node, is among the retained values (it
    never comes as an event). Before, the older value was retained, for good."""
    from tests.wsclient import ws_url

    a, b = await make_node(**STATE), await make_node(**STATE)
    assert a.state is not None
    room = unique("st")
    pub = await RawClient.connected(ws_url(a), token("dev-1"))
    reply = await pub.request({"type": "publish", "room": room, "event": "e", "data": 0,
                               "key": "k"})
    assert reply["type"] == "published", reply
    watcher = await RawClient.connected(ws_url(a), token("watcher"))
    assert (await watcher.request({"type": "join", "room": room}))["type"] == "joined"
    held = asyncio.Event()
    write = a.state._write

    async def late_write(*args: Any) -> None:
        await held.wait()
        await write(*args)

    a.state._write = late_write
    m = None
    try:
        await pub.send({"type": "publish", "id": "p1", "room": room, "event": "e", "data": 1,
                        "key": "k"})
        [ev] = await watcher.events(1, room)
        s1 = ev["seq"]
        m = await RawMqtt.connect(b.mqtt.port, "dev-m", token("dev-m", kind="device"),
                                  clean=True)
        assert await m.subscribe(f"rooms/{room}", qos=1) == [1]
        _topic, payload, packet_id, _qos, _dup, retain = await m.publish_in(10)
        m.puback(packet_id)
        value = cbor2.loads(payload)
        assert (retain, value["seq"], value["data"]) == (True, s1, 1), value
    finally:
        held.set()
        a.state._write = write
        if m is not None:
            await m.drop()
    for c in (pub, watcher):
        await c.close()
