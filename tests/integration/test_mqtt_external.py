"""External broker mode against a real Mosquitto, with two nodes: each uplink stored once,
each room event published to the broker once."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import cbor2
import pytest

from node.nats_server import free_port
from tests.servers import wait_until
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            import socket
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_until(up, 10, what="mosquitto")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def test_two_nodes_bridge_a_broker_once(mosquitto: int, make_node) -> None:
    url = f"mqtt://127.0.0.1:{mosquitto}"
    n1 = await make_node(mqtt_broker_url=url)
    n2 = await make_node(mqtt_broker_url=url)
    assert n1.mqtt is None and n1.mqtt_external is not None
    for n in (n1, n2):
        await asyncio.wait_for(n.mqtt_external._ready.wait(), 10)
    room = unique("ext")
    browser = await RawClient.connected(ws_url(n1), token("b"))
    await browser.request({"type": "join", "room": room})
    async with aiomqtt.Client("127.0.0.1", mosquitto, identifier="sensor-7") as dev:
        await dev.subscribe(f"rooms/{room}", qos=1)
        for i in range(20):
            await dev.publish(f"rooms/{room}/up", cbor2.dumps(
                {"event": "reading", "data": i, "msg_id": f"m{i}", "device": "sensor-7"}), qos=1)
        events = await browser.events(20, room)
        assert sorted(e["data"] for e in events) == list(range(20))
        assert {e["from"]["kind"] for e in events} == {"device"}
        hist = await browser.request({"type": "history", "room": room, "limit": 100})
        assert len(hist["events"]) == 20, "each uplink stored once, though two nodes listen"
        pub = await browser.request({"type": "publish", "room": room, "event": "cmd",
                                     "data": "on"})
        got = []
        async with asyncio.timeout(10):
            async for m in dev.messages:
                got.append(cbor2.loads(m.payload))
                if got[-1].get("event") == "cmd":
                    break
        cmds = [g for g in got if g.get("event") == "cmd"]
        assert cmds == [cmds[0]] and cmds[0]["seq"] == pub["seq"] and "type" not in cmds[0]
        # give a duplicate the time it would need to arrive: another whole round trip
        await dev.publish(f"rooms/{room}/up", cbor2.dumps({"event": "ping"}), qos=1)
        async with asyncio.timeout(10):
            async for m in dev.messages:
                ev = cbor2.loads(m.payload)
                assert ev.get("event") != "cmd", "a room event reached the broker twice"
                if ev.get("event") == "ping":
                    break
    assert n1.mqtt_external.uplinks + n2.mqtt_external.uplinks == 21
