"""The console at / in a real Chromium: development sign-in, live stats pushed by the node, the
room view (live events, history, presence, publish, rpc), at 1280 and 390 px."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.browser.conftest import WAIT_MS, base_url, wait_js
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


async def stat(page: Any, name: str) -> float:
    text = await page.text_content(f'[data-stat="{name}"]')
    return float(text or 0)


async def wait_stat_above(page: Any, name: str, value: float) -> None:
    await wait_js(page,
        "([n, v]) => Number(document.querySelector(`[data-stat=\"${n}\"]`).textContent) > v",
        arg=[name, value], timeout=WAIT_MS,
    )


async def test_console_live_view_and_room_view(
    make_node: Any, browser: Any, tmp_path: Path
) -> None:
    node = await make_node(dev=True)
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # The console works under the node's Content-Security-Policy: nothing it does is refused.
    page.on("console", lambda msg: errors.append(msg.text)
            if "Content Security Policy" in msg.text else None)
    response = await page.goto(base_url(node) + "/")
    assert response is not None
    assert "script-src 'self'" in response.headers["content-security-policy"]
    dev_button = page.get_by_role("button", name="Use a development token")
    await dev_button.wait_for(state="visible", timeout=WAIT_MS)
    await dev_button.click()
    await page.get_by_role("heading", name="Room", exact=True).wait_for(timeout=WAIT_MS)
    # The first stats event: this node, the console's own connection.
    await wait_stat_above(page, "nodes", 0)
    await wait_stat_above(page, "connections", 0)
    connections = await stat(page, "connections")
    published = await stat(page, "published")

    room = unique("demo")
    clients = [await RawClient.connected(ws_url(node), token(f"u{i}")) for i in range(2)]
    await clients[1].request({"type": "join", "room": room})
    for i in range(5):
        reply = await clients[0].request(
            {"type": "publish", "room": room, "event": "tick", "data": {"i": i}})
        assert reply["type"] == "published"
    await wait_stat_above(page, "connections", connections + 1)
    await wait_stat_above(page, "published", published + 4)
    await wait_stat_above(page, "rooms", 0)
    transports = await page.text_content("#by-transport")
    assert "ws/json" in (transports or "")
    await wait_js(page,
        "document.getElementById('chart').getAttribute('aria-label').startsWith('Events per')",
        timeout=WAIT_MS)
    await page.screenshot(path=str(tmp_path / "console-1280.png"), full_page=True)

    # The room view: history, live events, presence, publish, rpc.
    await page.get_by_label("Room name").fill(room)
    await page.get_by_role("button", name="Open", exact=True).click()
    await wait_js(page,
        "document.querySelectorAll('#history li[data-seq]').length === 5", timeout=WAIT_MS)
    await wait_js(page,
        "document.getElementById('presence').textContent.includes('dev-console')",
        timeout=WAIT_MS)
    await clients[0].request({"type": "publish", "room": room, "event": "live",
                              "data": {"hello": "console"}})
    await wait_js(page,
        "document.querySelector('#events li[data-event=\"live\"] pre')"
        "?.textContent.includes('\"hello\": \"console\"')", timeout=WAIT_MS)
    await page.get_by_label("Event name").fill("from-console")
    await page.get_by_label("Data (JSON)").fill('{"n": 42}')
    await page.get_by_role("button", name="Publish").click()
    await wait_js(page,
        "document.getElementById('pub-result').textContent.startsWith('published: seq')",
        timeout=WAIT_MS)
    got = await clients[1].events(7, room)  # 5 ticks, then these two
    assert [e["event"] for e in got[5:]] == ["live", "from-console"]
    assert got[6]["data"] == {"n": 42} and got[6]["from"]["user"] == "dev-console"
    await page.get_by_label("Params (JSON)").fill('{"ping": "pong"}')
    await page.get_by_role("button", name="Call").click()
    await wait_js(page,
        "document.getElementById('rpc-result').dataset.ok === 'true'", timeout=WAIT_MS)
    assert '"ping": "pong"' in (await page.text_content("#rpc-result") or "")
    await page.screenshot(path=str(tmp_path / "room-1280.png"), full_page=True)

    # 390 px wide: one column, nothing wider than the screen.
    await page.set_viewport_size({"width": 390, "height": 844})
    await wait_js(page,
        "document.documentElement.scrollWidth <= 390", timeout=WAIT_MS)
    await page.screenshot(path=str(tmp_path / "console-390.png"), full_page=True)
    assert errors == []
    for c in clients:
        await c.close()
    await context.close()


async def test_dev_token_only_in_dev_mode(make_node: Any, browser: Any) -> None:
    node = await make_node()
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(base_url(node) + "/")
    await page.get_by_role("heading", name="Sign in").wait_for(timeout=WAIT_MS)
    await wait_js(page, "window.fetch !== undefined", timeout=WAIT_MS)
    assert await page.get_by_role("button", name="Use a development token").is_hidden()
    status = await page.evaluate("fetch('/dev/token', {method: 'POST'}).then(r => r.status)")
    assert status == 404
    # A plain token signs in; without join on sys:* the console says there are no stats.
    await page.get_by_label("Token (JWT)").fill(token("viewer", rooms={"chat:*": ["join"]}))
    await page.get_by_role("button", name="Sign in").click()
    await wait_js(page,
        "document.getElementById('stats-note').textContent.includes('4003')", timeout=WAIT_MS)
    await context.close()


async def test_console_state_view(make_node: Any, browser: Any, tmp_path: Path) -> None:
    """A state room in the room view: one row per key (value, who, when), live, and Remove."""
    node = await make_node(dev=True, namespaces={"fleet": {"state": True}})
    room = f"fleet:{unique('st')}"
    devices = [await RawClient.connected(ws_url(node), token(f"thermo-{i}", kind="device"))
               for i in range(3)]
    for i, d in enumerate(devices):
        await d.request({"type": "publish", "room": room, "event": "reported",
                         "data": {"t": 20 + i}})
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(base_url(node) + "/")
    await page.get_by_role("button", name="Use a development token").click()
    await page.get_by_label("Room name").fill(room)
    await page.get_by_role("button", name="Open", exact=True).click()
    rows = "[...document.querySelectorAll('#state-rows tr')].map(r => r.dataset.key)"
    await wait_js(page, f"{rows}.join() === 'thermo-0,thermo-1,thermo-2'", timeout=WAIT_MS)
    row = await page.text_content('#state-rows tr[data-key="thermo-1"]') or ""
    assert '{"t":21}' in row and "device thermo-1" in row and "reported" in row

    # Live: a new reading replaces the value; a desired value set from the console adds a key.
    await devices[1].request({"type": "publish", "room": room, "event": "reported",
                              "data": {"t": 25}})
    await wait_js(page, "document.querySelector('#state-rows tr[data-key=\"thermo-1\"]')"
                  "?.textContent.includes('{\"t\":25}')", timeout=WAIT_MS)
    await page.get_by_label("Event name").fill("desired")
    await page.get_by_label("Data (JSON)").fill('{"t": 22}')
    await page.get_by_label("Key (state rooms only", exact=False).fill("desired:thermo-1")
    await page.get_by_role("button", name="Publish").click()
    await wait_js(page, f"{rows}.includes('desired:thermo-1')", timeout=WAIT_MS)
    assert "(4 keys)" in (await page.text_content("#state-count") or "")
    await page.screenshot(path=str(tmp_path / "state-1280.png"), full_page=True)
    await page.get_by_role("button", name="Remove key thermo-2").click()
    await wait_js(page, f"!{rows}.includes('thermo-2')", timeout=WAIT_MS)
    await page.set_viewport_size({"width": 390, "height": 844})
    await wait_js(page, "document.documentElement.scrollWidth <= 390", timeout=WAIT_MS)
    await page.screenshot(path=str(tmp_path / "state-390.png"), full_page=True)
    assert errors == []
    for d in devices:
        await d.close()
    await context.close()


async def test_console_sessions_view(make_node: Any, browser: Any) -> None:
    """Persistent MQTT sessions in the console: listed (offline, room, QoS, cursor),
    inspected, deleted; the HTTP API called with the dev service token."""
    node = await make_node(dev=True)
    room, dev = unique("cmd"), f"valve-{unique('v')[-6:]}"
    async with aiomqtt.Client("127.0.0.1", node.mqtt.port, identifier=dev, username=dev,
                              password=token(dev, kind="device"), clean_session=False) as c:
        await c.subscribe(f"rooms/{room}", qos=1)
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: dialog.accept())
    await page.goto(base_url(node) + "/")
    await page.get_by_role("button", name="Use a development token").click()
    await page.get_by_role("button", name="List sessions").click()
    row = f'#session-rows tr[data-client-id="{dev}"]'
    await wait_js(page, "(s) => document.querySelector(s)?.textContent.includes('offline')",
                  arg=row, timeout=WAIT_MS)
    text = await page.text_content(row) or ""
    assert f"{room} (QoS 1" in text, text
    await page.get_by_role("button", name=f"Inspect session {dev}").click()
    await wait_js(page, "document.getElementById('session-detail').textContent"
                  ".includes('\"cursors\"')", timeout=WAIT_MS)
    assert f'"client_id": "{dev}"' in (await page.text_content("#session-detail") or "")
    await page.get_by_role("button", name=f"Delete session {dev}").click()
    await wait_js(page, "(s) => !document.querySelector(s)", arg=row, timeout=WAIT_MS)
    # A wrong credential is one line in the status, not an exception.
    await page.get_by_label("Service token or API key").fill("not-the-key")
    await page.get_by_role("button", name="List sessions").click()
    await wait_js(page, "document.getElementById('sessions-status').textContent"
                  ".startsWith('sessions unavailable: 4001')", timeout=WAIT_MS)
    assert errors == []
    await context.close()
