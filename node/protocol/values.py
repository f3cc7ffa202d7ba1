"""The value model: what ``data`` (of a publish) and ``params`` and ``result`` (of an rpc) may
hold. Pure: data in, data out, no I/O. Written down in docs/protocol-notes.md, "Value model".

One rule for every door and every codec, so that whatever the node acknowledges can be delivered
to every member in every codec (JSON, CBOR, SSE, plain MQTT), and read back by every reader:

* null and booleans;
* integers in ``[-2**63, 2**64 - 1]``: every value fits an int64 or a uint64, CBOR encodes each
  without a bignum tag (tags are refused by every rtnode reader) and JSON readers decode them
  (exactly in Python; a JavaScript ``JSON.parse`` rounds beyond 2**53, cbor-x gives a BigInt);
* floats that are finite (JSON has no NaN or Infinity);
* text that is valid Unicode (no lone surrogate: it cannot be written as UTF-8);
* byte strings: JSON and SSE members receive them as base64 text (RFC 4648, padded), CBOR and
  MQTT members as byte strings;
* lists, and maps whose keys are text;
* at most :data:`MAX_DEPTH` containers nested in one another;
* nothing else: no CBOR tags, ``undefined`` or other simple values.

:func:`check_value` enforces it (the admission pipeline calls it); :func:`to_safe` turns what an
older node stored, or a backend wrote to the stream directly, into something every codec can
encode, so that encoders never fail on an event they must deliver.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable
from math import isfinite
from typing import Any

from node.protocol.errors import ProtocolError

__all__ = [
    "FRAME_MAX_DEPTH",
    "INT_MAX",
    "INT_MIN",
    "MAX_DEPTH",
    "check_value",
    "has_lone_surrogate",
    "has_long_digits",
    "to_safe",
]

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
MAX_DEPTH = 32
#: How deep the frames that carry a value may nest: the deepest the node sends is a ``history``
#: reply (frame -> events -> event -> data), three levels above the value. Readers decode frames
#: with this limit, so that a value at :data:`MAX_DEPTH` is never refused by a reader.
FRAME_MAX_DEPTH = MAX_DEPTH + 3

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}\Z")
_KINDS = {"UndefinedType": "undefined", "CBORSimpleValue": "a CBOR simple value",
          "CBORTag": "a CBOR tag", "LoneSurrogate": "text with a lone surrogate"}
_INT_RANGE = "integer out of range [-2^63, 2^64-1]"


class _Refused(Exception):
    """Raised inside the walk; carries the reason and the path, innermost step first."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what
        self.path: list[str] = []


def check_value(value: Any, where: str = "data") -> None:
    """Check that ``value`` is within the value model.

    Args:
        value: A decoded ``data``, ``params`` or ``result``.
        where: The name of the field, first step of the path in the error.

    Raises:
        ProtocolError: 4000, with a one-line reason naming the offending path, e.g.
            ``bad value at data.readings[3]: integer out of range [-2^63, 2^64-1]``.
    """
    try:
        _check(value, MAX_DEPTH)
    except _Refused as exc:
        path = (where + "".join(reversed(exc.path)))[:160]
        raise ProtocolError(4000, f"bad value at {path}: {exc.what}") from None


