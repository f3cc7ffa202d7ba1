"""``/api/sessions`` (issue 13): list, inspect and delete persistent MQTT sessions, each tenant
its own (an admin service token may name another). Real node, real nats-server, aiomqtt
devices with ``clean_session = 0``."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import aiomqtt
import pytest

from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


def device(node: Any, dev: str, tenant: str, **kw: Any) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", node.mqtt.port, identifier=dev, username=dev,
                          password=token(dev, kind="device", tenant=tenant),
                          clean_session=False, **kw)


class Api:
    def __init__(self, node: Any, http: aiohttp.ClientSession, headers: dict[str, str]):
        self.base = f"http://127.0.0.1:{node.http.port}/api"
        self.http, self.headers = http, headers

    async def __call__(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.http.request(method, self.base + path, headers=self.headers,
                                     **kw) as resp:
            return resp.status, await resp.json()


async def presence_event(watcher: RawClient, client_id: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            f = await watcher.until("event")
            if f["event"].startswith("presence:") and f["data"]["client_id"] == client_id:
                return f


def service(tenant: str, **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token('ops', kind='service', tenant=tenant, **kw)}"}


async def test_list_inspect_delete_and_tenant_isolation(make_node) -> None:
    node = await make_node(api_key="k" * 24)
    room = unique("fleet")
    ta, tb = unique("ta").replace(":", "-"), unique("tb").replace(":", "-")
    async with aiohttp.ClientSession() as http:
        a, b = Api(node, http, service(ta)), Api(node, http, service(tb))
        admin = Api(node, http, service(tb, admin=True))
        for dev in ("s-1", "s-2"):
            async with device(node, dev, ta) as d:
                await d.subscribe(f"rooms/{room}", qos=1)
        async with device(node, "s-1", tb) as d:  # the same client id in another tenant
            await d.subscribe(f"rooms/{room}-b", qos=1)

        status, body = await a("GET", "/sessions")
        assert status == 200
        assert sorted(s["client_id"] for s in body["sessions"]) == ["s-1", "s-2"]
        status, rec = await a("GET", "/sessions/s-1")
        assert status == 200 and rec["tenant"] == ta and rec["connected"] is False
        assert rec["subs"] == {f"rooms/{room}": 1}
        status, body = await b("GET", "/sessions")
        assert [(s["client_id"], s["subs"]) for s in body["sessions"]] == [
            ("s-1", {f"rooms/{room}-b": 1})]

        # tenant B sees nothing of A's, not even by naming A
        assert (await b("GET", "/sessions/s-2")) == (404, {"code": 4004,
                                                             "reason": "no such session"})
        assert (await b("DELETE", "/sessions/s-2"))[0] == 404
        status, body = await b("GET", "/sessions", params={"tenant": ta})
        assert (status, body["code"]) == (403, 4003)
        # an admin service token may name another tenant
        status, body = await admin("GET", "/sessions", params={"tenant": ta})
        assert status == 200 and len(body["sessions"]) == 2
        # bad input: one clear error
        status, body = await a("GET", "/sessions/bad%20id")
        assert (status, body["code"]) == (400, 4000) and "client_id" in body["reason"]
        status, body = await admin("GET", "/sessions", params={"tenant": "no:colons"})
        assert (status, body["code"]) == (400, 4000)
        status, body = await Api(node, http, {})("GET", "/sessions")
        assert (status, body["code"]) == (401, 4001)

        assert await a("DELETE", "/sessions/s-2") == (200, {"deleted": True})
        assert (await a("GET", "/sessions/s-2"))[0] == 404
        assert (await a("DELETE", "/sessions/s-2"))[0] == 404
        assert (await b("GET", "/sessions/s-1"))[0] == 200  # B's own s-1 untouched
        # the API key acts in the default tenant
        status, body = await Api(node, http, {"X-API-Key": "k" * 24})("GET", "/sessions")
        assert status == 200 and {s["tenant"] for s in body["sessions"]} <= {"default"}


async def test_deleting_a_connected_session_disconnects_the_device(make_node) -> None:
    node = await make_node()
    room = unique("fleet")
    tenant = unique("tc").replace(":", "-")
    watcher = await RawClient.connected(ws_url(node), token("w", tenant=tenant))
    await watcher.request({"type": "join", "room": room, "presence": True})
    async with aiohttp.ClientSession() as http:
        api = Api(node, http, service(tenant))
        dev = device(node, "live-1", tenant)
        await dev.__aenter__()
        try:
            await dev.subscribe(f"rooms/{room}", qos=1)
            status, rec = await api("GET", "/sessions/live-1")
            assert status == 200 and rec["connected"] is True
            assert (await presence_event(watcher, "live-1"))["event"] == "presence:join"
            assert await api("DELETE", "/sessions/live-1") == (200, {"deleted": True})
            with pytest.raises(aiomqtt.MqttError):
                async with asyncio.timeout(5):
                    async for _ in dev.messages:
                        pass
        finally:
            await asyncio.wait_for(dev.__aexit__(None, None, None), 5)
        assert (await api("GET", "/sessions/live-1"))[0] == 404
        # gone, not offline: its session is no more
        left = await presence_event(watcher, "live-1")
        assert left["event"] == "presence:leave" and "online" not in left["data"]
        r = await watcher.request({"type": "presence", "room": room})
        assert not [m for m in r["members"] if m["client_id"] == "live-1"]
