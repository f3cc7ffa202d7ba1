"""node.protocol.frames.salvage_frames: a refused message read again, only to answer its frames by
their ids. Pure: seeded hostile frames, no sockets."""

from __future__ import annotations

import json
import math
import os
import random
from typing import Any

import cbor2
import pytest

from node.protocol.errors import CodecError, ProtocolError
from node.protocol.frames import (
    CBOR,
    JSON,
    SALVAGE_MAX_DEPTH,
    LoneSurrogate,
    parse_frame,
    request_id_of,
    salvage_frames,
)
from node.protocol.values import check_value
from tests.integration.test_frame_fuzz import _frame

SEED = int(os.environ.get("RTNODE_TEST_SALVAGE_SEED", "7"))
VALUES = ("data", "params", "result")


def _nest(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_what_the_value_model_refuses_is_kept_to_be_refused() -> None:
    bignum = {"type": "reply", "id": "r1", "result": {"n": 2**70, "r": cbor2.CBORTag(35, "a+")}}
    [frame] = salvage_frames(cbor2.dumps(bignum), True, 4) or []
    assert frame["result"]["n"] == cbor2.CBORTag(2, (2**70).to_bytes(9, "big"))
    assert frame["result"]["r"] == cbor2.CBORTag(35, "a+"), "no regular expression compiled"
    with pytest.raises(ProtocolError, match=r"bad value at result.n: a CBOR tag is not allow"):
        check_value(parse_frame(frame).result, "result")  # type: ignore[union-attr]
    [keyed] = salvage_frames(cbor2.dumps({"type": "reply", "id": 2, "result": {5: 1}}), True, 4) \
        or []
    with pytest.raises(ProtocolError, match=r"bad value at result: map key is not text"):
        check_value(parse_frame(keyed).result, "result")  # type: ignore[union-attr]
    # A shared reference to itself: kept as tags, no cycle built.
    [cycle] = salvage_frames(bytes.fromhex("d81c81d81d00"), True, 1) or []
    assert cycle == cbor2.CBORTag(28, [cbor2.CBORTag(29, 0)])
    text = '{"type":"publish","id":7,"room":"a","event":"e","data":[NaN,"\\ud800",-Infinity]}'
    [pub] = salvage_frames(text, False, 4) or []
    assert math.isnan(pub["data"][0]) and isinstance(pub["data"][1], LoneSurrogate)
    with pytest.raises(ProtocolError, match=r"bad value at data\[0\]: not a finite number"):
        check_value(parse_frame(pub).data)  # type: ignore[union-attr]
    surrogate_id = '{"type":"ping","id":"\\ud800"}'
    [ping] = salvage_frames(surrogate_id, False, 4) or []
    assert request_id_of(ping) is None
    with pytest.raises(ProtocolError):
        parse_frame(ping)
    deep = {"type": "publish", "id": 8, "room": "a", "event": "e", "data": _nest(60)}
    [frame] = salvage_frames(cbor2.dumps(deep), True, 4) or []
    with pytest.raises(ProtocolError, match="nested deeper than 32"):
        check_value(parse_frame(frame).data)  # type: ignore[union-attr]


@pytest.mark.parametrize("message", [
    b"\xff\xfe", b"\x9f\x01\xff",  # not CBOR; an indefinite-length array
    bytes.fromhex("a2616101616102"),  # a duplicate key
    cbor2.dumps(_nest(SALVAGE_MAX_DEPTH + 1)),
    cbor2.dumps({"type": "ping"}) * 5,  # more than max_frames (4)
    "{", '{"type":"ping"} x', b'{"type":"\xff"}', "[" * 5000 + "]" * 5000,
])
def test_what_cannot_be_read_at_all_stays_unread(message: bytes | str) -> None:
    binary = isinstance(message, bytes) and not message.startswith(b"{")
    assert salvage_frames(message, binary, 4) is None


def test_seeded_hostile_frames_salvaged_never_carry_a_refused_value_past_validation() -> None:
    """Every message the strict codecs refuse is either unread, or read into frames each of
    which fails validation or carries only values of the model in its typed fields (a refused
    value in data, params or result is the value check's to refuse). What the strict codecs
    read, salvage reads the same."""
    rng = random.Random(SEED)
    salvaged = unread = 0
    for fid in range(3000):
        cbor = rng.random() < 0.5
        frames = [_frame(rng, cbor, "room", fid) for _ in range(rng.choice([1, 1, 2]))]
        try:
            message: bytes | str = (b"".join(cbor2.dumps(f) for f in frames) if cbor
                                    else "\n".join(json.dumps(f) for f in frames))
        except (TypeError, ValueError):
            continue  # a key json cannot write
        if rng.random() < 0.1:  # cut short: unreadable either way
            message = message[:-rng.randint(1, 3)]
        codec = CBOR if cbor else JSON
        try:
            strict = codec.decode(message)
        except CodecError:
            strict = None
        got = salvage_frames(message, cbor, 8)
        if strict is not None:
            assert got == strict or repr(got) == repr(strict), message
            continue
        if got is None:
            unread += 1
            continue
        salvaged += 1
        for raw in got:
            try:
                frame = parse_frame(raw)
            except ProtocolError as exc:
                assert exc.code == 4000
                continue
            typed = frame.model_dump(exclude=set(VALUES))
            check_value(typed, "frame")  # no tag, NaN or lone surrogate in a typed field
    assert salvaged > 100 and unread > 10, (salvaged, unread)
