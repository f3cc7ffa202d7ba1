"""/rtnode.js in a real Chromium: rooms, offline recovery, page reload, rpc, CBOR with JSON."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from tests.browser.conftest import (
    WAIT_MS,
    app_context,
    base_url,
    load_test_page,
    open_test_page,
    wait_count,
)
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


async def publish_raw(client: RawClient, room: str, n: int, start: int = 0) -> list[int]:
    """Publish ``n`` events {i} from Python; returns their seqs."""
    seqs = []
    for i in range(start, start + n):
        reply = await client.request(
            {"type": "publish", "room": room, "event": "tick", "data": {"i": i}}
        )
        assert reply["type"] == "published", reply
        seqs.append(reply["seq"])
    return seqs


async def test_two_pages_in_one_room_see_each_other(make_node: Any, browser: Any) -> None:
    node = await make_node()
    room = unique("chat")
    context = await app_context(browser)
    p1 = await open_test_page(context, node)
    p2 = await open_test_page(context, node)
    await p1.evaluate("(a) => start(a)", {"token": token("alice"), "rooms": [room]})
    await p2.evaluate("(a) => start(a)", {"token": token("bob"), "rooms": [room]})

    seq1 = await p1.evaluate("(r) => client.publish(r, 'chat:msg', {text: 'hi from alice'})", room)
    seq2 = await p2.evaluate("(r) => client.publish(r, 'chat:msg', {text: 'hi bob here'})", room)
    assert isinstance(seq1, int) and seq2 > seq1
    for page in (p1, p2):
        await wait_count(page, room, 2)
        got = await page.evaluate("(r) => got[r].map(e => [e.seq, e.data.text, e.from.user])", room)
        assert got == [[seq1, "hi from alice", "alice"], [seq2, "hi bob here", "bob"]]

    # The dev token endpoint exists only in dev mode.
    status = await p1.evaluate("fetch('/dev/token', {method: 'POST'}).then(r => r.status)")
    assert status == 404
    assert p1.js_errors == [] and p2.js_errors == []
    await context.close()


async def test_offline_page_gets_exactly_the_missed_events_and_so_does_a_reload(
    make_node: Any, browser: Any
) -> None:
    node = await make_node()
    room = unique("feed")
    pub = await RawClient.connected(ws_url(node), token("publisher"))
    context = await app_context(browser)
    page = await open_test_page(context, node)
    await page.evaluate("(a) => start(a)", {"token": token("carol"), "rooms": [room],
                                            "persist": True})
    seqs = await publish_raw(pub, room, 3)
    await wait_count(page, room, 3)

    await context.set_offline(True)
    await page.wait_for_function("!client.connected", timeout=WAIT_MS)
    seqs += await publish_raw(pub, room, 5, start=3)
    assert await page.evaluate("(r) => got[r].length", room) == 3
    await context.set_offline(False)
    await wait_count(page, room, 8)
    await page.wait_for_function("client.connected", timeout=WAIT_MS)
    got = await page.evaluate("(r) => got[r].map(e => [e.seq, e.data.i])", room)
    assert got == [[s, i] for i, s in enumerate(seqs)]  # every missed one, once, in order
    log = await page.evaluate("log.map(e => e[0])")
    assert "disconnected" in log and "recovered" not in log

    # A reload: the position of the room survives in sessionStorage.
    await load_test_page(page, node, reload=True)
    more = await publish_raw(pub, room, 4, start=8)
    await page.evaluate("(a) => start(a)", {"token": token("carol"), "rooms": [room],
                                            "persist": True})
    await wait_count(page, room, 4)
    joined = await page.evaluate("(r) => joined[r]", room)
    assert joined["recovered"] is True and joined["replayed"] == 4
    got = await page.evaluate("(r) => got[r].map(e => [e.seq, e.data.i])", room)
    assert got == [[s, 8 + i] for i, s in enumerate(more)]
    assert page.js_errors == []
    await context.close()
    await pub.close()


async def test_rpc_between_pages_devices_and_the_server(make_node: Any, browser: Any) -> None:
    node = await make_node()
    device = await RawClient.connected(ws_url(node), token("thermo-1", kind="device"))

    async def answer_device() -> None:
        while True:
            f = await device.until("rpc", timeout=30)
            await device.send({"type": "reply", "id": f["id"],
                               "result": {"t": 21.5, "asked": f["params"], "by": f["from"]}})

    answering = asyncio.create_task(answer_device())
    context = await app_context(browser)
    page = await open_test_page(context, node)
    client_id = await page.evaluate(
        "(a) => start(a)",
        {"token": token("dave", rpc=["device:*", "server"]), "rpc": {"hello": "from the page"}},
    )
    result = await page.evaluate("client.rpc('device:thermo-1', 'read', {unit: 'C'})")
    assert result["t"] == 21.5 and result["asked"] == {"unit": "C"}
    assert result["by"]["user"] == "dave"
    echo = await page.evaluate("client.rpc('server', 'echo', {x: [1, 2]})")
    assert echo == {"x": [1, 2]}
    refused = await page.evaluate(
        "client.rpc('user:nobody', 'x').then(() => null, e => [e.name, e.code])"
    )
    assert refused == ["RtnodeError", 4003]

    # The other way: a Python caller reaches the page's handler.
    caller = await RawClient.connected(ws_url(node), token("erin", rpc=["client:*", "user:*"]))
    reply = await caller.request({"type": "rpc", "to": f"client:{client_id}", "method": "hello",
                                  "params": {"n": 1}})
    assert reply["type"] == "result", reply
    assert reply["result"] == {"answer": "from the page", "params": {"n": 1}, "from": "erin"}
    missing = await caller.request({"type": "rpc", "to": "user:dave", "method": "nope"})
    assert missing["type"] == "error" and missing["code"] == 4004
    answering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await answering
    assert page.js_errors == []
    await context.close()
    await device.close()
    await caller.close()


async def test_cbor_page_and_json_page_share_a_room(make_node: Any, browser: Any) -> None:
    node = await make_node()
    room = unique("mixed")
    context = await app_context(browser)
    cbor_page = await open_test_page(context, node)
    json_page = await open_test_page(context, node)
    await cbor_page.evaluate("(a) => start(a)", {"token": token("fay"), "rooms": [room],
                                                 "cbor": True})
    await json_page.evaluate("(a) => start(a)", {"token": token("gus"), "rooms": [room]})
    assert await cbor_page.evaluate("client.protocol") == "rtnode.v1.cbor"
    assert await json_page.evaluate("client.protocol") == "rtnode.v1.json"

    data = {"n": 7, "f": 1.5, "s": "h\u00e9llo", "list": [1, None, True], "nested": {"k": "v"}}
    await cbor_page.evaluate("([r, d]) => client.publish(r, 'reading', d)", [room, data])
    await json_page.evaluate("(r) => client.publish(r, 'reply', {ok: true})", room)
    # A CBOR device's bytes stay bytes for the CBOR page; JSON gets base64 text.
    dev = await RawClient.connected(ws_url(node), token("sensor", kind="device"), codec="cbor")
    reply = await dev.request({"type": "publish", "room": room, "event": "raw",
                               "data": {"raw": b"\x01\x02\xff"}})
    assert reply["type"] == "published", reply
    for page in (cbor_page, json_page):
        await wait_count(page, room, 3)
        names = await page.evaluate("(r) => got[r].map(e => e.event)", room)
        assert names == ["reading", "reply", "raw"]
        assert await page.evaluate("(r) => got[r][0].data", room) == data
    raw_cbor = await cbor_page.evaluate(
        "(r) => { const v = got[r][2].data.raw; return [v instanceof Uint8Array, [...v]]; }", room)
    assert raw_cbor == [True, [1, 2, 255]]
    assert await json_page.evaluate("(r) => got[r][2].data.raw", room) == "AQL/"
    assert cbor_page.js_errors == [] and json_page.js_errors == []
    assert base_url(node).startswith("http://127.0.0.1:")
    await context.close()
    await dev.close()
