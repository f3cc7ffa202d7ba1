"""Late MQTT takeover notices (task H3): a notice names the claim it announces, and only a
connection holding an older revision is closed. The device reconnects A -> B -> C; B's notice
(or B's claim itself, on the same node) arriving after C's claim must leave C up. Real nodes on
a real nats-server, raw MQTT clients (``tests.cluster.RawMqtt``); the late notice is published by
the test itself, the late claim is held back by a wrapper of the node's session store."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.cluster import RawMqtt
from tests.integration.test_mqtt_sessions import dev_token, receive, saved, store
from tests.wsclient import unique

pytestmark = pytest.mark.integration

TAKEOVER = "rtnode.mqtt.takeover"


def watch_notices(node: Any) -> asyncio.Queue[Any]:
    """The takeover notices ``node`` handles, in order (its callback is wrapped)."""
    seen: asyncio.Queue[Any] = asyncio.Queue()
    original = node.sessions.on_takeover
    assert original is not None

    def wrapped(*args: Any) -> None:
        original(*args)
        seen.put_nowait(args)

    node.sessions.on_takeover = wrapped
    return seen


async def notice(node: Any, dev: str, sender: str, headers: dict[str, str] | None,
                 seen: asyncio.Queue[Any]) -> None:
    """Publish a takeover notice for ``dev`` (as node ``sender`` would) and wait until ``node``
    has handled it."""
    nc = node.store.link.nc
    await nc.publish(f"{TAKEOVER}.default.{dev}", sender.encode(), headers=headers)
    await nc.flush()
    async with asyncio.timeout(5):
        await seen.get()


async def closed(raw: RawMqtt) -> None:
    """Wait until the node ends ``raw``'s connection."""
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        async with asyncio.timeout(5):
            while True:
                await raw.read_packet()


async def stays_up(node: Any, raw: RawMqtt, room: str, start: int) -> None:
    """``raw`` still receives the room's new events (and acknowledges them)."""
    more = await store(node, room, 2, start=start)
    got = await receive(raw, 2)
    assert [m["seq"] for *_, m in got] == more


async def test_a_late_notice_from_another_node_leaves_the_newest_connection_up(
        make_node: Any) -> None:
    a = await make_node()
    b = await make_node()
    room, dev = unique("cmd"), unique("dev")
    first = await RawMqtt.connect(a.mqtt.port, dev, dev_token(dev))  # A on n1
    await first.subscribe(f"rooms/{room}")
    await saved(a, dev, lambda r: r.connected and r.node == "n1" and r.subs)
    second = await RawMqtt.connect(b.mqtt.port, dev, dev_token(dev))  # B on n2
    assert second.session_present
    await closed(first)
    await saved(b, dev, lambda r: r.connected and r.node == "n2")
    _, b_revision = await b.sessions.read("default", dev)
    third = await RawMqtt.connect(a.mqtt.port, dev, dev_token(dev))  # C on n1
    assert third.session_present
    await saved(a, dev, lambda r: r.connected and r.node == "n1")
    await closed(second)
    seen = watch_notices(a)

    # B's notice, late: older than C's claim, it closes nothing.
    await notice(a, dev, "n2", {"Rtnode-Takeover-Before": str(b_revision),
                                "Rtnode-Takeover-Conn": "b-conn"}, seen)
    await stays_up(a, third, room, 0)
    record = await saved(a, dev, lambda r: r.connected and r.cursors.get(room))
    assert record.node == "n1"

    # A bad header is one log line, and closes nothing (the stale notice after it is handled
    # after it).
    await a.store.link.nc.publish(f"{TAKEOVER}.default.{dev}", b"n2",
                                  headers={"Rtnode-Takeover-Before": "x"})
    await notice(a, dev, "n2", {"Rtnode-Takeover-Before": str(b_revision)}, seen)
    await stays_up(a, third, room, 2)

    # A newer claim's notice closes it (far ahead: C's last PUBACKs may still be written).
    _, c_revision = await a.sessions.read("default", dev)
    await notice(a, dev, "n2", {"Rtnode-Takeover-Before": str(c_revision + 10**6),
                                "Rtnode-Takeover-Conn": "d-conn"}, seen)
    await closed(third)

    # A notice of an older node (no headers) closes the device's connection, as before.
    fourth = await RawMqtt.connect(a.mqtt.port, dev, dev_token(dev))
    await saved(a, dev, lambda r: r.connected and r.node == "n1")
    await notice(a, dev, "n2", None, seen)
    await closed(fourth)


async def test_a_late_notice_of_a_clean_connection_s_predecessor_is_ignored(
        make_node: Any) -> None:
    a = await make_node()
    b = await make_node()
    dev, other = unique("dev"), unique("dev")
    held = await RawMqtt.connect(a.mqtt.port, other, dev_token(other))  # n1 holds a session
    await saved(a, other, lambda r: r.connected)
    first = await RawMqtt.connect(b.mqtt.port, dev, dev_token(dev))  # persistent, on n2
    await saved(b, dev, lambda r: r.connected and r.node == "n2")
    _, b_revision = await b.sessions.read("default", dev)
    clean = await RawMqtt.connect(a.mqtt.port, dev, dev_token(dev), clean=True)  # on n1
    await closed(first)
    assert await a.sessions.get("default", dev) is None
    seen = watch_notices(a)
    await notice(a, dev, "n2", {"Rtnode-Takeover-Before": str(b_revision),
                                "Rtnode-Takeover-Conn": "b-conn"}, seen)
    room = unique("cmd")
    assert await clean.subscribe(f"rooms/{room}") == [1]
    await stays_up(a, clean, room, 0)
    await clean.disconnect()
    await held.disconnect()


async def test_a_late_claim_on_the_same_node_does_not_take_the_newest_connection(
        make_node: Any) -> None:
    node = await make_node()
    room, dev = unique("cmd"), unique("dev")
    first = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))  # A
    await saved(node, dev, lambda r: r.connected)
    await first.drop()
    await saved(node, dev, lambda r: not r.connected)

    # B's claim is held until C's claim is done (or 1 s): B's claim lands after C's, unless
    # C waits for B's.
    sessions = node.sessions
    claim = sessions.claim
    b_entered, b_done, c_done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    calls = 0

    async def held_claim(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # B's
            b_entered.set()
            try:
                async with asyncio.timeout(1.0):
                    await c_done.wait()
            except TimeoutError:
                pass
            try:
                return await claim(*args, **kwargs)
            finally:
                b_done.set()
        try:
            return await claim(*args, **kwargs)
        finally:
            c_done.set()

    sessions.claim = held_claim
    reader, writer = await asyncio.open_connection("127.0.0.1", node.mqtt.port)
    second = RawMqtt(reader, writer)  # B: its CONNECT, its CONNACK not awaited
    token = dev_token(dev)
    body = (RawMqtt._str("MQTT") + bytes([4, 0xC0]) + (60).to_bytes(2, "big")
            + RawMqtt._str(dev) + RawMqtt._str(dev) + RawMqtt._str(token))
    writer.write(RawMqtt._packet(0x10, body))
    async with asyncio.timeout(5):
        await b_entered.wait()
    third = await RawMqtt.connect(node.mqtt.port, dev, token)  # C
    assert third.session_present
    async with asyncio.timeout(5):
        await b_done.wait()
    assert await third.subscribe(f"rooms/{room}") == [1]
    await stays_up(node, third, room, 0)
    record = await saved(node, dev, lambda r: r.connected and r.cursors.get(room))
    assert f"rooms/{room}" in record.subs
    await third.disconnect()
    writer.close()
    del second
