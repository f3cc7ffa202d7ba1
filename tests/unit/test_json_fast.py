"""The JSON codec's fast path (orjson) against its reference (the standard library): pure.

Whatever text a peer sends, ``json_loads_strict`` must answer exactly as ``json_loads_slow``
(the same value, of the same types, or the same refusal), and ``JSON.encode`` must write what
the standard library's encoder writes, up to the spelling of numbers. Random and hostile text,
seeded (``RTNODE_TEST_JSON_SEED``, default 1; hypothesis derandomized).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.protocol.errors import CodecError
from node.protocol.frames import JSON, has_long_digits, json_loads_slow, json_loads_strict

SEED = int(os.environ.get("RTNODE_TEST_JSON_SEED", "1"))

# Pieces a hostile peer splices into otherwise valid JSON.
HOSTILE = [
    "\\ud800", "\\udc00", "\\ud83d\\ude00", "\\u0000", "NaN", "Infinity", "-Infinity", "1e400",
    "-1e400", "2.4e-324", "18446744073709551615", "18446744073709551616", "-9223372036854775808",
    "-9223372036854775809", "123456789012345678901234567890", "0.1234567890123456789", "-0",
    "-0.0", "1E5", "01", "\ufeff", "\x00", "\x1f", "\x7f", "\u2028", "\u00e9", "\U0001f600", '"',
    "\\", "\\/", "\\x", "[", "]", "{", "}", ",", ":", " ", "\t", "\r", "true", "nul", "[1,]",
    "{\"a\":1,\"a\":2}", "9" * 40, "1" + "0" * 308, "[" * 300, "]" * 300,
]


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types, all the way down (1 == 1.0 == True are not the same)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def answer(fn: Any, text: str | bytes) -> tuple[str, Any]:
    try:
        return "ok", fn(text)
    except CodecError as exc:
        return "refused", exc.reason


def check(text: str | bytes) -> None:
    fast, slow = answer(json_loads_strict, text), answer(json_loads_slow, text)
    assert fast[0] == slow[0], (text, fast, slow)
    if fast[0] == "ok":
        assert same(fast[1], slow[1]), (text, fast, slow)
    else:
        assert fast[1] == slow[1]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=20,
)


@settings(derandomize=True, max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.integers(min_value=0, max_value=2**32))
def test_fast_decode_answers_as_the_reference(value: Any, seed: int) -> None:
    text = json.dumps(value, ensure_ascii=seed % 2 == 0)
    check(text)
    check(text.encode("utf-8", "surrogatepass"))
    rnd = random.Random(SEED * 1_000_003 + seed)
    for _ in range(4):  # hostile splices and cuts of the same text
        at = rnd.randrange(len(text) + 1)
        mutated = text[:at] + rnd.choice(HOSTILE) + text[at + rnd.randrange(3):]
        check(mutated)
        check(mutated.encode("utf-8", "surrogatepass"))


def test_fast_decode_on_random_bytes() -> None:
    rnd = random.Random(SEED)
    alphabet = b'0123456789-+.eE"\\u{}[],: \t\r\nabcdfnrtxDd\x00\x7f\xc3\xa9\xed\xa0\x80\xff'
    for _ in range(5000):
        data = bytes(rnd.choice(alphabet) for _ in range(rnd.randrange(1, 24)))
        check(data)


def test_long_digits_are_found_as_a_regex_finds_them() -> None:
    # The fast path's test for integers orjson reads as floats: any text, str or UTF-8 bytes.
    rng = random.Random(SEED)
    pieces = ["0", "1", "9", "12345", "9" * 18, "9" * 19, "1" * 25, "a", " ", "-", ".", "e",
              "\u0663", "\uff11", "\u00b9", "\U0001d7cf", "\ud800", "\u00e9", "\U0001f600", '"']
    found = 0
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        want = re.search(r"[0-9]{19}", text, re.ASCII) is not None
        found += want
        assert has_long_digits(text) is want, repr(text)
        if "\ud800" not in text:
            assert has_long_digits(text.encode()) is want, repr(text)
    assert 300 < found < 2700  # both answers, many times


@pytest.mark.parametrize("piece", HOSTILE, ids=repr)
def test_fast_decode_on_each_hostile_piece(piece: str) -> None:
    for text in (piece, f"[{piece}]", f'{{"k":{piece}}}', f'"{piece}"'):
        check(text)


encodable = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats() | st.text() | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=4),
    max_leaves=20,
)


@settings(derandomize=True, max_examples=600, deadline=None)
@given(encodable)
def test_fast_encode_writes_what_the_reference_writes(value: Any) -> None:
    frame = {"type": "event", "data": value}
    fast = JSON.encode(frame)
    try:
        slow = JSON._encoder.encode(frame).encode("utf-8")
    except (ValueError, TypeError, RecursionError):
        return  # made safe: what the slow path writes then is what both write
    assert same(json.loads(fast), json.loads(slow)), (value, fast, slow)


def test_fast_encode_makes_unsafe_values_safe_as_before() -> None:
    for value in (math.nan, math.inf, 2**64, -(2**63) - 1, "a\ud800", {1: 2}, [[[]]] * 2):
        frame = {"data": value}
        assert json.loads(JSON.encode(frame)) is not None
    assert json.loads(JSON.encode({"data": math.nan})) == {"data": None}
    assert json.loads(JSON.encode({"data": "a\ud800"})) == {"data": "a\ufffd"}
