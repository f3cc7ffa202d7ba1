"""The QoS 1 window of a device session (bridge.mqtt_qos): pure, no sockets."""

from __future__ import annotations

from typing import Any

from bridge.mqtt_qos import QosWindow, packet_id_of
from bridge.mqtt_sessions import SessionRecord


def seqs(out: list[Any]) -> list[int]:
    return [m.seq for m in out]


def test_window_bounds_in_flight_and_keeps_order() -> None:
    w = QosWindow(2)
    w.track("r", 10)
    assert seqs(w.offer("r", 11, b"a")) == [11]
    assert seqs(w.offer("r", 12, b"bb")) == [12]
    assert w.offer("r", 13, b"ccc") == [] and w.waiting_bytes == 3  # beyond the window
    assert w.offer("r", 12, b"again") == []  # not above what was offered: dropped
    assert seqs(w.ack(packet_id_of(12))) == [13]  # out of order: the slot frees ...
    assert w.rooms["r"].cursor == 10  # ... but the cursor waits for 11
    w.changed = False
    assert w.ack(packet_id_of(11)) == []
    assert w.rooms["r"].cursor == 12 and w.changed
    assert w.ack(packet_id_of(11)) == []  # a duplicate ack changes nothing
    w.ack(packet_id_of(13))
    assert w.positions() == ({"r": 13}, {"r": 13})


def test_resume_sends_unacknowledged_with_dup_and_same_ids() -> None:
    w = QosWindow(32)
    w.track("r", 100, sent=103)  # 101..103 were sent on the last connection
    out = w.offer("r", 101, b"x") + w.offer("r", 103, b"y") + w.offer("r", 107, b"z")
    assert [(m.seq, m.dup, m.packet_id) for m in out] == [
        (101, True, 102), (103, True, 104), (107, False, 108)]
    assert w.positions()[1] == {"r": 107}


def test_packet_ids_wrap_and_a_busy_id_waits() -> None:
    assert packet_id_of(0xFFFE) == 0xFFFF and packet_id_of(0xFFFF) == 1
    w = QosWindow(8)
    w.track("r", 0)
    assert seqs(w.offer("r", 1, b"a")) == [1]
    # 65536 has the packet id of 1: it waits (and what follows it) until 1 is acked.
    assert w.offer("r", 1 + 0xFFFF, b"b") == [] and w.offer("r", 70000, b"c") == []
    assert seqs(w.ack(packet_id_of(1))) == [1 + 0xFFFF, 70000]


def test_retained_values_move_no_cursor_and_untrack_drops_waiting() -> None:
    w = QosWindow(1)
    w.track("s", 50)
    out = w.offer_retained("s", 40, b"v")
    assert [(m.seq, m.retain) for m in out] == [(40, True)]
    assert w.offer("s", 51, b"e") == []
    assert seqs(w.ack(packet_id_of(40))) == [51]
    assert w.rooms["s"].cursor == 50  # the retained value is no event of the cursor
    w.track("t", 0)
    w.offer("t", 60, b"q")  # waits behind 51
    w.untrack("t")
    assert w.waiting_bytes == 0 and w.ack(packet_id_of(51)) == []
    assert w.positions() == ({"s": 51}, {"s": 51})


def test_record_round_trip() -> None:
    rec = SessionRecord("t1", "dev-1", subs={"rooms/a": 1}, cursors={"a": 5}, epoch="e",
                        node="n1", connected=True, created_ms=1, updated_ms=2, sent={"a": 7})
    assert SessionRecord.from_json(rec.to_json()) == rec
    rec.behind = True
    assert SessionRecord.from_json(rec.to_json()) == rec
    assert SessionRecord.from_json({"tenant": "t"}) is None
    assert SessionRecord.from_json([1]) is None
