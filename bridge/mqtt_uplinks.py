"""Plain MQTT uplinks: decoding their payload, and making their refusals visible. Pure.

MQTT 3.1.1 has no negative PUBACK, so a refused uplink is acknowledged and dropped; these are
the means by which it still shows:

* :func:`decode_uplink`: a JSON object or a CBOR map, told apart by the first byte, so the
  reason for a refusal can say which one was meant;
* :class:`RefusalLog`: counts refusals by reason (``rtnode_mqtt_uplinks_refused_total``), and
  says which ones to report (a log line at info and a notice to the device): at most one per
  device and reason per ``interval_s``, with how many were held back since;
* :func:`refusal_notice`: the ``error`` frame a device gets on ``rtnode/v1/<id>/out``;
* :func:`payload_preview`: what of a refused payload may appear in the log.

The MQTT glue (``bridge.mqtt_session``, ``bridge.mqtt_external``) uses them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from node.protocol.errors import CodecError, ProtocolError
from node.protocol.frames import (
    Publish,
    cbor_loads_strict,
    error_frame,
    json_loads_strict,
    publish_frame,
)
from node.protocol.tokens import Principal

__all__ = [
    "REASONS",
    "REPORT_INTERVAL_S",
    "RefusalLog",
    "UplinkDecodeError",
    "check_will",
    "decode_uplink",
    "label_of",
    "payload_preview",
    "refusal_notice",
    "uplink_publish",
]

#: Every reason an uplink is refused for, as counted (the metric's ``reason`` label).
REASONS: dict[str, str] = {
    "undecodable": "neither a JSON object nor a CBOR map (4000)",
    "not_a_map": "valid CBOR, but not a map (4000)",
    "bad_field": "a map without a valid event, room or msg_id (4000)",
    "invalid_data": "data outside the value model (4000)",
    "forbidden": "no publish right on the room, or a reserved event name (4003)",
    "unauthenticated": "no identity (4001)",
    "rate_limited": "over the device's rate limit (4009)",
    "too_large": "event over the room's max_payload_bytes (4013)",
    "store_refused": "refused for good by the store (4500)",
    "unknown_topic": "a topic that is neither rooms/<room>/up nor the device's tunnel (4000)",
    "other_tunnel": "another device's tunnel, rtnode/v1/<other id>/in (4003)",
    "bad_tunnel_frame": "a tunnel payload that is not a valid frame (answered with error)",
    "will_topic": "a will on a topic other than rooms/<room>/up (4000)",
    "no_identity": "broker mode: rooms/<room>/up names no device",
    "bad_device_id": "broker mode: the topic's device id is outside the id grammar",
    "not_uplink": "broker mode: not an uplink topic",
    "not_state_room": "a RETAIN uplink to a room that is not a state room (4000)",
}
#: At most one report (log line and notice) per device and reason in this many seconds.
REPORT_INTERVAL_S = 10.0

_LABEL_OF_CODE = {4000: "invalid_data", 4001: "unauthenticated", 4003: "forbidden",
                  4009: "rate_limited", 4013: "too_large", 4500: "store_refused"}
# Optional whitespace, then "{": the payload means to be JSON. No CBOR map starts like that
# (maps are 0xa0-0xbf, and a leading whitespace byte would be an item of its own).
_JSON_START = re.compile(rb"[ \t\r\n]*\{")
_PREVIEW_BYTES = 24


class UplinkDecodeError(ProtocolError):
    """An uplink payload that is neither a JSON object nor a CBOR map (4000).

    Args:
        label: The reason as counted: ``undecodable`` or ``not_a_map``.
        reason: One line for the device and the log.
    """

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(4000, reason)
        self.label = label


def decode_uplink(payload: bytes) -> dict[str, Any]:
    """The map of a plain uplink: a JSON object or a CBOR map.

    A payload whose first byte after optional whitespace is ``{`` is JSON (UTF-8, one object,
    no ``NaN``); any other is CBOR (exactly one item, no tags). Then both go through the same
    rules (``publish_frame``, admission).

    Raises:
        UplinkDecodeError: 4000, with a reason that says what was expected.
    """
    if _JSON_START.match(payload):
        try:
            value = json_loads_strict(payload)
        except CodecError:
            raise UplinkDecodeError(
                "undecodable", f"payload starts with {{ but is not a JSON object: "
                               f"{_json_error(payload)}") from None
        if not isinstance(value, dict):  # cannot happen after "{", kept for the type
            raise UplinkDecodeError("undecodable", "payload is not a JSON object")
        return value
    try:
        value = cbor_loads_strict(payload)
    except CodecError:
        raise UplinkDecodeError(
            "undecodable", "payload is neither a JSON object nor a CBOR map") from None
    if not isinstance(value, dict):
        raise UplinkDecodeError(
            "not_a_map", f"payload is a CBOR {_cbor_kind(value)}, expected a map "
                         "{event, data, msg_id?} (or a JSON object)")
    return value


def uplink_publish(payload: bytes, room: str) -> Publish:
    """The ``publish`` of a plain uplink to ``room``: :func:`decode_uplink`, then the fields
    {event, data, msg_id?} as every door reads them (``publish_frame``).

    Raises:
        UplinkDecodeError: 4000: ``undecodable``, ``not_a_map``, or ``bad_field`` (no valid
            event, room or msg_id).
    """
    fields = decode_uplink(payload)
    if "event" not in fields:
        raise UplinkDecodeError("bad_field", "the map has no event: expected "
                                             "{event, data?, msg_id?}")
    try:
        return publish_frame(fields, room)
    except ProtocolError as exc:
        raise UplinkDecodeError("bad_field", exc.reason) from None


def check_will(principal: Principal, topic: str, payload: bytes) -> None:
    """Check at CONNECT a will that could never be stored, so the device can learn why while
    it is still there: its topic, its payload and the right to publish to its room. (The
    rest of admission, such as the rate and the value model, applies when it is sent.)

    Raises:
        ProtocolError: 4000 (``will_topic``, or a label of :func:`uplink_publish`) or 4003.
    """
    if not (topic.startswith("rooms/") and topic.endswith("/up")):
        raise UplinkDecodeError("will_topic", "a will is stored only on rooms/<room>/up")
    frame = uplink_publish(payload, topic[6:-3])
    if not principal.can("publish", frame.room):
        raise ProtocolError(4003, "no publish right on this room")


def _json_error(payload: bytes) -> str:
    """Where JSON decoding failed, in words (only on the error path: decodes again)."""
    try:
        json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        return "not valid UTF-8"
    except json.JSONDecodeError as exc:
        return f"{exc.msg} at character {exc.pos}"
    except (ValueError, RecursionError):
        return "not valid JSON"
    return "NaN, Infinity or a lone surrogate"  # what json_loads_strict refuses beyond json


def _cbor_kind(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return "simple value"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "text string"
    if isinstance(value, bytes):
        return "byte string"
    if isinstance(value, list):
        return "array"
    return "value"


def label_of(exc: ProtocolError) -> str:
    """The reason label of a refusal raised by ``publish_frame``, admission or the store."""
    label = getattr(exc, "label", None)
    if isinstance(label, str) and label in REASONS:
        return label
    return _LABEL_OF_CODE.get(exc.code, "invalid_data")


def refusal_notice(code: int, reason: str, topic: str, *, msg_id: object = None,
                   retry: bool = False) -> dict[str, Any]:
    """The ``error`` frame telling a device why its uplink on ``topic`` was dropped.

    It has no ``id`` (no request asked for it); ``topic`` is the uplink's (cut to 256
    characters), and ``msg_id`` the uplink's when it had a valid one.
    """
    frame = error_frame(code, reason, retry=retry)
    frame["topic"] = topic[:256]
    if isinstance(msg_id, str) and 0 < len(msg_id) <= 128:
        frame["msg_id"] = msg_id
    return frame


def payload_preview(payload: bytes) -> str:
    """Its length and first bytes, escaped: all of a refused payload the log may show."""
    head = payload[:_PREVIEW_BYTES]
    more = "..." if len(payload) > _PREVIEW_BYTES else ""
    return f"{len(payload)} bytes {head!r}{more}"


class RefusalLog:
    """Refused uplinks: counted by reason, and reported at most once per device and reason
    per ``interval_s``.

    Pure: the caller passes the time, and logs (and notifies) when :meth:`refuse` says so.

    Args:
        interval_s: The shortest time between two reports for one device and reason.
        max_keys: Devices x reasons remembered; beyond, the stale ones are forgotten, and if
            none is stale (a flood of distinct ids) new ones are not reported.

    Attributes:
        counts: Refusals by reason label.
        held: Refusals counted but never reported because ``max_keys`` were all fresh.
    """

    def __init__(self, interval_s: float = REPORT_INTERVAL_S, max_keys: int = 10_000) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self.counts: Counter[str] = Counter()
        self.held = 0
        self._last: dict[tuple[str, str], list[float]] = {}  # key -> [reported at, held back]

    def refuse(self, device: str, label: str, now: float) -> int | None:
        """Count one refusal.

        Returns:
            None when it is not to be reported (one was, less than ``interval_s`` ago);
            else how many of this device and reason were held back since the last report.
        """
        self.counts[label] += 1
        key = (device, label)
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self.interval_s:
            entry[1] += 1
            return None
        if entry is None and len(self._last) >= self.max_keys:
            self._last = {k: e for k, e in self._last.items() if now - e[0] < self.interval_s}
            if len(self._last) >= self.max_keys:
                self.held += 1
                return None
        held = int(entry[1]) if entry is not None else 0
        self._last[key] = [now, 0]
        return held
