"""Hostile input over the real network, against a real node and NATS: each case is refused with a
clear error (4000), never stored, and the node stays up for everyone else.

The value model (docs/protocol-notes.md, "Value model") is what makes "acknowledged" mean
"deliverable to every member in every codec": these tests send what one codec can say and
another cannot.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from typing import Any

import aiohttp
import cbor2
import pytest

from tests.doors import make_door, mqtt_device, tunnel_request
from tests.integration.test_sse import open_sse
from tests.unit.test_cbor_decoder import message as hostile_message
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


def nest(depth: int, leaf: Any = 1) -> Any:
    """``depth`` lists around ``leaf``."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


async def still_serves(node: Any, room: str | None = None) -> None:
    """Another client can connect, publish and receive: the node is up."""
    room = room or unique("alive")
    c = await RawClient.connected(ws_url(node), token("someone-else"))
    await c.request({"type": "join", "room": room})
    pub = await c.request({"type": "publish", "room": room, "event": "alive", "data": 1})
    assert pub["type"] == "published", pub
    [ev] = await c.events(1, room)
    assert ev["seq"] == pub["seq"]
    await c.close()


async def history_len(node: Any, room: str) -> int:
    c = await RawClient.connected(ws_url(node), token("auditor"))
    hist = await c.request({"type": "history", "room": room})
    await c.close()
    assert hist["type"] == "history", hist
    return len(hist["events"])


async def test_invalid_utf8_in_a_binary_message_on_a_json_connection(make_node) -> None:
    node = await make_node()
    c = await RawClient.connected(ws_url(node))
    await c.ws.send(b'{"type":"ping","id":1,"x":"\xff\xfe"}')
    err = await c.recv()
    assert err["type"] == "error" and err["code"] == 4000, err
    assert (await c.request({"type": "ping"}))["type"] == "pong", "the connection stays"
    await still_serves(node)


async def test_lone_surrogate_in_a_request_id(make_node) -> None:
    node = await make_node()
    c = await RawClient.connected(ws_url(node))
    await c.ws.send(json.dumps({"type": "ping", "id": "\ud800"}))
    err = await c.recv()
    assert err["type"] == "error" and err["code"] == 4000 and "id" not in err, err
    # a lone surrogate in data or msg_id is refused the same way, never stored
    room = unique("sur")
    # (json.dumps writes a lone surrogate as its escape, as a hostile client would)
    await c.ws.send(json.dumps({"type": "publish", "id": 2, "room": room, "event": "e",
                                "data": "\udc00x"}))
    await c.ws.send(json.dumps({"type": "publish", "id": 3, "room": room, "event": "e",
                                "msg_id": "\ud83d"}))
    for _ in range(2):
        err = await c.recv()
        assert err["type"] == "error" and err["code"] == 4000, err
    # a valid pair is one character, and welcome
    ok = await c.request({"type": "publish", "room": room, "event": "e", "data": "\U0001f600"})
    assert ok["type"] == "published"
    assert await history_len(node, room) == 1
    await still_serves(node)


# Pairs of msg_ids that a NATS header would make one (it loses trailing whitespace, and CR and
# LF become spaces), and the escape's own ``%``.
DISTINCT_MSG_IDS = [("a ", "a"), ("a\t", "a"), ("a\rb", "a b"), ("a\nb", "a b"),
                    ("a\u3000", "a"), ("a\x85", "a"), ("a\x1f", "a"), ("a%20", "a "),
                    ("a%", "a%25")]


@pytest.mark.parametrize("door", ["ws-json", "tunnel", "http-api"])
async def test_msg_ids_a_header_would_merge_are_distinct_keys(make_node, door: str) -> None:
    """Two msg_ids that differ only in spacing are two events, each deduplicated on its own:
    they were one ``Nats-Msg-Id``, so the second was answered with the first's seq and never
    stored (acknowledged, and lost)."""
    node = await make_node()
    publisher = make_door(door, node, {"*": ["publish", "join", "history"]})
    await publisher.open()
    try:
        for first, second in DISTINCT_MSG_IDS:
            room = unique("mid")
            a = await publisher.publish(room, "e", 1, first)
            b = await publisher.publish(room, "e", 2, second)
            again = await publisher.publish(room, "e", 3, first)
            assert a.kind == b.kind == "stored" and a.seq != b.seq, (first, second, a, b)
            assert again.seq == a.seq, (first, again)  # a retry is still one event
            reader = await RawClient.connected(ws_url(node), token("reader"))
            hist = await reader.request({"type": "history", "room": room})
            await reader.close()
            assert [e["data"] for e in hist["events"]] == [1, 2], (first, second, hist)
            assert [e["msg_id"] for e in hist["events"]] == [first, second]
    finally:
        await publisher.close()


