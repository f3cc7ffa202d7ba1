"""State rooms without sockets: admission of ``key``/``unset``, the order of the stream's ack,
the state write and the answer, the room's ``state`` frame after ``joined`` (with the events it
delivered lately merged in), and the SSE session's ``event: state`` first."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from typing import Any

import cbor2
import pytest

from actors import ActorSystem
from bridge.sse import SseSession
from node.core.admission import NOT_STATE_ROOM, Admission
from node.core.ports import StoreError
from node.core.room import Join, RoomActor, RoomCounters, RoomSettings
from node.core.room_state import RoomValues, with_stored
from node.protocol.errors import ProtocolError
from node.protocol.frames import (
    STATE_CHUNK_BYTES,
    Publish,
    parse_frame,
    publish_frame,
    state_frames,
)
from node.protocol.settings import load_settings
from node.protocol.tokens import Principal
from tests.unit.test_room import FakeStore, member

DEV = Principal(sub="dev-7", tenant="t1", rooms={"*": frozenset({"publish"})})


class Log:
    """One list of what happened, in order, for every fake."""

    def __init__(self) -> None:
        self.steps: list[Any] = []


class Store:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.seq = 0

    def publish_soon(self, tenant: str, room: str, body: bytes, msg_id: str,
                     ttl_s: float | None = None) -> None:
        return None  # never gathers: publish is awaited

    async def publish(self, tenant: str, room: str, body: bytes, msg_id: str,
                      ttl_s: float | None = None) -> tuple[int, bool]:
        self.seq += 1
        self.log.steps.append(("stored", self.seq, cbor2.loads(body)))
        return self.seq, False

    def publish_volatile(self, tenant: str, room: str, body: bytes, *,
                         later: bool = False) -> None:
        self.log.steps.append(("volatile", cbor2.loads(body)))


class State:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.full = False
        self.fail = False
        self.values_: list[dict[str, Any]] = []
        self.reads = 0
        self.gate: asyncio.Event | None = None  # hold reads until set

    async def values(self, tenant: str, room: str) -> list[dict[str, Any]]:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        return list(self.values_)

    async def put(self, tenant: str, room: str, key: str, seq: int, event_map: dict[str, Any],
                  unset: bool) -> None:
        if self.fail:
            raise StoreError("kv down")
        self.log.steps.append(("put", key, seq, event_map, unset))

    async def may_add(self, tenant: str, room: str, key: str) -> bool:
        self.log.steps.append(("may_add", key))
        return not self.full


def pipeline() -> tuple[Admission, State, Log]:
    log = Log()
    settings = load_settings(namespaces={"st": {"state": True}})
    store = Store(log)
    state = State(log)
    return Admission(settings, store, store, state), state, log  # type: ignore[arg-type]


def frame(room: str, **fields: Any) -> Publish:
    parsed = parse_frame({"type": "publish", "room": room, "event": "reading", **fields})
    assert isinstance(parsed, Publish)
    return parsed


async def test_the_key_defaults_to_the_sub_and_the_state_is_written_before_the_answer() -> None:
    adm, _, log = pipeline()
    admitted = adm.admit("mqtt", DEV, frame("st:fleet", data=21), client_id="c1")
    assert (admitted.key, admitted.unset) == ("dev-7", False)
    seq = await adm.store(admitted)
    log.steps.append(("answered", seq))
    kinds = [step[0] for step in log.steps]
    assert kinds == ["may_add", "stored", "put", "answered"]
    _, key, put_seq, event_map, unset = log.steps[2]
    assert (key, put_seq, unset) == ("dev-7", seq, False)
    assert event_map["key"] == "dev-7" and event_map["seq"] == seq and event_map["data"] == 21
    assert "unset" not in log.steps[1][2] and log.steps[1][2]["key"] == "dev-7"

    admitted = adm.admit("ws", DEV, frame("st:fleet", key="target", unset=True), client_id=None)
    log.steps.clear()
    await adm.store(admitted)
    assert [step[0] for step in log.steps] == ["stored", "put"]  # an unset never needs room
    assert log.steps[0][2]["unset"] is True and log.steps[0][2]["key"] == "target"
    assert log.steps[1][4] is True


async def test_refusals_are_the_same_for_every_door() -> None:
    adm, state, log = pipeline()
    for fields in ({"key": "k"}, {"unset": True}):
        with pytest.raises(ProtocolError) as exc:
            adm.admit("api", DEV, frame("chat:x", **fields), client_id=None)
        assert (exc.value.code, exc.value.reason) == (4000, NOT_STATE_ROOM)
        assert exc.value.label == "not_state_room"  # type: ignore[attr-defined]
    with pytest.raises(ProtocolError) as exc:
        adm.admit("api", DEV, frame("st:x", data=1, unset=True), client_id=None)
    assert exc.value.code == 4000
    assert adm.stats.counts[("api", "4000")] == 3
    # The HTTP body and a plain uplink's map read key and unset as a frame does.
    assert publish_frame({"room": "st:x", "event": "e", "key": "k", "unset": True}).key == "k"
    for bad in ({"key": ""}, {"key": "x" * 129}, {"key": "a\x00"}, {"key": 1},
                {"unset": "yes"}, {"key": None, "unset": None}):
        with pytest.raises(ProtocolError) as exc:
            publish_frame({"room": "st:x", "event": "e", **bad})
        assert exc.value.code == 4000, bad
    # Events of other rooms are unchanged: no key in their map.
    admitted = adm.admit("api", DEV, frame("chat:x", data=1), client_id=None)
    assert admitted.key is None and "key" not in cbor2.loads(admitted.body)

    state.full = True  # a new key beyond state_max_keys: nothing stored
    admitted = adm.admit("ws", DEV, frame("st:x", key="new"), client_id=None)
    with pytest.raises(ProtocolError) as exc:
        await adm.store(admitted)
    assert (exc.value.code, exc.value.reason) == (4009, "state room full")
    assert [s[0] for s in log.steps] == ["may_add"]

    state.full, state.fail = False, True  # stored, state not written: retry (deduplicated)
    log.steps.clear()
    with pytest.raises(ProtocolError) as exc:
        await adm.store(adm.admit("ws", DEV, frame("st:x", key="k2"), client_id=None))
    assert (exc.value.code, exc.value.retry) == (4503, True)
    assert [s[0] for s in log.steps] == ["may_add", "stored"]


async def test_volatile_events_of_a_state_room_carry_the_key_but_set_nothing() -> None:
    adm, _, log = pipeline()
    admitted = adm.admit("ws", DEV, frame("st:x", event="user:typing"), client_id=None)
    assert admitted.volatile and admitted.key == "dev-7"
    adm.send_volatile(admitted)
    assert [s[0] for s in log.steps] == ["volatile"]


def _body(key: str, data: Any, unset: bool = False) -> bytes:
    event: dict[str, Any] = {"event": "e", "data": data, "key": key}
    if unset:
        event["unset"] = True
    return cbor2.dumps(event)


async def _frames(rec: Any, n: int) -> list[dict[str, Any]]:
    while len(rec.frames) < n:
        rec.arrived.clear()
        await asyncio.wait_for(rec.arrived.wait(), 5)
    return list(rec.frames)


def _state_room(system: ActorSystem, store: FakeStore, state: State) -> Any:
    return system.spawn(lambda: RoomActor(
        "t", "st:r", store, store,  # type: ignore[arg-type]  # reads only
        RoomSettings(state=True), RoomCounters(), state))


async def _joined_reading(ref: Any, state: State) -> Any:
    """A member joins the state room; returns its recorder once the room's read is in flight."""
    m, rec = member()
    ref.tell(Join(m))
    async with asyncio.timeout(5):
        while not state.reads:  # noqa: ASYNC110  (the fake has no event to wait on)
            await asyncio.sleep(0.001)
    return rec


