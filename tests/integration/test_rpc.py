"""Rpc (PROTOCOL.md): to the server, to a user on another node, offline targets, timeouts."""

from __future__ import annotations

import asyncio

import pytest

from tests.wsclient import RawClient, token, ws_url

pytestmark = pytest.mark.integration


async def test_rpc_to_server(make_node) -> None:
    node = await make_node()
    c = await RawClient.connected(ws_url(node), token("a", rpc=["server"]))
    r = await c.request({"type": "rpc", "to": "server", "method": "echo", "params": {"x": [1]}})
    assert r == {"type": "result", "id": r["id"], "result": {"x": [1]}}
    r = await c.request({"type": "rpc", "to": "server", "method": "nope"})
    assert r["type"] == "error" and r["code"] == 4004
    denied = await RawClient.connected(ws_url(node), token("b"))
    r = await denied.request({"type": "rpc", "to": "server", "method": "echo"})
    assert r["code"] == 4003


async def test_rpc_to_a_user_on_another_node(make_node) -> None:
    n1, n2 = await make_node(), await make_node()
    caller = await RawClient.connected(ws_url(n1), token("caller", rpc=["user:*", "client:*"]))
    target = await RawClient.connected(ws_url(n2), token("bob"))

    async def answer() -> None:
        f = await target.until("rpc")
        assert f["method"] == "add" and f["from"]["user"] == "caller"
        await target.send({"type": "reply", "id": f["id"],
                           "result": f["params"]["a"] + f["params"]["b"]})

    responder = asyncio.create_task(answer())
    r = await caller.request({"type": "rpc", "to": "user:bob", "method": "add",
                              "params": {"a": 2, "b": 3}})
    await responder
    assert r["type"] == "result" and r["result"] == 5

    async def refuse() -> None:
        f = await target.until("rpc")
        await target.send({"type": "reply", "id": f["id"],
                           "error": {"code": 4003, "reason": "not you"}})

    responder = asyncio.create_task(refuse())
    r = await caller.request({"type": "rpc", "to": f"client:{target.info['client_id']}",
                              "method": "x"})
    await responder
    assert (r["type"], r["code"], r["reason"]) == ("error", 4003, "not you")

    async def refuse_in_lines() -> None:  # a reason reaches the caller in one line
        f = await target.until("rpc")
        await target.send({"type": "reply", "id": f["id"],
                           "error": {"code": 4003, "reason": "not\nyou\r\n\t today\n"}})

    responder = asyncio.create_task(refuse_in_lines())
    r = await caller.request({"type": "rpc", "to": "user:bob", "method": "x"})
    await responder
    assert (r["type"], r["code"], r["reason"]) == ("error", 4003, "not you today")


async def test_rpc_offline_and_timeout(make_node) -> None:
    node = await make_node()
    caller = await RawClient.connected(ws_url(node), token("c", rpc=["user:*"]))
    r = await caller.request({"type": "rpc", "to": "user:nobody", "method": "m"})
    assert r["type"] == "error" and r["code"] == 4004 and r["retry"] is True
    await RawClient.connected(ws_url(node), token("silent"))  # never answers
    r = await caller.request({"type": "rpc", "to": "user:silent", "method": "m",
                              "timeout_ms": 300})
    assert r["type"] == "error" and r["code"] == 4504
    r = await caller.request({"type": "rpc", "to": "device:x", "method": "m"})
    assert r["code"] == 4003, "the rpc claim does not cover devices"