async def _nul_events(pub: RawClient, room: str) -> list[int]:
    """20 events at the size limit, of NUL characters (64 KB in CBOR, 390 KB in JSON); their
    seqs."""
    seqs = []
    for _ in range(20):
        reply = await pub.request({"type": "publish", "room": room, "event": "nul",
                                   "data": "\x00" * 65000})
        assert reply["type"] == "published", reply
        seqs.append(reply["seq"])
    return seqs


@pytest.mark.parametrize("codec", ["json", "cbor"])
async def test_a_history_page_too_large_for_the_outbox_is_cut_not_a_4008(
        make_node, codec: str) -> None:
    """Events at the size limit, of NUL characters (1 byte in CBOR, 6 in JSON): a page of 20 of
    them is 7.8 MB in JSON, 1.3 MB in CBOR, more than a connection's outbox takes at once
    (``slow_consumer_bytes``, 1 MiB). It used to close the reader with 4008 (and again each time
    it came back and asked); now the page is cut, says ``more: true``, and paging reads all."""
    node = await make_node()
    room = unique("bighist")
    pub = await RawClient.connected(ws_url(node), token("big-writer"), codec="cbor")
    seqs = await _nul_events(pub, room)
    reader = await RawClient.connected(ws_url(node), token("big-reader"), codec=codec)
    page = await reader.request({"type": "history", "room": room})
    assert page["type"] == "history" and page.get("more") is True, {**page, "events": "..."}
    got = [e["seq"] for e in page["events"]]
    assert got and got == seqs[-len(got):]  # the latest, oldest first
    while page.get("more"):
        page = await reader.request({"type": "history", "room": room, "reverse": True,
                                     "since": {"seq": got[0]}})
        assert page["type"] == "history" and page["events"], {**page, "events": "..."}
        got[:0] = reversed([e["seq"] for e in page["events"]])
    assert got == seqs
    assert all(e["data"] == "\x00" * 65000 for e in page["events"])
    forward = await reader.request({"type": "history", "room": room, "since": {"seq": 0}})
    assert forward["more"] is True and [e["seq"] for e in forward["events"]] == seqs[
        :len(forward["events"])]
    assert (await reader.request({"type": "ping"}))["type"] == "pong"
    await reader.close()
    await pub.close()


@pytest.mark.parametrize("codec", ["json", "cbor"])
async def test_a_replay_too_large_for_the_outbox_is_not_a_4008(make_node, codec: str) -> None:
    """The same 20 events of NUL characters, replayed to a join: with ``since`` before them (a
    client coming back), and with ``rewind``. The replay went to the outbox at once, over its
    limit: 4008, and again each time the client came back and joined. Now a recovery that does
    not fit is ``recovered: false`` (the client reloads from history, paged) and a rewind keeps
    its newest events that fit; the connection goes on, live."""
    node = await make_node()
    room = unique("bigreplay")
    pub = await RawClient.connected(ws_url(node), token("big-writer"), codec="cbor")
    first = await pub.request({"type": "publish", "room": room, "event": "small", "data": 1})
    seqs = await _nul_events(pub, room)
    reader = await RawClient.connected(ws_url(node), token("big-reader"), codec=codec)
    for _ in range(2):  # as a client that came back would, again
        joined = await reader.request({"type": "join", "room": room,
                                       "since": {"seq": first["seq"]}})
        assert joined["type"] == "joined" and joined["recovered"] is False, joined
        assert joined["seq"] == seqs[-1] and joined["replayed"] == 0, joined
        assert (await reader.request({"type": "leave", "room": room}))["type"] == "left"
    rewound = await reader.request({"type": "join", "room": room, "rewind": 20})
    assert rewound["type"] == "joined" and 0 < rewound["replayed"] < 20, rewound
    got = [(await reader.recv(10))["seq"] for _ in range(rewound["replayed"])]
    assert got == seqs[-len(got):], got  # the newest that fit, in order
    live = await pub.request({"type": "publish", "room": room, "event": "small", "data": 2})
    event = await reader.recv(10)
    assert (event["type"], event["seq"]) == ("event", live["seq"]), event
    assert (await reader.request({"type": "ping"}))["type"] == "pong"
    await reader.close()
    await pub.close()


