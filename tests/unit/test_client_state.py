"""The state-room map of ClientSession (issue 13): the ``state`` frame, keyed events, the seq
rule, ``unset``, and publish frames with ``key``/``unset``; plain values, no event loop."""

from __future__ import annotations

from typing import Any

from devices.client_session import ClientSession, Event, StateValues

ROOM = "fleet:lab"


def value(seq: int, key: str, data: Any = None, **extra: Any) -> dict[str, Any]:
    return {"seq": seq, "event": "reading", "data": data, "ts": 1700000000000 + seq,
            "from": {"user": key, "kind": "device"}, "key": key} | extra


def ev(seq: int, key: str, data: Any = None, **extra: Any) -> dict[str, Any]:
    return {"type": "event", "room": ROOM} | value(seq, key, data, **extra)


def joined(seq: int = 10) -> ClientSession:
    s = ClientSession()
    frame = s.join_frame(ROOM)
    s.receive({"type": "joined", "id": frame["id"], "room": ROOM, "seq": seq, "epoch": "e",
               "recovered": False, "replayed": 0})
    return s


def data_of(s: ClientSession) -> dict[str, Any]:
    return {k: e.data for k, e in s.values(ROOM).items()}


def test_state_frame_fills_the_values_and_is_reported() -> None:
    s = joined()
    out = s.receive({"type": "state", "room": ROOM,
                     "values": [value(7, "b", 2), value(3, "a", 1)]})
    assert len(out) == 1 and isinstance(out[0], StateValues)
    assert list(out[0].values) == ["a", "b"]  # ordered by key
    assert data_of(s) == {"a": 1, "b": 2}
    a = s.values(ROOM)["a"]
    assert a.seq == 3 and a.key == "a" and a.from_["user"] == "a" and a.event == "reading"


def test_live_events_update_and_unset_removes() -> None:
    s = joined()
    s.receive({"type": "state", "room": ROOM, "values": [value(3, "a", 1)]})
    items = s.receive(ev(11, "a", 5))
    assert isinstance(items[0], Event) and items[0].key == "a"
    s.receive(ev(12, "c", 9))
    assert data_of(s) == {"a": 5, "c": 9}
    items = s.receive(ev(13, "a", None, unset=True))
    assert isinstance(items[0], Event) and items[0].unset
    assert data_of(s) == {"c": 9}


def test_a_lower_seq_never_replaces_a_higher_one() -> None:
    s = joined(seq=20)
    s.receive(ev(21, "a", "new"))  # live before the values were applied (a racing read)
    s.receive({"type": "state", "room": ROOM, "values": [value(15, "a", "old")]})
    assert data_of(s) == {"a": "new"}
    # A removed key is not brought back by an older value either.
    s.receive(ev(22, "b", 1))
    s.receive(ev(23, "b", None, unset=True))
    s.receive({"type": "state", "room": ROOM, "values": [value(22, "b", 1)]})
    assert "b" not in s.values(ROOM)


def test_a_new_state_frame_drops_keys_removed_while_away() -> None:
    s = joined(seq=10)
    s.receive({"type": "state", "room": ROOM, "values": [value(3, "a", 1), value(4, "b", 2)]})
    # Re-joined later (seq 30): "a" was unset meanwhile, so it is absent from the values.
    frame = s.join_frame(ROOM)
    s.receive({"type": "joined", "id": frame["id"], "room": ROOM, "seq": 30, "epoch": "e",
               "recovered": True, "replayed": 0})
    s.receive({"type": "state", "room": ROOM, "values": [value(25, "b", 3)]})
    assert data_of(s) == {"b": 3}


def test_other_rooms_and_unkeyed_events_are_untouched() -> None:
    s = joined()
    s.receive({"type": "event", "room": ROOM, "seq": 11, "event": "x", "data": 1})
    s.receive({"type": "state", "room": "other:room", "values": [value(1, "a")]})
    s.receive({"type": "state", "room": ROOM, "values": "nonsense"})
    assert s.values(ROOM) == {} and s.values("other:room") == {}


def test_publish_frames_with_key_and_unset() -> None:
    s = ClientSession()
    plain = s.publish_frame(ROOM, "msg", {"x": 1}, "m1")
    assert plain == {"type": "publish", "room": ROOM, "event": "msg", "data": {"x": 1},
                     "msg_id": "m1", "id": plain["id"]}
    keyed = s.publish_frame(ROOM, "set", 22, "m2", key="desired:sim-1")
    assert keyed["key"] == "desired:sim-1" and keyed["data"] == 22
    unset = s.publish_frame(ROOM, "state:unset", None, "m3", key="k", unset=True)
    assert unset["unset"] is True and "data" not in unset and unset["key"] == "k"


def test_a_state_in_several_frames_is_whole_at_its_last() -> None:
    # A large state comes as several frames, all but the last with more: true. Keys of the
    # earlier frames are kept; the prune of keys removed while away waits for the last.
    s = joined(seq=10)
    s.receive({"type": "state", "room": ROOM, "values": [value(3, "a", 1), value(4, "z", 0)]})
    frame = s.join_frame(ROOM)
    s.receive({"type": "joined", "id": frame["id"], "room": ROOM, "seq": 30, "epoch": "e",
               "recovered": True, "replayed": 0})
    first = s.receive({"type": "state", "room": ROOM, "more": True,
                       "values": [value(3, "a", 1), value(5, "b", 2)]})
    assert first == []  # not whole yet
    out = s.receive({"type": "state", "room": ROOM, "values": [value(6, "c", 3)]})
    assert len(out) == 1 and isinstance(out[0], StateValues)
    assert data_of(s) == {"a": 1, "b": 2, "c": 3}  # "z" was unset while away
