"""One admission pipeline: the same cases through every door, the same outcome from each.

Doors: WebSocket JSON and CBOR, the MQTT tunnel, a plain MQTT uplink on ``rooms/<room>/up``,
``POST /api/publish``, and an uplink through an external broker (Mosquitto) bridged by the
node. A JSON and a CBOR member of each case's room check what was delivered, and ``history``
what was stored: refused events never are, volatile ones are delivered but never stored, a
duplicate ``msg_id`` is stored once.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

import cbor2
import pytest

from node.protocol.frames import CBOR
from tests.doors import DOORS, Outcome, make_door
from tests.integration.test_mqtt_external import mosquitto  # noqa: F401  (a fixture)
from tests.wsclient import ALL_RIGHTS, RawClient, as_json_member, token, unique, ws_url

pytestmark = pytest.mark.integration

SMALL = {"small": {"max_payload_bytes": 300}, "st": {"state": True}}


@dataclass(frozen=True)
class Case:
    name: str
    expect: Outcome
    namespace: str = "chat"
    event: str = "chat:msg"
    data: Any = None
    msg_id: str | None = None
    allowed: bool = True
    times: int = 1
    fields: dict[str, Any] | None = None  # more fields of the publish (key, unset)


BAD_VALUE = {"json": {"v": [1, 2**64]}, "cbor": {"v": [1, cbor2.undefined]}}

CASES = [
    Case("valid", Outcome("stored"), data={"t": 21.5, "b": True}),
    Case("oversized", Outcome("refused", 4013), namespace="small", data="x" * 400),
    Case("bad value", Outcome("refused", 4000), data=BAD_VALUE),
    Case("reserved event name", Outcome("refused", 4003), event="presence:join", data={}),
    Case("volatile event", Outcome("volatile"), event="user:typing", data={"on": True}),
    Case("no right", Outcome("refused", 4003), data=1, allowed=False),
    Case("duplicate msg_id", Outcome("stored"), data=2, msg_id="same", times=2),
    # State rooms (issue 13): key and unset only there, unset without data.
    Case("key in a state room", Outcome("stored"), namespace="st", data=3,
         fields={"key": "setpoint"}),
    Case("key outside a state room", Outcome("refused", 4000), data=4, fields={"key": "k"}),
    Case("unset outside a state room", Outcome("refused", 4000), fields={"unset": True}),
    Case("unset with data", Outcome("refused", 4000), namespace="st", data=5,
         fields={"key": "k", "unset": True}),
]


class Members:
    """A JSON and a CBOR member, joined to each case's room."""

    def __init__(self, node: Any) -> None:
        self.node = node

    async def open(self) -> None:
        self.json = await RawClient.connected(ws_url(self.node), token("m-json"), codec="json")
        self.cbor = await RawClient.connected(ws_url(self.node), token("m-cbor"), codec="cbor")

    async def join(self, room: str) -> None:
        for m in (self.json, self.cbor):
            joined = await m.request({"type": "join", "room": room})
            assert joined["type"] == "joined", joined

    async def delivered(self, room: str, volatile: bool) -> list[dict[str, Any]]:
        """What each member got in ``room`` (the same for both), up to a sentinel event."""
        if volatile:  # not stored: no sentinel can order it; wait for it
            got = [await m.events(1, room) for m in (self.json, self.cbor)]
            assert got[0][0]["data"] == got[1][0]["data"]
            return got[0]
        sentinel = await self.json.request({"type": "publish", "room": room,
                                            "event": "sentinel"})
        got = []
        for m in (self.json, self.cbor):
            events = []
            while not events or events[-1]["event"] != "sentinel":
                [ev] = await m.events(1, room)
                events.append(ev)
            assert events[-1]["seq"] == sentinel["seq"]
            got.append(events[:-1])
        assert [e["seq"] for e in got[0]] == [e["seq"] for e in got[1]]
        return got[0]

    async def stored(self, room: str) -> list[dict[str, Any]]:
        hist = await self.json.request({"type": "history", "room": room})
        return [e for e in hist["events"] if e["event"] != "sentinel"]

    async def close(self) -> None:
        await self.json.close()
        await self.cbor.close()


@pytest.mark.parametrize("door", list(DOORS))
async def test_every_door_gives_the_same_outcome(door: str, make_node: Any) -> None:
    node = await make_node(namespaces=SMALL)
    await _check_all(make_door(door, node, {"*": ALL_RIGHTS}), node)


@pytest.mark.skipif(not shutil.which("mosquitto") and not shutil.which("/usr/sbin/mosquitto"),
                    reason="needs Debian's mosquitto")
