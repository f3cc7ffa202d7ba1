"""bridge.mqtt_uplinks: plain uplink payloads (JSON or CBOR) and the refusal log. Pure."""

from __future__ import annotations

import cbor2
import pytest

from bridge.mqtt_uplinks import (
    REASONS,
    RefusalLog,
    UplinkDecodeError,
    check_will,
    decode_uplink,
    label_of,
    payload_preview,
    refusal_notice,
    uplink_publish,
)
from node.protocol.errors import ProtocolError
from node.protocol.tokens import Principal


@pytest.mark.parametrize("payload", [
    b'{"event":"reading","data":{"t":21.5}}',
    b' \r\n\t{"event": "reading", "data": {"t": 21.5}}\n',
    cbor2.dumps({"event": "reading", "data": {"t": 21.5}}),
])
def test_json_objects_and_cbor_maps_decode_alike(payload: bytes) -> None:
    assert decode_uplink(payload) == {"event": "reading", "data": {"t": 21.5}}


@pytest.mark.parametrize(("payload", "label", "words"), [
    (b'{"event": "x",}', "undecodable", "not a JSON object: Expecting property name"),
    (b'{"event": NaN}', "undecodable", "NaN"),
    (b'{"event": "\xff"}', "undecodable", "UTF-8"),
    (b"[1, 2]", "undecodable", "neither a JSON object nor a CBOR map"),
    (b"21.5", "undecodable", "neither"),
    (b"", "undecodable", "neither"),
    (cbor2.dumps([1, 2]), "not_a_map", "CBOR array"),
    (cbor2.dumps("text"), "not_a_map", "CBOR text string"),
    (cbor2.dumps({"event": "x"}) + b"\x00", "undecodable", "neither"),
])
def test_what_is_neither_is_refused_with_a_reason(payload: bytes, label: str, words: str) -> None:
    with pytest.raises(UplinkDecodeError) as info:
        decode_uplink(payload)
    assert info.value.code == 4000 and info.value.label == label
    assert words in info.value.reason


def test_uplink_publish_reads_event_data_msg_id_only() -> None:
    frame = uplink_publish(b'{"event": "e", "data": 1, "msg_id": "m", "room": "x", "device": "d"}',
                           "sensors:lab")
    assert (frame.room, frame.event, frame.data, frame.msg_id) == ("sensors:lab", "e", 1, "m")
    with pytest.raises(UplinkDecodeError) as info:
        uplink_publish(b'{"data": 1}', "sensors:lab")
    assert info.value.label == "bad_field" and "event" in info.value.reason
    with pytest.raises(UplinkDecodeError) as info:
        uplink_publish(b'{"event": "e"}', "a/b")
    assert info.value.label == "bad_field" and "room" in info.value.reason


def test_check_will() -> None:
    dev = Principal(sub="d", tenant="default", kind="device",
                    rooms={"sensors:*": frozenset({"publish"})})
    check_will(dev, "rooms/sensors:lab/up", b'{"event": "offline"}')
    with pytest.raises(UplinkDecodeError) as info:
        check_will(dev, "status/d", b'{"event": "offline"}')
    assert info.value.label == "will_topic"
    with pytest.raises(ProtocolError) as perr:
        check_will(dev, "rooms/other:x/up", b'{"event": "offline"}')
    assert perr.value.code == 4003 and label_of(perr.value) == "forbidden"


def test_labels() -> None:
    assert label_of(ProtocolError(4009, "rate limited", retry=True)) == "rate_limited"
    assert label_of(ProtocolError(4013, "too large")) == "too_large"
    assert label_of(ProtocolError(4500, "store")) == "store_refused"
    assert label_of(ProtocolError(4000, "data.x: ...")) == "invalid_data"
    assert label_of(UplinkDecodeError("bad_field", "no event")) == "bad_field"
    assert {"undecodable", "bad_field", "forbidden", "unknown_topic", "will_topic"} <= set(REASONS)


def test_notice_and_preview() -> None:
    notice = refusal_notice(4003, "no publish right on this room", "rooms/x/up", msg_id="m1")
    assert notice == {"type": "error", "code": 4003, "reason": "no publish right on this room",
                      "retry": False, "topic": "rooms/x/up", "msg_id": "m1"}
    assert "msg_id" not in refusal_notice(4000, "r", "t", msg_id=7)
    preview = payload_preview(b"\x00\x01secret" + b"x" * 100)
    assert preview.startswith("108 bytes b'\\x00\\x01secret") and preview.endswith("'...")
    assert "x" * 30 not in preview


def test_refusal_log_reports_once_per_device_and_reason_per_interval() -> None:
    refusals = RefusalLog(interval_s=10)
    assert refusals.refuse("a", "bad_field", 0.0) == 0
    assert [refusals.refuse("a", "bad_field", t) for t in (1.0, 2.0, 9.9)] == [None] * 3
    assert refusals.refuse("a", "undecodable", 3.0) == 0  # another reason
    assert refusals.refuse("b", "bad_field", 3.0) == 0  # another device
    assert refusals.refuse("a", "bad_field", 10.0) == 3  # held back since the last report
    assert refusals.refuse("a", "bad_field", 20.5) == 0
    assert refusals.counts == {"bad_field": 7, "undecodable": 1}


def test_refusal_log_is_bounded() -> None:
    refusals = RefusalLog(interval_s=10, max_keys=3)
    assert [refusals.refuse(f"d{i}", "bad_field", 0.0) for i in range(4)] == [0, 0, 0, None]
    assert refusals.held == 1 and refusals.counts["bad_field"] == 4
    assert refusals.refuse("d9", "bad_field", 11.0) == 0  # the stale ones are forgotten
    assert len(refusals._last) == 1
