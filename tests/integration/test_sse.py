"""PROTOCOL.md section 7: SSE streams against a real node and NATS, read line by line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from bridge.sse import SseSession, format_cursor, parse_cursor, parse_rooms, sse_message
from node.protocol.errors import ProtocolError
from tests.wsclient import RawClient, token, unique, ws_url

# -- pure parts (no event loop) ----------------------------------------------------------------


def test_cursor_round_trip_with_colons_in_room_names() -> None:
    cursor = {"chat:a:b": 105, "x": 0}
    text = format_cursor(["chat:a:b", "x"], cursor)
    assert text == "chat:a:b:105,x:0"
    assert parse_cursor(text) == cursor
    for bad in ("", "chat", "chat:", "chat:-1", "chat:1x", "a.b:1", "chat:1,,x:2", "x:" + "9" * 21):
        with pytest.raises(ProtocolError) as info:
            parse_cursor(bad)
        assert info.value.code == 4000


def test_parse_rooms() -> None:
    assert parse_rooms(["a", "b,c", "a"]) == ["a", "b", "c"]
    for bad in ([], ["a.b"], [""], ["x" * 129]):
        with pytest.raises(ProtocolError):
            parse_rooms(bad)


def _frames(*frames: dict[str, Any]) -> bytes:
    return b"\n".join(json.dumps(f, separators=(",", ":")).encode() for f in frames)


def test_session_holds_until_every_room_joined_and_never_repeats() -> None:
    s = SseSession(["a", "b"], {"a": 5})
    ev = {"type": "event", "room": "a", "seq": 3, "event": "e", "data": 1}
    s.receive_message(_frames(ev))  # before a's joined: from an earlier membership
    s.receive_message(_frames({"type": "joined", "room": "a", "seq": 9, "recovered": True},
                              {**ev, "seq": 6}))
    assert s.data_to_send() == b"" and s.held_bytes > 0, "held until b has joined"
    s.receive_message(_frames({"type": "joined", "room": "b", "seq": 2, "recovered": False},
                              {**ev, "seq": 6}, {**ev, "seq": 7, "room": "b"},
                              {"type": "event", "room": "b", "event": "v", "data": 1}))
    out = s.data_to_send().decode()
    assert out == (
        ": joined a:5,b:2\n\n"
        'event: e\nid: a:6,b:2\ndata: {"room":"a","seq":6,"event":"e","data":1}\n\n'
        'event: e\nid: a:6,b:7\ndata: {"room":"b","seq":7,"event":"e","data":1}\n\n'
        'event: v\ndata: {"room":"b","event":"v","data":1}\n\n'
    ), "the duplicate a:6 is written once"
    s.receive_message(_frames({"type": "disconnect", "code": 4008, "reason": "slow",
                               "reconnect": True}, {**ev, "seq": 8}))
    assert s.ended
    assert s.data_to_send() == (b'event: disconnect\ndata: {"code":4008,"reason":"slow",'
                                b'"reconnect":true}\n\n')
    assert sse_message("a\nb", b"{}") == b"event: a b\ndata: {}\n\n"


def test_a_resume_that_is_not_recovered_is_said() -> None:
    """Resumed rooms the node could not recover get an ``rtnode:resync`` message after the
    ``: joined`` comment, with the cursor as id; recovered ones and live ones get none."""
    s = SseSession(["a", "b", "c"], {"a": 5, "b": 3})
    s.receive_message(_frames(
        {"type": "joined", "room": "a", "seq": 9, "epoch": "e1", "recovered": False},
        {"type": "joined", "room": "b", "seq": 4, "epoch": "e1", "recovered": True},
        {"type": "joined", "room": "c", "seq": 2, "epoch": "e1", "recovered": False}))
    assert s.data_to_send().decode() == (
        ": joined a:9,b:3,c:2\n\n"
        'event: rtnode:resync\nid: a:9,b:3,c:2\n'
        'data: {"room":"a","since":5,"seq":9,"epoch":"e1"}\n\n')


# -- against a node ----------------------------------------------------------------------------


class SseStream:
    """One SSE response, read line by line into messages (dicts of fields) and comments."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.comments: list[str] = []

    async def block(self, timeout: float = 10.0) -> dict[str, str] | str:
        """The next message, or the next comment (a str)."""
        fields: dict[str, str] = {}
        while True:
            line = await asyncio.wait_for(self.resp.content.readline(), timeout)
            if not line:
                raise EOFError("stream ended")
            text = line.decode().rstrip("\r\n")
            if not text:
                if fields:
                    return fields
                continue
            if text.startswith(":"):
                self.comments.append(text)
                if not fields:
                    return text
                continue
            name, _, value = text.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value

    async def message(self, timeout: float = 10.0) -> dict[str, str]:
        """The next message (comments skipped)."""
        while True:
            b = await self.block(timeout)
            if isinstance(b, dict):
                return b

    async def joined(self) -> str:
        """Wait until every room has joined; returns the cursor of the ``: joined`` comment."""
        while True:
            b = await self.block()
            if isinstance(b, str) and b.startswith(": joined "):
                return b[len(": joined "):]

    async def ended(self) -> list[dict[str, str]]:
        """Every message until the node ends the response."""
        out = []
        with contextlib.suppress(EOFError):
            while True:
                b = await self.block()
                if isinstance(b, dict):
                    out.append(b)
        return out


