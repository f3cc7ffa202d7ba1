"""PROTOCOL.md section 8: the HTTP API for backends, against real nodes and NATS."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import pytest

from bridge.api import authenticate
from node.protocol.errors import ProtocolError
from node.protocol.tokens import TokenVerifier
from tests.wsclient import SECRET, RawClient, token, unique, ws_url

# -- pure parts --------------------------------------------------------------------------------


def test_authenticate() -> None:
    tokens = TokenVerifier(secret=SECRET)
    svc = authenticate({"Authorization": f"Bearer {token('b', kind='service')}"}, tokens, "")
    assert (svc.sub, svc.kind) == ("b", "service")
    assert authenticate({"X-API-Key": "k"}, tokens, "k").sub == "api"
    for headers, key, code in [
        ({}, "k", 4001),
        ({"X-API-Key": "wrong"}, "k", 4001),
        ({"X-API-Key": ""}, "", 4001),  # no key configured: no key accepted
        ({"X-API-Key": "k\u00e9"}, "k", 4001),  # not ASCII: refused, not a TypeError
        ({"Authorization": "Basic abc", "X-API-Key": "k"}, "k", 4001),
        ({"Authorization": f"Bearer {token('u')}"}, "", 4003),
        ({"Authorization": f"Bearer {token(kind='service', ttl_s=1, now=time.time() - 9)}"},
         "", 4010),
    ]:
        with pytest.raises(ProtocolError) as info:
            authenticate(headers, tokens, key)
        assert info.value.code == code, headers


# -- against a node ----------------------------------------------------------------------------


class Api:
    """A backend calling one node's HTTP API."""

    def __init__(self, node: Any, http: aiohttp.ClientSession, headers: dict[str, str]) -> None:
        self.base = f"http://127.0.0.1:{node.http.port}/api"
        self.http = http
        self.headers = headers

    async def call(self, method: str, path: str, *, status: int = 200, **kw: Any) -> Any:
        headers = {**self.headers, **kw.pop("headers", {})}
        async with self.http.request(method, self.base + path, headers=headers, **kw) as resp:
            assert resp.headers["Content-Type"].startswith("application/json")
            body = await resp.json()
            assert resp.status == status, (resp.status, body)
            return body

    async def error(self, method: str, path: str, status: int, code: int, **kw: Any) -> str:
        body = await self.call(method, path, status=status, **kw)
        assert body["code"] == code and set(body) == {"code", "reason"}, body
        assert "\n" not in body["reason"] and "Traceback" not in body["reason"]
        return str(body["reason"])


def service(sub: str = "backend", **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, kind='service', rooms={}, **kw)}"}


@pytest.mark.integration
async def test_publish_reaches_websocket_members(make_node) -> None:
    node = await make_node(api_key="the-key")
    room = unique("chat")
    user = f"alice-{uuid.uuid4().hex[:8]}"  # its personal room is stored: keep it to this test
    member = await RawClient.connected(ws_url(node), token(user))
    await member.request({"type": "join", "room": room})
    async with aiohttp.ClientSession() as http:
        svc = Api(node, http, service("backend"))
        first = await svc.call("POST", "/publish", json={
            "room": room, "event": "chat:msg", "data": {"text": "hi"}, "msg_id": "x1",
            "from": {"user": "mallory"}, "tenant": "evil"})
        again = await svc.call("POST", "/publish", json={
            "room": room, "event": "chat:msg", "data": {"text": "hi"}, "msg_id": "x1"})
        assert set(first) == {"seq"} and again == first, "msg_id: stored once"
        keyed = await Api(node, http, {"X-API-Key": "the-key"}).call(
            "POST", "/publish", json={"room": f"@user:{user}", "event": "dm", "data": 1})
    [ev] = await member.events(1, room)
    assert (ev["seq"], ev["event"], ev["data"], ev["msg_id"]) == (first["seq"], "chat:msg",
                                                                   {"text": "hi"}, "x1")
    assert ev["from"] == {"user": "backend", "kind": "service"}
    [dm] = await member.events(1, f"@user:{user}")
    assert dm["seq"] == keyed["seq"] and dm["from"] == {"user": "api", "kind": "service"}