async def test_an_api_history_answer_is_cut_at_its_byte_budget(make_node) -> None:
    """/api/history built its whole answer: 1,000 events of 64 KB of NUL characters were 390 MB
    of JSON in the node's memory. It is cut at API_HISTORY_BYTES, with ``more: true``."""
    from bridge.api import API_HISTORY_BYTES

    node = await make_node(api_key="history-key")
    room = unique("apihist")
    pub = await RawClient.connected(ws_url(node), token("big-writer"), codec="cbor")
    seqs = []
    for _ in range(24):  # 24 x 390 KB of JSON: past 8 MiB
        reply = await pub.request({"type": "publish", "room": room, "event": "nul",
                                   "data": "\x00" * 65000})
        seqs.append(reply["seq"])
    await pub.close()
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{node.http.port}/api/history", params={"room": room},
            headers={"X-API-Key": "history-key"}) as resp:
        body = await resp.read()
    assert resp.status == 200 and len(body) <= API_HISTORY_BYTES + 2**20, len(body)
    answer = json.loads(body)
    got = [e["seq"] for e in answer["events"]]
    assert answer["more"] is True and got and got == seqs[-len(got):]


@pytest.mark.parametrize("connected", [True, False])
async def test_a_message_of_many_bad_items_is_cheap_to_refuse(
        make_node, monkeypatch: pytest.MonkeyPatch, connected: bool) -> None:
    """One binary message of 60,000 one-byte CBOR items (each a 4000: not a map), with a token
    and without: every item was decoded, validated and handed to the connection's actor as an
    error, which held the node's loop ~0.5 s a message. A message holds at most one frame per
    11 bytes (the smallest frame), so it is refused whole, unread (no item validated); and a
    message of many frames that are each refused is not validated past ``max_errors_per_min``
    of them (the connection ends on those, whatever follows)."""
    import bridge.ws

    validated = 0
    real_parse = bridge.ws.parse_frame

    def parse(raw: Any) -> Any:
        nonlocal validated
        validated += 1
        return real_parse(raw)

    monkeypatch.setattr(bridge.ws, "parse_frame", parse)
    node = await make_node()
    tolerance = node.settings.max_errors_per_min
    unknown = cbor2.dumps({"type": "zzzz"})  # 11 bytes: as short as a frame may be
    for payload in (b"\x00" * 60000, b"\xa0" * 60000, unknown * 5900):
        c = await (RawClient.connected(ws_url(node), token("many-items"), codec="cbor")
                   if connected else RawClient.open(ws_url(node), codec="cbor"))
        validated = 0
        await c.ws.send(payload)
        if connected and payload != unknown * 5900:
            code, frames = None, [await c.recv(10)]
        else:
            code, frames = await c.closed(10)
        if payload == unknown * 5900:
            assert validated <= tolerance + 1, (validated, tolerance)  # 5,900 before
        else:
            assert validated == 0, validated  # 60,000 before
        if code is None:  # refused whole: one error, and the connection goes on
            [error] = frames
            assert error["code"] == 4000 and "frames in one message" in error["reason"], error
            assert (await c.request({"type": "ping"}))["type"] == "pong"
            await c.close()
        else:
            errors = [f for f in frames if f.get("type") == "error"]
            assert code == 4000 and len(errors) <= 11, (code, frames[-3:])
            assert frames[-1]["type"] == "disconnect", frames[-3:]
    await still_serves(node)


async def test_since_beyond_the_seq_range_is_4000(make_node) -> None:
    node = await make_node()
    room = unique("since")
    c = await RawClient.connected(ws_url(node))
    for big in (2**63, 2**64, 10**30):
        for frame in ({"type": "join", "room": room, "since": {"seq": big}},
                      {"type": "history", "room": room, "since": {"seq": big}},
                      {"type": "ack", "room": room, "seq": big}):
            r = await c.request(frame)
            assert r["type"] == "error" and r["code"] == 4000 and r["retry"] is False, (frame, r)
    # the largest seq a client may name is answered, not failed
    top = 2**63 - 1
    joined = await c.request({"type": "join", "room": room, "since": {"seq": top}})
    assert joined["type"] == "joined" and joined["recovered"] is False, joined
    hist = await c.request({"type": "history", "room": room, "since": {"seq": top}})
    assert hist["type"] == "history" and hist["events"] == [], hist
    await still_serves(node)


