"""External broker mode against a real Mosquitto.

With two nodes: each uplink stored once, each room event published to the broker once. With
compose/'s Mosquitto configuration (mosquitto.conf, paths and port remapped, and mosquitto.acl
as is: every client logs in, a device writes only ``rooms/<room>/up/<its user name>``), a
device's identity is what the broker enforces: another client cannot post as it (on its
topic, with its client id, or by naming it in the payload), cannot suppress its readings by
taking its next ``msg_id`` first, and a device id outside the id grammar is refused, counted,
and leaves the bridge serving. An uplink on the bare ``rooms/<room>/up`` names nobody and is
refused even by a broker that lets anyone write it.
"""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import cbor2
import nats
import nats.js.api
import nats.js.errors
import pytest

from bridge.mqtt_external import DOWN_DURABLE, DURABLE, ExternalMqtt
from node.nats_server import free_port
from node.protocol.ids import ID_MAX_LEN
from node.protocol.subjects import STREAM_NAME, room_subject
from tests.servers import NatsProcess, http_get, wait_until
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
BRIDGE_USER = "rtnode-bridge"
SEED = 11


def _mosquitto(conf: Path, port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"mosquitto exited with {proc.returncode} ({conf})")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(up, 10, what="mosquitto")
    return proc


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[int]:
    """An open Mosquitto: anonymous clients may write anything (no ACL)."""
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = _mosquitto(conf, port)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class Broker:
    """A Mosquitto run with compose/'s configuration, and the passwords of its users."""

    port: int
    passwords: dict[str, str]

    @property
    def bridge_url(self) -> str:
        return f"mqtt://{BRIDGE_USER}:{self.passwords[BRIDGE_USER]}@127.0.0.1:{self.port}"

    def client(self, user: str, identifier: str | None = None, **kw: Any) -> aiomqtt.Client:
        """An MQTT client logged in as ``user`` (client id random unless given)."""
        return aiomqtt.Client("127.0.0.1", self.port, username=user,
                              password=self.passwords[user],
                              identifier=identifier or f"c-{uuid.uuid4().hex[:8]}", **kw)


def _compose_conf(tmp: Path, port: int, passwd: Path) -> str:
    """compose/mosquitto.conf with its port, paths and log remapped; nothing else changed."""
    text = (COMPOSE / "mosquitto.conf").read_text()
    assert re.search(r"^allow_anonymous false$", text, re.M), "compose's Mosquitto is locked"
    swaps = {
        "listener 1883": f"listener {port} 127.0.0.1",
        "password_file /mosquitto/auth/passwd": f"password_file {passwd}",
        "acl_file /mosquitto/config/mosquitto.acl": f"acl_file {COMPOSE / 'mosquitto.acl'}",
        "persistence_location /mosquitto/data/": f"persistence_location {tmp}/",
        "log_dest stdout": f"log_dest file {tmp / 'mosquitto.log'}",
    }
    for old, new in swaps.items():
        text, n = re.subn(rf"^{re.escape(old)}$", new, text, flags=re.M)
        assert n == 1, f"compose/mosquitto.conf has no line {old!r}"
    # Started as root, Mosquitto would drop to its own user, who cannot read pytest's tmp dir.
    return text + "user root\n"


