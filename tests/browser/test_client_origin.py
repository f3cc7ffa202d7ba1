"""/rtnode.js imported by a page of another origin: it connects to the node it came from, and a
refused WebSocket upgrade (wrong path, forbidden origin) reaches the app as an error.

The app's page is served by a second HTTP server on another port of 127.0.0.1 (another
origin, same address space, so Chromium's local-network checks let it reach the node).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from tests.browser.conftest import WAIT_MS, app_context, base_url, open_test_page
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

# How long a refused upgrade may take to reach the app: three attempts with backoff caps of
# 0.5 s and 1 s between them, plus one probe each (the client's own timeout is 10 s).
SETTLE_S = 5.0

# The app's page: imports the client from the node (absolute URL, another origin).
APP_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>app on another origin</title></head>
<body><main><h1>app</h1></main>
<script type="module">
import * as rtnode from "NODE/rtnode.js";
window.rtnode = rtnode;
window.log = [];
window.got = [];
window.start = async ({ token, room, url }) => {
  const c = new rtnode.Client(url ? { token, url } : { token });  // listen, then open()
  window.client = c;
  for (const name of ["connecting", "connected", "disconnected", "error", "closed"]) {
    c.on(name, (d) => window.log.push([name, d]));
  }
  c.open();
  const t0 = performance.now();
  try {
    const joined = await c.join(room, { onEvent: (ev) => window.got.push(ev) });
    return { ok: true, joined, ms: performance.now() - t0 };
  } catch (e) {
    return { ok: false, name: e.name, code: e.code, status: e.status, reason: e.reason,
             ms: performance.now() - t0 };
  }
};
window.rtReady = true;
</script></body></html>
"""


class AppServer:
    """A second local HTTP server: the app's origin, serving :data:`APP_PAGE` for a node."""

    def __init__(self) -> None:
        self.node_base = ""
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=APP_PAGE.replace("NODE", self.node_base),
                            content_type="text/html")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._page)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]


@pytest_asyncio.fixture
async def app_server() -> AsyncIterator[AppServer]:
    server = AppServer()
    await server.start()
    try:
        yield server
    finally:
        assert server.runner is not None
        await server.runner.cleanup()


async def open_app_page(browser: Any, server: AppServer, node: Any) -> Any:
    """The app's page, on the app server's origin, importing /rtnode.js from ``node``."""
    server.node_base = base_url(node)
    context = await app_context(browser)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    await page.goto(server.origin + "/")
    await page.wait_for_function("window.rtReady === true", timeout=WAIT_MS)
    return page


async def start(page: Any, **args: Any) -> dict[str, Any]:
    """Connect and join from the page; bounded by SETTLE_S plus the client's own 10 s."""
    result: dict[str, Any] = await asyncio.wait_for(
        page.evaluate("(a) => start(a)", args), timeout=SETTLE_S + 12)
    return result


async def events(page: Any, name: str) -> list[Any]:
    found: list[Any] = await page.evaluate(
        "(n) => log.filter(([k]) => k === n).map(([, d]) => d)", name)
    return found


async def test_page_of_another_origin_connects_to_the_node_it_imported_from(
    make_node: Any, browser: Any, app_server: AppServer
) -> None:
    # The node lets the app's origin open WebSockets (allowed_origins is what must be set
    # when it is not empty; empty allows any origin).
    node = await make_node(allowed_origins=[app_server.origin])
    room = unique("xorigin")
    page = await open_app_page(browser, app_server, node)
    result = await start(page, token=token("alice"), room=room)
    assert result["ok"], result
    connecting = await events(page, "connecting")
    assert connecting[0]["url"] == ws_url(node)  # the node, not the page's host

    pub = await RawClient.connected(ws_url(node), token("bob"))
    try:
        reply = await pub.request({"type": "publish", "room": room, "event": "chat:msg",
                                   "data": {"text": "hi"}})
        assert reply["type"] == "published", reply
    finally:
        await pub.close()
    await page.wait_for_function("got.length >= 1", timeout=WAIT_MS)
    got = await page.evaluate("got.map(e => [e.seq, e.data.text])")
    assert got == [[reply["seq"], "hi"]]
    assert await events(page, "error") == [] and page.js_errors == []
    await page.context.close()


