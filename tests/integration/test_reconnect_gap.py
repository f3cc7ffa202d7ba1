"""Events stored while a node's NATS link was cut reach its members after the link comes back,
even when no later event reveals the gap."""

from __future__ import annotations

import pytest

from node.nats_server import free_port
from tests.cluster import TcpProxy
from tests.servers import NatsProcess
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


async def test_quiet_room_is_caught_up_after_a_reconnect(shared_nats: NatsProcess,
                                                         make_node) -> None:
    proxy = await TcpProxy(free_port(), "127.0.0.1", shared_nats.port).start()
    try:
        cut_node = await make_node(nats_url=proxy.url)
        other = await make_node()
        room = unique("quiet")
        member = await RawClient.connected(ws_url(cut_node), token("m"))
        await member.request({"type": "join", "room": room})
        writer = await RawClient.connected(ws_url(other), token("w"))
        first = await writer.request({"type": "publish", "room": room, "event": "e", "data": 0})
        [ev] = await member.events(1)
        assert ev["seq"] == first["seq"]
        await proxy.cut()
        missed = [(await writer.request({"type": "publish", "room": room, "event": "e",
                                         "data": i}))["seq"] for i in range(1, 11)]
        await proxy.restore()
        # nothing else is published: the reconnect alone must bring the 10 events
        events = await member.events(10, timeout=20)
        assert [e["seq"] for e in events] == missed
    finally:
        await proxy.stop()
