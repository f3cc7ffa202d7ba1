"""Connections and rooms leave no reference cycle in the node: under a churn of clients,
refcounting frees them at once, and full garbage collections (long pauses for every
client) stay rare and short. That holds for the server side of websockets too (its
protocol object and parser), however a client goes: a close frame, cut off by the node,
or a socket dropped without a word."""

from __future__ import annotations

import asyncio
import gc
import random
from typing import Any

import pytest

from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

_OURS = ("node", "actors", "bridge", "websockets.server")


async def _churn(url: str, rng: random.Random, clients: int) -> None:
    """Clients that connect, join and leave rooms, publish, read, send junk (some until the
    node cuts them off), and go away."""
    for _ in range(clients):
        client = await RawClient.connected(url, token(unique("u")))
        for _ in range(3):
            room = unique("gc")
            await client.request({"type": "join", "room": room, "presence": rng.random() < 0.5})
            if rng.random() < 0.5:
                await client.request({"type": "publish", "room": room, "data": {"n": 1}})
            if rng.random() < 0.3:
                await client.request({"type": "history", "room": room})
            if rng.random() < 0.3:
                await client.request({"type": "presence", "room": room})
            if rng.random() < 0.5:
                await client.request({"type": "leave", "room": room})
        draw = rng.random()
        if draw < 0.2:  # gone without a close frame: the node reads the end of the stream
            client.ws.transport.abort()
            continue
        if draw < 0.3:
            await client.send("{nope")
            await client.until("error")
        elif draw < 0.6:  # junk until the node cuts the client off (frames of no known type:
            # a message of items shorter than any frame is refused whole, one error)
            await client.send(*[{"type": "nope"}] * 100)
            code, _ = await client.closed()
            assert code == 4000
        await client.close()


async def _settled(node: Any) -> None:
    """Until every connection and room actor of ``node`` has stopped (bounded)."""
    # Polled: the actor system has no event for "all of a kind stopped".
    async with asyncio.timeout(15):
        while node.system.names("conn:") or node.system.names("room:"):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def _node_types(garbage: list[Any]) -> dict[str, int]:
    gc.collect()
    found: dict[str, int] = {}
    for obj in garbage:
        cls = type(obj)
        module = getattr(cls, "__module__", "") or ""
        if module.split(".")[0] in _OURS or module in _OURS:
            found[cls.__qualname__] = found.get(cls.__qualname__, 0) + 1
    return found


async def test_churning_clients_leave_no_cycle_in_the_node(make_node, saved_garbage) -> None:
    node = await make_node(room_idle_s=0.1)
    url = ws_url(node)
    await _churn(url, random.Random(11), 3)  # warm-up: caches and lazy state of the node
    await _settled(node)
    gc.collect()
    saved_garbage.clear()
    await _churn(url, random.Random(12), 20)
    await _settled(node)
    assert _node_types(saved_garbage) == {}