async def test_an_external_broker_gives_the_same_outcome(
        mosquitto: int, make_node: Any) -> None:  # noqa: F811  (the imported fixture)
    node = await make_node(namespaces=SMALL, mqtt_broker_url=f"mqtt://127.0.0.1:{mosquitto}")
    await asyncio.wait_for(node.mqtt_external._ready.wait(), 10)
    await _check_all(make_door("broker", node, {"*": ALL_RIGHTS}, broker_port=mosquitto), node)


async def _check_all(publisher: Any, node: Any) -> None:
    members = Members(node)
    await members.open()
    await publisher.open()
    try:
        for case in CASES:
            await _check(case, publisher, members)
    finally:
        await publisher.close()
        await members.close()


async def _check(case: Case, publisher: Any, members: Members) -> None:
    room = unique(case.namespace)
    await members.join(room)
    data = case.data[publisher.codec] if case.data is BAD_VALUE else case.data
    outcomes = [await publisher.publish(room, case.event, data, case.msg_id,
                                        allowed=case.allowed, fields=case.fields)
                for _ in range(case.times)]
    assert {o.same() for o in outcomes} == {case.expect.same()}, (case.name, outcomes)
    seqs = {o.seq for o in outcomes if o.seq is not None}
    assert len(seqs) <= 1, f"{case.name}: one event, one seq ({seqs})"
    delivered = await members.delivered(room, case.expect.kind == "volatile")
    stored = await members.stored(room)
    if case.expect.kind == "stored":
        assert [e["data"] for e in delivered] == [data], case.name
        if case.fields and "key" in case.fields:
            assert [e["key"] for e in delivered] == [case.fields["key"]], case.name
        assert [e["seq"] for e in stored] == [delivered[0]["seq"]], case.name
        assert seqs <= {delivered[0]["seq"]}, case.name
    elif case.expect.kind == "volatile":
        assert [e["data"] for e in delivered] == [data] and "seq" not in delivered[0]
        assert stored == [], f"{case.name}: a volatile event is never stored"
    else:
        assert delivered == [] and stored == [], f"{case.name}: refused, never stored"


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A seeded value of the value model (floats, big integers, bytes, text and nesting)."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([None, True, False, 0, -0.0, 2**64 - 1, -(2**63)])
    if kind == 1:
        return rng.randint(-(2**40), 2**40)
    if kind == 2:
        return rng.choice([rng.random() * 10 ** rng.randint(-5, 300), 1.5, 0.1, 1e16])
    if kind == 3:
        return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0x2FFF),
                                       0x1F600, 0])) for _ in range(rng.randint(0, 12)))
    if kind == 4:
        return rng.randbytes(rng.randint(0, 9))
    if kind == 5:
        return rng.uniform(-1e6, 1e6)
    if kind in (6, 7):
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"k{i}\u00e9"[: rng.randint(1, 3)]: _value(rng, depth + 1)
            for i in range(rng.randint(0, 4))}


async def test_the_admitting_node_delivers_its_map_and_another_decodes_the_same(
        make_node: Any) -> None:
    """The node a publish comes in by hands its room the event map it built (RecentEvents);
    another node decodes the stored bytes. Members of both, in both codecs, receive the same
    bytes for every event of a seeded run of values."""
    seed = int(os.environ.get("RTNODE_TEST_MAP_SEED") or random.randrange(2**32))
    print(f"\nRTNODE_TEST_MAP_SEED={seed}")  # repeats the run's values
    rng = random.Random(seed)
    first, second = await make_node(), await make_node()
    room = unique("chat")
    members: dict[tuple[str, str], RawClient] = {}
    for node in (first, second):
        for codec in ("json", "cbor"):
            m = await RawClient.connected(ws_url(node), token(f"m-{codec}"), codec=codec)
            assert (await m.request({"type": "join", "room": room}))["type"] == "joined"
            members[(node.settings.node_name, codec)] = m
    publisher = await RawClient.connected(ws_url(first), token("pub"), codec="cbor")
    values = [_value(rng) for _ in range(40)]
    try:
        for value in values:
            reply = await publisher.request({"type": "publish", "room": room, "event": "v",
                                             "data": value})
            assert reply["type"] == "published", (seed, value, reply)
        for codec in ("json", "cbor"):
            here, there = (members[(n.settings.node_name, codec)] for n in (first, second))
            for value in values:
                raw_here, raw_there = await _raw_event(here), await _raw_event(there)
                assert raw_here == raw_there, (seed, value)
        assert first.ctx.admission.recent.hits > 0  # the first node did use its maps
    finally:
        for m in [*members.values(), publisher]:
            await m.close()


