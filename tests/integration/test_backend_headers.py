"""A backend publishes into a room through the stream (PROTOCOL.md section 9) with headers
of its own, some named as the ones the stream's RePublish sets: ``Nats-Sequence`` and
``Nats-Last-Sequence`` (a relay that copies another stream's message with its headers does).

nats-server keeps a republished message's own headers and appends its own after them, so the
live message carries both. The node must read the server's: when it read the first ones, a
forged seq moved every member's cursor, and the events stored after it were dropped as
already delivered (an acknowledged event silently missed), or a gap that was not there sent
the room to repair from the stream.

The backend's bodies are its own too: whatever it stores that is not an event map (bytes that
are not CBOR, CBOR that is not a map, a map without an event name, tags, nesting too deep, items
after the first) is skipped and counted; event maps with values outside the value model reach
every member once, made safe; the members get every other event once, in order, and the node
serves on.

Seeded: the backend's headers (which names, which values: beyond the stream's last seq, below
it, 0, not a number), its bodies, and which of the room's events come from the backend and
which from a WebSocket member, differ with ``RTNODE_TEST_BACKEND_HEADERS_SEED``.

A header line of its own named ``Status`` (and ``Description``), the names nats-py gives a
server's status line, once ended or failed the direct-get batches that read the room back: a
late joiner's recovery and ``history`` failed with 4500. A durable consumer reads the same
events once each, whatever pin, status or count its headers forge.
"""

from __future__ import annotations

import math
import os
import random

import cbor2
import nats
import pytest

from bridge.replay import ReplayConsumer
from node.core.events import event_body
from node.protocol.errors import CodecError
from node.protocol.frames import cbor_loads_strict
from node.protocol.subjects import room_subject
from node.protocol.tokens import Principal
from tests.integration.test_hostile_input import still_serves
from tests.servers import NatsProcess
from tests.unit.test_cbor_decoder import message as hostile_cbor
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("RTNODE_TEST_BACKEND_HEADERS_SEED", "9151"))
EVENTS = 60


def _forged(rng: random.Random, last: int) -> dict[str, str]:
    """Headers a backend's message may carry, named as the server's own."""
    values = [str(last + rng.randrange(2, 10**6)), str(10**12), str(max(0, last - 1)), "0", "1",
              "seven", f" {last + 5} "]
    names = rng.sample(["Nats-Sequence", "Nats-Last-Sequence", "Nats-Stream", "Nats-Subject",
                        "Nats-Time-Stamp", "Nats-Num-Pending", "Status"], rng.randrange(1, 8))
    out = {name: rng.choice(values) for name in names}
    if "Status" in out:  # as the server's status lines say: the end of a batch, none, errors
        out["Status"] = rng.choice(["404", "204", "503", "408", "500", "100", "409"])
        out["Description"] = rng.choice(["No Messages", "EOB", "No Responders", "Bad"])
    return out


async def test_a_backend_s_own_sequence_headers_move_no_member(
        make_node, shared_nats: NatsProcess) -> None:
    rng = random.Random(SEED)
    node = await make_node()
    room = unique("relay")
    members = [await RawClient.connected(ws_url(node), token("alice")),
               await RawClient.connected(ws_url(node), token("bob"), codec="cbor")]
    joined = {}
    for m in members:
        joined = await m.request({"type": "join", "room": room})
        assert joined["type"] == "joined", joined
    backend = Principal(sub="relay", tenant="default", kind="service")
    nc = await nats.connect(shared_nats.url)
    try:
        js = nc.jetstream()
        stored: list[tuple[int, int]] = []  # (seq, i) of every event, in the order stored
        forged = 0
        for i in range(EVENTS):
            last = stored[-1][0] if stored else joined["seq"]
            if rng.random() < 0.6:
                headers = _forged(rng, last)
                forged += "Nats-Sequence" in headers or "Nats-Last-Sequence" in headers
                body = event_body(room, "reading", {"i": i}, backend, None, None)
                ack = await js.publish(room_subject("default", room), body, headers=headers)
                stored.append((ack.seq, i))
            else:
                reply = await members[0].request(
                    {"type": "publish", "room": room, "event": "reading", "data": {"i": i}})
                assert reply["type"] == "published", reply
                stored.append((reply["seq"], i))
        assert forged >= EVENTS // 4, forged  # the seed forged often enough
        # Every member gets every event once, in order, with the seq the stream gave it.
        for m in members:
            got = await m.events(EVENTS, room)
            assert [(f["seq"], f["data"]["i"]) for f in got] == stored, m.codec.name
        # The node serves on: an event published now reaches both members with the next seq.
        reply = await members[1].request(
            {"type": "publish", "room": room, "event": "reading", "data": {"i": EVENTS}})
        assert reply["seq"] == stored[-1][0] + 1, reply
        for m in members:
            (f,) = await m.events(1, room)
            assert (f["seq"], f["data"]["i"]) == (reply["seq"], EVENTS)
        # A member that resumes from before the first event recovers the same, in order.
        late = await RawClient.connected(ws_url(node), token("carol"))
        r = await late.request({"type": "join", "room": room,
                                "since": {"seq": joined["seq"], "epoch": joined["epoch"]}})
        assert r.get("recovered") is True, r
        got = await late.events(EVENTS + 1, room)
        assert [(f["seq"], f["data"]["i"]) for f in got] == [*stored, (reply["seq"], EVENTS)]
        # History reads (the stream's direct gets, their own header blocks) give the same.
        hist = await late.request({"type": "history", "room": room, "limit": EVENTS + 1})
        assert [(e["seq"], e["data"]["i"]) for e in hist["events"]] == [
            *stored, (reply["seq"], EVENTS)]
        await late.close()
    finally:
        await nc.close()
        for m in members:
            await m.close()