def sse_url(node: Any) -> str:
    return f"http://127.0.0.1:{node.http.port}/sse"


@contextlib.asynccontextmanager
async def open_sse(node: Any, rooms: list[str], tok: str | None = None, *,
                   headers: dict[str, str] | None = None,
                   params: list[tuple[str, str]] | None = None) -> AsyncIterator[SseStream]:
    hdrs = {"Authorization": f"Bearer {tok or token()}", **(headers or {})}
    query = [("room", r) for r in rooms] + (params or [])
    async with aiohttp.ClientSession() as http, http.get(sse_url(node), params=query,
                                                          headers=hdrs) as resp:
        assert resp.status == 200, await resp.text()
        yield SseStream(resp)


def data(msg: dict[str, str]) -> dict[str, Any]:
    return json.loads(msg["data"])


@pytest.mark.integration
async def test_sse_receives_websocket_events(make_node) -> None:
    node = await make_node()
    room = unique("chat")
    pub = await RawClient.connected(ws_url(node), token("alice"))
    async with open_sse(node, [room], token("bob", rooms={"chat:*": ["join"]})) as sse:
        assert sse.resp.headers["Content-Type"] == "text/event-stream"
        assert sse.resp.headers["Cache-Control"] == "no-cache"
        assert sse.resp.headers["X-Accel-Buffering"] == "no"
        assert await sse.joined() == f"{room}:0"
        p1 = await pub.request({"type": "publish", "room": room, "event": "chat:msg",
                                "data": {"text": "hi"}, "msg_id": "m1"})
        p2 = await pub.request({"type": "publish", "room": room, "event": "chat:edit",
                                "data": [1, 2]})
        m1, m2 = await sse.message(), await sse.message()
    assert m1["event"] == "chat:msg" and m1["id"] == f"{room}:{p1['seq']}"
    ev = data(m1)
    assert ev == {"room": room, "seq": p1["seq"], "event": "chat:msg", "data": {"text": "hi"},
                  "ts": ev["ts"], "from": {"user": "alice", "client_id": pub.info["client_id"],
                                           "kind": "user"}, "msg_id": "m1"}
    assert abs(ev["ts"] - time.time() * 1000) < 60_000
    assert m2["event"] == "chat:edit" and m2["id"] == f"{room}:{p2['seq']}"
    assert data(m2)["data"] == [1, 2]


@pytest.mark.integration
async def test_two_rooms_give_a_combined_cursor(make_node) -> None:
    node = await make_node()
    a, b = unique("chat"), unique("chat") + ":x:y"
    pub = await RawClient.connected(ws_url(node))
    before = (await pub.request({"type": "publish", "room": b, "event": "old"}))["seq"]
    async with open_sse(node, [a, b], params=[("token", "ignored-when-header-given")]) as sse:
        assert await sse.joined() == f"{a}:0,{b}:{before}"
        sa = (await pub.request({"type": "publish", "room": a, "event": "e"}))["seq"]
        sb = (await pub.request({"type": "publish", "room": b, "event": "e"}))["seq"]
        m1, m2 = await sse.message(), await sse.message()
    assert (m1["id"], data(m1)["room"]) == (f"{a}:{sa},{b}:{before}", a)
    assert (m2["id"], data(m2)["room"]) == (f"{a}:{sa},{b}:{sb}", b)
    assert parse_cursor(m2["id"]) == {a: sa, b: sb}


