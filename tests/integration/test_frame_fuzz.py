"""Seeded hostile frames over the real network: every field of every request, any value.

A client (JSON, then CBOR) sends frames built from the protocol's own types and fields, one to
three fields made hostile (values a codec can say and the value model cannot hold, integers
past 64 bits, NaN, byte strings, deep nesting, odd text, unknown fields and types) and many
plain publishes among them. Beside it, two members of the room, one JSON and one CBOR.

Held for every frame: a request with an id gets its typed reply or an ``error`` with a
client-side code, never 4500 and never a closed connection; nothing fails inside the node (no
error logged). Held for the room: every event acknowledged with a seq reaches both members
exactly once, with the same data (a byte string as base64 text for JSON); the node serves a
plain client afterwards. "What one door accepts, every member in every codec can receive."
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
from typing import Any

import cbor2
import pytest

from tests.integration.test_request_limits import OPEN
from tests.wsclient import RawClient, as_json_member, token, unique, ws_url

pytestmark = pytest.mark.integration

# The requests of PROTOCOL.md section 2 that answer every frame with an id, and their fields.
REQUESTS: dict[str, tuple[str, ...]] = {
    "join": ("room", "since", "presence"),
    "leave": ("room",),
    "publish": ("room", "event", "data", "msg_id"),
    "history": ("room", "since", "limit", "reverse"),
    "presence": ("room",),
    "rpc": ("to", "method", "params", "timeout_ms"),
    "ping": (),
    "connect": ("token", "client"),
    "refresh": ("token",),
}
EXTRA_FIELDS = ("seq", "key", "unset", "result", "error", "client_id", "type2", "")
# Codes of the client's own mistakes (PROTOCOL.md section 5): the frame is refused, the node
# goes on. 4500 (the node failed) is never among them.
CLIENT_CODES = {4000, 4001, 4003, 4004, 4009, 4010, 4013, 4029, 4504}


def _hostile(rng: random.Random, cbor: bool, depth: int = 0) -> Any:
    """A value a peer could send; some the value model refuses, most it takes."""
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return rng.choice([0, -1, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1,
                           10**30])
    if kind == 1:
        return rng.choice([0.1, -0.0, 1e308, 5e-324, math.nan, math.inf, -math.inf])
    if kind == 2:
        text = rng.choice(["", "fz", "a" * 5000, "\u00e9\u4e2d\U0001f600", "a\x00b", "@user:x",
                           "sys:all:x", "presence:join", "*", "a.b", " x", "x\n", "\ud800"])
        return text if not (cbor and text == "\ud800") else "\ufffd"  # CBOR text is UTF-8
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return rng.randrange(-1000, 10**6)
    if kind == 5:
        return "".join(rng.choice("az09_-:.@") for _ in range(rng.randrange(1, 20)))
    if kind == 6:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
    if kind == 7:
        return rng.choice([{"seq": rng.randrange(100)}, {"seq": -1}, {"seq": 2**70},
                           {"seq": 1, "epoch": "x"}, {"epoch": 5}])
    if kind == 8 and cbor:
        return rng.choice([cbor2.CBORTag(1, 5), cbor2.undefined, cbor2.CBORSimpleValue(99)])
    if kind == 9:
        deep: Any = 1
        for _ in range(rng.choice([5, 40, 70])):
            deep = [deep]
        return deep
    if kind == 10:
        return [_hostile(rng, cbor, depth + 1) for _ in range(rng.randrange(4))]
    return {(rng.choice([5, b"k"]) if cbor and rng.random() < 0.1 else f"k{i}"):
            _hostile(rng, cbor, depth + 1) for i in range(rng.randrange(4))}


def _plain(field: str, rng: random.Random, room: str) -> Any:
    """A valid value of ``field``."""
    return {
        "room": room, "event": "reading", "data": {"v": rng.randrange(1000), "t": "x"},
        "msg_id": f"m-{rng.getrandbits(48):x}", "since": {"seq": rng.randrange(5)},
        "presence": rng.choice([True, False]), "limit": rng.randrange(1, 20),
        "reverse": rng.choice([True, False]), "to": "user:nobody", "method": "m",
        "params": {"a": 1}, "timeout_ms": 200, "token": token("fuzzer"), "client": {"name": "fz"},
    }.get(field)


def _frame(rng: random.Random, cbor: bool, room: str, fid: int) -> dict[Any, Any]:
    if rng.random() < 0.35:  # a plain publish with any data: those must reach both members
        return {"type": "publish", "id": fid, "room": room, "event": "e",
                "data": _hostile(rng, cbor)}
    kind: Any = rng.choice([*REQUESTS, "bogus", 5, None]) if rng.random() < 0.95 else "ack"
    fields = REQUESTS.get(kind, ("room",)) if isinstance(kind, str) else ("room",)
    frame: dict[Any, Any] = {"type": kind, "id": fid}
    for field in fields:
        if rng.random() < 0.9:
            frame[field] = _plain(field, rng, room)
    for field in rng.sample([*fields, *EXTRA_FIELDS], rng.randint(1, 3)):
        frame[field] = _hostile(rng, cbor)
    return frame


def _encode(frame: dict[Any, Any], cbor: bool) -> str | bytes:
    """The frame as a peer could write it (NaN and integers past 64 bits included)."""
    if cbor:
        return cbor2.dumps(frame)
    return json.dumps(frame, default=_base64)


def _base64(value: Any) -> str:
    """A byte string in a JSON frame: its base64 text (JSON has no byte strings)."""
    return base64.b64encode(value).decode()


async def _answer(client: RawClient, fid: int, expect_reply: bool) -> dict[str, Any] | None:
    """The answer to frame ``fid``: its reply, or an error without id (the message could not be
    read); for an ack, which answers only with an error, up to a ping's pong sent after it.
    Events are kept for the members' check, other frames dropped."""
    kept: list[Any] = []
    try:
        if not expect_reply:
            await client.send({"type": "ping", "id": f"after-{fid}"})
        while True:
            f = await client.recv(10.0)
            if isinstance(f, dict) and f.get("id") == fid and f.get("type") != "rpc":
                return f
            if isinstance(f, dict) and f.get("type") == "disconnect":
                return f
            if isinstance(f, dict) and f.get("type") == "error" and "id" not in f:
                return f  # a message that could not be read: its id with it (one at a time)
            if not expect_reply and isinstance(f, dict) and f.get("id") == f"after-{fid}":
                return None
            kept.append(f)
    finally:
        client.buffer[:0] = [f for f in kept if isinstance(f, dict) and f.get("type") == "event"]


