"""/rtnode.js in a real Chromium: ``join(room, {rewind: N})`` shows the room's last N events,
then live ones; a reconnect resumes exactly (no second rewind); a reload rewinds again."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.conftest import WAIT_MS, app_context, load_test_page, open_test_page, wait_count
from tests.integration.test_rewind import publish_many
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

FAST = {"rate_per_s": 1e6, "rate_burst": 1_000_000}

JOIN = """async ([room, opts]) => {
  got[room] = [];
  try {
    joined[room] = await client.join(room, { ...opts, onEvent: (ev) => got[room].push(ev) });
    return joined[room];
  } catch (e) {
    return { error: e.code, reason: e.reason };
  }
}"""


async def seqs_and_data(page: Any, room: str) -> list[list[int]]:
    got: list[list[int]] = await page.evaluate("(r) => got[r].map(e => [e.seq, e.data])", room)
    return got


async def test_rewind_in_the_browser(make_node: Any, browser: Any) -> None:
    node = await make_node(**FAST)
    room = unique("chat")
    pub = await RawClient.connected(ws_url(node), token("publisher"))
    stored = await publish_many(pub, room, 30)
    context = await app_context(browser)
    page = await open_test_page(context, node)
    await page.evaluate("(a) => start(a)", {"token": token("dora"), "rooms": []})

    joined = await page.evaluate(JOIN, [room, {"rewind": 10}])
    assert (joined["recovered"], joined["replayed"], joined["seq"]) == (False, 10, stored[-1])
    await wait_count(page, room, 10)
    stored += await publish_many(pub, room, 1, start=30)
    await wait_count(page, room, 11)
    assert await seqs_and_data(page, room) == [[s, 20 + i] for i, s in enumerate(stored[-11:])]

    # Offline and back: re-joined with since, exactly the missed events, no second rewind.
    await context.set_offline(True)
    await page.wait_for_function("!client.connected", timeout=WAIT_MS)
    stored += await publish_many(pub, room, 3, start=31)
    await context.set_offline(False)
    await wait_count(page, room, 14)
    await page.wait_for_function("client.connected", timeout=WAIT_MS)
    stored += await publish_many(pub, room, 1, start=34)
    await wait_count(page, room, 15)
    assert await seqs_and_data(page, room) == [[s, 20 + i] for i, s in enumerate(stored[-15:])]
    assert "recovered" not in await page.evaluate("log.map(e => e[0])")

    # A reload (no persist): the page rebuilds its view from the last 5 events.
    await load_test_page(page, node, reload=True)
    await page.evaluate("(a) => start(a)", {"token": token("dora"), "rooms": []})
    joined = await page.evaluate(JOIN, [room, {"rewind": 5}])
    assert joined["replayed"] == 5
    await wait_count(page, room, 5)
    assert await seqs_and_data(page, room) == [[s, 30 + i] for i, s in enumerate(stored[-5:])]

    # Bad values are the node's 4000, and the client goes on.
    for bad in (0, 5000, "3"):
        refused = await page.evaluate(JOIN, [unique("chat"), {"rewind": bad}])
        assert refused["error"] == 4000 and refused["reason"].startswith("bad field rewind")
    assert await page.evaluate("client.connected")
    assert page.js_errors == []
    await context.close()
    await pub.close()
