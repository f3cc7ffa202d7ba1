"""PROTOCOL.md sections 1-5 over WebSocket, in JSON and CBOR, against a real node and NATS."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest
from websockets.exceptions import InvalidStatus

from node.protocol.tokens import mint_token
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

CODECS = ["json", "cbor"]


@pytest.mark.parametrize("codec", CODECS)
async def test_connect_join_publish_history_leave(make_node, codec: str) -> None:
    node = await make_node()
    room = unique("chat")
    a = await RawClient.connected(ws_url(node), token("alice"), codec=codec)
    b = await RawClient.connected(ws_url(node), token("bob"), codec=codec)
    info = a.info
    assert info["node"] == "n1" and info["rooms"] == ["@user:alice"]
    assert info["heartbeat_s"] == 25 and 3500 < info["expires_in_s"] <= 3600
    assert isinstance(info["client_id"], str) and info["client_id"]

    for c in (a, b):
        joined = await c.request({"type": "join", "room": room})
        assert joined == {"type": "joined", "id": joined["id"], "room": room, "seq": 0,
                          "epoch": joined["epoch"], "recovered": False, "replayed": 0}
    published = await a.request({"type": "publish", "room": room, "event": "chat:msg",
                                 "data": {"text": "hi", "n": [1, 2.5, None, True]},
                                 "msg_id": "m-1", "from": {"user": "mallory"}, "ts": 1,
                                 "seq": 99, "tenant": "evil"})
    assert published["type"] == "published" and published["room"] == room
    seq = published["seq"]
    for c in (a, b):
        [ev] = await c.events(1, room)
        assert ev["seq"] == seq and ev["event"] == "chat:msg" and ev["msg_id"] == "m-1"
        assert ev["data"] == {"text": "hi", "n": [1, 2.5, None, True]}
        assert ev["from"] == {"user": "alice", "client_id": info["client_id"], "kind": "user"}
        assert abs(ev["ts"] - time.time() * 1000) < 60_000

    hist = await b.request({"type": "history", "room": room})
    assert hist["type"] == "history" and hist["seq"] == seq
    assert [e["seq"] for e in hist["events"]] == [seq]
    assert hist["events"][0]["from"]["user"] == "alice"
    assert (await b.request({"type": "ping"}))["type"] == "pong"
    left = await b.request({"type": "leave", "room": room})
    assert left == {"type": "left", "room": room, "id": left["id"]}
    await a.request({"type": "publish", "room": room, "event": "x"})
    assert (await b.request({"type": "ping"}))["type"] == "pong"
    assert not [f for f in b.buffer if f.get("type") == "event"], "no events after leave"
    await a.close()
    await b.close()


@pytest.mark.parametrize("codec", CODECS)
async def test_history_paging(make_node, codec: str) -> None:
    node = await make_node()
    room = unique("h")
    c = await RawClient.connected(ws_url(node), codec=codec)
    seqs = [(await c.request({"type": "publish", "room": room, "event": "e", "data": i}))["seq"]
            for i in range(12)]
    other = unique("h")
    await c.request({"type": "publish", "room": other, "event": "e"})

    async def hist(**kw):
        r = await c.request({"type": "history", "room": room, **kw})
        assert r["seq"] == seqs[-1]
        return [e["seq"] for e in r["events"]]

    assert await hist() == seqs
    assert await hist(limit=5) == seqs[-5:]
    assert await hist(since={"seq": seqs[3]}, limit=4) == seqs[4:8]
    assert await hist(reverse=True, limit=3) == seqs[::-1][:3]
    assert await hist(reverse=True, since={"seq": seqs[5]}, limit=3) == [seqs[4], seqs[3], seqs[2]]
    assert await hist(reverse=True, since={"seq": seqs[1]}, limit=3) == [seqs[0]]
    assert await hist(since={"seq": seqs[-1]}) == []
    empty = await c.request({"type": "history", "room": unique("none")})
    assert empty["events"] == [] and empty["seq"] == 0


async def test_batched_frames_in_one_message(make_node) -> None:
    node = await make_node()
    room = unique("b")
    c = await RawClient.connected(ws_url(node))
    await c.send({"type": "join", "room": room, "id": "j"},
                 *[{"type": "publish", "room": room, "event": "e", "data": i, "id": f"p{i}"}
                   for i in range(20)])
    frames = []
    while len([f for f in frames if f["type"] == "published"]) < 20 or len(
            [f for f in frames if f["type"] == "event"]) < 20:
        frames.append(await c.recv())
    events = [f for f in frames if f["type"] == "event"]
    assert [e["data"] for e in events] == list(range(20)), "one connection's publishes keep order"
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))


async def test_json_and_cbor_share_a_room(make_node) -> None:
    node = await make_node()
    room = unique("mix")
    j = await RawClient.connected(ws_url(node), token("j"), codec="json")
    c = await RawClient.connected(ws_url(node), token("c"), codec="cbor")
    await j.request({"type": "join", "room": room})
    await c.request({"type": "join", "room": room})
    await c.request({"type": "publish", "room": room, "event": "bin", "data": b"\x00\x01\xff"})
    [ej] = await j.events(1)
    [ec] = await c.events(1)
    assert ec["data"] == b"\x00\x01\xff"
    assert ej["data"] == "AAH/", "bytes reach JSON clients as base64"
    assert ej["seq"] == ec["seq"]


@pytest.mark.parametrize("codec", CODECS)
async def test_msg_id_dedupe(make_node, codec: str) -> None:
    node = await make_node()
    room = unique("d")
    c = await RawClient.connected(ws_url(node), codec=codec)
    await c.request({"type": "join", "room": room})
    first = await c.request({"type": "publish", "room": room, "event": "e", "msg_id": "same"})
    again = await c.request({"type": "publish", "room": room, "event": "e", "msg_id": "same"})
    assert first["seq"] == again["seq"]
    third = await c.request({"type": "publish", "room": room, "event": "e", "msg_id": "other"})
    events = await c.events(2)
    assert [e["seq"] for e in events] == [first["seq"], third["seq"]], "delivered once"
    hist = await c.request({"type": "history", "room": room})
    assert len(hist["events"]) == 2


async def test_malformed_frames_get_4000_and_too_many_close(make_node) -> None:
    node = await make_node(max_errors_per_min=3)
    c = await RawClient.connected(ws_url(node))
    for bad in ({"type": "nope", "id": 1}, {"type": "join", "id": 2, "room": "a.b"},
                {"type": "publish", "id": 3, "room": "r", "event": "e", "msg_id": 7}):
        r = await c.request({k: v for k, v in bad.items() if k != "id"})
        assert r["type"] == "error" and r["code"] == 4000 and r["retry"] is False
        assert "Traceback" not in r["reason"]
    await c.ws.send("{not json")
    code, frames = await c.closed()
    assert code == 4000
    assert frames[-1]["type"] == "disconnect" and frames[-1]["code"] == 4000


@pytest.mark.parametrize("codec", CODECS)
async def test_second_connect_is_4000(make_node, codec: str) -> None:
    node = await make_node()
    c = await RawClient.connected(ws_url(node), codec=codec)
    r = await c.request({"type": "connect", "token": token()})
    assert r["type"] == "error" and r["code"] == 4000
    assert (await c.request({"type": "ping"}))["type"] == "pong"


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("case", ["none", "wrong-key", "garbage", "not-first", "expired"])
async def test_bad_tokens_end_the_connection(make_node, case: str, codec: str) -> None:
    node = await make_node()
    c = await RawClient.open(ws_url(node), codec=codec)
    if case == "none":
        tok = jwt.encode({"sub": "a", "rooms": {"*": ["join"]}}, key=None, algorithm="none")
    elif case == "wrong-key":
        tok = mint_token("another-secret-another-secret-another", sub="a")
    elif case == "expired":
        tok = token(ttl_s=10, now=time.time() - 60)
    else:
        tok = "garbage"
    if case == "not-first":
        await c.send({"type": "ping", "id": 1})
    else:
        await c.send({"type": "connect", "id": 1, "token": tok})
    code, frames = await c.closed()
    expected = 4010 if case == "expired" else 4001
    assert code == expected
    assert frames[-1] == {"type": "disconnect", "code": expected, "reason": frames[-1]["reason"],
                          "reconnect": case == "expired"}


async def test_connect_timeout(make_node) -> None:
    node = await make_node(connect_timeout_s=0.3)
    c = await RawClient.open(ws_url(node))
    code, frames = await c.closed()
    assert code == 4001 and frames[-1]["code"] == 4001


async def test_token_expiry_disconnects_with_4010(make_node) -> None:
    node = await make_node()
    # exp is in whole seconds (iat + ttl, iat truncated): ttl 3 leaves at least 2 s to connect
    # on a loaded machine (ttl 1 could be expired on arrival).
    c = await RawClient.connected(ws_url(node), token(ttl_s=3))
    code, frames = await c.closed(timeout=10)
    assert code == 4010
    assert frames[-1] == {"type": "disconnect", "code": 4010, "reason": "token expired",
                          "reconnect": True}


@pytest.mark.parametrize("codec", CODECS)
async def test_rights_are_checked_on_every_action(make_node, codec: str) -> None:
    node = await make_node()
    room = unique("r")
    reader = await RawClient.connected(ws_url(node), token("r", rooms={"r:*": ["join"]}),
                                       codec=codec)
    assert (await reader.request({"type": "join", "room": room}))["type"] == "joined"
    for frame in ({"type": "publish", "room": room, "event": "e"},
                  {"type": "history", "room": room},
                  {"type": "join", "room": unique("other")},
                  {"type": "join", "room": "@user:bob"},
                  {"type": "publish", "room": "@user:r", "event": "e"}):
        r = await reader.request(frame)
        assert r["type"] == "error" and r["code"] == 4003, (frame, r)
    # a member needs the publish right, not membership; publishing needs no membership
    writer = await RawClient.connected(ws_url(node), token("w", rooms={"r:*": ["publish"]}),
                                       codec=codec)
    assert (await writer.request({"type": "publish", "room": room, "event": "e"}))["seq"] > 0
    [ev] = await reader.events(1)
    assert ev["from"]["user"] == "w"
    r = await writer.request({"type": "publish", "room": room, "event": "presence:join"})
    assert r["code"] == 4003


@pytest.mark.parametrize("codec", CODECS)
async def test_personal_rooms(make_node, codec: str) -> None:
    node = await make_node()
    user = "alice-" + unique("u").split(":")[1]  # its personal room is new in the shared store
    alice = await RawClient.connected(ws_url(node), token(user), codec=codec)
    alice2 = await RawClient.connected(ws_url(node), token(user), codec=codec)
    svc = await RawClient.connected(ws_url(node), token("backend", kind="service", rooms={}),
                                    codec=codec)
    r = await svc.request({"type": "publish", "room": f"@user:{user}", "event": "dm", "data": 1})
    assert r["type"] == "published"
    for c in (alice, alice2):
        [ev] = await c.events(1)
        assert ev["room"] == f"@user:{user}" and ev["from"]["kind"] == "service"
    hist = await alice.request({"type": "history", "room": f"@user:{user}"})
    assert len(hist["events"]) == 1


@pytest.mark.parametrize("codec", CODECS)
async def test_tenant_isolation(make_node, codec: str) -> None:
    node = await make_node()
    room = unique("iso")
    a = await RawClient.connected(ws_url(node), token("u", tenant="acme"), codec=codec)
    b = await RawClient.connected(ws_url(node), token("u", tenant="globex"), codec=codec)
    await a.request({"type": "join", "room": room})
    await b.request({"type": "join", "room": room})
    await a.request({"type": "publish", "room": room, "event": "secret", "msg_id": "k"})
    pb = await b.request({"type": "publish", "room": room, "event": "other", "msg_id": "k"})
    assert pb["type"] == "published"
    [ea] = await a.events(1)
    [eb] = await b.events(1)
    assert ea["event"] == "secret" and eb["event"] == "other"
    hb = await b.request({"type": "history", "room": room})
    assert [e["event"] for e in hb["events"]] == ["other"]


@pytest.mark.parametrize("codec", CODECS)
async def test_rate_limit_4009(make_node, codec: str) -> None:
    node = await make_node(rate_per_s=1, rate_burst=3, max_errors_per_min=100)
    room = unique("rl")
    c = await RawClient.connected(ws_url(node), codec=codec)
    replies = [await c.request({"type": "publish", "room": room, "event": "e"})
               for _ in range(5)]
    assert [r["type"] for r in replies[:3]] == ["published"] * 3
    assert replies[4] == {"type": "error", "id": replies[4]["id"], "code": 4009,
                          "reason": "rate limited", "retry": True}


@pytest.mark.parametrize("codec", CODECS)
async def test_frame_and_event_size_4013(make_node, codec: str) -> None:
    node = await make_node(max_frame_bytes=2000, namespaces={"big": {"max_payload_bytes": 500}})
    room = unique("big")
    c = await RawClient.connected(ws_url(node), codec=codec)
    r = await c.request({"type": "publish", "room": room, "event": "e", "data": "x" * 1000})
    assert r["code"] == 4013, "the namespace's max payload"
    await c.send({"type": "publish", "room": room, "event": "e", "data": "x" * 5000, "id": 9})
    err = await c.until("error")
    assert err["code"] == 4013
    assert (await c.request({"type": "ping"}))["type"] == "pong", "4013 keeps the connection"


@pytest.mark.parametrize("codec", CODECS)
async def test_limits_4029(make_node, codec: str) -> None:
    node = await make_node(max_rooms_per_connection=2, max_connections_per_user=2)
    c = await RawClient.connected(ws_url(node), token("lim"))  # @user:lim counts as one room
    assert (await c.request({"type": "join", "room": unique()}))["type"] == "joined"
    r = await c.request({"type": "join", "room": unique()})
    assert r["type"] == "error" and r["code"] == 4029
    await RawClient.connected(ws_url(node), token("lim"), codec=codec)
    third = await RawClient.open(ws_url(node), codec=codec)
    await third.send({"type": "connect", "id": 1, "token": token("lim")})
    code, frames = await third.closed()
    assert code == 4029 and frames[-1]["reconnect"] is False


async def test_origin_allow_list(make_node) -> None:
    node = await make_node(allowed_origins="https://good.example")
    ok = await RawClient.connected(ws_url(node), origin="https://good.example")
    await ok.close()
    with pytest.raises(InvalidStatus) as info:
        await RawClient.open(ws_url(node), origin="https://evil.example")
    assert info.value.response.status_code == 403


async def test_drain_sends_4503(make_node) -> None:
    node = await make_node()
    c = await RawClient.connected(ws_url(node))
    stopping = asyncio.create_task(node.stop())
    code, frames = await c.closed()
    await stopping
    assert code == 4503
    assert frames[-1] == {"type": "disconnect", "code": 4503, "reason": "node shutting down",
                          "reconnect": True}


async def test_volatile_events_live_throttled_not_stored(make_node) -> None:
    node = await make_node(volatile_throttle_ms=300, namespaces={"cur": {"volatile": True}})
    room = unique("vol")
    a = await RawClient.connected(ws_url(node), token("a"))
    b = await RawClient.connected(ws_url(node), token("b"))
    await b.request({"type": "join", "room": room})
    replies = [await a.request({"type": "publish", "room": room, "event": "user:typing",
                                "data": i}) for i in range(5)]
    assert all(r == {"type": "published", "room": room, "id": r["id"]} for r in replies)
    first, last = await b.events(2)
    assert (first["data"], last["data"]) == (0, 4), "the first at once, then the latest"
    assert "seq" not in first and first["from"]["user"] == "a"
    stored = await a.request({"type": "publish", "room": room, "event": "chat:msg"})
    [ev] = await b.events(1)
    assert ev["seq"] == stored["seq"], "nothing else came in between: the 3 others were dropped"
    hist = await b.request({"type": "history", "room": room})
    assert [e["event"] for e in hist["events"]] == ["chat:msg"]
    cur = unique("cur")
    await b.request({"type": "join", "room": cur})
    r = await a.request({"type": "publish", "room": cur, "event": "move", "data": [1, 2]})
    assert "seq" not in r
    [ev] = await b.events(1)
    assert ev["room"] == cur and "seq" not in ev


async def test_heartbeat_closes_a_silent_peer(make_node) -> None:
    """A peer that answers no ping (a raw socket that never reads frames) is closed."""
    import base64
    import os

    node = await make_node(heartbeat_s=0.5, connect_timeout_s=30)  # only the heartbeat acts
    reader, writer = await asyncio.open_connection("127.0.0.1", node.http.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    started = asyncio.get_running_loop().time()
    # never answer: read (pings, then the close) until the node drops the connection
    while await asyncio.wait_for(reader.read(4096), 10):
        pass
    waited = asyncio.get_running_loop().time() - started
    assert waited < 5, f"closed after {waited:.1f} s"
    writer.close()


@pytest.mark.parametrize("codec", CODECS)
async def test_ack(make_node, codec: str) -> None:
    node = await make_node()
    room = unique("ack")
    c = await RawClient.connected(ws_url(node), codec=codec)
    await c.request({"type": "join", "room": room})
    p = await c.request({"type": "publish", "room": room, "event": "e"})
    await c.send({"type": "ack", "room": room, "seq": p["seq"], "id": "a1"})
    assert (await c.request({"type": "ping"}))["type"] == "pong", "an ack gets no reply"
    assert not [f for f in c.buffer if f.get("id") == "a1"]
    r = await c.request({"type": "ack", "room": unique("other"), "seq": 1})
    assert r["type"] == "error" and r["code"] == 4004
