"""Refused MQTT uplinks are visible (issue 15, point 2), and plain uplinks accept JSON.

MQTT 3.1.1 has no negative PUBACK: a refused uplink is acknowledged and dropped. Each refusal
is then counted per reason (``rtnode_mqtt_uplinks_refused_total{reason}``), logged at info
with the device id and the reason (a short preview of the payload at most), and told to the
device in an ``error`` notice on its ``rtnode/v1/<id>/out`` topic; log and notice at most once
per device and reason per 10 s. Real node, real clients: aiomqtt, paho-mqtt, mosquitto_pub, and
Mosquitto for the external-broker path.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
from typing import Any

import aiomqtt
import cbor2
import paho.mqtt.client as paho
import pytest

from tests.integration.test_mqtt_external import bridged, mosquitto  # noqa: F401 (fixtures)
from tests.servers import http_get
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

SECRET_TAIL = "s3cr3t-tail-that-must-not-be-logged"


def device_token(dev: str, **kw: Any) -> str:
    return token(dev, kind="device", **kw)


def mqtt_client(node: Any, dev: str, tok: str | None = None, **kw: Any) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", node.mqtt.port, identifier=dev, username=dev,
                          password=tok or device_token(dev), **kw)


async def next_notice(client: aiomqtt.Client, topic: str, timeout: float = 10.0) -> dict[str, Any]:
    """The next ``error`` notice about ``topic`` on the client's subscriptions."""
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            frame = cbor2.loads(message.payload)
            if frame.get("type") == "error" and frame.get("topic") == topic:
                assert str(message.topic).endswith("/out"), message.topic
                return dict(frame)
    raise AssertionError(f"no notice about {topic}")


async def metric(node: Any, reason: str) -> float:
    status, body = await asyncio.to_thread(http_get,
                                           f"http://127.0.0.1:{node.http.port}/metrics")
    assert status == 200
    m = re.search(rf'^rtnode_mqtt_uplinks_refused_total{{reason="{reason}"}} (\S+)$',
                  body.decode(), re.M)
    assert m, f"no rtnode_mqtt_uplinks_refused_total for {reason}"
    return float(m.group(1))


def refusal_lines(caplog: pytest.LogCaptureFixture, device: str, label: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.INFO and r.name.startswith("bridge.mqtt")
            and r.getMessage().startswith(f"! {device}: uplink refused")
            and f": {label} (" in r.getMessage()]


# (case, topic template, payload, reason label, code, words in the reason)
CASES = [
    ("bad JSON", "rooms/{room}/up",
     b'{"event": "reading", "data": {"t": 21.5},, "pad": "' + SECRET_TAIL.encode() + b'"}',
     "undecodable", 4000, "not a JSON object"),
    ("plain text", "rooms/{room}/up", b"21.5 " + SECRET_TAIL.encode(),
     "undecodable", 4000, "neither a JSON object nor a CBOR map"),
    ("CBOR array", "rooms/{room}/up", cbor2.dumps([1, 2, 3]), "not_a_map", 4000, "array"),
    ("CBOR map without event", "rooms/{room}/up", cbor2.dumps({"data": {"t": 21.5}}),
     "bad_field", 4000, "event"),
    ("JSON without event", "rooms/{room}/up",
     b'  {"data": {"t": 21.5}, "msg_id": "m-1"}', "bad_field", 4000, "event"),
    ("not granted", "rooms/other:{room_id}/up", b'{"event": "reading", "msg_id": "m-2"}',
     "forbidden", 4003, "publish right"),
    ("reserved event", "rooms/{room}/up", cbor2.dumps({"event": "presence:join"}),
     "forbidden", 4003, "reserved"),
    ("other topic", "sensors/{room_id}/up", cbor2.dumps({"event": "reading"}),
     "unknown_topic", 4000, "rooms/<room>/up"),
    ("other tunnel", "rtnode/v1/someone-else/in", cbor2.dumps({"type": "ping"}),
     "other_tunnel", 4003, "own tunnel"),
]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
async def test_each_refusal_is_noticed_logged_and_counted(
        make_node: Any, caplog: pytest.LogCaptureFixture, case: str) -> None:
    _, template, payload, label, code, words = next(c for c in CASES if c[0] == case)
    caplog.set_level(logging.INFO, logger="bridge.mqtt")
    node = await make_node()
    room = unique("sensors")
    topic = template.format(room=room, room_id=room.split(":")[1])
    dev_id = f"thermo-{room.split(':')[1]}"
    member = await RawClient.connected(ws_url(node), token("b"))
    await member.request({"type": "join", "room": room})
    before = await metric(node, label)
    tok = device_token(dev_id, rooms={"sensors:*": ["join", "publish"]})
    async with mqtt_client(node, dev_id, tok) as dev:
        await dev.subscribe(f"rtnode/v1/{dev_id}/out", qos=1)
        await dev.publish(topic, payload, qos=1)  # PUBACKed all the same: MQTT has no nack
        notice = await next_notice(dev, topic)
        assert notice["code"] == code and words in notice["reason"], notice
        assert notice["retry"] is False and "id" not in notice
        # the device is still served: a good uplink after the refused one is stored
        await dev.publish(f"rooms/{room}/up", b'{"event": "after"}', qos=1)
    [ev] = await member.events(1, room)
    assert ev["event"] == "after" and ev["from"]["user"] == dev_id
    assert len((await member.request({"type": "history", "room": room}))["events"]) == 1
    assert await metric(node, label) == before + 1
    [line] = refusal_lines(caplog, dev_id, label)
    assert topic[:100] in line and str(code) in line and "payload" in line
    assert SECRET_TAIL not in line, "only a short preview of the payload is logged"


