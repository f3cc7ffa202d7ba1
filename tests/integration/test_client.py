"""The Python client against a real node: requests, events, resume after reconnect."""

from __future__ import annotations

import asyncio

import pytest

from devices.client import Client, Event
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


async def test_refresh_keeps_a_connection_past_expiry(make_node) -> None:
    node = await make_node()
    issued = asyncio.Event()

    async def provider() -> str:
        issued.set()
        return token("r", ttl_s=2)

    async with Client(ws_url(node), token_provider=provider) as c:
        room = unique("ref")
        await c.join(room)
        events = aiter(c.events())
        # Three token lifetimes later the same connection still works: it was refreshed.
        for _ in range(3):
            issued.clear()
            await asyncio.wait_for(issued.wait(), 5)
            seq = await c.publish(room, "tick")
            ev = await asyncio.wait_for(anext(events), 10)
            assert ev.seq == seq
        assert c.reconnects == 0


async def test_refresh_frame(make_node) -> None:
    from tests.wsclient import RawClient

    node = await make_node()
    raw = await RawClient.connected(ws_url(node), token("s", ttl_s=60))
    r = await raw.request({"type": "refresh", "token": token("s", ttl_s=600)})
    assert r["type"] == "refreshed" and 590 < r["expires_in_s"] <= 600
    r = await raw.request({"type": "refresh", "token": token("other")})
    assert r["code"] == 4003
    r = await raw.request({"type": "refresh", "token": "garbage"})
    assert r["code"] == 4001 and r["type"] == "disconnect"