def _body(rng: random.Random, room: str, i: int) -> tuple[bytes, bool]:
    """A backend's body, and whether it is an event map (delivered) or not (skipped)."""
    who = {"user": "relay", "kind": "service"}
    roll = rng.random()
    if roll < 0.3:  # outside the value model, no tag (a bignum is one): delivered, made safe
        bad = rng.choice([cbor2.undefined, math.nan, -(2**64), {b"k": 1},
                         cbor2.CBORSimpleValue(99)])
        return cbor2.dumps({"room": room, "event": "odd", "data": {"i": i, "v": bad}, "ts": 1,
                            "from": who}), True
    if roll < 0.45:  # a map, but no event name
        return cbor2.dumps(rng.choice([{"data": {"i": i}}, {"event": 7, "data": {"i": i}},
                                       {"event": None}])), False
    if roll < 0.55:  # an event map, then more
        return cbor2.dumps({"event": "e", "data": {"i": i}, "from": who}) + b"\x01", False
    if roll < 0.65:  # tagged
        return cbor2.dumps(cbor2.CBORTag(1, {"event": "e", "data": {"i": i}})), False
    data = hostile_cbor(rng)  # anything: cut short, a byte changed, nested too deep
    try:
        value = cbor_loads_strict(data)
    except CodecError:
        return data, False
    return data, isinstance(value, dict) and isinstance(value.get("event"), str)


async def test_a_backend_s_bodies_that_are_not_event_maps_are_skipped_and_nothing_else(
        make_node, shared_nats: NatsProcess) -> None:
    rng = random.Random(SEED + 1)
    node = await make_node()
    room = unique("bodies")
    members = [await RawClient.connected(ws_url(node), token("alice")),
               await RawClient.connected(ws_url(node), token("bob"), codec="cbor")]
    for m in members:
        assert (await m.request({"type": "join", "room": room}))["type"] == "joined"
    skipped_before = node.ctx.counters.undeliverable
    nc = await nats.connect(shared_nats.url)
    try:
        js = nc.jetstream()
        delivered: list[tuple[int, int]] = []  # (seq, i) of the events members must get
        skipped = 0
        for i in range(EVENTS):
            if rng.random() < 0.7:
                body, is_event = _body(rng, room, i)
                headers = _forged(rng, delivered[-1][0] if delivered else 0) \
                    if rng.random() < 0.3 else None
                ack = await js.publish(room_subject("default", room), body, headers=headers)
                if is_event:
                    delivered.append((ack.seq, i))
                else:
                    skipped += 1
            else:
                reply = await members[i % 2].request(
                    {"type": "publish", "room": room, "event": "e", "data": {"i": i}})
                assert reply["type"] == "published", reply
                delivered.append((reply["seq"], i))
        assert skipped >= EVENTS // 5 and len(delivered) >= EVENTS // 3, (skipped, delivered)
        last = await members[0].request(
            {"type": "publish", "room": room, "event": "e", "data": {"i": EVENTS}})
        delivered.append((last["seq"], EVENTS))
        for m in members:
            got = await m.events(len(delivered), room)
            seen = [(f["seq"], f["data"]["i"] if isinstance(f["data"], dict) else None)
                    for f in got]
            assert seen == delivered, m.codec.name
        # Nothing more came: each event once (the next frame is the ping's answer).
        for m in members:
            assert (await m.request({"type": "ping"}))["type"] == "pong"
            assert not [f for f in m.buffer if f.get("type") == "event"], m.buffer
        assert node.ctx.counters.undeliverable - skipped_before == skipped
        await still_serves(node, room)
    finally:
        await nc.close()
        for m in members:
            await m.close()


async def test_a_durable_consumer_reads_a_backend_s_forged_headers_as_the_event_s_own(
        make_node, shared_nats: NatsProcess) -> None:
    """``ReplayConsumer`` (a pinned client of a priority group) reads the server's pin, status
    and delivery count, never the event's own headers of those names: a forged ``Nats-Pin-Id``
    would start a takeover (a reset to the ack floor, events again), a forged ``Status`` would
    end a pull early. Every event comes once, in order, delivered once."""
    rng = random.Random(SEED + 2)
    await make_node()  # the stream
    t = "t" + unique("h").replace("-", "")[-10:]
    rooms = ["dev:a", "dev:b"]
    nc = await nats.connect(shared_nats.url)
    try:
        js = nc.jetstream()
        stored: dict[str, list[tuple[int, int]]] = {r: [] for r in rooms}
        backend = Principal(sub="relay", tenant=t, kind="service")
        for i in range(EVENTS):
            room = rng.choice(rooms)
            headers = _forged(rng, i)
            headers.update(rng.choice([
                {"Nats-Pin-Id": rng.choice(["forged", "0" * 22, ""])},
                {"Nats-Pending-Messages": "9", "Nats-Pull-Group": "g"},
                {"Status": "423", "Description": "Nats-Pin-Id mismatch"},
                {},
            ]))
            body = event_body(room, "reading", {"i": i}, backend, None, None)
            ack = await js.publish(room_subject(t, room), body, headers=headers)
            stored[room].append((ack.seq, i))
        got: dict[str, list[tuple[int, int]]] = {r: [] for r in rooms}
        async with ReplayConsumer(nc, tenant=t, rooms="dev:*",
                                  durable=f"forged-{unique('d')[-6:]}") as consumer:
            for _ in range(EVENTS):
                ev = await consumer.next(10)
                assert ev is not None, got
                assert ev.delivered == 1, ev
                got[ev.room].append((ev.seq, ev.data["i"]))
                await ev.ack()
            assert await consumer.next(0.5) is None  # nothing again
            assert consumer.takeovers == 1, consumer.takeovers  # its own pin, once
        assert got == stored
    finally:
        await nc.close()
