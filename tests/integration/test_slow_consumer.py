"""A member that stops reading is cut off (4008); the others keep receiving everything."""

from __future__ import annotations

import asyncio
import resource

import pytest

from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


async def test_slow_consumer_is_disconnected_others_unaffected(make_node) -> None:
    node = await make_node(rate_per_s=1e6, rate_burst=1_000_000,
                           slow_consumer_bytes=256 * 1024)
    room = unique("slow")
    fast = await RawClient.connected(ws_url(node), token("fast"))
    # max_queue=1: the client library stops reading the socket once one message is queued
    slow = await RawClient.connected(ws_url(node), token("slow"), max_queue=1)
    for c in (fast, slow):
        await c.request({"type": "join", "room": room})
    writer = await RawClient.connected(ws_url(node), token("w"))
    pad = "x" * 8000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sent = 0
    received: list[int] = []
    grew = asyncio.Event()

    async def read_fast() -> None:
        while True:
            f = await fast.recv(30)
            if f.get("type") == "event":
                received.append(f["data"]["i"])
                grew.set()

    async def until_len(n: int) -> None:
        while len(received) < n:
            grew.clear()
            await grew.wait()

    reader = asyncio.create_task(read_fast())
    # Publish until the node gives up on the slow member (bounded: at most 4000 x 8 KB).
    while node.ctx.slow_consumers == 0 and sent < 4000:
        for k in range(20):  # one 8 KB frame per message: under max_frame_bytes
            await writer.send({"type": "publish", "room": room, "event": "e", "id": sent + k,
                               "data": {"i": sent + k, "pad": pad}})
        sent += 20
        while True:  # paced by the store's acks: each batch is stored before the next
            f = await writer.recv(30)
            assert f.get("type") == "published", f
            if f.get("id") == sent - 1:
                break
        try:
            await asyncio.wait_for(until_len(sent), 30)
        except TimeoutError:
            raise AssertionError(f"{sent=} {len(received)=} {node.ctx.counters}") from None
    assert node.ctx.slow_consumers == 1, f"not cut off after {sent} events"
    code, frames = await slow.closed()
    assert code in (4008, 1006)  # 1006 if the node had to abort a peer that never read
    if code == 4008:
        assert frames[-1] == {"type": "disconnect", "code": 4008, "reason": "slow consumer",
                              "reconnect": True}
    await asyncio.wait_for(until_len(sent), 60)
    reader.cancel()
    assert received == list(range(sent)), "the fast member got every event, in order"
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\nslow consumer: cut after {sent} events of 8 KB; "
          f"test process max RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB")
