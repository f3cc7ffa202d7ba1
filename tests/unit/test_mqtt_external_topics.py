"""External broker uplink topics: the sender is the topic's last level, within the id grammar."""

from __future__ import annotations

import random
import string

import pytest

from bridge.mqtt_external import UplinkRefused, device_id_ok, uplink_route
from node.protocol.ids import ID_MAX_LEN

FORBIDDEN = ".*>/ \t\r\n\x00\x7f\u00a0\u2028é$!%~,'\"\\+#"


def test_the_sender_is_the_last_level() -> None:
    assert uplink_route("rooms/sensors:lab/up/thermo-1") == ("sensors:lab", "thermo-1")
    assert uplink_route("rooms/r/up/a@b=c_d:e-1") == ("r", "a@b=c_d:e-1")


@pytest.mark.parametrize(("topic", "label"), [
    ("rooms/sensors:lab/up", "no_identity"),
    ("rooms//up", "no_identity"),
    ("rooms/r/up/", "bad_device_id"),
    ("rooms/r/up/a.b", "bad_device_id"),
    ("rooms/r/up/>", "bad_device_id"),
    ("rooms/r/up/" + "x" * (ID_MAX_LEN + 1), "bad_device_id"),
    ("rooms/r/up/a/b", "not_uplink"),
    ("rooms/r/down/a", "not_uplink"),
    ("room/r/up/a", "not_uplink"),
    ("rooms/r", "not_uplink"),
])
def test_a_topic_naming_no_valid_sender_is_refused(topic: str, label: str) -> None:
    with pytest.raises(UplinkRefused) as err:
        uplink_route(topic)
    assert err.value.label == label and err.value.code == 4001


def test_device_ids_accepted_are_safe_in_subjects_keys_and_topics() -> None:
    rng = random.Random(11)
    valid = string.ascii_letters + string.digits + "_:@=-"
    for _ in range(5000):
        alphabet = valid if rng.random() < 0.5 else valid + FORBIDDEN  # half: all valid chars
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 140)))
        ok = device_id_ok(value)
        assert ok == (0 < len(value) <= ID_MAX_LEN and not set(value) & set(FORBIDDEN)), repr(value)
        if ok:
            assert uplink_route(f"rooms/r/up/{value}") == ("r", value)
        else:
            with pytest.raises(UplinkRefused):
                uplink_route(f"rooms/r/up/{value}")
