"""Presence across nodes: members, join/leave events, members of a dead node leave by TTL."""

from __future__ import annotations

import asyncio

import pytest

from tests.servers import NodeProcess
from tests.wsclient import SECRET, RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


async def _presence(c: RawClient, room: str) -> dict:
    r = await c.request({"type": "presence", "room": room})
    assert r["type"] == "presence", r
    return r


async def test_presence_across_two_nodes(make_node) -> None:
    n1, n2 = await make_node(), await make_node()
    room = unique("pr")
    watcher = await RawClient.connected(ws_url(n1), token("w"))
    await watcher.request({"type": "join", "room": room, "presence": True})
    alice = await RawClient.connected(ws_url(n2), token("alice"))
    alice2 = await RawClient.connected(ws_url(n1), token("alice"))
    await alice.request({"type": "join", "room": room})
    await alice2.request({"type": "join", "room": room})
    joins = []
    while len(joins) < 2:
        e = await watcher.until("event")
        assert e["event"] == "presence:join"
        if e["data"]["user"] == "alice":
            joins.append(e)
    assert {e["data"]["client_id"] for e in joins} == {alice.info["client_id"],
                                                       alice2.info["client_id"]}
    assert all("seq" not in e for e in joins)
    assert {e["data"]["node"] for e in joins} == {"n1", "n2"}

    async def settled() -> dict:
        while True:
            p = await _presence(watcher, room)
            if len(p["members"]) == 3:
                return p
            await asyncio.sleep(0.05)

    p = await asyncio.wait_for(settled(), 10)
    assert p["unique_users"] == 2, "a user with two connections counts once"
    member = next(m for m in p["members"] if m["client_id"] == alice.info["client_id"])
    assert member["user"] == "alice" and member["kind"] == "user" and member["node"] == "n2"
    assert isinstance(member["joined_at"], int)

    await alice.request({"type": "leave", "room": room})
    left = await watcher.until("event")
    assert left["event"] == "presence:leave"
    assert left["data"]["client_id"] == alice.info["client_id"]
    # members without presence: true get no presence events
    assert not [f for f in alice2.buffer if f.get("event", "").startswith("presence:")]


async def test_presence_rights_and_policy(make_node) -> None:
    node = await make_node(namespaces={"quiet": {"presence": False}})
    c = await RawClient.connected(ws_url(node), token("x", rooms={"a:*": ["join"]}))
    r = await c.request({"type": "presence", "room": "a:1"})
    assert r["code"] == 4003
    r = await c.request({"type": "join", "room": "a:1", "presence": True})
    assert r["code"] == 4003
    full = await RawClient.connected(ws_url(node), token("y"))
    r = await full.request({"type": "presence", "room": "quiet:1"})
    assert r["code"] == 4004


async def test_killed_node_members_leave_within_ttl(make_node, shared_nats, tmp_path) -> None:
    n1 = await make_node(presence_ttl_s=1.0)
    n2 = NodeProcess(tmp_path / "k", "--nats-url", shared_nats.url, "--presence-ttl-s", "1",
                     name="doomed", env={"RTNODE_JWT_SECRET": SECRET}).start()
    try:
        await asyncio.to_thread(n2.wait_ready)
        room = unique("dead")
        watcher = await RawClient.connected(ws_url(n1), token("w"))
        await watcher.request({"type": "join", "room": room, "presence": True})
        doomed = await RawClient.connected(n2.ws_url, token("d"))
        await doomed.request({"type": "join", "room": room})
        while (await watcher.until("event"))["data"]["user"] != "d":
            pass
        assert n2.proc is not None
        n2.proc.kill()  # kill -9: no leave is ever sent by that node
        killed_at = asyncio.get_running_loop().time()
        left = await watcher.until("event", timeout=10)
        waited = asyncio.get_running_loop().time() - killed_at
        assert left["event"] == "presence:leave"
        assert left["data"]["client_id"] == doomed.info["client_id"]
        assert left["data"]["node"] == "doomed"
        print(f"\nleave of a killed node's member after {waited:.2f} s (TTL 1 s)")
        p = await _presence(watcher, room)
        assert [m["user"] for m in p["members"]] == ["w"]
    finally:
        n2.stop()
