"""The Python client against a real node: requests, events, resume after reconnect."""

from __future__ import annotations

import asyncio

import pytest

from bridge.client import Client, Event
from tests.wsclient import token, unique, ws_url

pytestmark = pytest.mark.integration


async def test_client_basics(make_node) -> None:
    node = await make_node()
    room = unique("cl")
    async with Client(ws_url(node), token=token("a")) as c:
        joined = await c.join(room)
        assert joined["recovered"] is False
        seq = await c.publish(room, "chat:msg", {"x": 1})
        ev = await asyncio.wait_for(anext(aiter(c.events())), 10)
        assert isinstance(ev, Event) and ev.seq == seq and ev.data == {"x": 1}
        hist = await c.history(room)
        assert [e["seq"] for e in hist["events"]] == [seq]