async def _drain(member: RawClient, room: str, seqs: set[int]) -> dict[int, list[Any]]:
    """The events of ``room`` a member got, by seq, until every seq in ``seqs`` came."""
    got: dict[int, list[Any]] = {}
    while not seqs <= got.keys():
        f = await member.recv(20.0)
        if isinstance(f, dict) and f.get("type") == "event" and f.get("room") == room:
            got.setdefault(f["seq"], []).append(f.get("data"))
    return got


@pytest.mark.parametrize("codec", ["json", "cbor"])
@pytest.mark.parametrize("seed", [31, 32])
async def test_seeded_hostile_frames_are_answered_and_what_is_stored_reaches_every_codec(
        make_node, seed: int, codec: str, caplog) -> None:
    rng = random.Random(seed)
    cbor = codec == "cbor"
    node = await make_node(**OPEN, max_errors_per_min=100_000, heavy_requests_per_s=10_000)
    caplog.set_level(logging.WARNING)
    room = unique("fz")
    members = [await RawClient.connected(ws_url(node), token(f"m-{c}"), codec=c)
               for c in ("json", "cbor")]
    for m in members:
        assert (await m.request({"type": "join", "room": room}))["type"] == "joined"
    fuzzer = await RawClient.connected(ws_url(node), token("fuzzer"), codec=codec)
    stored: dict[int, Any] = {}  # seq -> the data sent
    refused: dict[int, int] = {}
    for fid in range(1, 161):
        frame = _frame(rng, cbor, room, fid)
        await fuzzer.ws.send(_encode(frame, cbor))
        try:
            answer = await _answer(fuzzer, fid, frame.get("type") != "ack")
        except TimeoutError:
            raise AssertionError(f"no answer to {frame!r}") from None
        if answer is None:
            continue
        kind = answer.get("type")
        if kind == "disconnect" and frame.get("type") == "refresh" and answer["code"] == 4001:
            # An invalid token in a refresh ends the connection (docs/protocol-notes.md).
            await fuzzer.closed()
            fuzzer = await RawClient.connected(ws_url(node), token("fuzzer"), codec=codec)
            continue
        assert kind not in ("disconnect", None), (frame, answer)
        if kind == "error":
            assert answer["code"] in CLIENT_CODES, (frame, answer)
            refused[answer["code"]] = refused.get(answer["code"], 0) + 1
        elif kind == "published" and answer.get("room") == room and "seq" in answer:
            stored[answer["seq"]] = frame.get("data")
    assert stored and refused.get(4000), (len(stored), refused)  # both outcomes reached
    # A last event: the room delivers in seq order, so a repeat of any of them would come
    # before it.
    last = await members[0].request({"type": "publish", "room": room, "event": "last"})
    got = [await _drain(m, room, {*stored, last["seq"]}) for m in members]
    for seq, sent in stored.items():
        as_json, as_cbor = got[0][seq], got[1][seq]
        assert len(as_json) == 1 and len(as_cbor) == 1, (seq, as_json, as_cbor)  # once each
        assert as_json[0] == as_json_member(as_cbor[0]), (seq, as_json, as_cbor)
        if not cbor:
            assert as_json[0] == json.loads(json.dumps(sent, default=_base64)), (seq, as_json)
    failures = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures[:3]]
    plain = await RawClient.connected(ws_url(node), token("plain"))
    assert (await plain.request({"type": "ping"}))["type"] == "pong"
    for c in (plain, fuzzer, *members):
        await c.close()