async def test_json_uplinks_are_stored_and_delivered(make_node: Any) -> None:
    """mosquitto_pub -m '{...}' (what most firmware sends), and a paho client with a msg_id
    sent twice (stored once), both reach a WebSocket member; JSON and CBOR mix."""
    node = await make_node()
    room = unique("sensors")
    member = await RawClient.connected(ws_url(node), token("b"))
    await member.request({"type": "join", "room": room})
    exe = shutil.which("mosquitto_pub")
    assert exe, "make test installs Debian's mosquitto-clients"
    r = await asyncio.to_thread(subprocess.run, [
        exe, "-h", "127.0.0.1", "-p", str(node.mqtt.port), "-i", "thermo-1", "-u", "thermo-1",
        "-P", device_token("thermo-1"), "-q", "1", "-t", f"rooms/{room}/up",
        "-m", '{"event":"reading","data":{"t":21.5}}'], capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    [ev] = await member.events(1, room)
    assert ev["event"] == "reading" and ev["data"] == {"t": 21.5}
    assert ev["from"] == {"user": "thermo-1", "kind": "device", "client_id": "thermo-1"}

    loop = asyncio.get_running_loop()
    acked: asyncio.Queue[int] = asyncio.Queue()
    p = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="thermo-2")
    p.username_pw_set("thermo-2", device_token("thermo-2"))
    p.on_publish = lambda c, u, mid, rc, props: loop.call_soon_threadsafe(acked.put_nowait, mid)
    p.connect("127.0.0.1", node.mqtt.port)
    p.loop_start()
    try:
        body = '\n {"event": "reading", "data": {"t": 19.0, "ok": true, "n": null}, "msg_id": "j1"}'
        for payload in (body, body, cbor2.dumps({"event": "reading", "data": 3})):
            info = p.publish(f"rooms/{room}/up", payload, qos=1)
            assert await asyncio.wait_for(acked.get(), 10) == info.mid
    finally:
        p.loop_stop()
        p.disconnect()
    got = await member.events(2, room)
    assert [(e["data"], e.get("msg_id")) for e in got] == [
        ({"t": 19.0, "ok": True, "n": None}, "j1"), (3, None)], "the duplicate msg_id stored once"
    hist = await member.request({"type": "history", "room": room})
    assert len(hist["events"]) == 3
    assert node.mqtt.uplinks == 4  # the duplicate is acknowledged as stored


