"""The device SDK (devices.sdk) and the fleet simulator, with a real node and real MQTT.

Nodes killed with SIGKILL are subprocesses (tests.servers.NodeProcess) on a fixed MQTT port,
so that the device finds the next node where the last one was.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devices.sdk import ClientError, Device
from devices.simulate import simulate
from node.nats_server import free_port
from tests.servers import NatsProcess, NodeProcess
from tests.wsclient import SECRET, RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


def device_token(dev: str, **kw: Any) -> str:
    return token(dev, kind="device", **kw)


def new_id(prefix: str = "thermo") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def start_node(tmp_path: Path, name: str, nats: NatsProcess, mqtt_port: int) -> NodeProcess:
    # NodeProcess passes a random --mqtt-port first; argparse keeps the last one: ours.
    return NodeProcess(
        tmp_path / name, "--nats-url", nats.url, "--mqtt-port", str(mqtt_port),
        "--rate-per-s", "100000", "--rate-burst", "100000",
        name=name, env={"RTNODE_JWT_SECRET": SECRET},
    ).start()


async def ready(node: NodeProcess) -> NodeProcess:
    await asyncio.to_thread(node.wait_ready, 15)
    return node


def kill(node: NodeProcess) -> None:
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait(10)


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll a condition that has no event of its own, with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def fast(dev_id: str, port: int, **kw: Any) -> Device:
    return Device("127.0.0.1", port, dev_id, token=device_token(dev_id), min_backoff_s=0.05,
                  max_backoff_s=0.5, **kw)


async def test_offline_replay_across_a_node_kill(shared_nats: NatsProcess,
                                                 tmp_path: Path) -> None:
    mqtt_port = free_port()
    room, dev_id, state = unique("dev"), new_id(), tmp_path / "device-state.json"
    nodes = [start_node(tmp_path, "sdk1", shared_nats, mqtt_port)]
    try:
        await ready(nodes[0])
        pub = await RawClient.connected(nodes[0].ws_url, token("publisher"))
        async with fast(dev_id, mqtt_port, state_file=state) as d:
            await d.wait_connected(5)
            joined = await d.join(room)
            assert joined["type"] == "joined" and joined["recovered"] is False
            first = await pub.request({"type": "publish", "room": room, "event": "e",
                                       "data": {"n": 0}})
            events = d.events()
            ev = await asyncio.wait_for(anext(events), 10)
            assert isinstance(ev, dict) and ev["seq"] == first["seq"]
            assert ev["data"] == {"n": 0}
            await events.aclose()
        saved = json.loads(state.read_text())["rooms"][room]
        assert saved["seq"] == first["seq"] and saved["epoch"] == joined["epoch"]

        # The device is offline: 200 events, pipelined in one WebSocket message.
        await pub.send(*[{"type": "publish", "id": 1000 + i, "room": room, "event": "e",
                          "data": {"n": i + 1}} for i in range(200)])
        replies: dict[int, int] = {}
        while len(replies) < 200:
            frame = await pub.recv()
            assert frame["type"] == "published", frame
            replies[frame["id"]] = frame["seq"]
        seqs = [replies[1000 + i] for i in range(200)]
        assert seqs == sorted(seqs)
        await pub.close()

        kill(nodes[0])
        nodes.append(await ready(start_node(tmp_path, "sdk2", shared_nats, mqtt_port)))

        # A new process (a new Device object) with the same id and state file.
        async with fast(dev_id, mqtt_port, state_file=state) as d2:
            rejoined = await d2.join(room)
            assert rejoined["recovered"] is True and rejoined["replayed"] == 200, rejoined
            got: list[dict[str, Any]] = []
            events = d2.events()
            async with asyncio.timeout(15):
                while len(got) < 200:
                    item = await anext(events)
                    assert isinstance(item, dict), item
                    got.append(item)
            assert [e["seq"] for e in got] == seqs
            assert [e["data"]["n"] for e in got] == list(range(1, 201))
            # Nothing doubled after the replay: the next event is a new one.
            late = await RawClient.connected(nodes[1].ws_url, token("publisher"))
            marker = await late.request({"type": "publish", "room": room, "event": "marker",
                                         "data": None})
            nxt = await asyncio.wait_for(anext(events), 10)
            assert isinstance(nxt, dict) and nxt["seq"] == marker["seq"]
            assert nxt["event"] == "marker"
            await events.aclose()
            await late.close()
        assert json.loads(state.read_text())["rooms"][room]["seq"] == marker["seq"]
    finally:
        for node in nodes:
            node.stop()


async def test_uplink_exactly_once_across_a_cut(shared_nats: NatsProcess,
                                                tmp_path: Path) -> None:
    mqtt_port = free_port()
    room, dev_id = unique("up"), new_id()
    nodes = [await ready(start_node(tmp_path, "cut1", shared_nats, mqtt_port))]
    try:
        async with fast(dev_id, mqtt_port, publish_timeout_s=25) as d:
            await d.wait_connected(5)
            kill(nodes[0])
            await until(lambda: not d.connected, 10, "the device to see the node gone")
            sending = asyncio.create_task(
                d.publish(room, "cmd", {"on": True}, msg_id="once-1"))
            nodes.append(start_node(tmp_path, "cut2", shared_nats, mqtt_port))
            seq = await asyncio.wait_for(sending, 25)
            assert isinstance(seq, int) and d.reconnects >= 1
            assert await d.publish(room, "cmd", {"on": True}, msg_id="once-1") == seq
            other = await d.publish(room, "cmd", {"on": False})  # a fresh uuid msg_id
            assert isinstance(other, int) and other > seq
        reader = await RawClient.connected(nodes[1].ws_url, token("reader"))
        hist = await reader.request({"type": "history", "room": room})
        assert [e["msg_id"] for e in hist["events"]].count("once-1") == 1
        assert [e["seq"] for e in hist["events"]] == [seq, other]
        assert hist["events"][0]["from"] == {"user": dev_id, "kind": "device",
                                             "client_id": dev_id}
        await reader.close()
    finally:
        for node in nodes:
            node.stop()


async def test_rpc_handlers(make_node) -> None:
    node = await make_node()
    dev_id = new_id()
    async with Device("127.0.0.1", node.mqtt.port, dev_id, token=device_token(dev_id)) as d:

        @d.rpc("set_temp")
        async def set_temp(params: Any, from_: dict[str, Any]) -> Any:
            return {"ok": True, "temp": params["temp"], "by": from_.get("user")}

        @d.rpc("boom")
        async def boom(params: Any, from_: dict[str, Any]) -> Any:
            raise RuntimeError("sensor on fire")

        await d.wait_connected(10)
        caller = await RawClient.connected(ws_url(node), token("operator", rpc=["device:*"]))
        res = await caller.request({"type": "rpc", "to": f"device:{dev_id}",
                                    "method": "set_temp", "params": {"temp": 21.5}})
        assert res["type"] == "result", res
        assert res["result"] == {"ok": True, "temp": 21.5, "by": "operator"}
        unknown = await caller.request({"type": "rpc", "to": f"device:{dev_id}",
                                        "method": "nope", "params": None})
        assert unknown["type"] == "error" and unknown["code"] == 4004, unknown
        failed = await caller.request({"type": "rpc", "to": f"device:{dev_id}",
                                       "method": "boom", "params": None})
        assert failed["type"] == "error" and failed["code"] == 4500, failed
        await caller.close()


async def test_refused_device_ends_with_an_error(make_node) -> None:
    node = await make_node()
    async with Device("127.0.0.1", node.mqtt.port, "d-1", token=device_token("d-2")) as d:
        with pytest.raises(ClientError) as info:
            await d.wait_connected(10)
        assert info.value.code == 4001


async def test_simulator_readings_reach_a_room_member(make_node) -> None:
    node = await make_node()
    room = unique("sim")
    # Unread events must not pause the reading of the socket (its close would then wait).
    watcher = await RawClient.connected(ws_url(node), token("watcher"), max_queue=None)
    await watcher.request({"type": "join", "room": room})
    lines: list[str] = []
    run = asyncio.create_task(simulate("127.0.0.1", node.mqtt.port, count=5, room=room, rate=5,
                                       secret=SECRET, duration=2.0, out=lines.append))
    seen: set[str] = set()
    async with asyncio.timeout(10):
        while len(seen) < 5:
            [ev] = await watcher.events(1, room)
            assert ev["from"]["kind"] == "device" and ev["event"] == "reading"
            assert set(ev["data"]) == {"t", "i"}
            seen.add(ev["from"]["user"])
    assert seen == {f"sim-{i}" for i in range(5)}
    caller = await RawClient.connected(ws_url(node), token("operator", rpc=["device:*"]))
    read = await caller.request({"type": "rpc", "to": "device:sim-0", "method": "read",
                                 "params": None})
    assert read["type"] == "result" and set(read["result"]) == {"t", "i"}, read
    stats = await asyncio.wait_for(run, 10)
    assert stats.acked >= 25 and stats.failed == 0 and stats.rpc_answered >= 1
    assert any("acked" in line for line in lines[:-1]), lines
    assert lines[-1].endswith("(done)")
    await caller.close()
    await watcher.close()
