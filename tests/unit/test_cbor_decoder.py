"""The CBOR codec decodes every message with one decoder per thread (``CborCodec.decode``).

It must answer as a decoder built for that message alone would: nothing of a message, one that
failed midway included (depth reached, a tag refused, a duplicate key, bytes cut short), may
change how the next one is read. Held here against a fresh decoder per message, on seeded
streams of valid and hostile messages in random order.
"""

from __future__ import annotations

import io
import random
import struct
import threading
from typing import Any

import cbor2
import pytest

from node.protocol.errors import CodecError
from node.protocol.frames import (
    _SEMANTIC_REJECT,
    CBOR,
    CBOR_MAX_DEPTH,
    _reject_tag,
    cbor_loads_strict,
)


def fresh_decode(data: bytes) -> list[Any]:
    """The codec's decode as it was before the decoder was kept: one built per message."""
    fp = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(
        fp, tag_hook=_reject_tag, semantic_decoders=_SEMANTIC_REJECT,
        max_depth=CBOR_MAX_DEPTH, allow_indefinite=False, allow_duplicate_keys=False,
        strict_hashable_types=True)
    frames = []
    try:
        while fp.tell() < len(data):
            frames.append(decoder.decode())
    except (cbor2.CBORError, ValueError, RecursionError):
        raise CodecError("message is not valid CBOR") from None
    return frames


def answer(decode: Any, data: bytes) -> tuple[str, str]:
    """What ``decode`` makes of ``data``, comparable (a NaN is not equal to itself)."""
    try:
        return "ok", repr(decode(data))
    except CodecError as exc:
        return "refused", repr((exc.code, exc.reason))


def head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes((major << 5 | n,))
    if n < 256:
        return bytes((major << 5 | 24, n))
    if n < 65536:
        return bytes((major << 5 | 25,)) + struct.pack(">H", n)
    return bytes((major << 5 | 26,)) + struct.pack(">I", n)


def item(rng: random.Random, depth: int) -> bytes:
    """One CBOR item, valid or not (about one in five has something hostile inside)."""
    roll = rng.random()
    if depth > 0 and roll < 0.25:
        n = rng.randrange(4)
        return head(4, n) + b"".join(item(rng, depth - 1) for _ in range(n))
    if depth > 0 and roll < 0.45:
        n = rng.randrange(4)
        keys = [rng.choice(["a", "b", "data", "é", "k" * rng.randrange(30)]) for _ in range(n)]
        return head(5, n) + b"".join(cbor2.dumps(k) + item(rng, depth - 1) for k in keys)
    if roll < 0.55:
        return cbor2.dumps(rng.choice([0, 1, -1, 23, 24, 255, 256, 2**32, 2**64 - 1, -(2**63)]))
    if roll < 0.65:
        return cbor2.dumps(rng.choice(["", "x", "ü" * 3, "a" * 40, "\u2028"]))
    if roll < 0.7:
        return cbor2.dumps(rng.choice([b"", b"\x00\xff", bytes(300)]))
    if roll < 0.75:
        return cbor2.dumps(rng.choice([1.5, -0.0, 1e300, float("inf")]))
    if roll < 0.8:
        return bytes((rng.choice([0xF4, 0xF5, 0xF6, 0xF7]),))  # false, true, null, undefined
    hostile = [
        b"\xc1\x01",  # tag 1 (a datetime): refused
        b"\xd8\x23\x61x",  # tag 35 (a regex): refused
        b"\xd9\xd9\xf7\x01",  # tag 55799
        b"\xd8\x1c\x81\xd8\x1d\x00",  # shareable and its reference (a cycle)
        b"\x9f\x01\xff",  # indefinite array
        b"\x7f\x61a\xff",  # indefinite text
        b"\xa2\x61a\x01\x61a\x02",  # duplicate key
        b"\xa1\x81\x01\x02",  # an array as a map key
        b"\x62\xff\xfe",  # text that is not UTF-8
        b"\x5a\xff\xff\xff\xff",  # bytes longer than the message
        b"\x1c",  # reserved additional information
        b"\xff",  # a break on its own
        b"\x81" * (CBOR_MAX_DEPTH + 2) + b"\x00",  # nested beyond the limit
    ]
    return rng.choice(hostile)