async def test_a_will_on_a_non_room_topic_is_refused_at_connect(
        make_node: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bridge.mqtt")
    node = await make_node()
    before = await metric(node, "will_topic")
    will = aiomqtt.Will("status/pump-7", b'{"event": "offline"}', qos=1)
    async with mqtt_client(node, "pump-7", will=will) as dev:
        assert len(refusal_lines(caplog, "pump-7", "will_topic")) == 1  # at CONNECT
        await dev.subscribe("rtnode/v1/pump-7/out", qos=1)  # the notice waited for this
        notice = await next_notice(dev, "status/pump-7")
        assert notice["code"] == 4000 and "rooms/<room>/up" in notice["reason"]
    assert await metric(node, "will_topic") == before + 1


async def test_reports_are_rate_limited_per_device_and_reason(
        make_node: Any, caplog: pytest.LogCaptureFixture) -> None:
    """50 refused uplinks of one reason: 50 counted, one log line and one notice in the 10 s
    window; another reason of the same device, and the same reason of another device, are
    reported; the node keeps serving the others."""
    caplog.set_level(logging.INFO, logger="bridge.mqtt")
    node = await make_node()
    room = unique("sensors")
    member = await RawClient.connected(ws_url(node), token("b"))
    await member.request({"type": "join", "room": room})
    before = await metric(node, "bad_field")
    up = f"rooms/{room}/up"
    async with mqtt_client(node, "noisy-1") as noisy, mqtt_client(node, "quiet-1") as quiet:
        await noisy.subscribe("rtnode/v1/noisy-1/out", qos=1)
        await quiet.subscribe("rtnode/v1/quiet-1/out", qos=1)
        for i in range(50):
            await noisy.publish(up, cbor2.dumps({"data": i}), qos=1)
        await noisy.publish(up, b"{oops", qos=1)  # another reason: reported
        await quiet.publish(up, cbor2.dumps({"data": "q"}), qos=1)  # another device: reported
        first = await next_notice(noisy, up)
        assert "event" in first["reason"]
        second = await next_notice(noisy, up)
        assert "not a JSON object" in second["reason"], "one notice per reason in 10 s"
        assert (await next_notice(quiet, up))["code"] == 4000
        await quiet.publish(up, b'{"event": "still-served"}', qos=1)
        [ev] = await member.events(1, room)
        assert ev["event"] == "still-served"
    assert await metric(node, "bad_field") == before + 51
    assert len(refusal_lines(caplog, "noisy-1", "bad_field")) == 1
    assert len(refusal_lines(caplog, "noisy-1", "undecodable")) == 1
    assert len(refusal_lines(caplog, "quiet-1", "bad_field")) == 1


async def test_external_broker_refusals_and_json(
        mosquitto: int, bridged: Any, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """Through Mosquitto: a refused uplink on rooms/<room>/up/<device> is counted, logged and
    told to the device on rtnode/v1/<device>/out of the broker; a JSON uplink is stored."""
    caplog.set_level(logging.INFO, logger="bridge.mqtt")
    node = await bridged(f"mqtt://127.0.0.1:{mosquitto}")
    room = unique("sensors")
    member = await RawClient.connected(ws_url(node), token("b"))
    await member.request({"type": "join", "room": room})
    up = f"rooms/{room}/up/thermo-5"
    async with aiomqtt.Client("127.0.0.1", mosquitto, identifier="thermo-5") as dev:
        await dev.subscribe("rtnode/v1/thermo-5/out", qos=1)
        await dev.publish(up, cbor2.dumps({"data": 1, "msg_id": "x1"}), qos=1)
        notice = await next_notice(dev, up)
        assert notice["code"] == 4000 and "event" in notice["reason"]
        await dev.publish(up, b"{not json", qos=1)
        assert "not a JSON object" in (await next_notice(dev, up))["reason"]
        await dev.publish("rooms/@alice/up/thermo-5", b'{"event": "x"}', qos=1)
        assert (await next_notice(dev, "rooms/@alice/up/thermo-5"))["code"] == 4003
        await dev.publish(up, b'{"event": "reading", "data": {"t": 20.5}}', qos=1)
    [ev] = await member.events(1, room)
    assert ev["data"] == {"t": 20.5} and ev["from"]["user"] == "thermo-5"
    assert await metric(node, "bad_field") == 1 and await metric(node, "undecodable") == 1
    assert await metric(node, "forbidden") == 1
    assert len(refusal_lines(caplog, "thermo-5", "bad_field")) == 1