async def test_forbidden_origin_is_an_error_the_app_sees_and_join_rejects(
    make_node: Any, browser: Any, app_server: AppServer
) -> None:
    node = await make_node(allowed_origins=["https://app.example"])
    page = await open_app_page(browser, app_server, node)
    result = await start(page, token=token("alice"), room=unique("xorigin"))
    assert not result["ok"] and result["name"] == "RtnodeError", result
    assert result["ms"] < SETTLE_S * 1000, result
    # A page of another origin may not read the 403: status 0, and a reason that says where
    # to look.
    assert result["status"] == 0 and "allowed_origins" in result["reason"], result
    errors = await events(page, "error")
    assert len(errors) == 1 and errors[0]["status"] == 0 and errors[0]["url"] == ws_url(node)
    closed = await events(page, "closed")
    assert len(closed) == 1 and "allowed_origins" in closed[0]["reason"]
    assert await page.evaluate("client.state") == "closed"
    # No attempt after the end: three refused upgrades, then nothing.
    attempts = len(await events(page, "connecting"))
    assert attempts == 3
    await asyncio.sleep(1.0)  # a retry would be due within 2 s of backoff cap
    assert len(await events(page, "connecting")) == attempts
    assert page.js_errors == []
    await page.context.close()


async def test_wrong_path_from_another_origin_is_an_error_and_an_explicit_url_wins(
    make_node: Any, browser: Any, app_server: AppServer
) -> None:
    node = await make_node()  # any origin
    page = await open_app_page(browser, app_server, node)
    wrong = f"ws://127.0.0.1:{node.http.port}/websocket"
    result = await start(page, token=token("alice"), room=unique("xorigin"), url=wrong)
    assert not result["ok"] and result["ms"] < SETTLE_S * 1000, result
    assert result["status"] == 0 and wrong in result["reason"], result
    connecting = await events(page, "connecting")
    assert {c["url"] for c in connecting} == {wrong}
    assert [e["url"] for e in await events(page, "error")] == [wrong]
    assert page.js_errors == []
    await page.context.close()


async def test_wrong_path_on_the_same_origin_reports_the_status_at_once(
    make_node: Any, browser: Any
) -> None:
    node = await make_node()
    context = await app_context(browser)
    page = await open_test_page(context, node)
    wrong = f"ws://127.0.0.1:{node.http.port}/websocket"
    result = await asyncio.wait_for(page.evaluate("""async (url) => {
      const c = rtnode.connect({ token: "x", url });
      const errors = [];
      c.on("error", (d) => errors.push(d));
      const t0 = performance.now();
      try {
        await c.join("chat:lobby");
        return { ok: true };
      } catch (e) {
        return { ok: false, code: e.code, status: e.status, reason: e.reason, errors,
                 ms: performance.now() - t0, state: c.state };
      }
    }""", wrong), timeout=SETTLE_S + 12)
    # Readable on the node's own origin: 404, final at the first attempt (4004).
    assert not result["ok"] and result["status"] == 404 and result["code"] == 4004, result
    assert result["reason"] == f"HTTP 404 Not Found: no WebSocket upgrade at {wrong}", result
    assert result["state"] == "closed" and result["ms"] < SETTLE_S * 1000, result
    assert [e["status"] for e in result["errors"]] == [404], result
    # Which HTTP answers end the client, which are retried (docs/browser.md).
    kinds = await page.evaluate(
        "[0, 400, 401, 403, 404, 426, 429, 500, 503].map(rtnode.upgradeFailure)")
    assert kinds == ["refused", "refused", "final", "final", "final", "refused", "retry",
                     "retry", "retry"]
    # The default URL is the node the module came from.
    assert await page.evaluate("rtnode.defaultUrl()") == ws_url(node)
    assert await page.evaluate(
        "rtnode.defaultUrl('https://rt.example/prefix/rtnode.js')") == "wss://rt.example/prefix/ws"
    await context.close()