@pytest.mark.integration
async def test_history(make_node) -> None:
    node = await make_node()
    room = unique("h")
    async with aiohttp.ClientSession() as http:
        svc = Api(node, http, service())
        seqs = [(await svc.call("POST", "/publish", json={
            "room": room, "event": "e", "data": i}))["seq"] for i in range(6)]
        await svc.call("POST", "/publish", json={"room": unique("h"), "event": "other"})

        async def hist(**params: Any) -> list[int]:
            r = await svc.call("GET", "/history", params={"room": room, **params})
            assert r["seq"] == seqs[-1]
            return [e["seq"] for e in r["events"]]

        full = await svc.call("GET", "/history", params={"room": room})
        assert full["events"][0] == {"room": room, "seq": seqs[0], "event": "e", "data": 0,
                                     "ts": full["events"][0]["ts"],
                                     "from": {"user": "backend", "kind": "service"}}
        assert await hist() == seqs
        assert await hist(limit=2) == seqs[-2:]
        assert await hist(since=seqs[1], limit=3) == seqs[2:5]
        assert await hist(reverse="true", limit=2) == seqs[::-1][:2]
        assert await hist(reverse="1", since=seqs[3], limit=2) == [seqs[2], seqs[1]]
        assert await svc.call("GET", "/history", params={"room": unique("none")}) == {
            "events": [], "seq": 0}
        for params in ({}, {"room": "a.b"}, {"room": room, "limit": "abc"},
                       {"room": room, "limit": "5000"}, {"room": room, "since": "-1"},
                       {"room": room, "reverse": "maybe"}):
            await svc.error("GET", "/history", 400, 4000, params=params)


@pytest.mark.integration
async def test_authentication(make_node) -> None:
    node = await make_node(api_key="the-key")
    room = unique("a")
    body = {"room": room, "event": "e"}
    async with aiohttp.ClientSession() as http:
        anon = Api(node, http, {})
        await anon.error("POST", "/publish", 401, 4001, json=body)
        await anon.error("POST", "/publish", 401, 4001, json=body, headers={"X-API-Key": "nope"})
        await anon.error("POST", "/publish", 401, 4001, json=body,
                         headers={"Authorization": "Bearer garbage"})
        await anon.error("POST", "/publish", 403, 4003, json=body,
                         headers={"Authorization": f"Bearer {token('u')}"})
        await anon.error("GET", "/history", 403, 4003, params={"room": room},
                         headers={"Authorization": f"Bearer {token('d', kind='device')}"})
        await anon.error("POST", "/publish", 401, 4010, json=body,
                         headers=service(ttl_s=1, now=time.time() - 9))
        assert "seq" in await anon.call("POST", "/publish", json=body,
                                        headers={"X-API-Key": "the-key"})
    no_key = await make_node()  # no api_key configured: the header opens nothing
    async with aiohttp.ClientSession() as http:
        await Api(no_key, http, {"X-API-Key": ""}).error("POST", "/publish", 401, 4001,
                                                         json=body)


@pytest.mark.integration
async def test_bad_requests(make_node) -> None:
    node = await make_node(namespaces={"small": {"max_payload_bytes": 300}})
    room = unique("small")
    async with aiohttp.ClientSession() as http:
        svc = Api(node, http, service())
        for raw in (b"{not json", b"[1, 2]", b"", b'{"room": NaN}', b"\xff\xfe"):
            await svc.error("POST", "/publish", 400, 4000, data=raw)
        for bad, field in (({"room": 5, "event": "e"}, "room"),
                           ({"room": "a b", "event": "e"}, "room"),
                           ({"room": room}, "event"),
                           ({"room": room, "event": "e", "msg_id": "x" * 129}, "msg_id"),
                           ({"room": room, "event": "e", "msg_id": 7}, "msg_id")):
            reason = await svc.error("POST", "/publish", 400, 4000, json=bad)
            assert field in reason, reason
        await svc.error("POST", "/publish", 403, 4003,
                        json={"room": room, "event": "presence:join", "data": {}})
        await svc.error("POST", "/publish", 413, 4013,
                        json={"room": room, "event": "e", "data": "x" * 400})
        await svc.error("POST", "/publish", 413, 4013, data=b"x" * (1024 * 1024 + 10))
        assert "seq" in await svc.call("POST", "/publish",
                                       json={"room": room, "event": "e", "data": "x" * 100})
        await svc.error("POST", "/disconnect", 400, 4000, json={"reason": "who?"})
        await svc.error("POST", "/disconnect", 400, 4000, json={"user": "u", "reason": "a\nb"})