async def test_joins_get_the_state_as_of_joined_then_newer_events() -> None:
    store, state = FakeStore(), State(Log())
    store.events += [(1, _body("a", "old")), (3, _body("b", 3))]
    state.values_ = [{"seq": 1, "key": "a", "data": "old"}, {"seq": 3, "key": "b", "data": 3}]
    async with ActorSystem() as system:
        ref = _state_room(system, store, state)
        first, rec0 = member()
        ref.tell(Join(first))
        joined, values = await _frames(rec0, 2)
        assert (joined["type"], joined["seq"]) == ("joined", 3)
        assert (values["type"], [(v["key"], v["seq"]) for v in values["values"]]) == (
            "state", [("a", 1), ("b", 3)])
        store.events += [(5, _body("a", "new")), (7, _body("b", None, unset=True))]
        store.deliver(5)
        store.deliver(7)
        frames = await _frames(rec0, 4)
        assert [(f["seq"], f["key"], f.get("unset")) for f in frames[2:]] == [
            (5, "a", None), (7, "b", True)]

        # The room keeps its values up to date: a late join reads nothing, and its live
        # events are all newer than joined.seq.
        late, rec = member()
        ref.tell(Join(late, request_id="j"))
        joined, values = await _frames(rec, 2)
        assert joined["seq"] == 7
        assert [(v["key"], v["seq"], v["data"]) for v in values["values"]] == [("a", 5, "new")]
        store.events.append((9, _body("c", 9)))
        store.deliver(9)
        assert [(f["type"], f.get("seq")) for f in await _frames(rec, 3)] == [
            ("joined", 7), ("state", None), ("event", 9)]
        assert state.reads == 1

        silent, rec2 = member()
        ref.tell(Join(silent, silent=True))  # the plain MQTT face: no frames at all
        store.events.append((11, _body("c", 11)))
        store.deliver(11)
        await rec2.until(1)
        assert [f["type"] for f in rec2.frames] == ["event"]


