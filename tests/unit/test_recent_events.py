"""RecentEvents (node.core.events): the maps this node admitted, handed to its room actors so
that the live path skips the decode of what admission built. What a member receives must not
depend on it: the frames are byte-identical in every codec to those of a decoded body."""

from __future__ import annotations

from typing import Any

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.events import RecentEvents, event_frame
from node.protocol.frames import CBOR, JSON, cbor_loads_strict
from tests.unit.test_admission import ALICE, admission, frame
from tests.unit.test_values import json_values

values = json_values  # what the value model accepts (tests/unit/test_values.py)


def _here(tenant: str, room: str) -> bool:
    return True


@settings(max_examples=400, deadline=None)
@given(values, st.sampled_from(["direct", "json", "cbor"]),
       st.none() | st.text(min_size=1, max_size=8))
def test_a_kept_map_delivers_the_bytes_a_decoded_body_does(value: Any, via: str,
                                                           msg_id: str | None) -> None:
    # The value as each door hands it to admission: as built, or parsed from a JSON or a CBOR
    # frame (floats, bytes and big integers as that codec decodes them).
    if via == "json":
        [parsed] = JSON.decode(JSON.encode({"d": value}))
        value = parsed["d"]
    elif via == "cbor":
        value = cbor2.loads(cbor2.dumps(value))
    adm, _ = admission()
    adm.room_here = _here
    admitted = adm.admit("ws", ALICE, frame(data=value, msg_id=msg_id), client_id="c1")
    kept = adm.recent.take(admitted.body)
    assert kept is not None
    decoded = cbor_loads_strict(admitted.body)
    assert kept == decoded
    for codec in (JSON, CBOR):
        assert (codec.encode(event_frame("chat:a", 7, kept))
                == codec.encode(event_frame("chat:a", 7, decoded)))
    assert adm.recent.take(admitted.body) is None  # taken once


def test_only_events_of_a_room_running_here_outside_state_rooms_are_kept() -> None:
    adm, _ = admission(namespaces={"st": {"state": True}})
    here: set[str] = {"chat:a", "st:a"}
    adm.room_here = lambda tenant, room: room in here
    principal = ALICE.__class__(sub="alice", tenant="t1",
                                rooms={"*": frozenset({"publish"})})
    kept = adm.admit("ws", principal, frame(room="chat:a", data=1), client_id=None)
    elsewhere = adm.admit("ws", principal, frame(room="chat:b", data=1), client_id=None)
    state = adm.admit("ws", principal, frame(room="st:a", data=1), client_id=None)
    assert adm.recent.take(kept.body) is not None
    assert adm.recent.take(elsewhere.body) is None
    assert adm.recent.take(state.body) is None
    assert len(adm.recent) == 0


def test_what_is_never_taken_is_pushed_out_by_count_and_by_bytes() -> None:
    recent = RecentEvents(capacity=3, max_bytes=100)
    for i in range(5):
        recent.put(bytes([i]) * 10, {"i": i})
    assert len(recent) == 3
    assert recent.take(bytes([0]) * 10) is None and recent.take(bytes([1]) * 10) is None
    assert recent.take(bytes([4]) * 10) == {"i": 4}
    recent.put(b"a" * 60, {"big": 1})
    recent.put(b"b" * 60, {"big": 2})  # 120 bytes with a's: a goes (and the older ones)
    assert recent.take(b"a" * 60) is None
    assert recent.take(b"b" * 60) == {"big": 2}
    assert len(recent) == 0
    recent.put(b"same", {"n": 1})
    recent.put(b"same", {"n": 1})  # equal bytes, equal map: one entry, counted once
    assert len(recent) == 1 and recent.take(b"same") == {"n": 1}
    recent.put(b"x" * 100, {"fits": True})
    assert recent.take(b"x" * 100) == {"fits": True}
