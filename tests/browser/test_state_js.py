"""/rtnode.js in a real Chromium, state rooms (issue 13): values(room) after a join, onState,
live updates, unset, and publish with a key."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.conftest import WAIT_MS, app_context, open_test_page
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

# Joins a room keeping every StateChange, and exposes the room's values as [key, data, seq].
JOIN = """async (room) => {
  window.changes = [];
  await client.join(room, { onState: (c) => window.changes.push(
    { snapshot: c.snapshot, key: c.key ?? null, keys: [...c.values.keys()] }) });
}"""
VALUES = "(room) => [...client.values(room)].map(([k, v]) => [k, v.data, v.seq, v.from.user])"


async def test_state_room_values_in_the_browser(make_node: Any, browser: Any) -> None:
    node = await make_node(namespaces={"fleet": {"state": True}})
    room = f"fleet:{unique('js')}"
    dev = await RawClient.connected(ws_url(node), token("thermo-1", kind="device"))
    seqs = []
    for t in (20, 21):  # the device's key: its id; the older value is replaced
        reply = await dev.request({"type": "publish", "room": room, "event": "reported",
                                   "data": {"t": t}})
        seqs.append(reply["seq"])

    context = await app_context(browser)
    page = await open_test_page(context, node)
    await page.evaluate("(a) => start(a)", {"token": token("ui")})
    await page.evaluate(JOIN, room)
    await page.wait_for_function("window.changes.length >= 1", timeout=WAIT_MS)
    assert await page.evaluate("window.changes[0]") == {
        "snapshot": True, "key": None, "keys": ["thermo-1"]}
    assert await page.evaluate(VALUES, room) == [["thermo-1", {"t": 21}, seqs[1], "thermo-1"]]

    # The browser sets a desired value (a key of its own choosing), the device reports again.
    seq = await page.evaluate(
        "(r) => client.publish(r, 'desired', {t: 23}, {key: 'desired:thermo-1'})", room)
    reply = await dev.request({"type": "publish", "room": room, "event": "reported",
                               "data": {"t": 22}})
    await page.wait_for_function(
        "(r) => client.values(r).get('thermo-1')?.data.t === 22", arg=room, timeout=WAIT_MS)
    assert await page.evaluate(VALUES, room) == [
        ["thermo-1", {"t": 22}, reply["seq"], "thermo-1"],
        ["desired:thermo-1", {"t": 23}, seq, "ui"]]

    # unset removes the key, and the change says which.
    await page.evaluate("(r) => client.unset(r, 'desired:thermo-1')", room)
    await page.wait_for_function("(r) => !client.values(r).has('desired:thermo-1')", arg=room,
                                 timeout=WAIT_MS)
    last = await page.evaluate("window.changes[window.changes.length - 1]")
    assert last == {"snapshot": False, "key": "desired:thermo-1", "keys": ["thermo-1"]}
    assert page.js_errors == []
    await dev.close()
    await context.close()
