"""``rtnode run --workers N``: worker processes sharing the ports and one embedded NATS."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.servers import NatsProcess, NodeProcess, children_of, pid_alive, wait_until
from tests.wsclient import SECRET, RawClient, token, unique

pytestmark = pytest.mark.integration


def _workers(data: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((data / "workers.json").read_text()))
    except (OSError, ValueError):
        return {}


async def _by_worker(url: str, n: int, sub: str = "u") -> dict[str, list[RawClient]]:
    """``n`` connections, grouped by the node (worker) that answered each."""
    clients = await asyncio.gather(*(RawClient.connected(url, token(f"{sub}{i}"))
                                     for i in range(n)))
    groups: dict[str, list[RawClient]] = {}
    for c in clients:
        groups.setdefault(c.info["node"], []).append(c)
    return groups


async def _close(groups: dict[str, list[RawClient]]) -> None:
    await asyncio.gather(*(c.close() for cs in groups.values() for c in cs))


async def _across_workers(url: str) -> None:
    groups = await _by_worker(url, 20)
    assert set(groups) == {"w-w0", "w-w1"}, "the kernel spreads connections over both workers"
    a, b = groups["w-w0"][0], groups["w-w1"][0]
    room = unique("wk")
    assert (await b.request({"type": "join", "room": room, "presence": True}))["type"] == "joined"
    assert (await a.request({"type": "join", "room": room}))["type"] == "joined"
    joined = await b.until("event")
    while joined["data"].get("client_id") != a.info["client_id"]:  # b's own join first
        joined = await b.until("event")
    assert joined["event"] == "presence:join" and joined["data"]["node"] == "w-w0"
    members = (await b.request({"type": "presence", "room": room}))["members"]
    assert {m["node"] for m in members} == {"w-w0", "w-w1"}
    await a.request({"type": "publish", "room": room, "event": "hi", "data": 1})
    (event,) = await b.events(1, room)
    assert event["data"] == 1 and event["event"] == "hi"
    await _close(groups)


async def _serves_worker(url: str, name: str) -> None:
    """Connect until one connection lands on worker ``name`` (it serves the shared port)."""
    for _ in range(10):
        groups = await _by_worker(url, 10, sub="r")
        await _close(groups)
        if name in groups:
            return
    raise AssertionError(f"no connection reached {name}")


def test_workers_share_ports_restart_and_stop(tmp_path: Path) -> None:
    data = tmp_path / "data"
    node = NodeProcess(data, "--workers", "2", name="w",
                       env={"RTNODE_JWT_SECRET": SECRET}).start()
    seen: set[int] = set()
    try:
        wait_until(lambda: "rtnode w ready" in node.log() or node.proc.poll() is not None, 30,
                   what="the banner")
        assert node.proc.poll() is None, node.log()
        assert "workers    2: w-w0 (pid" in node.log()
        info = _workers(data)
        assert info["pid"] == node.proc.pid
        pids = {w["name"]: w["pid"] for w in info["workers"]}
        seen.update([*pids.values(), info["nats_pid"]])
        assert all(pid_alive(p) for p in seen)
        assert node.readyz()[0] == 200

        asyncio.run(_across_workers(node.ws_url))

        # A worker killed: the parent starts another under the same name, the port serves.
        os.kill(pids["w-w0"], signal.SIGKILL)
        def restarted_w0() -> int | None:
            w0 = (_workers(data).get("workers") or [{}])[0]
            return w0["pid"] if w0.get("ready") and w0.get("pid") not in seen else None

        wait_until(restarted_w0, 15, what="worker w-w0 restarted")
        restarted = _workers(data)["workers"][0]["pid"]
        seen.add(restarted)
        assert f"! worker w-w0 (pid {pids['w-w0']}) exited with signal 9" in node.log()
        assert pid_alive(pids["w-w1"]), "the other worker is untouched"
        asyncio.run(_serves_worker(node.ws_url, "w-w0"))

        node.signal(signal.SIGINT)
        assert node.wait(30) == 0, node.log()
        wait_until(lambda: not any(pid_alive(p) for p in seen), 10,
                   what="workers and nats-server gone")
        assert "rtnode w stopped (2 workers)" in node.log()
        assert not (data / "workers.json").exists()
    finally:
        node.stop()
        for pid in seen:  # only the processes this test started, by PID
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_bad_workers_is_one_line(tmp_path: Path, value: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "node", "run", f"--workers={value}", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "--workers" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "nats").exists(), "nothing started"


def test_workers_on_external_nats(tmp_path: Path, shared_nats: NatsProcess) -> None:
    node = NodeProcess(tmp_path / "data", "--workers", "2", "--nats-url", shared_nats.url,
                       name="x", env={"RTNODE_JWT_SECRET": SECRET}).start()
    try:
        wait_until(lambda: "rtnode x ready" in node.log() or node.proc.poll() is not None, 30,
                   what="the banner")
        assert node.proc.poll() is None, node.log()
        kids = children_of(node.proc.pid)
        pids = [w["pid"] for w in _workers(tmp_path / "data")["workers"]]
        assert sorted(kids) == sorted(pids), "two workers and no nats-server"
        assert _workers(tmp_path / "data")["nats_pid"] is None
        node.signal(signal.SIGTERM)
        assert node.wait(30) == 0, node.log()
        wait_until(lambda: not any(pid_alive(p) for p in pids), 10, what="workers gone")
    finally:
        node.stop()


def test_a_setting_the_workers_refuse_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "node", "run", "--workers", "2", "--data-dir", str(tmp_path),
         "--http-port", "0", "--mqtt-port", "0", "--rpc-modules", "no_such_rpc_module"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("rtnode:")]
    assert errors == [errors[0]] and "no_such_rpc_module" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert "worker x-w1" not in r.stderr and "-w1 started" not in r.stderr, "w1 never started"
    assert not (tmp_path / "workers.json").exists()


def test_workers_auto_and_no_reuseport(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from node.protocol.errors import ConfigError
    from node.workers import parse_workers

    assert parse_workers("auto") == (os.cpu_count() or 1)
    assert parse_workers("3") == 3
    monkeypatch.delattr(socket, "SO_REUSEPORT")
    assert parse_workers("1") == 1, "one process needs no shared port"
    with pytest.raises(ConfigError, match="SO_REUSEPORT"):
        parse_workers("2")
