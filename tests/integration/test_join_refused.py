"""A join the room refuses (its replay could not be read: ``error`` 4500 with ``retry``) leaves
the connection out of the room, on a real node and NATS: the client was told to join again, so
the node does not also rejoin it by itself (that rejoin, from nothing, replayed the room from
its start without a ``joined``, and the client's own join then delivered the same events a
second time). The client's next join gets every event once.
"""

from __future__ import annotations

from typing import Any

import pytest

from node.core.ports import StoreError
from tests.integration.test_state_rooms import publish
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


async def test_a_refused_join_is_not_rejoined_behind_the_client(make_node,
                                                               monkeypatch: Any) -> None:
    node = await make_node()
    room = unique("refused")
    observer = await RawClient.connected(ws_url(node), token("observer"))
    await observer.request({"type": "join", "room": room})
    seqs = [await publish(observer, room, "e", data=i) for i in range(6)]
    assert [e["seq"] for e in await observer.events(6, room)] == seqs
    c = await RawClient.connected(ws_url(node), token("member"))
    since = {"seq": seqs[2], "epoch": node.store.epoch}

    real_read = node.store.read
    failures = [1]

    async def failing_read(*args: Any, **kw: Any) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise StoreError("read failed: injected")
        return await real_read(*args, **kw)

    monkeypatch.setattr(node.store, "read", failing_read)
    error = await c.request({"type": "join", "room": room, "since": since})
    assert (error["type"], error["code"], error["retry"]) == ("error", 4500, True), error
    # out of the room: what is published now does not reach it, nor anything replayed
    later = await publish(observer, room, "e", data=6)
    [seen] = await observer.events(1, room)
    assert seen["seq"] == later
    assert (await c.request({"type": "ping"}))["type"] == "pong"
    assert [f for f in c.buffer if f.get("type") == "event"] == [], c.buffer
    members = await observer.request({"type": "presence", "room": room})
    assert [m["user"] for m in members["members"]] == ["observer"], members
    # as told: join again; every event after since arrives once, in order
    joined = await c.request({"type": "join", "room": room, "since": since})
    assert joined["type"] == "joined" and joined["recovered"] is True, joined
    last = await publish(observer, room, "e", data=7)
    want = [*seqs[3:], later, last]
    got = await c.events(len(want), room)
    assert [e["seq"] for e in got] == want
    assert (await c.request({"type": "ping"}))["type"] == "pong"
    assert [f for f in c.buffer if f.get("type") == "event"] == [], "nothing twice"
