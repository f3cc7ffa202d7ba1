"""Issue 13, done when: persistent MQTT sessions survive a kill -9 of the device's node.

A 3-server R3 NATS cluster and three node processes on it (A, B and C). Three devices with
``clean_session = 0`` subscribe at QoS 1 to one room through node A and go away: paho-mqtt,
Debian's ``mosquitto_sub -c -q 1`` and a bare MQTT client that PUBACKs only when told
(``tests.cluster.RawMqtt``). 500 events are stored, half from a browser-like WebSocket client
through A and half from the HTTP API through B; A is killed with SIGKILL. Each device
reconnects to B: session present, the 500 in stored order, then a live event. The bare client
leaves some PUBLISHes of B unacknowledged, reconnects through C, and gets them again with DUP
and their packet ids; ``clean_session = 1`` starts empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path

import aiohttp
import cbor2
import pytest

from tests.cluster import NatsCluster, RawMqtt, cluster_node
from tests.paho import PahoDevice
from tests.servers import NodeProcess
from tests.wsclient import RawClient, publish_many, token, unique

pytestmark = pytest.mark.integration

TOTAL = 500


def device_token(dev: str) -> str:
    return token(dev, kind="device")


async def http_publish(session: aiohttp.ClientSession, node: NodeProcess, room: str,
                       n: int, start: int) -> list[int]:
    """``n`` events through ``POST /api/publish`` (16 at a time); their seqs."""
    headers = {"Authorization": f"Bearer {token('backend', kind='service')}"}
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> int:
        async with sem, session.post(node.base + "/api/publish", headers=headers, json={
                "room": room, "event": "e", "data": i, "msg_id": f"h-{i}"}) as resp:
            assert resp.status == 200, await resp.text()
            return int((await resp.json())["seq"])

    return list(await asyncio.gather(*(one(i) for i in range(start, start + n))))


def _mosquitto_sub(port: int, dev: str, room: str, *extra: str) -> list[str]:
    exe = shutil.which("mosquitto_sub")
    assert exe, "make test installs Debian's mosquitto-clients"
    return [exe, "-h", "127.0.0.1", "-p", str(port), "-c", "-q", "1", "-i", dev, "-u", dev,
            "-P", device_token(dev), "-t", f"rooms/{room}", *extra]


def _logs(*nodes: NodeProcess) -> str:
    return "\n".join(f"--- {n.name}\n{n.log()[-2500:]}" for n in nodes)


async def test_sessions_survive_a_kill_9_of_the_node(tmp_path: Path, cluster: NatsCluster
                                                     ) -> None:
    a = cluster_node(tmp_path, "a", cluster.urls)
    b = cluster_node(tmp_path, "b", cluster.urls)
    c = cluster_node(tmp_path, "c", cluster.urls)
    http = aiohttp.ClientSession()
    try:
        await asyncio.gather(*(asyncio.to_thread(n.wait_ready, 30) for n in (a, b, c)))
        room = unique("cmd")

        # Three devices subscribe at QoS 1 through A, with clean_session = 0, and go away.
        p = PahoDevice("p-1", a.mqtt_port, clean=False)
        assert await p.start() == (False, 0), "a first CONNECT finds no session"
        assert await p.subscribe([f"rooms/{room}"]) == [1], "QoS 1 is granted"
        await p.stop()
        proc = await asyncio.create_subprocess_exec(
            *_mosquitto_sub(a.mqtt_port, "m-1", room, "-E"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err
        raw = await RawMqtt.connect(a.mqtt_port, "r-1", device_token("r-1"))
        assert not raw.session_present and raw.return_code == 0
        assert await raw.subscribe(f"rooms/{room}", 1) == [1]
        await raw.disconnect()

        # 500 events: 250 from a browser through A, 250 from the HTTP API through B.
        browser = await RawClient.connected(a.ws_url, token("browser"))
        ws_seqs, http_seqs = await asyncio.wait_for(asyncio.gather(
            publish_many(browser, room, TOTAL // 2),
            http_publish(http, b, room, TOTAL - TOTAL // 2, TOTAL // 2)), 60)
        await browser.close()
        stored = sorted(ws_seqs + http_seqs)
        assert len(set(stored)) == TOTAL

        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)

        async def live() -> int:
            [seq] = await http_publish(http, b, room, 1, 10_000 + len(stored))
            stored.append(seq)
            return seq

        # paho: session present on B, the 500 in order, then a live event.
        p = PahoDevice("p-1", b.mqtt_port, clean=False)
        assert await p.start() == (True, 0), "the session survived node A: " + _logs(b)
        got = await p.seqs(TOTAL)
        assert got == stored[:TOTAL], "every stored event, in order, once"
        seq = await live()
        assert await p.seqs(1) == [seq], "then the live events"
        await p.stop()

        # mosquitto_sub -c -q 1 (it subscribes again: the session's cursor stays).
        proc = await asyncio.create_subprocess_exec(
            *_mosquitto_sub(b.mqtt_port, "m-1", room, "-F", "%x", "-C", str(TOTAL + 2),
                            "-W", "60"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        lines: list[int] = []
        try:
            async with asyncio.timeout(40):
                while len(lines) < len(stored):
                    line = await proc.stdout.readline()
                    assert line, (lines[-3:], (await proc.stderr.read()) if proc.stderr else b"")
                    lines.append(int(cbor2.loads(bytes.fromhex(line.decode().strip()))["seq"]))
                seq = await live()
                line = await proc.stdout.readline()
                lines.append(int(cbor2.loads(bytes.fromhex(line.decode().strip()))["seq"]))
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert lines == stored, "mosquitto_sub: the 500 and the live event between, in order"

        # The bare client: 10 PUBLISHes read from B, the first 5 acknowledged, the connection
        # lost; back through C, the unacknowledged ones come again.
        raw = await RawMqtt.connect(b.mqtt_port, "r-1", device_token("r-1"))
        assert raw.session_present and raw.return_code == 0
        first = [await raw.publish_in() for _ in range(10)]
        assert [int(cbor2.loads(m[1])["seq"]) for m in first] == stored[:10]
        assert all(m[3] == 1 and m[2] and not m[4] for m in first), "QoS 1, packet ids, no DUP"
        for m in first[:5]:
            raw.puback(m[2])
        await raw.drop()
        # Its connection on B may still be writing its last cursors: C's claim has B hand the
        # session over first (that write done), so the 5 acknowledged are not sent again
        # (test_mqtt_handover); a lost race is read again, never a CONNACK 3
        # (test_session_store_races).
        raw = await RawMqtt.connect(c.mqtt_port, "r-1", device_token("r-1"))
        assert (raw.session_present, raw.return_code) == (True, 0), _logs(b, c)
        again = [await raw.publish_in() for _ in range(5)]
        assert [int(cbor2.loads(m[1])["seq"]) for m in again] == stored[5:10], \
            "the unacknowledged ones first, from the first one not acknowledged"
        assert all(m[4] for m in again), "resent with DUP = 1"
        assert [m[2] for m in again] == [m[2] for m in first[5:]], "with their packet ids"
        for m in again:
            raw.puback(m[2])
        rest: list[int] = []
        async with asyncio.timeout(30):
            while len(rest) < len(stored) - 10:
                m = await raw.publish_in()
                raw.puback(m[2])
                rest.append(int(cbor2.loads(m[1])["seq"]))
        assert rest == stored[10:], "then the rest, in order, nothing twice"
        await raw.disconnect()

        # clean_session = 1 starts empty and discards the session.
        missed = [await live() for _ in range(3)]
        p = PahoDevice("p-1", b.mqtt_port, clean=True)
        assert await p.start() == (False, 0), "clean session: no session present"
        assert await p.subscribe([f"rooms/{room}"]) == [1]
        seq = await live()
        assert await p.seqs(1) == [seq], f"no old event ({missed}), only the live one"
        await p.stop()
        p = PahoDevice("p-1", b.mqtt_port, clean=False)
        assert await p.start() == (False, 0), "clean_session = 1 discarded the stored session"
        await p.stop()
    finally:
        await http.close()
        for node in (a, b, c):
            with contextlib.suppress(Exception):
                node.stop()


async def test_a_session_survives_its_node_and_nats_server(tmp_path: Path, cluster: NatsCluster
                                                           ) -> None:
    """Node A uses only NATS server 0; the device's session is made through A, then A and
    server 0 are killed (-9) together; the device reconnects through B (servers 1 and 2): its
    session and every event stored meanwhile are there (R3: two servers of three hold them)."""
    a = cluster_node(tmp_path, "a", cluster.urls[:1])
    b = cluster_node(tmp_path, "b", cluster.urls[1:])
    http = aiohttp.ClientSession()
    try:
        await asyncio.gather(*(asyncio.to_thread(n.wait_ready, 30) for n in (a, b)))
        room = unique("cmd")
        p = PahoDevice("p-2", a.mqtt_port, clean=False)
        assert await p.start() == (False, 0)
        assert await p.subscribe([f"rooms/{room}"]) == [1]
        await p.stop()
        stored = await http_publish(http, b, room, 200, 0)
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        cluster.kill(0)

        # A CONNACK 3 (the session store electing a new leader) is retried, as a device would.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            p = PahoDevice("p-2", b.mqtt_port, clean=False)
            present, rc = await p.start()
            if rc not in (3, 136) or loop.time() > deadline:  # paho: 3 is 136
                break
            await p.stop()
            await asyncio.sleep(0.5)
        assert (present, rc) == (True, 0), "the session outlived its node and NATS server"
        assert await p.seqs(len(stored)) == sorted(stored), "every event, in order, once"
        [seq] = await http_publish(http, b, room, 1, 1000)
        assert await p.seqs(1) == [seq]
        await p.stop()
    finally:
        await http.close()
        for node in (a, b):
            with contextlib.suppress(Exception):
                node.stop()