@pytest.mark.integration
@pytest.mark.parametrize("how", ["header", "query"])
async def test_resume_with_last_event_id(make_node, how: str) -> None:
    node = await make_node()
    a, b = unique("r"), unique("r")
    pub = await RawClient.connected(ws_url(node))

    async def publish(room: str, n: int) -> int:
        r = await pub.request({"type": "publish", "room": room, "event": "e", "data": n})
        return int(r["seq"])

    async with open_sse(node, [a, b]) as sse:
        await sse.joined()
        s1 = await publish(a, 1)
        first = await sse.message()
    assert first["id"] == f"{a}:{s1},{b}:0"
    missed = [(a, await publish(a, 2)), (b, await publish(b, 3)), (a, await publish(a, 4))]

    if how == "header":
        kw: dict[str, Any] = {"headers": {"Last-Event-ID": first["id"]}}
    else:
        kw = {"params": [("last_event_id", first["id"])]}
    async with open_sse(node, [a, b], **kw) as sse:
        await sse.joined()
        replayed = [await sse.message() for _ in missed]
        live = await publish(b, 5)
        after = await sse.message()
    got = sorted((data(m)["room"], data(m)["seq"]) for m in replayed)
    assert got == sorted(missed), "exactly the missed events"
    assert [data(m)["data"] for m in replayed if data(m)["room"] == a] == [2, 4], "in order"
    assert (data(after)["seq"], data(after)["data"]) == (live, 5), "then live, no duplicate"
    assert parse_cursor(after["id"]) == {a: missed[2][1], b: live}


@pytest.mark.integration
async def test_a_resume_too_far_behind_is_said_then_live(make_node) -> None:
    """More than ``recovery_max`` missed: the stream says so (``rtnode:resync``, the cursor as
    its id, so that a reconnect resumes from there), then goes live."""
    node = await make_node(recovery_max=3)
    room = unique("rs")
    pub = await RawClient.connected(ws_url(node))
    seqs = [(await pub.request({"type": "publish", "room": room, "event": "e", "data": i}))["seq"]
            for i in range(6)]
    async with open_sse(node, [room], headers={"Last-Event-ID": f"{room}:{seqs[0]}"}) as sse:
        assert await sse.joined() == f"{room}:{seqs[-1]}"
        resync = await sse.message()
        live = (await pub.request({"type": "publish", "room": room, "event": "e",
                                   "data": "live"}))["seq"]
        after = await sse.message()
    assert resync["event"] == "rtnode:resync" and resync["id"] == f"{room}:{seqs[-1]}"
    assert json.loads(resync["data"]) == {"room": room, "since": seqs[0], "seq": seqs[-1],
                                          "epoch": json.loads(resync["data"])["epoch"]}
    assert (data(after)["seq"], after["id"]) == (live, f"{room}:{live}")


@pytest.mark.integration
async def test_refusals_are_http_errors(make_node) -> None:
    node = await make_node(max_rooms_per_connection=2, allowed_origins="https://good.example")
    room = unique("ok")
    url = sse_url(node)
    reader = token("r", rooms={"ok:*": ["join"]})
    cases: list[tuple[list[tuple[str, str]], dict[str, str], int, int]] = [
        ([("room", room)], {}, 401, 4001),
        ([("room", room), ("token", "garbage")], {}, 401, 4001),
        ([("room", room)], {"Authorization": f"Bearer {token(ttl_s=10, now=time.time() - 60)}"},
         401, 4010),
        ([("room", unique("no"))], {"Authorization": f"Bearer {reader}"}, 403, 4003),
        ([("room", "@user:someone-else")], {"Authorization": f"Bearer {reader}"}, 403, 4003),
        ([("room", "a.b")], {"Authorization": f"Bearer {reader}"}, 400, 4000),
        ([], {"Authorization": f"Bearer {reader}"}, 400, 4000),
        ([("room", room)], {"Authorization": f"Bearer {reader}", "Last-Event-ID": "nope"},
         400, 4000),
        # the personal room @user:r counts as one of the connection's rooms
        ([("room", room), ("room", room + "2")], {"Authorization": f"Bearer {reader}"}, 429,
         4029),
        ([("room", room)], {"Authorization": f"Bearer {reader}", "Origin": "https://evil.example"},
         403, 4003),
    ]
    async with aiohttp.ClientSession() as http:
        for params, headers, status, code in cases:
            async with http.get(url, params=params, headers=headers) as resp:
                body = await resp.json()
                assert (resp.status, body["code"]) == (status, code), (params, headers, body)
                assert isinstance(body["reason"], str) and "Traceback" not in body["reason"]
    # the good origin, and the token in the query string
    async with open_sse(node, [room], reader, headers={"Origin": "https://good.example"},
                        params=[("token", reader)]) as sse:
        assert sse.resp.headers["Access-Control-Allow-Origin"] == "https://good.example"
        await sse.joined()
    async with aiohttp.ClientSession() as http, http.get(
            url, params=[("room", room), ("token", reader)]) as resp:
        assert resp.status == 200
        await SseStream(resp).joined()


