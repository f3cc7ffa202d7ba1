"""Issue 13, done when: a state room of 100 devices.

100 plain MQTT devices (aiomqtt, one process) each publish a reading every second with RETAIN
on ``rooms/<room>/up`` of a state room (``[namespaces.fleet] state = true``): the key is the
device id. A browser-like WebSocket client that joins late gets ``joined``, then one ``state``
frame with the 100 current values, then live events that are newer than the values it holds;
``mosquitto_sub`` on the room gets 100 retained messages at once; an empty retained payload
from one device removes its key (``GET /api/state`` shows 99).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import cbor2
import pytest

from tests.wsclient import SECRET, RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

DEVICES = 100
RTNODE = Path(sys.executable).parent / "rtnode"


def _reading(i: int, n: int) -> bytes:
    return json.dumps({"event": "reading", "data": {"t": 20 + (i % 7) / 2, "n": n}}).encode()


async def _device(port: int, dev: str, i: int, room: str, first: asyncio.Event,
                  started: list[str]) -> None:
    """Connect, then publish a retained reading every second until cancelled."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=dev, username=dev,
                              password=token(dev, kind="device"), timeout=10) as c:
        loop = asyncio.get_running_loop()
        n = 0
        while True:
            t0 = loop.time()
            await c.publish(f"rooms/{room}/up", _reading(i, n), qos=1, retain=True)
            if n == 0:
                started.append(dev)
                if len(started) == DEVICES:
                    first.set()
            n += 1
            await asyncio.sleep(max(0.0, 1.0 - (loop.time() - t0)))