async def test_mqtt_subscribe_with_a_trailing_newline_is_refused(make_node) -> None:
    node = await make_node()
    room = unique("nl")
    async with mqtt_device(node, "nl-dev") as dev:
        granted = await dev.subscribe(f"rooms/{room}\n", qos=0)
        assert granted == [128], granted
        await dev.publish(f"rooms/{room}\n/up", cbor2.dumps({"event": "e", "data": 1}), qos=1)
        assert (await dev.subscribe(f"rooms/{room}", qos=0)) in ([0], [1]), "a real name is fine"
    assert node.mqtt.refused_subscribes >= 1
    assert await history_len(node, room) == 0
    await still_serves(node, room)


@pytest.mark.parametrize("first", [
    '{"type":"join"}', '{"type":"connect","token":7}', "{not json", '{"type":"nope"}',
])
async def test_a_malformed_first_frame_ends_the_connection(make_node, first: str) -> None:
    node = await make_node()
    c = await RawClient.open(ws_url(node))
    await c.ws.send(first)
    code, frames = await c.closed(timeout=5)
    assert code == 4000, (code, frames)
    assert frames and frames[-1]["type"] == "disconnect" and frames[-1]["code"] == 4000
    await still_serves(node)


CBOR_ONLY = {
    "undefined": cbor2.undefined,
    "simple": cbor2.CBORSimpleValue(16),
    "nan": math.nan,
    "bytes key": {b"k": 1},
    "int key": {1: "a"},
    "below -2^63": -(2**63) - 1,
}


async def _members(node: Any, room: str) -> tuple[RawClient, RawClient]:
    j = await RawClient.connected(ws_url(node), token("json-member"), codec="json")
    c = await RawClient.connected(ws_url(node), token("cbor-member"), codec="cbor")
    for m in (j, c):
        await m.request({"type": "join", "room": room})
    return j, c


async def _nothing_but(members: tuple[RawClient, RawClient], node: Any, room: str) -> None:
    """The next event each member gets is a fresh valid one: nothing hostile was delivered."""
    pub = await members[0].request({"type": "publish", "room": room, "event": "after",
                                    "data": "ok"})
    for m in members:
        [ev] = await m.events(1, room)
        assert ev["event"] == "after" and ev["seq"] == pub["seq"], ev
    assert await history_len(node, room) == 1


@pytest.mark.parametrize("case", list(CBOR_ONLY))
async def test_cbor_values_json_cannot_hold_are_refused_on_ws(make_node, case: str) -> None:
    node = await make_node()
    room = unique("cb")
    members = await _members(node, room)
    c = await RawClient.connected(ws_url(node), codec="cbor")
    await c.send({"type": "publish", "id": 1, "room": room, "event": "e",
                  "data": {"x": [CBOR_ONLY[case]]}})
    r = await c.recv()
    assert r["type"] == "error" and r["code"] == 4000, r
    # An int key is refused by the strict decoder; read again, the frame is answered by its id.
    assert r["id"] == 1 and "data.x[0]" in r["reason"], r
    await _nothing_but(members, node, room)


async def test_cbor_tags_are_refused_on_ws(make_node) -> None:
    node = await make_node()
    room = unique("tag")
    members = await _members(node, room)
    c = await RawClient.connected(ws_url(node), codec="cbor")
    head = cbor2.dumps({"type": "publish", "id": 1, "room": room, "event": "e"})[1:]
    await c.ws.send(bytes([0xA5]) + head + cbor2.dumps("data") + b"\xc1\x1a\x00\x00\x00\x01")
    err = await c.recv()
    assert err["type"] == "error" and err["code"] == 4000, err
    assert err["id"] == 1 and err["reason"] == "bad value at data: a CBOR tag is not allowed", err
    await _nothing_but(members, node, room)


@pytest.mark.parametrize("case", ["undefined", "simple", "nan", "bytes key", "int key"])
async def test_cbor_values_are_refused_in_the_mqtt_tunnel(make_node, case: str) -> None:
    node = await make_node()
    room = unique("tun")
    members = await _members(node, room)
    async with mqtt_device(node, "tun-1") as dev:
        await dev.subscribe("rtnode/v1/tun-1/out", qos=1)
        reply = await tunnel_request(dev, "tun-1", {"type": "publish", "id": 9, "room": room,
                                                    "event": "e", "data": CBOR_ONLY[case]})
        assert reply["type"] == "error" and reply["code"] == 4000 and reply["id"] == 9, reply
    await _nothing_but(members, node, room)