@pytest.mark.integration
async def test_presence(make_node) -> None:
    node = await make_node(namespaces={"quiet": {"presence": False}})
    room = unique("pr")
    member = await RawClient.connected(ws_url(node), token("alice"))
    await member.request({"type": "join", "room": room})
    async with aiohttp.ClientSession() as http:
        svc = Api(node, http, service())
        await svc.error("GET", "/presence", 400, 4000, params={"room": "a.b"})
        await svc.error("GET", "/presence", 404, 4004, params={"room": unique("quiet")})
        await svc.error("GET", "/presence", 404, 4004, params={"room": "@user:alice"})

        async def members() -> list[dict[str, Any]]:
            while True:  # presence is written to the KV bucket without waiting for it
                listed = (await svc.call("GET", "/presence", params={"room": room}))["members"]
                if listed:
                    return list(listed)
                await asyncio.sleep(0.02)

        [m] = await asyncio.wait_for(members(), 5)
        assert (m["client_id"], m["user"], m["kind"], m["node"]) == (
            member.info["client_id"], "alice", "user", "n1")
        presence, node.ctx.presence = node.ctx.presence, None
        try:
            reason = await svc.error("GET", "/presence", 404, 4004, params={"room": room})
            assert reason == "presence not available"
        finally:
            node.ctx.presence = presence


@pytest.mark.integration
async def test_disconnect_on_this_node(make_node) -> None:
    node = await make_node(api_key="k")
    alice = [await RawClient.connected(ws_url(node), token("alice")) for _ in range(2)]
    bob = await RawClient.connected(ws_url(node), token("bob"))
    other_tenant = await RawClient.connected(ws_url(node), token("alice", tenant="acme"))
    async with aiohttp.ClientSession() as http:
        api = Api(node, http, {"X-API-Key": "k"})
        assert await api.call("POST", "/disconnect", json={"user": "alice", "reason": "banned"}) \
            == {"disconnected": 2}
        for c in alice:
            code, frames = await c.closed()
            assert code == 4001
            assert frames[-1] == {"type": "disconnect", "code": 4001, "reason": "banned",
                                  "reconnect": False}
        assert await api.call("POST", "/disconnect", json={
            "client_id": bob.info["client_id"], "user": "not-bob"}) == {"disconnected": 0}
        assert await api.call("POST", "/disconnect", json={
            "client_id": bob.info["client_id"]}) == {"disconnected": 1}
        code, frames = await bob.closed()
        assert code == 4001 and frames[-1]["reason"] == "disconnected by the server"
    assert (await other_tenant.request({"type": "ping"}))["type"] == "pong", "tenant kept"


@pytest.mark.integration
async def test_disconnect_reaches_every_node(make_node) -> None:
    n1, n2 = await make_node(), await make_node()
    on_n2 = await RawClient.connected(ws_url(n2), token("dave"))
    other = await RawClient.connected(ws_url(n2), token("erin"))
    async with aiohttp.ClientSession() as http:
        r = await Api(n1, http, service()).call("POST", "/disconnect", json={"user": "dave"})
    assert r == {"disconnected": 0}, "the count is this node's"
    code, frames = await on_n2.closed()
    assert code == 4001 and frames[-1]["reconnect"] is False
    assert (await other.request({"type": "ping"}))["type"] == "pong"