async def _state(http: aiohttp.ClientSession, node: Any, room: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token('backend', kind='service')}"}
    async with http.get(f"http://127.0.0.1:{node.http.port}/api/state", params={"room": room},
                        headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def test_state_room_of_100_devices(make_node: Callable[..., Any]) -> None:
    node = await make_node(namespaces={"fleet": {"state": True}})
    port = node.mqtt.port
    room = unique("fleet")
    ids = [f"s-{i:03d}" for i in range(DEVICES)]
    first = asyncio.Event()
    started: list[str] = []
    tasks = {dev: asyncio.create_task(_device(port, dev, i, room, first, started),
                                      name=f"device[{dev}]") for i, dev in enumerate(ids)}
    http = aiohttp.ClientSession()
    try:
        done, _ = await asyncio.wait([asyncio.create_task(first.wait()), *tasks.values()],
                                     timeout=30, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # a device that failed says why
        assert first.is_set(), f"{len(started)} of {DEVICES} devices published"

        # A browser joins late: joined, then the state frame, then live events.
        browser = await RawClient.connected(ws_url(node), token("viewer"))
        joined = await browser.request({"type": "join", "room": room})
        assert joined["type"] == "joined", joined
        frame = await browser.recv()
        while frame.get("room") != room:
            frame = await browser.recv()
        assert frame["type"] == "state", f"the state frame first, got {frame}"
        values = frame["values"]
        assert [v["key"] for v in values] == ids, "the 100 current values, ordered by key"
        held = {v["key"]: v["seq"] for v in values}
        for v in values:
            assert v["event"] == "reading" and v["from"]["user"] == v["key"], v
            assert set(v) >= {"seq", "event", "data", "from", "ts", "key"}, v
        live = await browser.events(2 * DEVICES, room, timeout=10)
        newer = [e for e in live if e["seq"] > held[e["key"]]]
        assert len(newer) == len(live), "no live event older than the value held for its key"
        assert {e["key"] for e in live} == set(ids), "every device's readings, live"

        # mosquitto_sub: 100 retained messages at once, one per device.
        exe = shutil.which("mosquitto_sub")
        assert exe, "make test installs Debian's mosquitto-clients"
        proc = await asyncio.create_subprocess_exec(
            exe, "-h", "127.0.0.1", "-p", str(port), "-i", "watch-1", "-u", "watch-1",
            "-P", token("watch-1", kind="device"), "-t", f"rooms/{room}", "-C", str(DEVICES),
            "-W", "10", "-F", "%r %x",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err
        lines = [line.split(" ", 1) for line in out.decode().splitlines()]
        assert len(lines) == DEVICES and all(r == "1" for r, _ in lines), \
            f"{DEVICES} retained messages first: {[r for r, _ in lines]}"
        keys = [cbor2.loads(bytes.fromhex(x))["key"] for _, x in lines]
        assert sorted(keys) == ids

        # An empty retained payload removes the device's key.
        gone = ids[7]
        tasks[gone].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[gone]
        async with aiomqtt.Client("127.0.0.1", port, identifier=gone, username=gone,
                                  password=token(gone, kind="device"), timeout=10) as c:
            await c.publish(f"rooms/{room}/up", b"", qos=1, retain=True)
        state = await _state(http, node, room)
        assert len(state["values"]) == DEVICES - 1, state
        assert gone not in {v["key"] for v in state["values"]}
        async with asyncio.timeout(10):
            while True:
                [e] = await browser.events(1, room)
                if e["key"] == gone and e.get("unset"):
                    break
        assert e["unset"] is True and e["event"] == "state:unset" and e.get("data") is None, e
        await browser.close()
    finally:
        await http.close()
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)


async def test_simulated_fleet_reported_and_desired(make_node: Callable[..., Any],
                                                    tmp_path: Path) -> None:
    """``rtnode devices simulate --state``: 100 devices (the SDK, over the tunnel) report a
    reading a second, keyed by their ids; a late browser sees the 100 values first, then live
    ones; a desired value it sets for one device shows in that device's next readings."""
    node = await make_node(namespaces={"fleet": {"state": True}})
    room = unique("fleet")
    ids = sorted(f"sim-{i}" for i in range(DEVICES))
    sim = await asyncio.create_subprocess_exec(
        str(RTNODE), "devices", "simulate", "--count", str(DEVICES), "--room", room,
        "--rate", "1", "--state", "--port", str(node.mqtt.port), "--duration", "60",
        cwd=tmp_path, env={**os.environ, "RTNODE_JWT_SECRET": SECRET},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    http = aiohttp.ClientSession()
    try:
        async with asyncio.timeout(30):
            while len((await _state(http, node, room))["values"]) < DEVICES:
                if sim.returncode is not None:
                    assert sim.stdout is not None
                    out = (await sim.stdout.read()).decode(errors="replace")[-2000:]
                    raise AssertionError(f"simulate exited {sim.returncode}:\n{out}")
                await asyncio.sleep(0.2)

        browser = await RawClient.connected(ws_url(node), token("viewer"))
        joined = await browser.request({"type": "join", "room": room})
        assert joined["type"] == "joined", joined
        frame = await browser.recv()
        while frame.get("room") != room:
            frame = await browser.recv()
        assert frame["type"] == "state", f"the state frame first, got {frame}"
        assert [v["key"] for v in frame["values"]] == ids
        held = {v["key"]: v["seq"] for v in frame["values"]}
        assert all(v["event"] == "reported" and v["from"]["user"] == v["key"]
                   for v in frame["values"])
        live = await browser.events(DEVICES, room, timeout=10)
        assert all(e["seq"] > held[e["key"]] for e in live), "live events are newer"

        reply = await browser.request({"type": "publish", "room": f"{room}-desired",
                                       "event": "desired", "key": "sim-3",
                                       "data": {"t": 40.0}})
        assert reply["type"] == "published", reply
        async with asyncio.timeout(15):
            while True:
                [e] = await browser.events(1, room)
                if e["key"] == "sim-3" and e["data"]["t"] > 30:
                    break  # steering towards 40 (a third of the way a second)
        await browser.close()
    finally:
        await http.close()
        if sim.returncode is None:
            sim.terminate()  # our own child, by its PID
            try:
                await asyncio.wait_for(sim.wait(), 15)
            except TimeoutError:
                sim.kill()
                await sim.wait()