@pytest.mark.parametrize("case", ["undefined", "simple", "nan", "tag", "too deep", "-2^64"])
async def test_hostile_plain_uplinks_are_dropped_and_counted(make_node, case: str) -> None:
    node = await make_node()
    room = unique("up")
    members = await _members(node, room)
    if case == "tag":
        payload = bytes([0xA2]) + cbor2.dumps({"event": "e"})[1:] + cbor2.dumps("data") + \
            b"\xc1\x01"
    elif case == "too deep":
        payload = cbor2.dumps({"event": "e", "data": nest(33)})
    elif case == "-2^64":
        payload = cbor2.dumps({"event": "e", "data": -(2**64)})
    else:
        payload = cbor2.dumps({"event": "e", "data": CBOR_ONLY[case]})
    before = node.mqtt.bad_payloads + node.mqtt.refused_publishes
    async with mqtt_device(node, "up-1") as dev:
        await dev.publish(f"rooms/{room}/up", payload, qos=1)  # PUBACKed: MQTT has no nack
    assert node.mqtt.bad_payloads + node.mqtt.refused_publishes == before + 1
    await _nothing_but(members, node, room)


@pytest.mark.parametrize("seed", [3, 17])
async def test_seeded_hostile_cbor_uplinks_among_valid_readings(make_node, seed: int) -> None:
    """A device sends a seeded mix of valid readings and hostile CBOR (tags, duplicate keys,
    indefinite lengths, bad UTF-8, trailing items, messages cut short or with a byte changed)
    as plain uplinks: each hostile one is dropped and counted, every valid one is stored and
    reaches both members once, in order, and the node goes on serving."""
    rng = random.Random(seed)
    node = await make_node()
    room = unique("mix")
    members = await _members(node, room)
    valid = hostile = 0
    before = node.mqtt.bad_payloads
    async with mqtt_device(node, f"mix-{seed}") as dev:
        for _ in range(150):
            if rng.random() < 0.4:
                payload = cbor2.dumps({"event": "reading", "data": {"i": valid},
                                       "msg_id": f"r{valid}"})
                valid += 1
            else:  # a third of them a whole reading with bytes after it: one item only
                payload = hostile_message(rng)
                if rng.random() < 0.33:
                    payload = cbor2.dumps({"event": "reading", "data": {"i": -1}}) + payload
                hostile += 1
            await dev.publish(f"rooms/{room}/up", payload, qos=1)
    assert hostile > 50 and valid > 30
    assert node.mqtt.bad_payloads == before + hostile
    for m in members:
        got = await m.events(valid, room)
        assert [e["data"] for e in got] == [{"i": i} for i in range(valid)]
    pub = await members[0].request({"type": "publish", "room": room, "event": "after"})
    for m in members:
        [ev] = await m.events(1, room)
        assert ev["event"] == "after" and ev["seq"] == pub["seq"], ev
    assert await history_len(node, room) == valid + 1
    await still_serves(node)


@pytest.mark.parametrize("case", ["2^64", "-2^63-1", "1e400", "33 deep", "NaN", "-Infinity",
                                  "lone surrogate"])
async def test_json_values_beyond_the_model_are_4000(make_node, case: str) -> None:
    node = await make_node()
    room = unique("js")
    members = await _members(node, room)
    c = await RawClient.connected(ws_url(node))
    # NaN, Infinity and lone surrogates fail the strict decoder; read again, the frame is
    # answered by its id, with the path, as the others are.
    data = {"2^64": "18446744073709551616", "-2^63-1": "-9223372036854775809",
            "1e400": "1e400", "33 deep": json.dumps(nest(33)), "NaN": "NaN",
            "-Infinity": "-Infinity", "lone surrogate": '"\\ud800"'}[case]
    await c.ws.send(json.dumps({"type": "publish", "id": 5, "room": room, "event": "e",
                                "data": {"v": "V"}}).replace('"V"', data))
    r = await c.recv()
    assert r["type"] == "error" and r["code"] == 4000 and r["id"] == 5, r
    assert "data.v" in r["reason"], r["reason"]
    async with aiohttp.ClientSession() as http:
        body = json.dumps({"room": room, "event": "e", "data": {"v": "V"}}).replace('"V"', data)
        async with http.post(f"http://127.0.0.1:{node.http.port}/api/publish", data=body,
                             headers={"Authorization": "Bearer "
                                      + token("svc", kind="service")}) as resp:
            assert resp.status == 400 and (await resp.json())["code"] == 4000
    await _nothing_but(members, node, room)