async def _raw_event(member: RawClient) -> bytes:
    """The next ``v`` event's bytes as they came over the socket (a message may carry several
    frames: JSON ones joined by newlines, CBOR ones one after another)."""
    while True:
        while not member.buffer:
            data = await asyncio.wait_for(member.ws.recv(), 20)
            raw = data.encode() if isinstance(data, str) else data
            member.buffer.extend(_frames(raw, member.codec is CBOR))
        raw = member.buffer.pop(0)
        [frame] = member.codec.decode(raw)
        if frame.get("type") == "event" and frame.get("event") == "v":
            return bytes(raw)


def _frames(raw: bytes, cbor: bool) -> list[bytes]:
    if not cbor:
        return [line for line in raw.split(b"\n") if line.strip()]
    out, fp = [], io.BytesIO(raw)
    decoder = cbor2.CBORDecoder(fp)
    while fp.tell() < len(raw):
        start = fp.tell()
        decoder.decode()
        out.append(raw[start:fp.tell()])
    return out


def _door_value(rng: random.Random, cbor: bool, depth: int = 0) -> Any:
    """A seeded value for a door, in and out of the value model, as a peer of the door could
    write it (JSON: no byte strings, tags or undefined; NaN and integers past 64 bits are
    written all the same)."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([2**64 - 1, -(2**63), 2**64, -(2**63) - 1, 10**30, 2**53 + 1])
    if kind == 1:
        return rng.choice([float("nan"), float("inf"), -float("inf"), 1e308, -0.0]
                          + ([cbor2.undefined, cbor2.CBORTag(0, "2026"), rng.randbytes(3)]
                             if cbor else []))
    if kind == 2:
        deep: Any = "leaf"
        for _ in range(rng.choice([3, 31, 32, 33, 60])):
            deep = [deep] if rng.random() < 0.5 else {"d": deep}
        return deep
    if kind in (3, 4, 5):
        return _value(rng, depth)  # within the model
    return ([_door_value(rng, cbor, depth + 1) for _ in range(rng.randint(0, 3))] if kind < 8
            else {f"k{i}": _door_value(rng, cbor, depth + 1) for i in range(rng.randint(0, 3))})


@pytest.mark.parametrize("door", list(DOORS))
async def test_seeded_values_get_the_value_models_verdict_at_every_door(
        door: str, make_node: Any) -> None:
    """Seeded values in and out of the value model (deep nesting at the limit and past it,
    integers at and past 64 bits, NaN, tags, undefined, byte strings) through each door: each is
    stored exactly when ``check_value`` takes it, else refused with 4000, and a stored one
    reaches the JSON and the CBOR member as it was sent."""
    node = await make_node()
    await _seeded_values(door, node, make_door(door, node, {"*": ALL_RIGHTS}))


@pytest.mark.skipif(not shutil.which("mosquitto") and not shutil.which("/usr/sbin/mosquitto"),
                    reason="needs Debian's mosquitto")
async def test_seeded_values_get_the_value_models_verdict_through_an_external_broker(
        mosquitto: int, make_node: Any) -> None:  # noqa: F811  (the imported fixture)
    """As above, through the door of an external broker (Mosquitto) the node bridges: an
    uplink it cannot decode, or one admission refuses, is dropped and counted (4000)."""
    node = await make_node(mqtt_broker_url=f"mqtt://127.0.0.1:{mosquitto}")
    await asyncio.wait_for(node.mqtt_external._ready.wait(), 10)
    await _seeded_values("broker", node,
                         make_door("broker", node, {"*": ALL_RIGHTS}, broker_port=mosquitto))


async def _seeded_values(door: str, node: Any, publisher: Any) -> None:
    from node.protocol.errors import ProtocolError
    from node.protocol.values import check_value

    rng = random.Random(f"doors-{door}")
    members = Members(node)
    await members.open()
    await publisher.open()
    outcomes = set()
    try:
        for _ in range(20):
            value = _door_value(rng, publisher.codec == "cbor")
            if publisher.codec != "cbor":
                value = as_json_member(value)  # a JSON door has no byte strings
            try:
                check_value(value)
                want = Outcome("stored")
            except ProtocolError as exc:
                want = Outcome("refused", exc.code)
            room = unique("chat")
            await members.join(room)
            try:
                got = await publisher.publish(room, "chat:msg", value, None)
            except TimeoutError:
                raise AssertionError(f"{door}: no answer to a publish of {value!r}") from None
            assert got.same() == want.same(), (door, value, got)
            outcomes.add(want.kind)
            delivered = await members.delivered(room, False)
            if want.kind == "stored":
                assert [e["data"] for e in delivered] == [as_json_member(value)], value
                cbor_got = await members.cbor.request({"type": "history", "room": room})
                assert [e["data"] for e in cbor_got["events"]
                        if e["event"] != "sentinel"] == [value], value
            else:
                assert delivered == [], value
        assert outcomes == {"stored", "refused"}, outcomes
    finally:
        await publisher.close()
        await members.close()
