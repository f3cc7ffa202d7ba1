"""The value model (node.protocol.values) and the codecs that enforce and respect it: pure."""

from __future__ import annotations

import math
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.api import HistoryQuery, validate
from bridge.sse import parse_cursor
from node.protocol.errors import CodecError, ProtocolError
from node.protocol.frames import CBOR, JSON, SEQ_MAX, json_loads_strict, parse_frame, publish_frame
from node.protocol.values import FRAME_MAX_DEPTH, INT_MAX, INT_MIN, MAX_DEPTH, check_value, to_safe
from tests.wsclient import as_json_member


def nest(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


ACCEPTED = [
    None, True, False, 0, INT_MIN, INT_MAX, -1.5, 1.5e308, 0.0, "", "text", "\u00e9\U0001f600",
    b"", b"\x00\xff", [], {}, {"a": [1, {"b": None}]}, nest(MAX_DEPTH), {"k": nest(MAX_DEPTH - 1)},
]

REFUSED = [
    (INT_MAX + 1, "data", "integer out of range"),
    (INT_MIN - 1, "data", "integer out of range"),
    (math.nan, "data", "not a finite number"),
    (math.inf, "data", "not a finite number"),
    ({"x": [1, -math.inf]}, "data.x[1]", "not a finite number"),
    ("a\ud800", "data", "lone surrogate"),
    ({"\udc00": 1}, "data", "map key with a lone surrogate"),
    ({b"k": 1}, "data", "map key is not text"),
    ({1: 1}, "data", "map key is not text"),
    ({"a b": {"c": cbor2.undefined}}, 'data["a b"].c', "undefined is not allowed"),
    ([cbor2.CBORSimpleValue(16)], "data[0]", "a CBOR simple value is not allowed"),
    ({"t": cbor2.CBORTag(1, 1)}, "data.t", "a CBOR tag is not allowed"),
    ((1, 2), "data", "tuple is not allowed"),
    ({"s": {1}}, "data.s", "set is not allowed"),
    (nest(MAX_DEPTH + 1), "data" + "[0]" * MAX_DEPTH, f"nested deeper than {MAX_DEPTH}"),
    ({"k": nest(MAX_DEPTH)}, "data.k" + "[0]" * (MAX_DEPTH - 1), "nested deeper"),
]


@pytest.mark.parametrize("value", ACCEPTED, ids=repr)
def test_accepted_values_round_trip_through_both_codecs(value: Any) -> None:
    check_value(value)
    frame = {"type": "history", "events": [{"event": "e", "data": value}]}  # the deepest frame
    [back] = CBOR.decode(CBOR.encode(frame))
    assert back["events"][0]["data"] == value
    [back] = JSON.decode(JSON.encode(frame))
    expected = as_json_member(value)
    assert back["events"][0]["data"] == expected


@pytest.mark.parametrize(("value", "path", "what"), REFUSED, ids=lambda v: repr(v)[:40])
def test_refused_values_name_the_path(value: Any, path: str, what: str) -> None:
    with pytest.raises(ProtocolError) as info:
        check_value(value)
    assert info.value.code == 4000 and info.value.retry is False
    reason = info.value.reason
    assert reason.startswith(f"bad value at {path[:160]}"), reason
    assert what in reason and "\n" not in reason


def test_the_path_names_params_and_results_too() -> None:
    with pytest.raises(ProtocolError, match=r"bad value at params\.a\[2\]: undefined"):
        check_value({"a": [1, 2, cbor2.undefined]}, "params")


def test_a_long_hostile_key_stays_one_short_line() -> None:
    with pytest.raises(ProtocolError) as info:
        check_value({"x\n" * 500: cbor2.undefined})
    assert "\n" not in info.value.reason and len(info.value.reason) < 250


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(INT_MIN, INT_MAX)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text() | st.binary(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                                max_size=4),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_what_the_model_accepts_every_reader_decodes(value: Any) -> None:
    check_value(value)
    body = CBOR.encode({"event": "e", "data": value})
    [stored] = CBOR.decode(body)  # the room's reader
    assert stored["data"] == value
    JSON.decode(JSON.encode({"type": "event", "data": stored["data"]}))  # a JSON member


anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(max_size=4)
    | st.sampled_from([cbor2.undefined, cbor2.CBORSimpleValue(99), cbor2.CBORTag(7, 1)]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.text(max_size=3) | st.binary(max_size=2) | st.integers(), kids, max_size=3),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(anything)
def test_encoders_are_total_and_to_safe_lands_in_the_model(value: Any) -> None:
    safe = to_safe(value)
    check_value(safe)
    JSON.decode(JSON.encode({"type": "event", "data": value}))  # never fails, always JSON
    CBOR.encode({"type": "event", "data": value})  # never fails (tags and bignums stay tags)
    CBOR.decode(CBOR.encode({"type": "event", "data": safe}))


def test_to_safe_representations() -> None:
    assert to_safe({"u": cbor2.undefined, "n": math.nan, "k": {b"\x01": 1, 2: "a"},
                    "s": "x\ud800", "big": 2**70, "t": (1, 2)}) == {
        "u": None, "n": None, "k": {"AQ==": 1, "2": "a"}, "s": "x\ufffd", "big": None,
        "t": [1, 2]}
    assert to_safe(nest(200)) is not None  # cut deep down, never a RecursionError


def test_json_decoder_refuses_what_no_codec_could_write_back() -> None:
    for bad in (b'{"id":"\\ud800"}', b'{"a":{"\\udfff":1}}', b'["\\ud83d x"]', b"\xff",
                b'{"a":NaN}', b"[Infinity]"):
        with pytest.raises(CodecError):
            json_loads_strict(bad)
        with pytest.raises(CodecError):
            JSON.decode(bad)
    assert json_loads_strict(b'"\\ud83d\\ude00"') == "\U0001f600"  # a pair is one character
    assert json_loads_strict('"\\\\ud800"') == "\\ud800"  # an escaped backslash, not an escape


def test_frames_may_wrap_a_value_at_the_limit_but_no_deeper() -> None:
    at_limit = {"type": "history", "events": [{"data": nest(MAX_DEPTH)}]}
    CBOR.decode(CBOR.encode(at_limit))
    with pytest.raises(CodecError):
        CBOR.decode(cbor2.dumps(nest(FRAME_MAX_DEPTH + 1)))


def test_seqs_a_client_names_are_bounded() -> None:
    assert parse_frame({"type": "ack", "room": "r", "seq": SEQ_MAX}).seq == SEQ_MAX  # type: ignore[union-attr]
    for frame in ({"type": "ack", "room": "r", "seq": SEQ_MAX + 1},
                  {"type": "join", "room": "r", "since": {"seq": 2**64}},
                  {"type": "history", "room": "r", "since": {"seq": -1}}):
        with pytest.raises(ProtocolError) as info:
            parse_frame(frame)
        assert info.value.code == 4000
    # the same bound where a seq comes in by HTTP: SSE's Last-Event-ID, /api/history?since=
    assert parse_cursor(f"r:{SEQ_MAX}") == {"r": SEQ_MAX}
    with pytest.raises(ProtocolError):
        parse_cursor(f"r:{SEQ_MAX + 1}")
    with pytest.raises(ProtocolError):
        validate(HistoryQuery, {"room": "r", "since": str(SEQ_MAX + 1)})


def test_publish_frame_from_a_map() -> None:
    frame = publish_frame({"event": "e", "data": [1], "msg_id": "m", "room": "ignored"}, "r")
    assert (frame.room, frame.event, frame.data, frame.msg_id) == ("r", "e", [1], "m")
    for fields, room in (({"event": "e"}, "a\n"), ({"event": 3}, "r"), ({}, None)):
        with pytest.raises(ProtocolError):
            publish_frame(fields, room)
