"""Seeded hostile MQTT sessions over a raw socket: after a valid CONNECT, valid packets mixed
with packets of every kind with odd fields (topics and filters of any shape, QoS 3, reserved
flags, lengths that lie, bad UTF-8, payloads of any bytes, packets cut short, bytes that are
not MQTT at all).

Held: the node answers what is valid and closes the connection on what is not (it never hangs:
the socket answers a PINGREQ sent after it, or is closed, at the latest by the keep-alive
check when a length promised more than came), nothing fails inside it (no error logged), and
a plain device and a WebSocket client are served after every seed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid

import cbor2
import pytest

from bench.ingest_devices import read_packet, utf8, varint
from tests.doors import mqtt_device, tunnel_request
from tests.integration.test_hostile_input import still_serves
from tests.wsclient import token, unique

pytestmark = pytest.mark.integration


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


def _connect(dev: str) -> bytes:
    password = token(dev, kind="device").encode()
    # Keep-alive 1 s: a packet whose length promised more than came (the socket then waits
    # for the rest) is ended by the node's keep-alive check (1.5x: 1.5 s).
    body = (utf8(b"MQTT") + bytes((4, 0xC2)) + b"\x00\x01" + utf8(dev.encode())
            + utf8(dev.encode()) + utf8(password))
    return _packet(0x10, body)


def _topic(rng: random.Random, dev: str, room: str) -> bytes:
    text = rng.choice([
        f"rooms/{room}/up", f"rooms/{room}/down", f"rtnode/v1/{dev}/in", f"rtnode/v1/{dev}/out",
        "rtnode/v1/other/in", "#", "+/+", "rooms/#", "rooms/+/up", "$SYS/#", "", "/", "a" * 70000,
        f"rooms/{room}/up/extra", "rooms/a.b/up", "rooms/\u00e9/up", "rooms//up", "a\x00b",
    ])
    raw = text.encode()
    if rng.random() < 0.1:
        raw = raw[:3] + b"\xff\xfe" + raw[3:]  # not UTF-8
    return raw[:65535]


def _payload(rng: random.Random) -> bytes:
    return rng.choice([
        b"", b"\x00", rng.randbytes(rng.randrange(1, 64)), b'{"event":"e","data":1}',
        b'{"event":', cbor2.dumps({"event": "e", "data": rng.randrange(100)}),
        cbor2.dumps([1, 2]), cbor2.dumps({"event": 5}), b"\xc1\x01", b"{" * 500,
        cbor2.dumps({"event": "e", "data": 2**64}),
    ])


def _valid(rng: random.Random, dev: str, room: str, pid: int) -> bytes:
    """A packet the node takes: an uplink (QoS 0 or 1), a subscription to its tunnel, a ping."""
    kind = rng.randrange(4)
    if kind < 2:
        body = cbor2.dumps({"event": "e", "data": pid})
        topic = utf8(f"rooms/{room}/up".encode())
        return (_packet(0x32, topic + pid.to_bytes(2, "big") + body) if kind
                else _packet(0x30, topic + body))
    if kind == 2:
        return _packet(0x82, pid.to_bytes(2, "big") + utf8(f"rtnode/v1/{dev}/out".encode())
                       + b"\x01")
    return b"\xc0\x00"


def _hostile(rng: random.Random, dev: str, room: str, pid: int) -> bytes:
    if rng.random() < 0.6:
        return _valid(rng, dev, room, pid)
    kind = rng.randrange(10)
    if kind < 4:  # PUBLISH, QoS 0-3, odd flags
        qos = rng.choice([0, 1, 1, 2, 3])
        flags = (qos << 1) | rng.choice([0, 0, 1, 8])
        body = utf8(_topic(rng, dev, room)) + (pid.to_bytes(2, "big") if qos else b"")
        return _packet(0x30 | flags, body + _payload(rng))
    if kind == 4:  # SUBSCRIBE, sometimes with wrong flags or options
        filters = b"".join(utf8(_topic(rng, dev, room)) + bytes((rng.choice([0, 1, 2, 3, 7]),))
                           for _ in range(rng.randrange(0, 3)))
        return _packet(rng.choice([0x82, 0x82, 0x80]), pid.to_bytes(2, "big") + filters)
    if kind == 5:  # UNSUBSCRIBE
        return _packet(0xA2, pid.to_bytes(2, "big") + utf8(_topic(rng, dev, room)))
    if kind == 6:  # acks for nothing, PUBREL, a second CONNECT
        return rng.choice([_packet(0x40, pid.to_bytes(2, "big")), _packet(0x62, b"\x00\x01"),
                           _packet(0x70, b"\x00\x09"), _connect(dev), _packet(0xF0, b"")])
    if kind == 7:  # a length that lies
        good = _packet(0x30, utf8(f"rooms/{room}/up".encode()) + b"x")
        return good[:1] + rng.choice([b"\xff\xff\xff\xff\x7f", b"\x00", b"\x7f"]) + good[2:]
    if kind == 8:
        return rng.randbytes(rng.randrange(1, 40))  # not MQTT
    return _packet(0x30, utf8(f"rooms/{room}/up".encode()) + _payload(rng))[:-1]  # cut short


async def _alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """PINGREQ: True when the node answers PINGRESP (after whatever came first), False when
    it has closed the connection (at once, or at the keep-alive's end when the PINGREQ went
    into a packet that promised more bytes than came). It never stays silent longer."""
    try:
        writer.write(b"\xc0\x00")
        await writer.drain()
        async with asyncio.timeout(10):
            while (await read_packet(reader))[0] != 13:  # PINGRESP
                pass
            return True
    except (asyncio.IncompleteReadError, ConnectionError):
        return False


@pytest.mark.parametrize("seed", [51, 52])
async def test_seeded_hostile_mqtt_packets(make_node, seed: int, caplog) -> None:
    rng = random.Random(seed)
    node = await make_node()
    caplog.set_level(logging.WARNING)
    room = unique("fz")
    closed = answered = 0
    for _session in range(8):
        dev = f"fz-{uuid.uuid4().hex[:8]}"
        reader, writer = await asyncio.open_connection("127.0.0.1", node.mqtt.port)
        writer.write(_connect(dev))
        connack = await asyncio.wait_for(reader.readexactly(4), 10)
        assert connack[:2] == b"\x20\x02" and connack[3] == 0, connack
        try:
            for pid in range(1, 30):
                writer.write(_hostile(rng, dev, room, pid))
                if rng.random() < 0.3:
                    if not await _alive(reader, writer):
                        closed += 1
                        break
                    answered += 1
            else:
                if await _alive(reader, writer):
                    answered += 1
                else:
                    closed += 1
        finally:
            writer.close()
    assert closed and answered, (closed, answered)
    failures = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures[:3]]
    plain = f"plain-{uuid.uuid4().hex[:6]}"
    async with mqtt_device(node, plain) as device:
        await device.subscribe(f"rtnode/v1/{plain}/out", qos=1)
        pong = await tunnel_request(device, plain, {"type": "ping", "id": 1})
        assert pong["type"] == "pong", pong
    await still_serves(node)
