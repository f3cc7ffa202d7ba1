"""Backpressure instead of cuts: a client faster than the node is slowed by TCP, never cut; a
client over its rate gets 4009 errors, then a ``disconnect`` 4009 whose close frame reaches it.

Real node, real nats-server, real websockets and MQTT clients.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import cbor2
import pytest
from websockets.exceptions import ConnectionClosed

from bridge import mqtt_codec as mq
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

TOTAL = 5000
UNLIMITED = {"rate_per_s": 1e6, "rate_burst": 1_000_000}


def _publishes(room: str, n: int) -> list[dict[str, Any]]:
    return [{"type": "publish", "room": room, "event": "e", "id": i, "data": i} for i in range(n)]


@pytest.mark.parametrize("codec", ["json", "cbor"])
async def test_5000_publishes_back_to_back_are_slowed_not_cut(make_node, codec: str) -> None:
    """All 5,000 are written before the first reply is read: each gets ``published``, in
    order (the node stopped reading while its actor caught up; before, it cut the client)."""
    node = await make_node(**UNLIMITED)
    room = unique("bp")
    c = await RawClient.connected(ws_url(node), token("fast"), codec=codec)
    for frame in _publishes(room, TOTAL):  # one message each, as fast as TCP takes them
        await c.send(frame)
    replies = [await c.recv(30) for _ in range(TOTAL)]
    assert [r.get("type") for r in replies] == ["published"] * TOTAL, replies[0]
    assert [r["id"] for r in replies] == list(range(TOTAL)), "answered in order"
    seqs = [r["seq"] for r in replies]
    assert seqs == sorted(seqs) and len(set(seqs)) == TOTAL
    hist = await c.request({"type": "history", "room": room, "limit": 1000})
    assert [e["data"] for e in hist["events"]] == list(range(TOTAL - 1000, TOTAL))
    assert node.system.stats()["connection"].overflows == 0
    await c.close()


async def test_a_flood_of_frames_in_one_message_is_answered_in_full(make_node) -> None:
    """2,000 pings in one message (beyond the actor's mailbox): 2,000 pongs, connection kept."""
    node = await make_node()
    c = await RawClient.connected(ws_url(node))
    await c.send(*[{"type": "ping", "id": i} for i in range(2000)])
    pongs = [await c.recv() for _ in range(2000)]
    assert pongs == [{"type": "pong", "id": i} for i in range(2000)]
    assert (await c.request({"type": "ping"}))["type"] == "pong"
    await c.close()
    await asyncio.wait_for(node.ctx.index.wait_empty(), 5)
    assert node.system.stats()["connection"].actors == 0


def _check_rate_limited(frames: list[Any]) -> None:
    """4009 errors (and ``published`` for at most the burst of 3, each sent once stored: the
    errors may come first), then one ``disconnect`` 4009, nothing after."""
    types = [f.get("type") for f in frames]
    assert types.count("published") <= 3, types
    errors = [f for f in frames if f.get("type") == "error"]
    assert len(errors) == 11, "max_errors_per_min 10: the 11th ends the connection"
    assert all(e["code"] == 4009 and e["retry"] is True for e in errors)
    assert len(errors) + types.count("published") == len(frames) - 1, types
    assert frames[-1] == {"type": "disconnect", "code": 4009, "reason": "too many errors",
                          "reconnect": True}


async def test_flooding_reader_over_its_rate_sees_4009_frames_and_close_code(make_node) -> None:
    """The flooder reads while it sends; it gets close code 4009 (before: 1006 or 1000)."""
    node = await make_node(rate_per_s=1, rate_burst=3, max_errors_per_min=10)
    room = unique("bp")
    c = await RawClient.connected(ws_url(node), token("flood"))

    async def flood() -> int:
        sent = 0
        with contextlib.suppress(ConnectionClosed):
            for frame in _publishes(room, 20_000):
                await c.send(frame)
                sent += 1
        return sent

    sender = asyncio.create_task(flood())
    code, frames = await c.closed(timeout=15)
    sent = await asyncio.wait_for(sender, 15)
    assert code == 4009 and c.ws.close_reason == "too many errors", (sent, code, frames[-3:])
    _check_rate_limited(frames)


async def test_flooding_non_reader_over_its_rate_still_gets_close_code_4009(make_node) -> None:
    """It writes 3,000 publishes without reading any reply, then reads: the node had kept
    reading (and discarding) its input after the close frame instead of resetting the
    socket, so the close frame is still there to read."""
    node = await make_node(rate_per_s=1, rate_burst=3, max_errors_per_min=10)
    room = unique("bp")
    c = await RawClient.connected(ws_url(node), token("flood"))
    sent = 0
    with contextlib.suppress(ConnectionClosed):
        for frame in _publishes(room, 3000):
            await c.send(frame)
            sent += 1
    code, frames = await c.closed(timeout=15)
    assert code == 4009 and c.ws.close_reason == "too many errors", (sent, code, frames[-3:])
    _check_rate_limited(frames)


class RawMqtt:
    """A bare MQTT 3.1.1 client on a socket: it writes packets in bulk, as a fast device does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, dev: str) -> RawMqtt:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self = cls(reader, writer)
        password = token(dev, kind="device").encode()
        body = (b"\x00\x04MQTT\x04\xc2\x00\x00" + _mqtt_str(dev.encode()) + _mqtt_str(dev.encode())
                + _mqtt_str(password))
        writer.write(b"\x10" + _varint(len(body)) + body)
        assert await self.packet() == (0x20, b"\x00\x00"), "CONNACK accepted"
        return self

    async def subscribe(self, topic: str) -> None:
        body = b"\x00\x01" + _mqtt_str(topic.encode()) + b"\x00"
        self.writer.write(b"\x82" + _varint(len(body)) + body)
        assert await self.packet() == (0x90, b"\x00\x01\x00"), "SUBACK granted"

    async def packet(self, timeout: float = 30.0) -> tuple[int, bytes]:
        """The next packet from the node: (first byte, body)."""
        async with asyncio.timeout(timeout):
            first = (await self.reader.readexactly(1))[0]
            length, shift = 0, 0
            while True:
                byte = (await self.reader.readexactly(1))[0]
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            return first, await self.reader.readexactly(length)

    async def message(self, timeout: float = 30.0) -> tuple[str, Any]:
        """The next QoS 0 PUBLISH: (topic, decoded CBOR payload)."""
        first, body = await self.packet(timeout)
        assert first & 0xF0 == 0x30, hex(first)
        n = int.from_bytes(body[:2], "big")
        return body[2:2 + n].decode(), cbor2.loads(body[2 + n:])

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def _mqtt_str(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def test_tunnel_device_is_slowed_not_cut(make_node) -> None:
    """5,000 publish frames on the MQTT tunnel, written in one go: all ``published``, in order
    (before, the device's actor overflowed and the device was cut with 4009)."""
    node = await make_node(**UNLIMITED)
    room = unique("bp")
    dev = await RawMqtt.connect(node.mqtt.port, "bp-dev")
    await dev.subscribe("rtnode/v1/bp-dev/out")
    dev.writer.write(b"".join(mq.publish("rtnode/v1/bp-dev/in", cbor2.dumps(frame))
                              for frame in _publishes(room, TOTAL)))
    replies = [await dev.message() for _ in range(TOTAL)]
    assert {topic for topic, _ in replies} == {"rtnode/v1/bp-dev/out"}
    assert [r.get("type") for _, r in replies] == ["published"] * TOTAL, replies[0]
    assert [r["id"] for _, r in replies] == list(range(TOTAL))
    assert node.system.stats()["connection"].overflows == 0
    await dev.close()


async def test_tunnel_device_over_its_rate_gets_its_disconnect_frame(make_node) -> None:
    """A device flooding over its rate gets 4009 errors then ``disconnect`` 4009 on its
    tunnel, then the end of the connection: the node half-closed and drained its input."""
    node = await make_node(rate_per_s=1, rate_burst=3, max_errors_per_min=10)
    room = unique("bp")
    dev = await RawMqtt.connect(node.mqtt.port, "bp-flood")
    await dev.subscribe("rtnode/v1/bp-flood/out")
    flood = b"".join(mq.publish("rtnode/v1/bp-flood/in", cbor2.dumps(frame))
                     for frame in _publishes(room, 3000))
    with contextlib.suppress(ConnectionError):
        dev.writer.write(flood)
        await dev.writer.drain()
    frames = []
    with contextlib.suppress(asyncio.IncompleteReadError):
        while True:
            frames.append((await dev.message(15))[1])
    _check_rate_limited(frames)
    await dev.close()
