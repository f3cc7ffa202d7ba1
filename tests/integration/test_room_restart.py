"""A room actor that crashes is rebuilt, and every kind of member carries on from its cursor:
browsers (WebSocket), tunnel devices and plain MQTT subscribers (``rooms/<room>``) alike.

Real node (in-process, so the test can reach its room actor), real nats-server, real clients.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import cbor2
import pytest

from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

BEFORE, DURING, AFTER = 5, 5, 5


class _Poison:
    """A message no room handles: its handler raises, and the actor is restarted."""


def _device(node: Any, dev: str) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", node.mqtt.port, identifier=dev, username=dev,
                          password=token(dev, kind="device"))


async def _mqtt_events(client: aiomqtt.Client, n: int, *, tunnel: bool,
                       timeout: float = 30.0) -> list[dict[str, Any]]:
    """The next ``n`` room events a device receives (tunnel: ``event`` frames only)."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            frame = cbor2.loads(message.payload)
            if tunnel and frame.get("type") != "event":
                continue
            out.append(frame)
            if len(out) == n:
                return out
    raise AssertionError("message stream ended")


async def test_every_member_kind_recovers_after_its_room_actor_crashes(make_node) -> None:
    node = await make_node()
    room = unique("crash")
    browser = await RawClient.connected(ws_url(node), token("viewer"))
    assert (await browser.request({"type": "join", "room": room}))["type"] == "joined"
    publisher = await RawClient.connected(ws_url(node), token("pub"))
    async with _device(node, "tun-1") as tunnel, _device(node, "plain-1") as plain:
        await tunnel.subscribe("rtnode/v1/tun-1/out", qos=0)
        await tunnel.publish("rtnode/v1/tun-1/in", cbor2.dumps(
            {"type": "join", "id": 1, "room": room}), qos=1)
        [joined] = await _mqtt_events(tunnel, 1, tunnel=False)
        assert joined["type"] == "joined", joined
        await plain.subscribe(f"rooms/{room}", qos=0)

        async def publish(data: Any) -> int:
            reply = await publisher.request({"type": "publish", "room": room, "event": "n",
                                             "data": data})
            assert reply["type"] == "published", reply
            return int(reply["seq"])

        # The SUBACK comes before the device's actor has joined the room: once an event reaches
        # the plain subscriber, every member is in. Events up to that one are left out.
        start = await publish("warm-up")
        while True:
            try:
                [first] = await _mqtt_events(plain, 1, tunnel=False, timeout=0.5)
            except TimeoutError:
                start = await publish("warm-up")
                continue
            if first["seq"] == start:
                break

        seqs = [await publish(i) for i in range(BEFORE)]
        ref = node.system.get(f"room:default:{room}")
        assert ref is not None
        restarts = node.system.stats()["room"].restarts
        ref.tell(_Poison())
        # Stored while the room actor is down (it restarts after a backoff of 0.1 s): the
        # members' rejoins from their cursors must replay these.
        seqs += [await publish(i) for i in range(BEFORE, BEFORE + DURING)]
        # An ask is answered by the next instance (a failing ask does not crash an actor).
        with pytest.raises(TypeError):
            await ref.ask(_Poison(), timeout=10)
        assert node.system.stats()["room"].restarts == restarts + 1
        assert ref.is_alive and node.system.get(f"room:default:{room}") is ref
        seqs += [await publish(i) for i in range(BEFORE + DURING, BEFORE + DURING + AFTER)]

        total = BEFORE + DURING + AFTER
        expected = [(seq, i) for i, seq in enumerate(seqs)]
        got_browser: list[dict[str, Any]] = []
        while not got_browser or got_browser[-1]["seq"] < seqs[-1]:
            got_browser += await browser.events(1, room)
        got_tunnel: list[dict[str, Any]] = []
        while not got_tunnel or got_tunnel[-1]["seq"] < seqs[-1]:
            got_tunnel += await _mqtt_events(tunnel, 1, tunnel=True)
        got_browser = [ev for ev in got_browser if ev["seq"] > start]
        got_tunnel = [ev for ev in got_tunnel if ev["seq"] > start]
        got_plain = await _mqtt_events(plain, total, tunnel=False)
        for name, got in (("browser", got_browser), ("tunnel", got_tunnel),
                          ("plain", got_plain)):
            assert [(ev["seq"], ev["data"]) for ev in got] == expected, name
        # Plain subscribers keep their wire format: the event frame's fields without type.
        assert set(got_plain[0]) == {"room", "seq", "event", "data", "ts", "from"}
        assert all(ev["type"] == "event" for ev in got_tunnel)
        # Nothing more: no duplicate came after the last event.
        check = await publish(total)
        [after] = await _mqtt_events(plain, 1, tunnel=False)
        assert after["seq"] == check
        [after] = await _mqtt_events(tunnel, 1, tunnel=True)
        assert after["seq"] == check
        [after] = await browser.events(1, room)
        assert after["seq"] == check
    await browser.close()
    await publisher.close()


async def test_a_join_whose_room_crashes_during_its_replay_rejoins_from_its_since(
        make_node, monkeypatch: pytest.MonkeyPatch) -> None:
    """A join with ``since`` whose room actor crashes while its replay is read is rejoined
    from its ``since`` and answered: not from 0, which delivered again the events the client
    had before it (and, beyond ``recovery_max``, cut the client off), and not silently (the
    client's join never got its ``joined``)."""
    node = await make_node()
    room = unique("replaycrash")
    publisher = await RawClient.connected(ws_url(node), token("pub"))
    seqs = []
    for i in range(8):
        pub = await publisher.request({"type": "publish", "room": room, "event": "e", "data": i})
        seqs.append(pub["seq"])
    client = await RawClient.connected(ws_url(node), token("resumer"))
    release = asyncio.Event()
    reading = asyncio.Event()
    real_read = node.store.read

    async def held_read(*args: Any, **kw: Any) -> Any:
        if not release.is_set():
            reading.set()
            await release.wait()
        return await real_read(*args, **kw)

    monkeypatch.setattr(node.store, "read", held_read)
    await client.send({"type": "join", "room": room, "id": "j",
                       "since": {"seq": seqs[3], "epoch": node.store.epoch}})
    await asyncio.wait_for(reading.wait(), 10)  # its replay is being read
    ref = node.system.get(f"room:default:{room}")
    assert ref is not None
    ref.tell(_Poison())  # the room crashes under the join; its next instance reads again
    with pytest.raises(TypeError):
        await ref.ask(_Poison(), timeout=10)  # answered (by raising) once it was rebuilt
    release.set()
    # its join is answered by the rejoin: recovered from its since
    joined = await client.until("joined")
    assert (joined["id"], joined["recovered"], joined["replayed"]) == ("j", True, 4), joined
    last = await publisher.request({"type": "publish", "room": room, "event": "e", "data": 8})
    want = [*seqs[4:], last["seq"]]
    got = [e["seq"] for e in await client.events(len(want), room)]
    assert got == want, "from its since, once each"
    assert (await client.request({"type": "ping"}))["type"] == "pong"
    assert [f["seq"] for f in client.buffer if f.get("type") == "event"] == []