async def test_values_at_the_limits_reach_every_reader(make_node) -> None:
    """What the writer accepts at the edge of the model, every reader delivers."""
    node = await make_node(api_key="k")
    room = unique("edge")
    members = await _members(node, room)
    data = {"max": 2**64 - 1, "min": -(2**63), "deep": nest(31), "f": 1.5e308,
            "s": "\U0001f600\u00e9", "b": None, "t": True}
    async with open_sse(node, [room], token("sse")) as sse:
        await sse.joined()
        for codec in ("json", "cbor"):
            c = await RawClient.connected(ws_url(node), codec=codec)
            pub = await c.request({"type": "publish", "room": room, "event": codec,
                                   "data": data})
            assert pub["type"] == "published", pub
            for m in members:
                [ev] = await m.events(1, room)
                assert ev["data"] == data and ev["event"] == codec
            msg = await sse.message()
            assert json.loads(msg["data"])["data"] == data
    for m in members:
        hist = await m.request({"type": "history", "room": room})
        assert [e["data"] for e in hist["events"]] == [data, data]
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{node.http.port}/api/history", params={"room": room},
            headers={"X-API-Key": "k"}) as resp:
        assert resp.status == 200
        assert [e["data"] for e in (await resp.json())["events"]] == [data, data]


async def test_legacy_events_the_model_refuses_are_delivered_safely_once(make_node) -> None:
    """Events stored before the value model (or written to the stream by a backend) that JSON
    cannot hold reach every member once, in a safe form; the room never crashes on them."""
    node = await make_node(api_key="k")
    room = unique("legacy")
    members = await _members(node, room)
    bad = {"u": cbor2.undefined, "s": cbor2.CBORSimpleValue(16), "n": math.nan,
           "k": {b"\x01": 1}, "i": -(2**64)}
    body = cbor2.dumps({"room": room, "event": "old", "data": bad, "ts": 1,
                        "from": {"user": "legacy", "kind": "user"}})
    seq, _ = await node.store.publish("default", room, body, f"legacy-{room}")
    pub = await members[0].request({"type": "publish", "room": room, "event": "new",
                                    "data": 1})
    j, c = members
    [old, new] = await j.events(2, room)
    assert old["seq"] == seq and old["data"] == {"u": None, "s": None, "n": None,
                                                 "k": {"AQ==": 1}, "i": None}
    assert new["seq"] == pub["seq"]
    [old_c, new_c] = await c.events(2, room)
    assert old_c["seq"] == seq and new_c["seq"] == pub["seq"]
    await asyncio.sleep(0.3)
    assert not [f for f in j.buffer + c.buffer if f.get("type") == "event"], "no duplicates"
    hist = await j.request({"type": "history", "room": room})
    assert [e["seq"] for e in hist["events"]] == [seq, pub["seq"]]
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{node.http.port}/api/history", params={"room": room},
            headers={"X-API-Key": "k"}) as resp:
        assert resp.status == 200
        assert len((await resp.json())["events"]) == 2
    await still_serves(node, room)


async def test_rpc_params_and_results_follow_the_value_model(make_node) -> None:
    node = await make_node()
    target = await RawClient.connected(ws_url(node), token("json-target"), codec="json")
    caller = await RawClient.connected(ws_url(node), token("caller", rpc=["user:*"]),
                                       codec="cbor")
    r = await caller.request({"type": "rpc", "to": "user:json-target", "method": "m",
                              "params": {"x": cbor2.undefined}})
    assert r["type"] == "error" and r["code"] == 4000 and "params.x" in r["reason"], r
    assert (await target.request({"type": "ping"}))["type"] == "pong", "target still here"

    async def answer() -> None:
        f = await target.until("rpc")
        await target.ws.send(json.dumps({"type": "reply", "id": f["id"],
                                         "result": {"n": 2**64}}))
        err = await target.until("error")
        assert err["code"] == 4000 and "result.n" in err["reason"], err

    responder = asyncio.create_task(answer())
    r = await caller.request({"type": "rpc", "to": "user:json-target", "method": "m",
                              "params": {"x": 1}})
    await responder
    assert r["type"] == "error" and r["code"] == 4500, r
    assert (await caller.request({"type": "ping"}))["type"] == "pong"
    assert (await target.request({"type": "ping"}))["type"] == "pong"