def message(rng: random.Random) -> bytes:
    """Several items one after another, sometimes cut short or with a byte changed."""
    data = b"".join(item(rng, rng.randrange(6)) for _ in range(rng.randrange(1, 4)))
    roll = rng.random()
    if roll < 0.15 and len(data) > 1:
        data = data[:rng.randrange(1, len(data))]
    elif roll < 0.3 and data:
        i = rng.randrange(len(data))
        data = data[:i] + bytes((rng.randrange(256),)) + data[i + 1:]
    elif roll < 0.35:
        data = b"\x81" * rng.randrange(CBOR_MAX_DEPTH - 3, CBOR_MAX_DEPTH + 3) + b"\x01"
    return data


@pytest.mark.parametrize("seed", range(8))
def test_a_kept_decoder_answers_as_a_fresh_one(seed: int) -> None:
    rng = random.Random(seed)
    refused = decoded = 0
    for _ in range(1500):
        data = message(rng)
        expected = answer(fresh_decode, data)
        assert answer(CBOR.decode, data) == expected, data.hex()
        if expected[0] == "ok":
            decoded += 1
        else:
            refused += 1
    assert refused > 150 and decoded > 150  # both kinds, in every order


def test_depth_is_counted_from_zero_after_a_message_that_failed_deep() -> None:
    at_limit = b"\x81" * (CBOR_MAX_DEPTH - 1) + b"\x01"
    beyond = b"\x81" * (CBOR_MAX_DEPTH + 1) + b"\x01"
    assert answer(fresh_decode, at_limit)[0] == "ok"
    assert answer(fresh_decode, beyond)[0] == "refused"
    for failing in (b"\x81" * 30 + b"\xc1\x01", b"\x81" * 30 + b"\xa2\x61a\x01\x61a\x02",
                    b"\x81" * 30, b"\x81" * 30 + b"\x5f", beyond):
        for _ in range(3):
            assert answer(CBOR.decode, failing)[0] == "refused"
        assert answer(CBOR.decode, at_limit) == answer(fresh_decode, at_limit)
        assert answer(CBOR.decode, beyond) == answer(fresh_decode, beyond)


def one_item(data: bytes) -> Any:
    """``cbor_loads_strict`` as it was: the codec's decode, then exactly one item."""
    items = CBOR.decode(data)
    if len(items) != 1:
        raise CodecError("expected exactly one CBOR item")
    return items[0]


@pytest.mark.parametrize("seed", range(4))
def test_one_item_answers_as_the_codec_does(seed: int) -> None:
    """cbor_loads_strict reads every device uplink with the codec's decoder, not its list:
    the same answer, value or refusal and reason, on seeded valid and hostile messages."""
    rng = random.Random(1000 + seed)
    kinds = {"ok": 0, "refused": 0}
    for _ in range(1500):
        data = message(rng)
        expected = answer(one_item, data)
        assert answer(cbor_loads_strict, data) == expected, data.hex()
        kinds[expected[0]] += 1
    assert min(kinds.values()) > 150


def test_one_item_exactly() -> None:
    assert cbor_loads_strict(b"\xa1\x61a\x01") == {"a": 1}
    for data in (b"", b"\x01\x02", b"\xa1\x61a"):
        with pytest.raises(CodecError):
            cbor_loads_strict(data)
    assert cbor_loads_strict(b"\x01") == 1  # after the refusals
    assert answer(cbor_loads_strict, "x") == answer(one_item, "x")  # text: refused, as before
    assert answer(cbor_loads_strict, bytearray(b"\x01")) == ("ok", "1")


def test_threads_decode_with_their_own_decoder() -> None:
    messages = [cbor2.dumps({"n": i, "pad": "x" * (i % 50), "deep": [[[i]]]}) for i in range(300)]
    wrong: list[int] = []

    def run(offset: int) -> None:
        for _ in range(20):
            for i in range(len(messages)):
                j = (i + offset) % len(messages)
                if CBOR.decode(messages[j]) != [{"n": j, "pad": "x" * (j % 50),
                                                 "deep": [[[j]]]}]:
                    wrong.append(j)
                if i % 7 == 0:
                    with pytest.raises(CodecError):
                        CBOR.decode(b"\xc1\x01")

    threads = [threading.Thread(target=run, args=(k * 37,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