async def test_the_first_read_merges_what_was_delivered_and_waits_for_what_was_not() -> None:
    store, state = FakeStore(), State(Log())
    state.gate = asyncio.Event()  # the read is in flight while an event is delivered
    async with ActorSystem() as system:
        ref = _state_room(system, store, state)
        rec = await _joined_reading(ref, state)
        store.events.append((2, _body("a", 2)))
        store.deliver(2)  # delivered during the read, not yet in the bucket's answer
        # ...which holds an event the live path has not brought yet (seq 4): the join waits
        # until the room has delivered it (here read back by the gap check).
        store.events.append((4, _body("b", 4)))
        state.values_ = [{"seq": 4, "key": "b", "data": 4}]
        state.gate.set()
        joined, values = await _frames(rec, 2)
        assert joined["seq"] == 4
        assert [(v["key"], v["seq"]) for v in values["values"]] == [("a", 2), ("b", 4)]
        store.events.append((6, _body("b", 6)))
        store.deliver(6)
        assert [(f["type"], f.get("seq")) for f in await _frames(rec, 3)] == [
            ("joined", 4), ("state", None), ("event", 6)]


def test_sse_writes_every_state_first_then_events() -> None:
    session = SseSession(["chat:a", "st:b"], state_rooms=["st:b"])

    def feed(*frames: dict[str, Any]) -> bytes:
        session.receive_message(b"\n".join(json.dumps(f).encode() for f in frames))
        return session.data_to_send()

    assert feed({"type": "joined", "room": "chat:a", "seq": 4}) == b""
    assert feed({"type": "event", "room": "chat:a", "seq": 5, "event": "m"}) == b""
    # st:b joined: still held until its state arrives.
    assert feed({"type": "joined", "room": "st:b", "seq": 9}) == b""
    out = feed({"type": "state", "room": "st:b", "values": [{"seq": 9, "key": "k"}]})
    blocks = out.decode().split("\n\n")
    assert blocks[0] == ": joined chat:a:4,st:b:9"
    assert blocks[1] == ('event: state\ndata: {"room":"st:b","values":[{"seq":9,"key":"k"}]}')
    assert blocks[2].startswith("event: m\nid: chat:a:5,st:b:9\n")


def test_a_large_state_is_sent_in_frames_of_about_64_kb() -> None:
    values = [{"seq": i, "key": f"k{i:04d}", "data": "x" * 1000} for i in range(200)]
    frames = state_frames("st:r", values)
    assert len(frames) == 4
    assert [f.get("more") for f in frames] == [True, True, True, None]
    assert [v for f in frames for v in f["values"]] == values
    assert all(len(cbor2.dumps(f["values"])) <= STATE_CHUNK_BYTES for f in frames)
    assert state_frames("st:r", []) == [{"type": "state", "room": "st:r", "values": []}]

    # SSE writes one message per room with the values of all its frames.
    session = SseSession(["st:r"], state_rooms=["st:r"])
    session.receive_message(json.dumps({"type": "joined", "room": "st:r", "seq": 1}).encode())
    for f in frames:
        session.receive_message(json.dumps(f).encode())
    blocks = session.data_to_send().decode().split("\n\n")
    assert blocks[0] == ": joined st:r:1" and blocks[1].startswith("event: state\ndata: ")
    assert json.loads(blocks[1].split("data: ", 1)[1])["values"] == values


def test_room_values_merge_reads_and_deliveries_by_seq() -> None:
    values = RoomValues(30.0)
    assert not values.known
    values.delivered(5, {"type": "event", "key": "a", "seq": 5, "data": 5}, now=0.0)
    # The first read: what was delivered meanwhile wins over older values, and the highest
    # seq read is what joins wait for.
    need = values.take_read([{"key": "a", "seq": 3, "data": 3}, {"key": "b", "seq": 8}],
                            at=0.0, last_seq=5, now=1.0)
    assert need == 8 and values.known
    assert [(v["key"], v["seq"]) for v in values.upto(8)] == [("a", 5), ("b", 8)]
    assert [v["key"] for v in values.upto(5)] == ["a"]  # a join at 5 gets b live
    values.delivered(8, {"key": "b", "seq": 8}, now=2.0)
    values.delivered(9, {"key": "a", "seq": 9, "unset": True}, now=2.0)
    assert [v["key"] for v in values.upto(9)] == ["b"]
    # A refresh keeps the room's own value of a key whose read one it has not delivered yet.
    values.delivered(10, {"key": "c", "seq": 10}, now=40.0)
    assert values.stale(40.0)
    assert values.take_read([{"key": "b", "seq": 8}, {"key": "c", "seq": 12}],
                            at=40.0, last_seq=10, now=41.0) is None
    assert [(v["key"], v["seq"]) for v in values.upto(20)] == [("b", 8), ("c", 10)]


