"""State rooms (issue 13) in the Python client and the device SDK, against a real node: the
current values after a join, live updates, ``unset``, the seq rule, and the fleet simulator's
reported/desired pattern."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from devices.client import Client, ClientError, Event, StateValues
from devices.sdk import Device
from devices.simulate import desired_room, simulate
from tests.wsclient import SECRET, token, unique, ws_url

pytestmark = pytest.mark.integration

STATE_NS = {"fleet": {"state": True}}


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll a condition that has no event of its own, with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def next_of(events: Any, kind: type, timeout: float = 10.0) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            item = await anext(events)
            if isinstance(item, kind):
                return item


async def test_client_values_after_join_live_and_unset(make_node: Any) -> None:
    node = await make_node(namespaces=STATE_NS)
    room = f"fleet:{unique('cs')}"
    async with Client(ws_url(node), token=token("alice")) as a:
        await a.join(room)
        s1 = await a.publish(room, "reading", {"t": 20})  # key: alice, the publisher's sub
        s2 = await a.publish(room, "setpoint", 22, key="desired:thermo")
        s3 = await a.publish(room, "reading", {"t": 21})
        assert s1 is not None and s2 is not None and s3 is not None and s1 < s2 < s3
        await until(lambda: a.values(room).get("alice") is not None
                    and a.values(room)["alice"].seq == s3, what="alice's own live value")

        # A late joiner gets the current values first (one StateValues), then live events.
        async with Client(ws_url(node), token=token("bob")) as b:
            events = aiter(b.events())
            await b.join(room)
            snap = await next_of(events, StateValues)
            assert snap.room == room and list(snap.values) == ["alice", "desired:thermo"]
            assert snap.values["alice"].data == {"t": 21} and snap.values["alice"].seq == s3
            assert snap.values["desired:thermo"].from_["user"] == "alice"
            assert b.values(room) == snap.values

            s4 = await a.publish(room, "setpoint", 23, key="desired:thermo")
            ev = await next_of(events, Event)
            assert ev.seq == s4 and ev.key == "desired:thermo"
            assert b.values(room)["desired:thermo"].data == 23

            s5 = await a.unset(room, "desired:thermo")
            ev = await next_of(events, Event)
            assert ev.seq == s5 and ev.unset and ev.key == "desired:thermo"
            assert list(b.values(room)) == ["alice"]

        # Rooms that are not state rooms: no values, and key/unset are refused.
        plain = unique("plain")
        await a.join(plain)
        await a.publish(plain, "msg", 1)
        assert a.values(plain) == {}
        with pytest.raises(ClientError) as refused:
            await a.publish(plain, "msg", 1, key="k")
        assert refused.value.code == 4000


async def test_device_sdk_values_and_report(make_node: Any) -> None:
    node = await make_node(namespaces=STATE_NS)
    room, dev_id = f"fleet:{unique('sdk')}", f"thermo-{unique('d')[-6:]}"
    async with Client(ws_url(node), token=token("op")) as op:
        await op.join(room)
        await op.publish(room, "desired", {"t": 19}, key=dev_id)
        async with Device("127.0.0.1", node.mqtt.port, dev_id,
                          token=token(dev_id, kind="device"), min_backoff_s=0.05) as d:
            await d.wait_connected(5)
            events = aiter(d.events())
            await d.join(room)
            frame = await asyncio.wait_for(anext(events), 10)
            assert isinstance(frame, dict) and frame["type"] == "state"
            assert [v["key"] for v in frame["values"]] == [dev_id]
            assert d.values(room)[dev_id].data == {"t": 19}
            seq = await d.report(room, {"t": 20.5})  # key: the device id
            await until(lambda: (v := op.values(room).get(dev_id)) is not None and v.seq == seq,
                        what="the device's report in the operator's values")
            assert op.values(room)[dev_id].data == {"t": 20.5}
            assert op.values(room)[dev_id].from_["kind"] == "device"


async def test_simulate_state_reported_and_desired(make_node: Any) -> None:
    node = await make_node(namespaces=STATE_NS)
    room = f"fleet:{unique('sim')}"
    lines: list[str] = []
    stop = asyncio.Event()
    async with Client(ws_url(node), token=token("ui")) as ui:
        await ui.join(room)
        await ui.join(desired_room(room))
        await ui.publish(desired_room(room), "desired", {"t": 30}, key="sim-1")
        run = asyncio.create_task(simulate(
            "127.0.0.1", node.mqtt.port, count=2, room=room, rate=10, secret=SECRET,
            stop=stop, out=lines.append, min_backoff_s=0.05, max_backoff_s=0.5, state=True))
        try:
            await until(lambda: set(ui.values(room)) == {"sim-0", "sim-1"}, 15,
                        "both devices' reported values")
            # sim-1 steers to its desired value; sim-0 has none.
            await until(lambda: ui.values(room)["sim-1"].data.get("target") == 30.0, 10,
                        "sim-1 applying its desired value")
            assert "target" not in ui.values(room)["sim-0"].data
            assert ui.values(room)["sim-0"].event == "reported"
            # A desired value set while running reaches sim-0 too.
            await ui.publish(desired_room(room), "desired", 12.5, key="sim-0")
            await until(lambda: ui.values(room)["sim-0"].data.get("target") == 12.5, 10,
                        "sim-0 applying a new desired value")
        finally:
            stop.set()
            stats = await asyncio.wait_for(run, 15)
    assert stats.desired_applied >= 2 and stats.acked > 0
    assert "desired applied" in lines[-1]
