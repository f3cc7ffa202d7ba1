"""Devices lose nothing acknowledged, and get nothing acknowledged twice, under faults.

A seeded, randomized fault test for the devices' side of the delivery promise (docs/devices.md,
"Persistent sessions"; docs/tunnel.md, "Reconnecting and resuming"). Real parts only: a
3-server NATS cluster with the R3 room stream, two node processes (A and B), publishers
acknowledged through WebSocket and the HTTP API (each event with its own ``msg_id``, retried
until acknowledged), and four devices in two rooms:

- two bare MQTT 3.1.1 clients (``tests.cluster.RawMqtt``: they PUBACK when told) and one
  paho-mqtt client (manual acks: each PUBLISH acknowledged once recorded), all
  ``clean_session = 0`` with QoS 1 subscriptions to ``rooms/<room>``;
  each connects to A or B at random, reads a while, and leaves: DISCONNECT, a FIN, or a RST
  (the raw clients sometimes leave their last PUBLISHes unacknowledged first); they subscribe
  again on some reconnects, as the docs' paho sample does on every one;
- two SDK devices (``devices.sdk.Device``, the tunnel), each closed and opened again with its
  state file now and then, on the other node.

Meanwhile a seeded nemesis (``tests.jepsen.nemesis``) kills (-9) and pauses nats-servers, kills
(-9) and restarts nodes, and makes the stream leader step down. At the end the stored events
are read from JetStream, every device reconnects once more and gets the rest, and the checker
holds each device to what the docs promise:

- every stored event of its rooms is received (the devices subscribed before any publish);
- within one connection (one SDK process), a room's seqs strictly increase;
- a plain device gets a second copy of an event only if it had not acknowledged it (left
  unacknowledged, or acknowledged on a connection cut with a RST, whose PUBACKs may not have
  been read), or if the node that held it was killed (-9) after the PUBACK (the cursor is
  written behind the PUBACKs); that copy always carries DUP;
- a plain device's PUBLISH of event ``seq`` has packet id ``seq % 65535 + 1``, within one
  connection what comes with DUP (sent before) comes first, then the rest, and no more than
  ``mqtt_inflight`` (32) are unacknowledged at once (a device acknowledges in order, so those
  it left unacknowledged were all in flight together);
- a plain device that has a session finds it (session present) on every later CONNECT;
- an SDK device hands each event out once, in order, with no ``Resync``.

Publishers: every acknowledged event is stored once, with the seq it was acknowledged with.

``RTNODE_TEST_DEVICE_FAULTS_SEED`` repeats a run's choices (printed at the start; random by
default): the faults (kinds, targets as drawn, lengths, gaps; a line each in the report), each
device's choices for its n-th attempt to connect, each publisher's rooms and pace and the node
of its n-th attempt. ``RTNODE_TEST_DEVICE_FAULTS_SECONDS`` is the length of the fault phase
(22 s). The interleaving with the servers is not reproducible (nor how many faults and attempts
fit), only the choices are.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import cbor2
import pytest

from devices.sdk import Device, Resync
from tests.cluster import NatsCluster, RawMqtt, cluster_node
from tests.jepsen.harness import read_truth
from tests.jepsen.nemesis import Fault, Nemesis
from tests.paho import PahoDevice
from tests.servers import NodeProcess
from tests.wsclient import RawClient, token

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("RTNODE_TEST_DEVICE_FAULTS_SEED") or random.randrange(1 << 32))
SECONDS = float(os.environ.get("RTNODE_TEST_DEVICE_FAULTS_SECONDS", "22"))
KINDS = ("kill-nats", "pause-nats", "kill-node", "step-down")
FINAL_S = 40.0  # the devices' last connection: every stored event by then
INFLIGHT = 32  # mqtt_inflight (the default): unacknowledged QoS 1 PUBLISHes at most


def device_token(dev: str) -> str:
    return token(dev, kind="device")


# -- what the devices saw ----------------------------------------------------------------------

@dataclass
class Got:
    room: str
    seq: int
    conn: int  # connection (SDK: process) number within the device
    t: float  # monotonic, when read
    dup: bool = False
    acked: bool = False  # PUBACK written (raw: by the test; paho: by paho on return)
    pid: int = 0  # the PUBLISH's packet id (plain devices)


@dataclass
class Conn:
    node: str
    t: float
    ended: float = 0.0
    how: str = ""  # disconnect, fin, rst, lost, final
    session_present: bool | None = None


@dataclass
class DeviceLog:
    name: str
    kind: str  # raw, paho, sdk
    rooms: list[str]
    got: list[Got] = field(default_factory=list)
    conns: list[Conn] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # violations seen while running
    refused: Counter[int] = field(default_factory=Counter)  # CONNACK codes other than 0
    resyncs: list[Resync] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # first subscribe / joins done

    def seqs(self, room: str) -> set[int]:
        return {g.seq for g in self.got if g.room == room}

    def has_all(self, stored: dict[str, list[int]]) -> bool:
        return all(set(stored[r]) <= self.seqs(r) for r in self.rooms)


@dataclass
class Shared:
    """What the loops share: the nodes, the phase, the truth once read."""
    nodes: list[NodeProcess]
    rooms: list[str]
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # the churn ends
    stored: dict[str, list[int]] | None = None  # set at the end: every device must have these
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the final phase is over

    def node(self, rng: random.Random) -> NodeProcess:
        return rng.choice(self.nodes)


def _payload(data: bytes) -> tuple[str, int]:
    event = cbor2.loads(data)
    return str(event["room"]), int(event["seq"])


def attempt_rng(seeds: random.Random) -> random.Random:
    """The generator of a client's next connection attempt: its draws (which vary with how
    the attempt goes) do not move those of the attempts after it."""
    return random.Random(seeds.random())


async def _pause(rng: random.Random, low: float, high: float, stop: asyncio.Event) -> None:
    """Wait a random time (not for correctness: it spaces the device's actions)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), rng.uniform(low, high))


# -- plain devices: a bare client -------------------------------------------------------------

async def raw_device(log: DeviceLog, sh: Shared, seeds: random.Random) -> None:
    dev = log.name
    subscribed = False
    while not sh.done.is_set():
        rng = attempt_rng(seeds)
        final = sh.stop.is_set()
        node = sh.node(rng)
        try:
            raw = await RawMqtt.connect(node.mqtt_port, dev, device_token(dev), timeout=5)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            await _pause(rng, 0.05, 0.3, asyncio.Event())
            continue
        if raw.return_code != 0:
            log.refused[raw.return_code] += 1
            raw.writer.close()
            await _pause(rng, 0.1, 0.4, asyncio.Event())
            continue
        conn = Conn(node.name, time.monotonic(), session_present=raw.session_present)
        log.conns.append(conn)
        n = len(log.conns) - 1
        if subscribed and not raw.session_present:
            log.problems.append(f"conn {n} on {node.name}: session lost (session present 0)")
        try:
            if not subscribed or rng.random() < 0.3:
                for room in log.rooms:
                    granted = await raw.subscribe(f"rooms/{room}", 1)
                    if granted != [1]:
                        log.problems.append(f"conn {n}: SUBACK {granted} for {room}")
                subscribed = True
                log.ready.set()
            how = "final" if final else rng.choice(["disconnect", "fin", "rst", "unacked"])
            until = time.monotonic() + rng.uniform(0.3, 2.5)
            unacked_tail = rng.randint(1, 5) if how == "unacked" else 0
            while True:
                if final:
                    if sh.stored is not None and log.has_all(sh.stored):
                        break
                    if sh.done.is_set():
                        break
                    left = 1.0
                else:
                    left = until - time.monotonic()
                    if left <= 0 or sh.stop.is_set():
                        break
                try:
                    topic, payload, pid, qos, dup, _retain = await raw.publish_in(left)
                except TimeoutError:
                    continue
                room, seq = _payload(payload)
                if topic != f"rooms/{room}" or qos != 1:
                    log.problems.append(f"conn {n}: {topic} qos {qos} for {room}:{seq}")
                ack = not (unacked_tail and time.monotonic() > until - 0.3)
                if ack:
                    raw.puback(pid)
                log.got.append(Got(room, seq, n, time.monotonic(), dup, ack, pid))
            if how in ("disconnect", "final"):
                await raw.disconnect()
                if how == "final" and sh.stored is not None and log.has_all(sh.stored):
                    conn.how, conn.ended = how, time.monotonic()
                    return
            elif how in ("fin", "unacked"):
                await raw.drop(5)
            else:
                raw.writer.transport.abort()
            conn.how = how
        except (OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
            conn.how = f"lost ({type(exc).__name__})"
            raw.writer.close()
        conn.ended = time.monotonic()
        if not sh.stop.is_set():
            await _pause(rng, 0.05, 1.0, sh.stop)


# -- plain devices: paho-mqtt -------------------------------------------------------------------

async def paho_device(log: DeviceLog, sh: Shared, seeds: random.Random) -> None:
    dev = log.name
    subscribed = False
    while not sh.done.is_set():
        rng = attempt_rng(seeds)
        final = sh.stop.is_set()
        node = sh.node(rng)
        p = PahoDevice(dev, node.mqtt_port, clean=False, manual_ack=True)
        try:
            present, rc = await p.start()
        except (OSError, TimeoutError):
            await p.stop()
            await _pause(rng, 0.05, 0.3, asyncio.Event())
            continue
        if rc != 0:
            log.refused[rc] += 1
            await p.stop()
            await _pause(rng, 0.1, 0.4, asyncio.Event())
            continue
        conn = Conn(node.name, time.monotonic(), session_present=present)
        log.conns.append(conn)
        n = len(log.conns) - 1
        if subscribed and not present:
            log.problems.append(f"conn {n} on {node.name}: session lost (session present 0)")
        try:
            if not subscribed or rng.random() < 0.3:
                granted = await p.subscribe([f"rooms/{r}" for r in log.rooms])
                if granted != [1] * len(log.rooms):
                    log.problems.append(f"conn {n}: SUBACK {granted}")
                subscribed = True
                log.ready.set()
        except TimeoutError:
            pass  # the connection went away meanwhile: seen below
        until = time.monotonic() + rng.uniform(0.3, 2.5)
        while True:
            if final:
                if (sh.stored is not None and log.has_all(sh.stored)) or sh.done.is_set():
                    break
                left = 1.0
            else:
                left = until - time.monotonic()
                if left <= 0 or sh.stop.is_set():
                    break
            if p.gone.is_set() and p.messages.empty():
                break
            try:
                m, t = await asyncio.wait_for(p.messages.get(), min(left, 0.5))
            except TimeoutError:
                continue
            room, seq = _payload(m.payload)
            p.client.ack(m.mid, m.qos)
            log.got.append(Got(room, seq, n, t, bool(m.dup), True, m.mid))
        conn.how = "lost" if p.gone.is_set() else ("final" if final else "disconnect")
        await p.stop()
        while not p.messages.empty():  # read by paho, not acknowledged: received
            m, t = p.messages.get_nowait()
            room, seq = _payload(m.payload)
            log.got.append(Got(room, seq, n, t, bool(m.dup), False, m.mid))
        conn.ended = time.monotonic()
        if final and sh.stored is not None and log.has_all(sh.stored):
            return
        if not sh.stop.is_set():
            await _pause(rng, 0.05, 1.0, sh.stop)


# -- tunnel devices: the SDK ------------------------------------------------------------------

async def sdk_device(log: DeviceLog, sh: Shared, seeds: random.Random, state: Path) -> None:
    dev = log.name
    while not sh.done.is_set():
        rng = attempt_rng(seeds)
        final = sh.stop.is_set()
        node = sh.node(rng)
        conn = Conn(node.name, time.monotonic())
        log.conns.append(conn)
        n = len(log.conns) - 1
        async with Device("127.0.0.1", node.mqtt_port, dev, token=device_token(dev),
                          state_file=state, min_backoff_s=0.05, max_backoff_s=0.5,
                          request_timeout_s=5) as d:
            try:
                for room in log.rooms:
                    joined = await d.join(room)
                    if n and joined.get("recovered") is not True:
                        log.problems.append(f"process {n} on {node.name}: {joined}")
                log.ready.set()
            except Exception as exc:  # the node away too long: this process gives up
                conn.how = f"join failed ({type(exc).__name__})"
                conn.ended = time.monotonic()
                continue
            until = time.monotonic() + rng.uniform(1.0, 4.0)
            # events() is read by one task (a timeout on anext() would end the generator).
            queue: asyncio.Queue[Any] = asyncio.Queue()

            async def pump(d: Device = d, queue: asyncio.Queue[Any] = queue) -> None:
                try:
                    async for item in d.events():
                        queue.put_nowait(item)
                except Exception as exc:
                    queue.put_nowait(exc)
                queue.put_nowait(StopAsyncIteration())

            reader = asyncio.create_task(pump())
            try:
                while True:
                    if final:
                        if (sh.stored is not None and log.has_all(sh.stored)) \
                                or sh.done.is_set():
                            break
                        left = 1.0
                    else:
                        left = until - time.monotonic()
                        if left <= 0 or sh.stop.is_set():
                            break
                    try:
                        item = await asyncio.wait_for(queue.get(), left)
                    except TimeoutError:
                        continue
                    if isinstance(item, BaseException):
                        log.problems.append(f"process {n} on {node.name} ended: {item!r}, "
                                            f"failure {d.failure!r}")
                        break
                    if isinstance(item, Resync):
                        log.resyncs.append(item)
                        continue
                    seq = item.get("seq")
                    if isinstance(seq, int) and item.get("room") in log.rooms:
                        log.got.append(Got(item["room"], seq, n, time.monotonic()))
            finally:
                reader.cancel()
                await asyncio.wait({reader})
            while not queue.empty():  # handed out by events() (the cursor moved): received
                item = queue.get_nowait()
                if isinstance(item, dict) and isinstance(item.get("seq"), int) \
                        and item.get("room") in log.rooms:
                    log.got.append(Got(item["room"], item["seq"], n, time.monotonic()))
            conn.how = "final" if final else "closed"
        conn.ended = time.monotonic()
        if final and sh.stored is not None and log.has_all(sh.stored):
            return


# -- publishers -------------------------------------------------------------------------------

@dataclass
class Acked:
    room: str
    seq: int
    msg_id: str
    via: str


def start_publishers(sh: Shared, rng: random.Random, seconds: float, slack_s: float
                     ) -> tuple[list[Acked], list[asyncio.Task[int]]]:
    """A WebSocket and an HTTP publisher, 8 events a second of the fault phase each, retrying
    each until ``slack_s`` after it: the list they record what was acknowledged in, and their
    tasks (each returns its retries)."""
    acked: list[Acked] = []
    count, deadline = int(seconds * 8), time.monotonic() + seconds + slack_s
    pubs = [asyncio.create_task(ws_publisher(sh, random.Random(rng.random()), acked, count,
                                             deadline)),
            asyncio.create_task(http_publisher(sh, random.Random(rng.random()), acked, count,
                                               deadline))]
    return acked, pubs


def print_report(lines: list[str], problems: list[str], nodes: list[NodeProcess],
                 width: int) -> str:
    """A fault run's report: its lines, then its problems (each cut at ``width``); printed,
    with the nodes' log tails when there are problems, and returned for the assertion."""
    report = "\n".join(lines + ["problems:" if problems else "no problems"]
                       + ["  " + p[:width] for p in problems[:40]])
    print(report)
    if problems:
        for node in nodes:
            print(f"--- {node.name} log tail\n{node.log()[-3000:]}")
    return report


async def stop_all(tasks: list[asyncio.Task[Any]], nodes: list[NodeProcess]) -> None:
    """The end of a fault run: its client tasks cancelled (waited for up to 10 s), its node
    processes stopped."""
    left = [t for t in tasks if not t.done()]
    for t in left:
        t.cancel()
    if left:
        await asyncio.wait(left, timeout=10)
    for node in nodes:
        with contextlib.suppress(Exception):
            node.stop()


async def ws_publisher(sh: Shared, rng: random.Random, acked: list[Acked], count: int,
                       deadline: float) -> int:
    """Publish ``count`` events over WebSocket, each retried with its msg_id until acked."""
    where = random.Random(rng.random())  # apart: the retries do not move the rooms and pace
    client: RawClient | None = None
    retries = 0
    try:
        for i in range(count):
            room, mid = rng.choice(sh.rooms), f"ws-{i}-{uuid.uuid4().hex[:6]}"
            while True:
                if time.monotonic() > deadline:
                    return retries
                try:
                    if client is None:
                        node = sh.node(where)
                        client = await asyncio.wait_for(
                            RawClient.connected(node.ws_url, token("pub-ws")), 5)
                    reply = await client.request({"type": "publish", "room": room,
                                                  "event": "e", "data": i, "msg_id": mid}, 5)
                    if reply.get("type") == "published":
                        acked.append(Acked(room, int(reply["seq"]), mid, "ws"))
                        break
                    if reply.get("type") == "disconnect":
                        raise ConnectionError(str(reply))
                    retries += 1  # an error (4500, 4503): the same msg_id again
                    await asyncio.sleep(0.1)
                except Exception:
                    retries += 1
                    if client is not None:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(client.close(), 2)
                    client = None
                    await asyncio.sleep(0.1)
            await asyncio.sleep(rng.uniform(0.01, 0.08))
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2)
    return retries


async def http_publisher(sh: Shared, rng: random.Random, acked: list[Acked], count: int,
                         deadline: float) -> int:
    """Publish ``count`` events through ``POST /api/publish``, retried with the msg_id."""
    headers = {"Authorization": f"Bearer {token('backend', kind='service')}"}
    where = random.Random(rng.random())  # apart: the retries do not move the rooms and pace
    retries = 0
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for i in range(count):
            room, mid = rng.choice(sh.rooms), f"http-{i}-{uuid.uuid4().hex[:6]}"
            while True:
                if time.monotonic() > deadline:
                    return retries
                node = sh.node(where)
                try:
                    async with http.post(node.base + "/api/publish", headers=headers, json={
                            "room": room, "event": "e", "data": i, "msg_id": mid}) as resp:
                        if resp.status == 200:
                            acked.append(Acked(room, int((await resp.json())["seq"]), mid,
                                               "http"))
                            break
                except (aiohttp.ClientError, TimeoutError, OSError):
                    pass
                retries += 1
                await asyncio.sleep(0.1)
            await asyncio.sleep(rng.uniform(0.01, 0.08))
    return retries


# -- the checker ------------------------------------------------------------------------------

def _killed_between(faults: list[Fault], node: str, after: float, before: float) -> bool:
    return any(f.kind == "kill-node" and f.target == node and after <= f.started <= before
               for f in faults)


def _describe(log: DeviceLog, i: int, room: str, t0: float) -> str:
    """Connection ``i`` of a device, for a report: node, times, end, what it got of ``room``."""
    c = log.conns[i]
    seqs = [g.seq for g in log.got if g.conn == i and g.room == room]
    span = f"{seqs[0]}..{seqs[-1]} ({len(seqs)})" if seqs else "nothing"
    return (f"conn {i} {c.node} {c.t - t0:+.1f}s..{c.ended - t0:+.1f}s {c.how} "
            f"present={c.session_present} got {span}")


def check_device(log: DeviceLog, stored: dict[str, list[int]], faults: list[Fault],
                 t0: float = 0.0) -> list[str]:
    bad = list(log.problems)
    if log.kind != "sdk":
        # A plain device leaves only its last PUBLISHes unacknowledged: all in flight at once.
        unacked = Counter(g.conn for g in log.got if not g.acked)
        bad += [f"conn {n} on {log.conns[n].node}: {k} PUBLISHes unacknowledged at once, "
                f"beyond the window ({INFLIGHT})" for n, k in unacked.items() if k > INFLIGHT]
    for room in log.rooms:
        truth = stored[room]
        mine = [g for g in log.got if g.room == room]
        missing = sorted(set(truth) - {g.seq for g in mine})
        if missing:
            bad.append(f"{room}: {len(missing)} stored events never received: {missing[:10]}")
        extra = sorted({g.seq for g in mine} - set(truth))
        if extra:
            bad.append(f"{room}: received seqs that are not stored: {extra[:10]}")
        by_conn: dict[int, list[int]] = defaultdict(list)
        for g in mine:
            by_conn[g.conn].append(g.seq)
        for n, seqs in by_conn.items():
            if any(b <= a for a, b in itertools.pairwise(seqs)):
                where = next(i for i, (a, b) in enumerate(itertools.pairwise(seqs)) if b <= a)
                bad.append(f"{room}: conn {n} on {log.conns[n].node}: out of order or "
                           f"doubled: ...{seqs[max(0, where - 2):where + 3]}")
        if log.kind != "sdk":
            wrong = [(g.seq, g.pid) for g in mine if g.pid != g.seq % 0xFFFF + 1]
            if wrong:
                bad.append(f"{room}: packet ids not seq % 65535 + 1 (seq, id): {wrong[:5]}")
            # What was sent before goes again first, with DUP, then the rest.
            for n in by_conn:
                dups = [g.dup for g in mine if g.conn == n]
                fresh = dups.index(False) if False in dups else len(dups)
                if any(dups[fresh:]):
                    seqs = [(g.seq, g.dup) for g in mine if g.conn == n]
                    bad.append(f"{room}: conn {n} on {log.conns[n].node}: a DUP after a "
                               f"first sending (seq, dup): {seqs[:12]}")
        if log.kind == "sdk":
            counts = Counter(g.seq for g in mine)
            twice = sorted(s for s, c in counts.items() if c > 1)
            if twice:
                bad.append(f"{room}: handed out twice by the SDK: {twice[:10]}")
            continue
        first: dict[int, Got] = {}
        for g in mine:
            prev = first.get(g.seq)
            if prev is None:
                first[g.seq] = g
                continue
            if g.conn == prev.conn:
                continue  # reported above
            if not prev.acked:
                first[g.seq] = g
                continue  # left unacknowledged: may come again
            pc = log.conns[prev.conn]
            # Sent before, so with DUP: the node's record of what it sent, or the handover's
            # last state, says so; or the claim found neither (the holder's node killed) and
            # sent everything stored until then with DUP.
            if not g.dup:
                bad.append(f"{room}:{g.seq} received again without DUP on conn {g.conn} "
                           f"(first on conn {prev.conn}, {pc.node}, ended {pc.how})")
            if pc.how == "rst" or pc.how.startswith("lost"):
                first[g.seq] = g
                continue  # its PUBACK may never have been read
            if _killed_between(faults, pc.node, prev.t, g.t):
                first[g.seq] = g
                continue  # its cursor write may have died with the node
            bad.append(f"{room}:{g.seq} acknowledged on conn {prev.conn} ({pc.node}, ended "
                       f"{pc.how}) and received again on conn {g.conn} "
                       f"({log.conns[g.conn].node}, dup={g.dup}); "
                       + "; ".join(_describe(log, i, room, t0)
                                   for i in range(prev.conn, g.conn + 1)))
    return bad


def check_publishers(acked: list[Acked], truth: list[Any]) -> list[str]:
    bad = []
    by_mid: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for s in truth:
        if s.msg_id is not None:
            by_mid[s.msg_id].append((s.room, s.seq))
    for a in acked:
        where = by_mid.get(a.msg_id, [])
        if (a.room, a.seq) not in where:
            bad.append(f"acked {a.via} {a.msg_id} {a.room}:{a.seq} is stored as {where}")
    doubled = {m: w for m, w in by_mid.items() if len(w) > 1}
    if doubled:
        bad.append(f"stored more than once: {list(doubled.items())[:5]}")
    return bad


# -- the run ----------------------------------------------------------------------------------

async def _bounded(what: str, aw: Awaitable[Any], timeout: float, notes: list[str]) -> Any:
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        notes.append(f"{what}: still running after {timeout:.0f} s")
        return None


@pytest.mark.timeout(SECONDS + 150)
async def test_devices_get_every_acked_event_once_under_faults(tmp_path: Path,
                                                               cluster: NatsCluster) -> None:
    print(f"\ndevice faults: seed {SEED} (RTNODE_TEST_DEVICE_FAULTS_SEED={SEED}), "
          f"{SECONDS:.0f} s of faults")
    rng = random.Random(SEED)
    tag = uuid.uuid4().hex[:6]
    rooms = [f"cmd:{tag}", f"tel:{tag}"]
    nodes = [cluster_node(tmp_path, "a", cluster.urls), cluster_node(tmp_path, "b", cluster.urls)]
    notes: list[str] = []
    tasks: list[asyncio.Task[Any]] = []
    try:
        await asyncio.gather(*(asyncio.to_thread(n.wait_ready, 30) for n in nodes))
        sh = Shared(nodes, rooms)
        logs = [
            DeviceLog(f"raw0-{tag}", "raw", rooms),
            DeviceLog(f"raw1-{tag}", "raw", rooms[:1]),
            DeviceLog(f"paho-{tag}", "paho", rooms),
            DeviceLog(f"sdk0-{tag}", "sdk", rooms),
            DeviceLog(f"sdk1-{tag}", "sdk", rooms[1:]),
        ]
        runners: dict[str, Callable[..., Awaitable[None]]] = {
            "raw": raw_device, "paho": paho_device}
        for log in logs:
            drng = random.Random(rng.random())
            if log.kind == "sdk":
                coro = sdk_device(log, sh, drng, tmp_path / f"{log.name}.json")
            else:
                coro = runners[log.kind](log, sh, drng)
            tasks.append(asyncio.create_task(coro, name=f"device[{log.name}]"))

        # Every device subscribed (or joined) before the first publish: it is due every event.
        await asyncio.wait_for(asyncio.gather(*(log.ready.wait() for log in logs)), 30)

        acked, pubs = start_publishers(sh, rng, SECONDS, 40)
        nemesis = Nemesis(random.Random(rng.random()), cluster, [], nodes, kinds=KINDS,
                          gap_s=(0.5, 2.0), heal_timeout_s=15.0)
        await nemesis.run(SECONDS)
        retries = await _bounded("publishers", asyncio.gather(*pubs), 45, notes) or [0, 0]
        healthy = await nemesis.wait_healthy(20)
        if healthy is None:
            notes.append(f"not healthy at the end: {nemesis.unhealthy}")

        # The truth, then every device's last connection until it has all of it.
        truth, lasts = await read_truth(cluster.urls, rooms)
        stored = {r: sorted(s.seq for s in truth if s.room == r) for r in rooms}
        sh.stored = stored
        sh.stop.set()

        # Each device ends once it has every stored event; the rest are told to end.
        await asyncio.wait(tasks, timeout=FINAL_S)
        if not all(t.done() for t in tasks):
            notes.append(f"devices' last connections: still running after {FINAL_S:.0f} s")
        sh.done.set()
        await _bounded("devices' ends", asyncio.gather(*tasks, return_exceptions=True), 20,
                       notes)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                notes.append(f"{task.get_name()} failed: {task.exception()!r}")

        problems = check_publishers(acked, truth) + notes
        lines = [f"seed {SEED}: {len(acked)} events acked "
                 f"({Counter(a.via for a in acked)}), publish retries {retries}, "
                 f"stored {dict((r, len(s)) for r, s in stored.items())}, lasts {lasts}",
                 f"faults {nemesis.counts()}:"]
        lines += ["  " + f.describe(nemesis.faults[0].started) for f in nemesis.faults]
        for log in logs:
            counts = {r: len(log.seqs(r)) for r in log.rooms}
            copies = len(log.got) - sum(counts.values())
            dups = sum(1 for g in log.got if g.dup)
            hows = Counter(c.how.split(" ")[0] for c in log.conns)
            lines.append(f"  {log.name} ({log.kind}): distinct {counts}, extra copies "
                         f"{copies} (DUP {dups}), connections {len(log.conns)} {dict(hows)}"
                         f"{', refused ' + str(dict(log.refused)) if log.refused else ''}"
                         f"{', resyncs ' + str(len(log.resyncs)) if log.resyncs else ''}")
            t0 = nemesis.faults[0].started if nemesis.faults else 0.0
            problems += [f"{log.name}: {p}"
                         for p in check_device(log, stored, nemesis.faults, t0)]
            if log.resyncs:
                problems.append(f"{log.name}: Resync {log.resyncs[:3]}")
        report = print_report(lines, problems, nodes, 1500)
        assert not problems, report
    finally:
        await stop_all(tasks, nodes)