def test_the_first_read_merges_the_events_stored_before_the_room_started() -> None:
    # The bucket has a@3 (a@6's write in flight), no b (b@7 an unset, written), c@9 (c@4
    # older, in the stream's tail too): the tail is applied in seq order over the read, so
    # b@5 does not come back after b@7's unset.
    values = RoomValues(30.0)
    stored = [{"type": "event", "key": "c", "seq": 4}, {"type": "event", "key": "b", "seq": 5},
              {"type": "event", "key": "a", "seq": 6, "data": "new"},
              {"type": "event", "key": "b", "seq": 7, "unset": True}]
    need = values.take_read([{"key": "a", "seq": 3, "data": "old"}, {"key": "c", "seq": 9}],
                            at=0.0, last_seq=9, now=0.0, stored=stored)
    assert need == 9
    assert [(v["key"], v["seq"], v.get("data")) for v in values.upto(9)] == [
        ("a", 6, "new"), ("c", 9, None)]
    assert all("type" not in v for v in values.upto(9))


async def test_a_room_that_starts_while_a_state_write_is_in_flight() -> None:
    # a@3 is stored, but the node that stored it has not written its state yet: the room
    # starts at 3 (a@3 never comes to it live), so its first read takes it from the stream.
    store, state = FakeStore(), State(Log())
    store.events += [(1, _body("a", "old")), (3, _body("a", "new"))]
    state.values_ = [{"seq": 1, "key": "a", "data": "old"}]
    async with ActorSystem() as system:
        ref = _state_room(system, store, state)
        m, rec = member()
        ref.tell(Join(m))
        joined, values = await _frames(rec, 2)
        assert joined["seq"] == 3
        assert [(v["key"], v["seq"], v["data"]) for v in values["values"]] == [("a", 3, "new")]


def test_with_stored_applies_the_events_over_a_read_in_seq_order() -> None:
    read = [{"key": "a", "seq": 3}, {"key": "c", "seq": 9}]
    stored = [{"type": "event", "key": "b", "seq": 5}, {"type": "event", "key": "a", "seq": 6},
              {"type": "event", "key": "b", "seq": 7, "unset": True},
              {"type": "event", "key": "c", "seq": 8}]
    assert [(v["key"], v["seq"]) for v in with_stored(read, stored)] == [("a", 6), ("c", 9)]
    assert with_stored(read, []) == read


def test_a_refresh_from_a_replica_that_is_behind_lowers_no_value() -> None:
    # Direct gets are answered by any replica: a refresh may read one that is behind. The
    # room's values of events it delivered (longer ago than the grace) stay.
    values = RoomValues(30.0)
    values.take_read([{"key": "a", "seq": 1}], at=0.0, last_seq=1, now=0.0)
    values.delivered(4, {"key": "a", "seq": 4, "data": "new"}, now=1.0)
    values.delivered(5, {"key": "b", "seq": 5}, now=1.0)
    values.delivered(6, {"key": "c", "seq": 6}, now=1.0)
    assert values.take_read([{"key": "a", "seq": 1}, {"key": "c", "seq": 7}],
                            at=40.0, last_seq=8, now=40.0) is None
    assert [(v["key"], v["seq"]) for v in values.upto(8)] == [("a", 4), ("b", 5), ("c", 7)]


async def test_a_read_that_outlives_its_stopped_room_is_dropped_without_a_word(
        caplog: pytest.LogCaptureFixture) -> None:
    """A state read whose cancel was lost (its wait ended as the room stopped) answers a stopped
    room: dropped, not an "exception was never retrieved" traceback at ERROR (seen in a fault
    run)."""
    store, state = FakeStore(), State(Log())
    gate = asyncio.Event()

    async def values(tenant: str, room: str) -> list[dict[str, Any]]:
        state.reads += 1
        try:
            await gate.wait()
        except asyncio.CancelledError:  # the cancel lost, as by a wait that ended meanwhile
            await gate.wait()
        return []

    state.values = values  # type: ignore[method-assign]
    async with ActorSystem() as system:
        ref = _state_room(system, store, state)
        await _joined_reading(ref, state)
        await ref.stop()
        tasks = [t for t in asyncio.all_tasks() if t.get_name().endswith(".state")]
        assert tasks
        gate.set()
        await asyncio.wait(tasks, timeout=5)
    del tasks
    gc.collect()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