@pytest.mark.integration
async def test_volatile_events_have_no_id(make_node) -> None:
    node = await make_node(namespaces={"cursor": {"volatile": True}}, api_key="k")
    room = unique("cursor")
    async with open_sse(node, [room]) as sse, aiohttp.ClientSession() as http:
        await sse.joined()
        async with http.post(f"http://127.0.0.1:{node.http.port}/api/publish",
                             json={"room": room, "event": "move", "data": [1, 2]},
                             headers={"X-API-Key": "k"}) as resp:
            assert resp.status == 200 and await resp.json() == {}, "volatile: no seq"
        msg = await sse.message()
    assert "id" not in msg and msg["event"] == "move"
    assert data(msg)["data"] == [1, 2] and "seq" not in data(msg)


@pytest.mark.integration
async def test_node_ends_the_stream_with_a_disconnect_event(make_node) -> None:
    node = await make_node(api_key="k")
    room = unique("d")
    async with open_sse(node, [room], token("carol")) as sse, aiohttp.ClientSession() as http:
        await sse.joined()
        async with http.post(f"http://127.0.0.1:{node.http.port}/api/disconnect",
                             json={"user": "carol"}, headers={"X-API-Key": "k"}) as resp:
            assert await resp.json() == {"disconnected": 1}
        [msg] = await sse.ended()
    assert msg["event"] == "disconnect" and "id" not in msg
    assert data(msg) == {"code": 4001, "reason": "disconnected by the server",
                         "reconnect": False}
    await asyncio.wait_for(node.ctx.index.wait_empty(), 5)


@pytest.mark.integration
async def test_heartbeat(make_node) -> None:
    node = await make_node(heartbeat_s=0.1)
    async with open_sse(node, [unique("hb")]) as sse:
        await sse.joined()
        assert await sse.block() == ": ping"


@pytest.mark.integration
async def test_a_client_that_leaves_is_noticed(make_node) -> None:
    node = await make_node()  # heartbeat 25 s: the sweep notices, not the heartbeat
    node.sse.sweep_s = 0.05
    watcher = await RawClient.connected(ws_url(node), token("w"))
    room = unique("gone")
    await watcher.request({"type": "join", "room": room, "presence": True})
    async with open_sse(node, [room], token("leaver")) as sse:
        await sse.joined()
        assert len(node.ctx.index.by_id) == 2 and node.sse.open == 1
    left = await watcher.until("event")
    while left["event"] != "presence:leave":
        left = await watcher.until("event")
    assert left["data"]["user"] == "leaver", "an SSE subscriber is a member; it leaves at once"
    assert node.sse.open == 0 and len(node.ctx.index.by_id) == 1


@pytest.mark.integration
async def test_drain_ends_streams_with_4503(make_node) -> None:
    node = await make_node()
    async with open_sse(node, [unique("dr")]) as sse:
        await sse.joined()
        stopping = asyncio.create_task(node.stop())
        [msg] = await sse.ended()
        await stopping
    assert msg["event"] == "disconnect"
    assert data(msg) == {"code": 4503, "reason": "node shutting down", "reconnect": True}


@pytest.mark.integration
async def test_the_cursor_of_many_long_rooms_resumes(make_node) -> None:
    """63 rooms of 128 characters fit in the request line (``?room=a,b,...``, 8.1 KB), but their
    cursor (``room:seq`` each) is longer than the 8190 bytes aiohttp reads of a header: the
    stream's own ``id`` sent back as ``Last-Event-ID`` was a 400, and an EventSource that lost
    its connection could never come back. The node reads header values as long as its longest
    cursor."""
    node = await make_node()
    tag = unique("c")[2:]
    rooms = [f"c:{tag}{i:03d}".ljust(128, "x") for i in range(63)]
    url = sse_url(node) + "?room=" + ",".join(rooms)
    auth = {"Authorization": f"Bearer {token('long-reader')}"}
    pub = await RawClient.connected(ws_url(node), token("long-writer"))
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=auth) as resp:
            assert resp.status == 200
            sse = SseStream(resp)
            await sse.joined()
            first = await pub.request({"type": "publish", "room": rooms[0], "event": "e"})
            msg = await sse.message()
        cursor = msg["id"]
        assert len(cursor) > 8190 and parse_cursor(cursor)[rooms[0]] == first["seq"]
        async with http.get(url, headers={**auth, "Last-Event-ID": cursor}) as resp:
            assert resp.status == 200, await resp.text()
            sse = SseStream(resp)
            assert await sse.joined() == cursor  # resumed from it
            second = await pub.request({"type": "publish", "room": rooms[1], "event": "e"})
            msg = await sse.message()
            assert parse_cursor(msg["id"])[rooms[1]] == second["seq"]
    await pub.close()