@pytest.fixture
def locked_broker(tmp_path: Path) -> Iterator[Callable[[list[str]], Broker]]:
    """Start compose/'s Mosquitto with these users (and the bridge's); one per test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(users: list[str]) -> Broker:
        passwords = {u: secrets.token_hex(8) for u in [BRIDGE_USER, *users]}
        passwd = tmp_path / "passwd"
        passwd.write_text("".join(f"{u}:{p}\n" for u, p in passwords.items()))
        subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True,
                       capture_output=True)  # hashes the plain-text file in place
        port = free_port()
        conf = tmp_path / "mosquitto-locked.conf"
        conf.write_text(_compose_conf(tmp_path, port, passwd))
        procs.append(_mosquitto(conf, port))
        return Broker(port, passwords)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def bridged(nats_proc: NatsProcess, make_node: Any) -> Callable[[str], Any]:
    """Start a node bridging the broker at this URL, once it has subscribed.

    The nodes of a test share a nats-server of their own, not the session's ``shared_nats``:
    the bridge's downlink consumer is a durable (``RTNODE_MQTT_DOWN``, start ``new`` only
    when it is created), so on a shared server it outlives the test that created it
    (test_admission_doors' broker door, first in the suite) and every event stored in the
    ``default`` tenant's rooms since is its backlog, which these nodes would publish to the
    broker, one PUBACK at a time, before this test's own: 15,009 events after
    test_backpressure.py, 9-10 s, and the wait for ``cmd`` timed out. (``nats_proc`` comes
    first: torn down last, after the nodes have stopped.)
    """

    async def start(url: str) -> Any:
        node = await make_node(nats_url=nats_proc.url, mqtt_broker_url=url)
        assert node.mqtt is None and node.mqtt_external is not None
        await asyncio.wait_for(node.mqtt_external._ready.wait(), 10)
        return node

    return start


@pytest.fixture
async def watcher() -> AsyncIterator[Callable[[Any, str], Any]]:
    """Open a WebSocket member of a room on a node (closed at the end of the test)."""
    members: list[RawClient] = []

    async def open_member(node: Any, room: str) -> RawClient:
        member = await RawClient.connected(ws_url(node), token("watcher"))
        members.append(member)
        await member.request({"type": "join", "room": room})
        return member

    yield open_member
    for member in members:
        await member.close()


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds (a node counter moves), at most ``timeout`` seconds."""
    for _ in range(round(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def refused(node: Any, label: str) -> int:
    """Uplinks the node refused for their topic, by reason (none on a node that never did)."""
    return int(getattr(node.mqtt_external, "refused_topics", {}).get(label, 0))


async def publish(client: aiomqtt.Client, topic: str, **body: Any) -> None:
    await client.publish(topic, cbor2.dumps(body), qos=1)


async def stored(member: RawClient, room: str) -> list[dict[str, Any]]:
    hist = await member.request({"type": "history", "room": room, "limit": 1000})
    events: list[dict[str, Any]] = hist["events"]
    return events


async def test_two_nodes_bridge_a_broker_once(
        locked_broker: Any, bridged: Any, watcher: Any) -> None:
    broker = locked_broker(["sensor-7"])
    # Both bridge nodes log in as the one bridge user, each with its own client id.
    n1 = await bridged(broker.bridge_url)
    n2 = await bridged(broker.bridge_url)
    room = unique("ext")
    browser = await watcher(n1, room)
    async with broker.client("sensor-7") as dev:
        await dev.subscribe(f"rooms/{room}", qos=1)
        for i in range(20):
            await publish(dev, f"rooms/{room}/up/sensor-7", event="reading", data=i,
                          msg_id=f"m{i}")
        events = await browser.events(20, room)
        assert sorted(e["data"] for e in events) == list(range(20))
        assert {(e["from"]["user"], e["from"]["kind"]) for e in events} == {("sensor-7", "device")}
        assert len(await stored(browser, room)) == 20, "each uplink stored once, two nodes listen"
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
        await publish(dev, f"rooms/{room}/up/sensor-7", event="ping")
        async with asyncio.timeout(10):
            async for m in dev.messages:
                ev = cbor2.loads(m.payload)
                assert ev.get("event") != "cmd", "a room event reached the broker twice"
                if ev.get("event") == "ping":
                    break
    assert n1.mqtt_external.uplinks + n2.mqtt_external.uplinks == 21


async def test_a_client_cannot_post_as_another_device(
        locked_broker: Any, bridged: Any, watcher: Any) -> None:
    """evil tries thermo-1's topic, thermo-1's client id, and the bare topic naming thermo-1:
    only thermo-1's own readings are ever from thermo-1."""
    rng = random.Random(SEED)
    broker = locked_broker(["thermo-1", "evil"])
    node = await bridged(broker.bridge_url)
    room = unique("sensors")
    member = await watcher(node, room)
    forged = [rng.randrange(-10**6, 10**6) for _ in range(6)]
    for version in (aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5):
        async with broker.client("evil", protocol=version) as evil:
            await publish(evil, f"rooms/{room}/up/thermo-1", event="reading", data=forged[0])
            await publish(evil, f"rooms/{room}/up", event="reading", data=forged[1],
                          device="thermo-1")
        # the client id is the client's choice, not what the broker vouches for
        async with broker.client("evil", identifier="thermo-1", protocol=version) as evil:
            await publish(evil, f"rooms/{room}/up/thermo-1", event="reading", data=forged[2])
        forged = forged[3:]
    readings = [{"t": round(rng.uniform(-20, 40), 2), "n": i} for i in range(rng.randint(3, 8))]
    async with broker.client("thermo-1") as thermo:
        for i, data in enumerate(readings):
            await publish(thermo, f"rooms/{room}/up/thermo-1", event="reading", data=data,
                          msg_id=f"r{i}")
    async with broker.client("evil") as evil:
        await publish(evil, f"rooms/{room}/up/evil", event="hello", data="from evil")
    got = await member.events(len(readings) + 1, room)
    assert sorted(e["event"] for e in got) == ["hello"] + ["reading"] * len(readings)
    events = await stored(member, room)
    assert [(e["from"]["user"], e["data"]) for e in events if e["event"] == "reading"] == [
        ("thermo-1", data) for data in readings]
    assert [(e["from"]["user"], e["data"]) for e in events if e["event"] == "hello"] == [
        ("evil", "from evil")]
    assert {e["from"]["kind"] for e in events} == {"device"}


async def test_a_claimed_device_and_msg_id_suppress_nothing(
        locked_broker: Any, bridged: Any, watcher: Any) -> None:
    """evil sends thermo-1's next msg_ids first, naming thermo-1 in the payload, on its own
    topic: stored as from evil; each of thermo-1's readings is stored too."""
    rng = random.Random(SEED + 1)
    broker = locked_broker(["thermo-1", "evil"])
    node = await bridged(broker.bridge_url)
    room = unique("sensors")
    member = await watcher(node, room)
    msg_ids = [f"thermo-1/{rng.getrandbits(48):x}" for _ in range(rng.randint(4, 9))]
    async with broker.client("evil") as evil, broker.client("thermo-1") as thermo:
        for i, msg_id in enumerate(msg_ids):
            await publish(evil, f"rooms/{room}/up/evil", event="reading", data=-1,
                          msg_id=msg_id, device="thermo-1")
            await member.events(1, room)  # the forgery is stored before the real one is sent
            await publish(thermo, f"rooms/{room}/up/thermo-1", event="reading", data=i,
                          msg_id=msg_id)
            await member.events(1, room)
    events = await stored(member, room)
    real = [(e["msg_id"], e["data"]) for e in events if e["from"]["user"] == "thermo-1"]
    fake = [(e["msg_id"], e["data"]) for e in events if e["from"]["user"] == "evil"]
    assert real == [(m, i) for i, m in enumerate(msg_ids)], "every real reading stored"
    assert fake == [(m, -1) for m in msg_ids] and len(events) == 2 * len(msg_ids)


def hostile_ids(rng: random.Random, n: int) -> list[str]:
    """Device ids outside the grammar that Mosquitto still accepts as user names and topic
    levels: a forbidden character somewhere in a valid id, or a valid id one too long. (No
    ``:``, valid but the password file's separator; ``+``, ``#`` and ``/`` cannot be a topic
    level.)"""
    forbidden = [".", "*", ">", " ", "$", "!", "%", "é", "\u00a0", "~", ",", "'", '"', "\\"]
    ids = ["*", ">", "a" * (ID_MAX_LEN + 1), "thermo-1."]
    while len(ids) < n:
        base = "".join(rng.choice("abcdefxyz0189_-@=") for _ in range(rng.randint(1, 20)))
        at = rng.randint(0, len(base))
        ids.append(base[:at] + rng.choice(forbidden) + base[at:])
    return list(dict.fromkeys(ids))


async def test_hostile_device_ids_are_refused_and_counted(
        locked_broker: Any, bridged: Any, watcher: Any) -> None:
    rng = random.Random(SEED + 2)
    bad = hostile_ids(rng, 16)
    broker = locked_broker(["thermo-1", *bad])
    node = await bridged(broker.bridge_url)
    room = unique("sensors")
    member = await watcher(node, room)
    for device_id in bad:
        async with broker.client(device_id) as dev:  # the broker lets each write its own topic
            await publish(dev, f"rooms/{room}/up/{device_id}", event="reading", data=device_id)
    await eventually(lambda: refused(node, "bad_device_id") == len(bad),
                     f"{len(bad)} device ids refused")
    async with broker.client("thermo-1") as thermo:  # the bridge keeps serving
        await publish(thermo, f"rooms/{room}/up/thermo-1", event="reading", data=21.5)
    (event,) = await member.events(1, room)
    assert event["from"]["user"] == "thermo-1" and event["data"] == 21.5
    assert [e["from"]["user"] for e in await stored(member, room)] == ["thermo-1"]
    status, body = await asyncio.to_thread(http_get,
                                           f"http://127.0.0.1:{node.http.port}/metrics")
    assert status == 200
    assert f'rtnode_broker_refused_uplinks_total{{reason="bad_device_id"}} {len(bad)}.0' in (
        body.decode())


async def test_the_bare_uplink_topic_is_refused_even_on_an_open_broker(
        mosquitto: int, bridged: Any, watcher: Any) -> None:
    """A broker without that ACL lets anyone write rooms/<room>/up naming any device, with the
    device's next msg_ids: the node refuses and counts each (no identity), and every reading
    the device then sends on its own topic, with those msg_ids, is stored."""
    rng = random.Random(SEED + 3)
    node = await bridged(f"mqtt://127.0.0.1:{mosquitto}")
    room = unique("sensors")
    member = await watcher(node, room)
    msg_ids = [f"m{rng.getrandbits(32):x}" for _ in range(rng.randint(5, 20))]
    async with aiomqtt.Client("127.0.0.1", mosquitto, identifier=f"x-{SEED}") as anyone:
        for msg_id in msg_ids:
            await publish(anyone, f"rooms/{room}/up", event="reading", data="forged",
                          device="thermo-1", msg_id=msg_id)
    async with aiomqtt.Client("127.0.0.1", mosquitto, identifier="thermo-1") as dev:
        for i, msg_id in enumerate(msg_ids):
            await publish(dev, f"rooms/{room}/up/thermo-1", event="reading", data=i,
                          msg_id=msg_id)
    got = await member.events(len(msg_ids), room)
    assert [(e["from"]["user"], e["data"]) for e in got] == [
        ("thermo-1", i) for i in range(len(msg_ids))], "no forged event, every real one"
    assert [e["data"] for e in await stored(member, room)] == list(range(len(msg_ids)))
    await eventually(lambda: refused(node, "no_identity") == len(msg_ids),
                     f"{len(msg_ids)} bare uplinks refused")


async def test_a_bridge_stops_at_once_in_the_middle_of_a_backlog(
        mosquitto: int, nats_proc: NatsProcess, make_node: Any) -> None:
    """A bridge stopping while its downlink loop drains a backlog (one PUBACK after another)
    stops at once: the cancel that Python 3.11's wait_for loses when a PUBACK lands with it
    ended nothing, and stop() waited 2 x 5 s, then left the loop running. Three stops, each of
    a new bridge of the node (each may or may not meet that race); then the node stops at
    once too (its NATS drain waited 5 s for the queue of a pull subscription nobody read)."""
    url = f"mqtt://127.0.0.1:{mosquitto}"
    node = await make_node(nats_url=nats_proc.url, mqtt_broker_url=url)
    bridge = node.mqtt_external
    await asyncio.wait_for(bridge._ready.wait(), 10)
    nc = await nats.connect(nats_proc.url)
    try:
        js = nc.jetstream()
        for _ in range(250):  # the durable exists once the downlink loop has subscribed
            try:
                await js.consumer_info(STREAM_NAME, DOWN_DURABLE)
                break
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(0.02)
        event = cbor2.dumps({"event": "x", "data": 1, "from": {"user": "u", "kind": "user"}})
        acks = [await js.publish_async(room_subject("default", f"r{i % 10}"), event)
                for i in range(20_000)]
        await asyncio.gather(*acks)
        for round_ in range(3):
            if round_:
                bridge = ExternalMqtt(node.ctx, url)
                await bridge.start()
                await asyncio.wait_for(bridge._ready.wait(), 10)
            await eventually(lambda: bridge.downlinks >= 1000, "1000 downlinks")  # noqa: B023
            started = time.monotonic()
            await bridge.stop()
            took = time.monotonic() - started
            assert all(task.done() for task in bridge._tasks), "a bridge loop outlived stop()"
            assert took < 1.0, f"stop took {took:.2f} s"
        # and the node's NATS drain does not wait for the pull subscription's queued messages
        started = time.monotonic()
        await node.stop()
        took = time.monotonic() - started
        assert took < 2.0, f"the node's stop took {took:.2f} s"
    finally:
        await nc.close()


async def test_an_upgrade_starts_the_downlinks_after_what_the_old_durable_acknowledged(
        mosquitto: int, nats_proc: NatsProcess, make_node: Any) -> None:
    """The downlink durable of old (``RTNODE_MQTT_OUT``, pulled by every node at once) made way
    for one pinned to a node at a time (``RTNODE_MQTT_DOWN``). A node of this version starts
    the new one right after what the old one had acknowledged (the broker got those already;
    what came after, it has not) and deletes the old one."""
    room = unique("up")
    nc = await nats.connect(nats_proc.url)
    try:
        js = nc.jetstream()
        node = await make_node(nats_url=nats_proc.url)  # no bridge yet: the stream exists
        event = cbor2.dumps({"event": "e", "data": 0, "from": {"user": "u", "kind": "user"}})
        old = await js.pull_subscribe(room_subject("default", ">"), durable=DURABLE,
                                      stream=STREAM_NAME, config=nats.js.api.ConsumerConfig(
                                          deliver_policy=nats.js.api.DeliverPolicy.NEW,
                                          ack_policy=nats.js.api.AckPolicy.EXPLICIT))
        seqs = [(await js.publish(room_subject("default", room), event)).seq for _ in range(6)]
        for msg in await old.fetch(3, timeout=5):  # an old node sent the first 3 and acked
            await msg.ack_sync()
        await old.unsubscribe()
        await node.stop()
        async with aiomqtt.Client("127.0.0.1", mosquitto, identifier=f"s-{uuid.uuid4().hex[:6]}",
                                  clean_session=False) as device:
            await device.subscribe(f"rooms/{room}", qos=1)
            await make_node(nats_url=nats_proc.url, mqtt_broker_url=f"mqtt://127.0.0.1:{mosquitto}")
            got = []
            async with asyncio.timeout(10):
                async for m in device.messages:
                    got.append(cbor2.loads(m.payload)["seq"])
                    if got[-1] == seqs[-1]:
                        break
        assert got == seqs[3:], "after what the old durable acknowledged, each once, in order"
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.consumer_info(STREAM_NAME, DURABLE)
    finally:
        await nc.close()