def _text_ok(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _key_step(key: str) -> str:
    return f".{key}" if _NAME.match(key) else f"[{json.dumps(key[:32])}]"


def _check(value: Any, depth_left: int) -> None:
    # Exact types: decoders produce exactly these (bool is its own type, not an int here).
    t = type(value)
    if t is dict:
        if depth_left == 0:
            raise _Refused(f"nested deeper than {MAX_DEPTH}")
        for key in value:
            if type(key) is not str:
                raise _Refused("map key is not text")
            if not key.isascii() and not _text_ok(key):  # most keys are ASCII: no call
                raise _Refused("map key with a lone surrogate")
        _check_items(value.items(), depth_left - 1, _key_step)
    elif t is list:
        if depth_left == 0:
            raise _Refused(f"nested deeper than {MAX_DEPTH}")
        _check_items(enumerate(value), depth_left - 1, _index_step)
    elif t is str:
        if not _text_ok(value):
            raise _Refused("text with a lone surrogate")
    elif t is int:
        if not INT_MIN <= value <= INT_MAX:
            raise _Refused(_INT_RANGE)
    elif t is float:
        if not isfinite(value):
            raise _Refused("not a finite number")
    elif value is None or t is bool or t is bytes:
        return
    else:
        name = type(value).__name__
        raise _Refused(f"{_KINDS.get(name, name)} is not allowed")


def _check_items(pairs: Iterable[tuple[Any, Any]], depth_left: int,
                 step: Callable[[Any], str]) -> None:
    # The common scalars are checked inline: a call per item would cost about 3x.
    for where, item in pairs:
        ti = type(item)
        if (ti is str and item.isascii()) or (ti is int and INT_MIN <= item <= INT_MAX) \
                or (ti is float and isfinite(item)) or item is None or ti is bool:
            continue
        try:
            _check(item, depth_left)
        except _Refused as exc:
            exc.path.append(step(where))
            raise


def _index_step(index: int) -> str:
    return f"[{index}]"


def has_lone_surrogate(value: Any) -> bool:
    """Whether any text in ``value`` (map keys included) holds a lone surrogate.

    Only JSON can carry one (``"\\ud800"``); the JSON decoder calls this when the text has a
    surrogate escape at all, which is rare.
    """
    t = type(value)
    if t is str:
        return not _text_ok(value)
    if t is dict:
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if t is list:
        return any(has_lone_surrogate(v) for v in value)
    return False


def _safe_text(text: str) -> str:
    if _text_ok(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _safe_key(key: Any) -> str:
    if type(key) is str:
        return _safe_text(key)
    if isinstance(key, bytes | bytearray):
        return base64.b64encode(bytes(key)).decode("ascii")
    return _safe_text(str(key))


def to_safe(value: Any, depth_left: int = 2 * FRAME_MAX_DEPTH) -> Any:
    """A copy of ``value`` that JSON and CBOR can both encode, for what is already stored.

    Whatever the model refuses becomes null (``undefined``, simple values, tags, NaN and the
    infinities, integers out of range, containers nested too deep); map keys become text
    (byte strings as base64); lone surrogates become U+FFFD. Never raises.
    """
    t = type(value)
    if t is str:
        return _safe_text(value)
    if t is int:
        return value if INT_MIN <= value <= INT_MAX else None
    if t is float:
        return value if isfinite(value) else None
    if value is None or t is bool or t is bytes:
        return value
    if depth_left <= 0:
        return None
    if isinstance(value, dict):
        return {_safe_key(k): to_safe(v, depth_left - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_safe(v, depth_left - 1) for v in value]
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return None


# A run of 19 digits: orjson reads an integer beyond 64 bits (or below -2**63) as a float, json
# as an int (that the value model then refuses); text with one takes the slow path. Looked for
# in the UTF-8 bytes with every digit made a 0 (bytes.translate, then a substring search):
# ~0.25 us for a frame of 150 bytes, where a regex ([0-9][0-9]{18}) took ~0.95 us (that and
# nats-py's subject check, both regex searches, were 3.1% of an event's instructions). (UTF-8
# puts no ASCII byte inside a longer character.)
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN_ZEROS = b"0" * 19


def has_long_digits(text: str | bytes) -> bool:
    """Whether ``text`` holds a run of 19 or more ASCII digits."""
    if len(text) < 19:
        return False
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")
    # find, not `in`: bytes' `in` with a bytes needle first tries it as a byte value and
    # formats (then clears) a TypeError, ~0.2 us a frame.
    return text.translate(_DIGITS_AS_ZERO).find(_NINETEEN_ZEROS) >= 0
