"""Fixtures of the browser tests: Debian's chromium driven by Playwright, and a small test page
on the node's own origin (nothing is added to the node for the tests).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync",
]
WAIT_MS = 15_000

# The page every test drives: it imports /rtnode.js from the node and keeps what it receives.
TEST_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rtnode test page</title></head>
<body><main><h1>rtnode test page</h1></main>
<script type="module">
import * as rtnode from "/rtnode.js";
window.rtnode = rtnode;
window.got = {};
window.log = [];
window.joined = {};
window.start = async ({ token, rooms = [], persist = false, cbor = false, rpc = {} }) => {
  let codec;
  if (cbor) {
    const { Encoder, Decoder } = await import("/vendor/cbor-x/index.js");
    const enc = new Encoder({ useRecords: false, mapsAsObjects: true });
    const dec = new Decoder({ useRecords: false, mapsAsObjects: true });
    codec = { encode: (v) => enc.encode(v), decodeMulti: (b) => dec.decodeMultiple(b) };
  }
  const c = rtnode.connect({ token, codec, url: `ws://${location.host}/ws` });
  window.client = c;
  for (const name of ["connecting", "connected", "disconnected", "recovered", "error", "closed"]) {
    c.on(name, (d) => window.log.push([name, d && d.code !== undefined ? d.code : null]));
  }
  for (const [method, answer] of Object.entries(rpc)) {
    c.onRpc(method, (params, info) => ({ answer, params, from: info.from.user }));
  }
  await c.ping();  // resolves once connected
  for (const room of rooms) {
    window.got[room] = window.got[room] || [];
    const onEvent = (ev) => window.got[room].push(ev);
    window.joined[room] = await c.join(room, { persist, onEvent });
  }
  return c.clientId;
};
window.rtReady = true;
</script></body></html>
"""


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Any]:
    """A headless Debian chromium for one test."""
    if not HAVE_CHROMIUM:
        pytest.skip("chromium is not installed (make test installs it)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


def base_url(node: Any) -> str:
    """The http origin of an in-process node."""
    return f"http://127.0.0.1:{node.http.port}"


async def open_test_page(context: Any, node: Any) -> Any:
    """A new page on the node's origin showing :data:`TEST_PAGE`.

    The page is a real document of the node's origin (so Chromium's local-network checks and
    sessionStorage apply as to any page the node serves), whose content is then replaced.
    """
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    await load_test_page(page, node)
    return page


async def load_test_page(page: Any, node: Any, *, reload: bool = False) -> None:
    """(Re)load the test page: a reload starts a fresh JavaScript realm, same sessionStorage.

    The test page stands for an app's page, which has inline scripts: the node's
    Content-Security-Policy (sent with every response, this one too) would refuse them, so
    its context is made with :func:`app_context`.
    """
    if reload:
        await page.reload()
    else:
        await page.goto(f"{base_url(node)}/rtnode.d.ts")
    await page.set_content(TEST_PAGE)
    await page.wait_for_function("window.rtReady === true", timeout=WAIT_MS)


async def app_context(browser: Any, **options: Any) -> Any:
    """A browser context for the test page: an app's page, under the app's policy, not the
    node's (the console's pages, under the node's policy, use a plain context)."""
    return await browser.new_context(bypass_csp=True, **options)


async def wait_js(page: Any, expression: str, arg: Any = None, timeout: int = WAIT_MS) -> None:
    """Wait until ``expression`` (or the function it defines, called with ``arg``) is truthy.

    For the node's own pages: Playwright's ``wait_for_function`` compiles its predicate with
    ``eval`` in the page, which their Content-Security-Policy refuses, as it should; this polls
    with ``page.evaluate`` (DevTools, outside the page's policy) instead.
    """
    deadline = asyncio.get_running_loop().time() + timeout / 1000
    while not await page.evaluate(expression, arg):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} ms waiting for {expression}")
        await asyncio.sleep(0.05)


async def wait_count(page: Any, room: str, n: int, timeout: int = WAIT_MS) -> None:
    """Wait until the page has received ``n`` events of ``room``."""
    await page.wait_for_function(
        "([room, n]) => (window.got[room] || []).length >= n", arg=[room, n], timeout=timeout
    )
