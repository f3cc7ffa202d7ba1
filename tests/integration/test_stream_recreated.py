"""The room stream deleted and created again while a node runs (an operator's recovery, a
cluster that lost it), on real nodes and a real nats-server: the node notices the new epoch
within EPOCH_CHECK_S, tells its clients to reconnect (4503 with reconnect) and drops its room
actors. A client's rejoin with its old ``since`` is answered ``recovered: false`` with the new
epoch, and it gets the new life's events.

Before, the node's running rooms kept the old life's latest seq and skipped every new event
as already delivered: its members stayed connected and got nothing, without a word.
"""

from __future__ import annotations

from typing import Any

import pytest

from node import app as app_module
from tests.integration.test_state_rooms import _delete_stream
from tests.servers import NatsProcess
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


async def _publish(c: RawClient, room: str, i: int) -> dict[str, Any]:
    pub = await c.request({"type": "publish", "room": room, "event": "e", "data": i})
    assert pub["type"] == "published", pub
    return pub


async def test_clients_are_told_when_the_room_stream_is_recreated(
        make_node, nats_proc: NatsProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "EPOCH_CHECK_S", 0.2)
    node = await make_node(nats_url=nats_proc.url)
    room = unique("recreated")
    member = await RawClient.connected(ws_url(node), token("member"))
    joined = await member.request({"type": "join", "room": room})
    old_epoch = joined["epoch"]
    publisher = await RawClient.connected(ws_url(node), token("publisher"))
    seqs = [(await _publish(publisher, room, i))["seq"] for i in range(3)]
    assert [e["seq"] for e in await member.events(3, room)] == seqs

    await _delete_stream(nats_proc.url)
    other = await make_node(nats_url=nats_proc.url)  # creates the stream anew: a new epoch
    assert other.nats.epoch != old_epoch

    bye = await member.until("disconnect", timeout=10)
    assert (bye["code"], bye["reconnect"]) == (4503, True), bye
    await publisher.close()

    again = await RawClient.connected(ws_url(node), token("member"))
    rejoined = await again.request({"type": "join", "room": room,
                                    "since": {"seq": seqs[-1], "epoch": old_epoch}})
    assert rejoined["type"] == "joined", rejoined
    assert rejoined["recovered"] is False and rejoined["epoch"] == other.nats.epoch, rejoined
    publisher = await RawClient.connected(ws_url(node), token("publisher"))
    new = [await _publish(publisher, room, 10 + i) for i in range(3)]
    assert all(p.get("epoch", rejoined["epoch"]) == rejoined["epoch"] for p in new), new
    got = await again.events(3, room)
    assert [e["seq"] for e in got] == [p["seq"] for p in new]
    assert [e["data"] for e in got] == [10, 11, 12]


async def test_the_first_publish_of_a_new_life_is_tagged_with_its_epoch(
        make_node, nats_proc: NatsProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that has not asked for the epoch yet (its check is minutes away) learns of the
    recreation from its first publish of the new life (a seq below one acked before), before
    it answers the publisher: a state room's value is written with the new epoch (with the
    old one, it was taken as older than the old life's values, acknowledged, and lost)."""
    from bridge.nats_link import NatsLink
    from tests.integration.test_state_rooms import STATE, api, publish

    async def lost(link: NatsLink, msg: Any) -> None:
        pass  # the stream's advisories are core NATS: this node's were lost

    monkeypatch.setattr(app_module, "EPOCH_CHECK_S", 3600.0)
    monkeypatch.setattr(NatsLink, "_on_stream_advisory", lost)
    node = await make_node(nats_url=nats_proc.url, **STATE)
    room = unique("st")
    dev = await RawClient.connected(ws_url(node), token("dev-1"))
    for i in range(5):
        await publish(dev, room, data=f"old-{i}", key="a")
    await _delete_stream(nats_proc.url)
    other = await make_node(nats_url=nats_proc.url, **STATE)
    await dev.send({"type": "publish", "room": room, "event": "reading", "data": "new-a",
                    "key": "a", "msg_id": "m-new-a"})
    # the node learns of the new life from the ack and tells its clients to reconnect (the
    # publisher's answer may not come: its retry with the same msg_id is a duplicate)
    bye = await dev.until("disconnect")
    assert (bye["code"], bye["reconnect"]) == (4503, True), bye
    assert node.nats.epoch == other.nats.epoch
    again = await RawClient.connected(ws_url(node), token("dev-1"))
    retry = await again.request({"type": "publish", "room": room, "event": "reading",
                                 "data": "new-a", "key": "a", "msg_id": "m-new-a"})
    assert (retry["type"], retry["seq"]) == ("published", 1), retry
    for n in (node, other):
        _, body = await api(n, "GET", "/api/state", params={"room": room})
        assert [(v["key"], v["seq"], v["data"]) for v in body["values"]] == [
            ("a", 1, "new-a")], body
