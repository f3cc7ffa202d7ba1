"""Plain MQTT devices in presence (issue 13): a ``rooms/<room>`` subscriber is a member of the
room (kind device) for a WebSocket watcher and ``GET /api/presence``; a device with a persistent
session (``clean_session = 0``) that goes away stays listed as offline, on every node, until its
session is deleted. Real nodes, real nats-server, aiomqtt devices, WebSocket watchers."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import aiohttp
import aiomqtt
import pytest

from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


def device(node: Any, dev: str, **kw: Any) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", node.mqtt.port, identifier=dev, username=dev,
                          password=token(dev, kind="device"), **kw)


async def presence_event(watcher: RawClient, client_id: str,
                         timeout: float = 10.0) -> dict[str, Any]:
    """The next presence event about ``client_id`` (others are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            f = await watcher.until("event")
            if f["event"].startswith("presence:") and f["data"]["client_id"] == client_id:
                return f


async def api(node: Any, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token('backend', kind='service')}"}
    async with aiohttp.ClientSession() as http, http.request(
            method, f"http://127.0.0.1:{node.http.port}/api{path}", headers=headers,
            **kw) as resp:
        return resp.status, await resp.json()


async def members(node: Any, room: str) -> dict[str, dict[str, Any]]:
    status, body = await api(node, "GET", "/presence", params={"room": room})
    assert status == 200, body
    return {m["client_id"]: m for m in body["members"]}


async def test_plain_subscriber_joins_and_leaves_presence(make_node) -> None:
    node = await make_node()
    room = unique("fleet")
    watcher = await RawClient.connected(ws_url(node), token("w"))
    await watcher.request({"type": "join", "room": room, "presence": True})
    async with device(node, "pump-7") as dev:
        await dev.subscribe(f"rooms/{room}")
        joined = await presence_event(watcher, "pump-7")
        assert joined["event"] == "presence:join"
        assert joined["data"]["kind"] == "device" and joined["data"]["user"] == "pump-7"
        listed = await members(node, room)
        assert listed["pump-7"]["online"] is True and listed["pump-7"]["kind"] == "device"
        r = await watcher.request({"type": "presence", "room": room})
        assert any(m["client_id"] == "pump-7" for m in r["members"])

        await dev.unsubscribe(f"rooms/{room}")
        left = await presence_event(watcher, "pump-7")
        assert left["event"] == "presence:leave" and "online" not in left["data"]
        assert "pump-7" not in await members(node, room)

        await dev.subscribe(f"rooms/{room}")
        assert (await presence_event(watcher, "pump-7"))["event"] == "presence:join"
    # a clean session's DISCONNECT: gone
    left = await presence_event(watcher, "pump-7")
    assert left["event"] == "presence:leave" and "online" not in left["data"]
    assert "pump-7" not in await members(node, room)


async def test_persistent_device_is_offline_not_gone_until_its_session_is_deleted(
        make_node) -> None:
    node, other = await make_node(), await make_node()  # the API calls go to the other node
    room = unique("fleet")
    watcher = await RawClient.connected(ws_url(node), token("w"))
    await watcher.request({"type": "join", "room": room, "presence": True})
    async with device(node, "valve-3", clean_session=False) as dev:
        await dev.subscribe(f"rooms/{room}", qos=1)
        assert (await presence_event(watcher, "valve-3"))["event"] == "presence:join"
    left = await presence_event(watcher, "valve-3")
    assert left["event"] == "presence:leave" and left["data"]["online"] is False
    listed = await members(other, room)
    assert listed["valve-3"]["online"] is False and listed["valve-3"]["kind"] == "device"
    r = await watcher.request({"type": "presence", "room": room})
    assert [m["online"] for m in r["members"] if m["client_id"] == "valve-3"] == [False]

    # back: online again (the stored subscription resumes), then away again: offline
    async with device(node, "valve-3", clean_session=False):
        assert (await presence_event(watcher, "valve-3"))["event"] == "presence:join"
        assert (await members(other, room))["valve-3"]["online"] is True
    assert (await presence_event(watcher, "valve-3"))["data"]["online"] is False

    status, body = await api(other, "DELETE", "/sessions/valve-3")
    assert (status, body) == (200, {"deleted": True})
    gone = await presence_event(watcher, "valve-3")
    assert gone["event"] == "presence:leave"
    assert "valve-3" not in await members(other, room)
    with contextlib.suppress(asyncio.TimeoutError):  # no ghost comes back
        extra = await presence_event(watcher, "valve-3", timeout=2.5)
        raise AssertionError(f"unexpected {extra}")
    assert "valve-3" not in await members(other, room)


async def test_offline_device_leaves_when_its_session_expires(make_node) -> None:
    node = await make_node(presence_ttl_s=1.0, mqtt_session_expiry_s=2.0)
    room = unique("fleet")
    watcher = await RawClient.connected(ws_url(node), token("w"))
    await watcher.request({"type": "join", "room": room, "presence": True})
    async with device(node, "meter-5", clean_session=False) as dev:
        await dev.subscribe(f"rooms/{room}", qos=1)
        assert (await presence_event(watcher, "meter-5"))["event"] == "presence:join"
    assert (await presence_event(watcher, "meter-5"))["data"]["online"] is False
    assert (await members(node, room))["meter-5"]["online"] is False
    gone = await presence_event(watcher, "meter-5", timeout=6)  # expiry 2 s, checks every 0.5 s
    assert gone["event"] == "presence:leave"
    assert "meter-5" not in await members(node, room)


async def test_a_fleet_beyond_one_multi_last_is_listed_whole(make_node) -> None:
    node = await make_node()
    room = unique("fleet")
    n = 1100  # nats-server answers a multi_last with 1024 subjects at most
    for i in range(n):
        dev = f"fleet-{i:04d}"
        node.presence.mark_offline("default", room, {
            "client_id": dev, "user": dev, "kind": "device", "node": "n1", "joined_at": i},
            60)
    listed: dict[str, Any] = {}
    async with asyncio.timeout(10):
        while len(listed) < n:
            listed = await members(node, room)
    assert len(listed) == n and not any(m["online"] for m in listed.values())


@pytest.mark.parametrize("seed", [1])
async def test_a_devices_offline_leave_is_announced_once_its_entry_says_so(make_node,
                                                                           seed: int) -> None:
    """Persistent devices go away, a few at once: the moment a watcher hears a device's leave
    (``online: false``), a presence request lists that device offline (its entry was written
    before the announcement, not after)."""
    rng = random.Random(seed)
    node = await make_node(mqtt_session_expiry_s=60.0)
    room = unique("fleet")
    watcher = await RawClient.connected(ws_url(node), token("w"))
    await watcher.request({"type": "join", "room": room, "presence": True})
    ids = [f"dev-{seed}-{i}" for i in range(rng.randint(4, 8))]
    async with contextlib.AsyncExitStack() as stack:
        for dev in ids:
            client = await stack.enter_async_context(device(node, dev, clean_session=False))
            await client.subscribe(f"rooms/{room}", qos=1)
            assert (await presence_event(watcher, dev))["event"] == "presence:join"
    for _ in ids:
        f = await watcher.until("event")
        while not f["event"].startswith("presence:"):
            f = await watcher.until("event")
        assert f["event"] == "presence:leave" and f["data"]["online"] is False, f
        listed = await watcher.request({"type": "presence", "room": room})  # at once
        assert listed["type"] == "presence", listed
        online = {m["client_id"]: m["online"] for m in listed["members"]}
        assert online[f["data"]["client_id"]] is False, listed
