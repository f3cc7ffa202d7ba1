"""``parse_frame`` picks a frame's model by its ``type``: it must accept, build and refuse
exactly what the discriminated union of every frame type (its reference) does, with the same
field named in the reason. Random frames from hypothesis, near-valid and hostile."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from node.protocol.errors import ProtocolError
from node.protocol.frames import _BY_TYPE, ClientFrame, parse_frame

# The union validated as a whole: what parse_frame did before it picked a model by type.
_CLIENT_FRAME: TypeAdapter[ClientFrame] = TypeAdapter(ClientFrame)

FIELDS = ["id", "room", "event", "data", "msg_id", "key", "unset", "since", "presence",
          "rewind", "token", "client", "limit", "reverse", "to", "method", "params",
          "timeout_ms", "seq", "result", "error", "x"]
scalars = (st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats()
           | st.text(max_size=140) | st.sampled_from(["chat:r1", "m", "user:u1", "", " "]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(["seq", "epoch", "name", "version",
                                                         "code", "reason"]), inner,
                                        max_size=3), max_leaves=6)
types = st.sampled_from([*sorted(_BY_TYPE), "nope", "Publish", ""])
frames = st.builds(lambda kind, rest: {"type": kind, **rest}, types,
                   st.dictionaries(st.sampled_from(FIELDS), values, max_size=6))


def _reference(raw: dict[str, Any]) -> tuple[str, Any]:
    """What parse_frame did by the union: the frame, or the reason it gave."""
    try:
        return "ok", _CLIENT_FRAME.validate_python(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_context=False, include_input=False)[0]
        if err["type"] == "union_tag_invalid":
            return "refused", f"unknown frame type {raw['type'][:32]!r}"
        loc = [str(p) for p in err["loc"][1:]] or ["frame"]
        return "refused", f"bad field {'.'.join(loc)}: {err['msg']}"


@settings(max_examples=800, deadline=None)  # a timing bound is no assertion of behaviour
@given(frames)
def test_each_frame_as_the_union_would(raw: dict[str, Any]) -> None:
    expected = _reference(raw)
    try:
        got: tuple[str, Any] = ("ok", parse_frame(raw))
    except ProtocolError as exc:
        assert exc.code == 4000
        got = ("refused", exc.reason)
    assert got == expected


@pytest.mark.parametrize("raw", [
    {"type": "publish", "room": "chat:r1", "event": "m", "data": {"a": [1, 2]}, "id": 3},
    {"type": "join", "room": "chat:r1", "since": {"seq": 4, "epoch": "e"}},
    {"type": "publish", "room": "chat r1", "event": "m"},
    {"type": "join", "room": "chat:r1", "since": {"seq": -1}},
    {"type": "rpc", "to": "user:a b", "method": "m"},
    {"type": "bogus"},
])
def test_examples(raw: dict[str, Any]) -> None:
    test_each_frame_as_the_union_would.hypothesis.inner_test(raw)  # type: ignore[attr-defined]
