"""Seeded values through every door, read back by every kind of member and reader.

"What one door accepts, every member in every codec can receive" (docs/protocol-notes.md,
"Value model"). One node, one room. Publishes with ``data`` drawn at random (the frame fuzz's
values: integers at and past the 64-bit edges, NaN, -0.0, odd text, byte strings, tags and
simple values, keys that are not text, deep nesting), each through a door drawn at random:
WebSocket JSON and CBOR, the MQTT tunnel, a plain MQTT uplink as CBOR or as JSON, and
``POST /api/publish``; now and then sent again with the same ``msg_id``. Reading the room:
WebSocket members in JSON and CBOR, an SSE stream, a plain MQTT subscriber of ``rooms/<room>``,
a tunnel device; then ``history`` in both codecs, ``/api/history``, a durable replay consumer
and the webhook body it would POST. Members' messages are decoded with ``json`` and ``cbor2``,
not the node's codecs.

Held: a value inside the model (an oracle written here, apart from the node's check) is stored
once by every door, a value outside it refused with 4000 by every door (never a 4500, never
stored); every member and reader gets each stored event exactly once, in seq order, with the
value that was sent: as is in CBOR, byte strings as base64 text in JSON, types kept (an integer
stays an integer, -0.0 keeps its sign). ``RTNODE_TEST_VALUE_FUZZ_SEED`` repeats a run (printed
first; random by default).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import math
import os
import random
import uuid
from typing import Any

import aiohttp
import aiomqtt
import cbor2
import pytest

from bridge.replay import ReplayConsumer
from bridge.webhook import webhook_body
from node.protocol.values import INT_MAX, INT_MIN, MAX_DEPTH
from tests.doors import DOORS, Outcome, PlainMqttDoor, mqtt_device, tunnel_request
from tests.integration.test_frame_fuzz import _base64, _hostile
from tests.integration.test_request_limits import OPEN
from tests.integration.test_sse import open_sse
from tests.wsclient import ALL_RIGHTS, RawClient, as_json_member, token, unique, ws_url

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("RTNODE_TEST_VALUE_FUZZ_SEED") or random.randrange(1 << 32))
PUBLISHES = 70
MAX_BYTES = 20_000  # drawn values are kept well under the room's size limit (64 KiB)
SERVICE = {"Authorization": f"Bearer {token('vf-backend', kind='service')}"}


class PlainJsonDoor(PlainMqttDoor):
    """A JSON object on ``rooms/<room>/up`` (docs/devices.md: read as JSON when it starts
    with ``{``)."""

    name = "mqtt-plain-json"
    codec = "json"

    async def publish(self, room: str, event: str, data: Any, msg_id: str | None,
                      *, allowed: bool = True, fields: dict[str, Any] | None = None) -> Outcome:
        before, unread = self._counts(self.door), self._unread()
        body: dict[str, Any] = {"event": event, "data": data}
        if msg_id is not None:
            body["msg_id"] = msg_id
        await self.devices[allowed].publish(f"rooms/{room}/up", json.dumps(body), qos=1)
        return await self._counted(self.door, before, unread)


def inside(value: Any, depth: int = 0) -> bool:
    """The value model, written apart from node.protocol.values: the test's oracle."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return INT_MIN <= value <= INT_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, bytes):
        return True
    if isinstance(value, list):
        return depth < MAX_DEPTH and all(inside(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return depth < MAX_DEPTH and all(
            isinstance(k, str) and inside(k) and inside(v, depth + 1) for k, v in value.items())
    return False  # tags, undefined, simple values


def canon(value: Any) -> Any:
    """``value`` with its types spelled out, for comparisons that ``==`` would blur
    (1 == 1.0 == True, 0.0 == -0.0); map order does not count."""
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, list):
        return ("list", [canon(v) for v in value])
    if isinstance(value, dict):
        return ("map", sorted((repr(k), canon(v)) for k, v in value.items()))
    return (type(value).__name__, value)


def _draw(rng: random.Random, codec: str) -> tuple[Any, Any]:
    """A value to send through a door of ``codec``, and the value the node reads from it
    (the same, for JSON doors: byte strings as base64 text already, as a peer writes them)."""
    while True:
        value = _hostile(rng, codec == "cbor")
        if codec == "cbor":
            wire = cbor2.dumps(value)
            read = value
        else:
            text = json.dumps(value, default=_base64)
            wire = text.encode()
            value = read = json.loads(text)
        if len(wire) <= MAX_BYTES:
            return value, read


def _frames(message: str | bytes) -> list[Any]:
    """The frames of one WebSocket message, decoded by ``json`` or ``cbor2``."""
    if isinstance(message, str):
        return [json.loads(line) for line in message.split("\n") if line]
    stream, frames = io.BytesIO(message), []
    while stream.tell() < len(message):
        frames.append(cbor2.CBORDecoder(stream).decode())
    return frames


class Readers:
    """Every kind of member of one room, each collecting that room's events: name -> list of
    (seq, event name, data)."""

    def __init__(self, node: Any, room: str, stack: contextlib.AsyncExitStack) -> None:
        self.node, self.room, self.stack = node, room, stack
        self.got: dict[str, list[tuple[int, str, Any]]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.arrived = asyncio.Event()

    def _keep(self, name: str, event: dict[str, Any]) -> None:
        if event.get("room") == self.room and "seq" in event:
            self.got[name].append((event["seq"], event["event"], event.get("data")))
            self.arrived.set()

    async def open(self) -> None:
        for codec in ("json", "cbor"):
            client = await RawClient.connected(ws_url(self.node), token(f"vf-{codec}"),
                                               codec=codec)
            self.stack.push_async_callback(client.close)
            assert (await client.request({"type": "join", "room": self.room}))["type"] == "joined"
            self._read(f"ws-{codec}", self._ws(f"ws-{codec}", client))
        sse = await self.stack.enter_async_context(open_sse(self.node, [self.room]))
        await sse.joined()
        self._read("sse", self._sse(sse))
        plain = f"vf-sub-{uuid.uuid4().hex[:6]}"
        sub = await self.stack.enter_async_context(
            mqtt_device(self.node, plain, rooms={"*": ["join"]}))
        await sub.subscribe(f"rooms/{self.room}", qos=1)
        self._read("mqtt-plain", self._mqtt("mqtt-plain", sub))
        dev = f"vf-tun-{uuid.uuid4().hex[:6]}"
        tun = await self.stack.enter_async_context(mqtt_device(self.node, dev,
                                                               rooms={"*": ["join"]}))
        await tun.subscribe(f"rtnode/v1/{dev}/out", qos=1)
        joined = await tunnel_request(tun, dev, {"type": "join", "id": 1, "room": self.room})
        assert joined["type"] == "joined", joined
        self._read("tunnel", self._mqtt("tunnel", tun))
        # The plain subscriber is in the room once its join counts: a publish it sees.
        await self._settle()

    def _read(self, name: str, reader: Any) -> None:
        self.got[name] = []
        task = asyncio.create_task(reader)
        task.add_done_callback(lambda _: self.arrived.set())  # a reader that failed says so
        self.tasks.append(task)

    async def _ws(self, name: str, client: RawClient) -> None:
        while True:
            for frame in _frames(await client.ws.recv()):
                if isinstance(frame, dict) and frame.get("type") == "event":
                    self._keep(name, frame)

    async def _sse(self, sse: Any) -> None:
        while True:
            message = await sse.message(timeout=3600)
            if "id" in message:
                self._keep("sse", json.loads(message["data"]))

    async def _mqtt(self, name: str, client: aiomqtt.Client) -> None:
        """A plain subscriber's payloads are event maps; a tunnel device's are frames, of
        which the events count."""
        async for message in client.messages:
            payload = cbor2.loads(bytes(message.payload))
            if name == "mqtt-plain" or payload.get("type") == "event":
                self._keep(name, payload)

    async def _settle(self) -> None:
        """Wait until every reader has an event published now (their subscriptions hold)."""
        ws = await RawClient.connected(ws_url(self.node), token("vf-settle", rooms={
            "*": ALL_RIGHTS}))
        try:
            reply = await ws.request({"type": "publish", "room": self.room, "event": "settle"})
            assert reply["type"] == "published", reply
        finally:
            await ws.close()
        await self.until(reply["seq"])

    async def until(self, seq: int) -> None:
        """Wait until every reader got the event ``seq`` (a reader that failed raises)."""
        async with asyncio.timeout(30):
            while not all(any(s == seq for s, _, _ in got) for got in self.got.values()):
                for task in self.tasks:
                    if task.done():
                        task.result()
                self.arrived.clear()
                await self.arrived.wait()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _replayed(node: Any, room: str, last: int) -> dict[str, list[tuple[int, str, Any]]]:
    """The room's stored events up to ``last`` as a durable replay consumer yields them (CBOR,
    as stored) and as its webhook would POST them (JSON)."""
    replay: list[tuple[int, str, Any]] = []
    webhook: list[tuple[int, str, Any]] = []
    async with ReplayConsumer(node.settings.nats_url, rooms=room,
                              durable=f"vf-{uuid.uuid4().hex[:8]}") as consumer:
        while not replay or replay[-1][0] < last:
            ev = await consumer.next(timeout=30)
            assert ev is not None, f"the replay stopped at {replay[-1:]}"
            replay.append((ev.seq, ev.event, ev.data))
            body = json.loads(webhook_body(ev))
            webhook.append((body["seq"], body["event"], body["data"]))
            await ev.ack()
    return {"replay": replay, "webhook": webhook}


async def _history(node: Any, room: str) -> dict[str, list[tuple[int, str, Any]]]:
    """The room's stored events, page by page, through ``history`` in both codecs and
    ``/api/history``, decoded by ``json`` and ``cbor2``."""
    out: dict[str, list[tuple[int, str, Any]]] = {}
    for codec in ("json", "cbor"):
        client = await RawClient.connected(ws_url(node), token(f"vf-h-{codec}"), codec=codec)
        try:
            out[f"history-{codec}"] = events = []
            since = 0
            while True:
                frame = {"type": "history", "id": "h", "room": room, "since": {"seq": since},
                         "limit": 100}
                await client.ws.send(cbor2.dumps(frame) if codec == "cbor"
                                     else json.dumps(frame))
                replies: list[Any] = []
                while not replies:
                    replies = [f for f in _frames(await client.ws.recv()) if f.get("id") == "h"]
                [reply] = replies
                assert reply["type"] == "history", reply
                events += [(e["seq"], e["event"], e.get("data")) for e in reply["events"]]
                if not reply["events"] or not (reply.get("more") or len(reply["events"]) == 100):
                    break
                since = events[-1][0]
        finally:
            await client.close()
    url = f"http://127.0.0.1:{node.http.port}/api/history"
    out["api-history"] = events = []
    since = 0
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(url, params={"room": room, "since": since, "limit": 100},
                                headers=SERVICE) as resp:
                assert resp.status == 200, await resp.text()
                page = json.loads(await resp.text())
            events += [(e["seq"], e["event"], e.get("data")) for e in page["events"]]
            if not page["events"] or not (page.get("more") or len(page["events"]) == 100):
                break
            since = events[-1][0]
    return out


async def test_seeded_values_through_every_door_reach_every_reader(make_node: Any) -> None:
    print(f"\nvalue fuzz: seed {SEED} (RTNODE_TEST_VALUE_FUZZ_SEED={SEED})")
    rng = random.Random(SEED)
    node = await make_node(**OPEN, max_errors_per_min=100_000)
    room = unique("vf")
    doors = {**{name: cls(node, {"*": ALL_RIGHTS}) for name, cls in DOORS.items()},
             PlainJsonDoor.name: PlainJsonDoor(node, {"*": ALL_RIGHTS})}
    sent: list[tuple[int | None, Any, str]] = []  # (seq if told, value read by the node, door)
    outcomes: dict[tuple[str, str], int] = {}
    async with contextlib.AsyncExitStack() as stack:
        readers = Readers(node, room, stack)
        await readers.open()
        for door in doors.values():
            await door.open()
            stack.push_async_callback(door.close)
        for i in range(PUBLISHES):
            name = rng.choice(sorted(doors))
            door = doors[name]
            value, read = _draw(rng, door.codec)
            msg_id = f"vf-{i}" if rng.random() < 0.5 else None
            outcome = await door.publish(room, "e", value, msg_id)
            ok = inside(read)
            expected = "stored" if ok else "refused"
            assert outcome.kind == expected and (ok or outcome.code == 4000), (
                f"seed {SEED}, publish {i} via {name}: {outcome} for {value!r}")
            outcomes[name, outcome.kind] = outcomes.get((name, outcome.kind), 0) + 1
            if not ok:
                continue
            sent.append((outcome.seq, read, name))
            if msg_id is not None and rng.random() < 0.3:  # a retry: stored once, same seq
                again = await door.publish(room, "e", value, msg_id)
                assert again.kind == "stored" and again.seq == outcome.seq, (
                    f"seed {SEED}, retry of publish {i} via {name}: {again} after {outcome}")
        sentinel = await doors["ws-json"].publish(room, "end", None, None)
        await readers.until(sentinel.seq)
        await readers.close()
        got = {**readers.got, **await _history(node, room),
               **await _replayed(node, room, sentinel.seq)}
    print("value fuzz: outcomes " + ", ".join(f"{d} {k} {n}" for (d, k), n in
                                              sorted(outcomes.items())))
    assert sent, "nothing was stored"
    for reader, events in got.items():
        events = [e for e in events if e[1] == "e"]
        seqs = [s for s, _, _ in events]
        assert seqs == sorted(set(seqs)), f"seed {SEED}, {reader}: seqs {seqs}"
        assert len(events) == len(sent), (
            f"seed {SEED}, {reader}: {len(events)} events, {len(sent)} stored")
        as_json = reader in ("ws-json", "sse", "history-json", "api-history", "webhook")
        for (seq, _, data), (told, read, door) in zip(events, sent, strict=True):
            assert told is None or told == seq, f"seed {SEED}, {reader}: seq {seq} != {told}"
            want = as_json_member(read) if as_json else read
            assert canon(data) == canon(want), (
                f"seed {SEED}, {reader}, seq {seq} (via {door}): got {data!r}, sent {read!r}")


def test_the_oracle_agrees_with_the_docs() -> None:
    nest: Any = 1
    for _ in range(MAX_DEPTH):
        nest = [nest]
    assert inside(nest) and not inside([nest]) and inside({"k": nest[0]})
    assert not inside({"k": nest})
    for value in (INT_MAX, INT_MIN, -0.0, 5e-324, "\U0001f600", b"\x00", {"": None}):
        assert inside(value), value
    for value in (INT_MAX + 1, INT_MIN - 1, math.nan, math.inf, "\ud800", {5: 1},
                  cbor2.undefined, cbor2.CBORTag(1, 5), cbor2.CBORSimpleValue(99)):
        assert not inside(value), value
    assert canon(1) != canon(1.0) != canon(True) and canon(0.0) != canon(-0.0)
    assert canon(base64.b64encode(b"x").decode()) == canon(as_json_member(b"x"))


EVENTS = ["e", "reading", "a:b:c", "x" * 64, "x" * 65, "x" * 300, "", " ", "a b", "é", "a\x00b",
          "a\nb", "a.b", "*", ">", "user:typing", "presence:join", "presence", "sys:all:x",
          "state:set", "\U0001f600", "\u2028", "\ud800", "-", "a/b", "+", "#"]
MSG_IDS = [None, None, "m1", "m2", "", " ", "m1 ", "m1\n", "m1\r\nx", "a%20b", "a b", "\x00",
           "é", "x" * 64, "x" * 65, "x" * 300, "../x", "a/b", "a.b", "*", "\u3000", "\ud800",
           "k:1", "+", "#", "$"]
JSON_DOORS = ("ws-json", "http-api", "mqtt-plain-json")


def _ws_events(frames: list[Any], rooms: dict[str, str],
               got: dict[str, list[tuple[str, Any]]]) -> None:
    for f in frames:
        if isinstance(f, dict) and f.get("type") == "event" and "seq" in f \
                and f.get("room") in rooms:
            got[rooms[f["room"]]].append((f["event"], f.get("msg_id")))


async def test_seeded_event_names_and_msg_ids_get_one_outcome_at_every_door(
        make_node: Any) -> None:
    """Hostile ``event`` and ``msg_id`` through every door, each door publishing to a room of
    its own: every door that can spell them gives the same outcome (a name with a lone
    surrogate only the JSON doors can send), and each room's members get its stored events once
    each, with ``event`` and ``msg_id`` as sent: a repeated ``msg_id`` (of the same publisher,
    in the same room) is stored once, two that differ (``m1`` and ``m1 ``) twice."""
    print(f"\nvalue fuzz: seed {SEED} (RTNODE_TEST_VALUE_FUZZ_SEED={SEED})")
    rng = random.Random(SEED ^ 0x5EED)
    node = await make_node(**OPEN, max_errors_per_min=100_000)
    doors = {**{name: cls(node, {"*": ALL_RIGHTS}) for name, cls in DOORS.items()},
             PlainJsonDoor.name: PlainJsonDoor(node, {"*": ALL_RIGHTS})}
    rooms = {unique("vn"): name for name in doors}
    room_of = {name: room for room, name in rooms.items()}
    expected: dict[str, list[tuple[str, Any]]] = {name: [] for name in doors}
    seen: dict[str, set[Any]] = {name: set() for name in doors}
    got: dict[str, dict[str, list[tuple[str, Any]]]] = {}
    async with contextlib.AsyncExitStack() as stack:
        members = {}
        for codec in ("json", "cbor"):
            members[codec] = m = await RawClient.connected(ws_url(node), token(f"vn-{codec}"),
                                                           codec=codec)
            stack.push_async_callback(m.close)
            for room in rooms:
                assert (await m.request({"type": "join", "room": room}))["type"] == "joined"
            got[codec] = {name: [] for name in doors}
            # Frames already read by request() (events of another room's join) stay there.
            _ws_events(m.buffer, rooms, got[codec])
            m.buffer.clear()
        for door in doors.values():
            await door.open()
            stack.push_async_callback(door.close)
        for i in range(40):
            event, msg_id = rng.choice(EVENTS), rng.choice(MSG_IDS)
            lone = "\ud800" in event or "\ud800" in (msg_id or "")
            outcomes = {}
            for name in (JSON_DOORS if lone else sorted(doors)):
                outcome = await doors[name].publish(room_of[name], event, {"i": i}, msg_id)
                outcomes[name] = outcome.same()
                if outcome.kind == "stored" and (msg_id is None or msg_id not in seen[name]):
                    expected[name].append((event, msg_id))
                    seen[name].add(msg_id)
            assert len(set(outcomes.values())) == 1, (
                f"seed {SEED}, draw {i}: event {event!r}, msg_id {msg_id!r}: {outcomes}")
            assert outcomes[JSON_DOORS[0]][0] != "refused" or \
                outcomes[JSON_DOORS[0]][1] in (4000, 4003), outcomes
        for name in doors:
            end = await doors["ws-json"].publish(room_of[name], "end", None, None)
            assert end.kind == "stored"
        for codec, m in members.items():
            ends = 0
            async with asyncio.timeout(30):
                while ends < len(doors):
                    frames = _frames(await m.ws.recv())
                    ends += sum(1 for f in frames if isinstance(f, dict)
                                and f.get("type") == "event" and f.get("event") == "end")
                    _ws_events(frames, rooms, got[codec])
    for codec in got:
        for name in doors:
            events = [e for e in got[codec][name] if e[0] != "end"]
            assert events == expected[name], f"seed {SEED}, {codec} member, door {name}"
