"""What others can see, over the real network: the security headers of every console and API
response, the CORS answer of an event stream to a foreign page, and the node's stats, which
show an operator their own tenant's rooms only (every tenant's only to an admin service token).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import aiohttp
import jwt
import pytest
from websockets.asyncio.client import connect

from tests.integration.test_sse import open_sse
from tests.wsclient import SECRET, RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

EVIL = "https://evil.example"


def base(node: Any) -> str:
    return f"http://127.0.0.1:{node.http.port}"


def check_security_headers(path: str, headers: Any) -> None:
    """The headers every response carries; the console's pages get the console's policy."""
    assert headers.get("X-Content-Type-Options") == "nosniff", path
    assert headers.get("X-Frame-Options") == "DENY", path
    assert headers.get("Referrer-Policy") == "no-referrer", path
    csp = headers.get("Content-Security-Policy", "")
    assert "frame-ancestors 'none'" in csp, (path, csp)
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, (path, csp)
    if headers.get("Content-Type", "").startswith("text/html"):
        assert "script-src 'self'" in csp and "object-src 'none'" in csp, (path, csp)
    else:
        assert "default-src 'none'" in csp, (path, csp)


async def test_every_console_and_api_response_carries_security_headers(make_node) -> None:
    node = await make_node(api_key="k" * 32)
    requests = [
        ("GET", "/", {}), ("GET", "/index.html", {}), ("GET", "/console.css", {}),
        ("GET", "/console.js", {}), ("GET", "/rtnode.js", {}), ("GET", "/console.json", {}),
        ("GET", "/vendor/cbor-x/index.js", {}), ("GET", "/healthz", {}), ("GET", "/readyz", {}),
        ("GET", "/metrics", {}), ("GET", "/no-such-page", {}),
        ("POST", "/dev/token", {}),
        ("GET", f"/api/history?room={unique('h')}", {"Authorization": "Bearer " + "k" * 32}),
        ("GET", "/api/history?room=x", {}),  # refused: no key
        ("POST", "/api/publish", {"Authorization": "Bearer " + "k" * 32}),  # no body
        ("GET", "/sse?room=x", {}),  # refused: no token
        ("GET", "/ws", {}),  # not an upgrade
    ]
    async with aiohttp.ClientSession() as http:
        for method, path, headers in requests:
            async with http.request(method, base(node) + path, headers=headers) as resp:
                await resp.read()
                check_security_headers(f"{method} {path} -> {resp.status}", resp.headers)
    async with open_sse(node, [unique("s")]) as sse:
        check_security_headers("SSE stream", sse.resp.headers)
    async with connect(ws_url(node), subprotocols=["rtnode.v1.json"]) as ws:
        assert ws.response is not None
        check_security_headers("WebSocket upgrade", ws.response.headers)


async def test_an_event_stream_never_reflects_a_foreign_origin(make_node) -> None:
    node = await make_node()
    async with open_sse(node, [unique("s")], headers={"Origin": EVIL}) as sse:
        # No allow-list: any page may read a stream it holds a token for (no cookies, no
        # credentials), so the answer is the same for every Origin: "*".
        assert sse.resp.headers["Access-Control-Allow-Origin"] == "*"
        assert EVIL not in str(sse.resp.headers)
        assert "Access-Control-Allow-Credentials" not in sse.resp.headers


async def test_an_event_stream_names_only_an_allowed_origin(make_node) -> None:
    app = "https://app.example"
    node = await make_node(allowed_origins=[app])
    async with open_sse(node, [unique("s")], headers={"Origin": app}) as sse:
        assert sse.resp.headers["Access-Control-Allow-Origin"] == app
        assert sse.resp.headers["Vary"] == "Origin"
    async with aiohttp.ClientSession() as http, http.get(
            base(node) + "/sse", params={"room": unique("s")},
            headers={"Origin": EVIL, "Authorization": f"Bearer {token()}"}) as resp:
        assert resp.status == 403
        assert EVIL not in str(resp.headers)


def admin_token(sub: str = "ops", tenant: str = "default", kind: str = "service",
                admin: object = True) -> str:
    """A token with the ``admin`` claim (signed directly: any value of the claim)."""
    now = int(time.time())
    return jwt.encode({"sub": sub, "tenant": tenant, "kind": kind, "admin": admin,
                       "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


async def stats_until(client: RawClient, room: str, wanted: str,
                      timeout: float = 15.0) -> list[dict[str, Any]]:
    """Stats events of ``room`` until one lists ``wanted``; all of them, that one last."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [ev] = await client.events(1, room, timeout=max(deadline - time.monotonic(), 0.1))
        seen.append(ev["data"])
        if wanted in ev["data"].get("room_names", []):
            return seen
    raise AssertionError(f"no stats event of {room} listed {wanted}: {seen[-1:]}")


async def test_stats_show_an_operator_only_their_own_tenants_rooms(make_node) -> None:
    node = await make_node()
    url = ws_url(node)
    tag = uuid.uuid4().hex[:8]
    rooms = {t: f"chat:{t}-{tag}" for t in ("default", "acme", "globex")}
    members = []
    for tenant in ("acme", "globex", "default"):  # the default tenant's room comes last
        m = await RawClient.connected(url, token(f"u-{tenant}", tenant=tenant))
        reply = await m.request({"type": "join", "room": rooms[tenant]})
        assert reply["type"] == "joined", reply
        members.append(m)
    operator = {"sys:*": ["join"], "*": ["join"]}
    default_op = await RawClient.connected(url, token("op", rooms=operator))
    acme_op = await RawClient.connected(url, token("op", tenant="acme", rooms=operator))
    for op in (default_op, acme_op):
        reply = await op.request({"type": "join", "room": "sys:stats"})
        assert reply["type"] == "joined", reply

    # The default tenant's operator: its own rooms, none of the others' (which exist, as the
    # default room listed was made after them).
    seen = await stats_until(default_op, "sys:stats", rooms["default"])
    for data in seen:
        names = " ".join(data["room_names"])
        assert "acme" not in names and "globex" not in names, data["room_names"]
    # Another tenant's operator gets that tenant's own stats, with its rooms only.
    acme_seen = await stats_until(acme_op, "sys:stats", rooms["acme"])
    for data in acme_seen:
        assert all(name.startswith(("chat:acme-", "sys:", "@user:")) for name in
                   data["room_names"]), data["room_names"]

    # An admin service token sees every tenant's rooms, in a room nobody else may join.
    admin = await RawClient.connected(url, admin_token())
    reply = await admin.request({"type": "join", "room": "sys:all:stats"})
    assert reply["type"] == "joined", reply
    every = await stats_until(admin, "sys:all:stats", f"acme/{rooms['acme']}")
    assert f"globex/{rooms['globex']}" in every[-1]["room_names"]
    assert rooms["default"] in every[-1]["room_names"]
    for who in (default_op, await RawClient.connected(url, token("svc", kind="service"))):
        reply = await who.request({"type": "join", "room": "sys:all:stats"})
        assert reply["type"] == "error" and reply["code"] == 4003, reply
    for c in (*members, default_op, acme_op, admin):
        await c.close()


@pytest.mark.parametrize("claims", [{"kind": "user", "admin": True},
                                    {"kind": "service", "admin": "yes"}])
async def test_an_admin_claim_is_a_boolean_of_a_service_token(make_node, claims) -> None:
    node = await make_node()
    c = await RawClient.open(ws_url(node))
    reply = await c.request({"type": "connect", "token": admin_token(**claims)})
    assert reply["type"] in ("error", "disconnect") and reply["code"] == 4001, reply
    await c.close()
