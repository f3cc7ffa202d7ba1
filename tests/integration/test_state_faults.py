"""State rooms under faults, seeded: what a joiner is served is the stream's latest per key.

Two node processes share one nats-server, or a 3-server cluster (the streams with 3 replicas:
reads are direct gets, answered by any replica). Writers (WebSocket clients on either node) publish
and unset a few keys of one state room, pipelined (1-8 publishes a message, so writes of one
key conflict within a node and across nodes), each with a ``msg_id``: a publish answered with a
retryable error, or lost with its connection, is sent again with the same ``msg_id`` until it
is answered. Joiners come and go on both nodes meanwhile. A seeded nemesis runs faults one at a
time, each healed before the next (every replica current again): a nats-server paused
(SIGSTOP/SIGCONT) or killed (-9) and restarted, a node killed (-9) and restarted, or the room
stream deleted while the writers wait and created again by a node that restarts (a new epoch).
Rooms stop 0.2 s after their last member leaves, so that they start again and again during the
writes (a room's first read of the state races with the writes in flight).

Once the writers stop and everything is healthy, for every key of the room:

1. a joiner's ``state`` frame (WebSocket, each node), the SSE ``state`` message, ``GET
   /api/state`` and the MQTT retained messages all hold exactly the stream's event with the
   highest seq of that key (nothing when it is an unset), in the current epoch;
2. every publish was answered, and every acknowledged seq holds its event in the stream (of
   its life, for those acknowledged before a recreation);
3. every joiner's ``state`` is the stream's state as of its ``joined.seq``, no value above
   that seq, every live event newer than the value it holds for its key, and a joiner that
   stays to the end holds the final state;
4. no traceback in the nodes' logs, and no write left unanswered.

The seed comes from ``RTNODE_TEST_STATE_FAULTS_SEED`` (random when unset) and is printed first;
``-s`` shows it with a line per fault and a summary of the run. A seed repeats the faults (kinds,
targets, lengths, gaps; how many fit is the run's), each writer's publishes and the joiners'
arrivals, each from a generator of its own; the nodes that clients reach, and the interleaving
with the servers, are the run's. ``test_state_races.py`` pins, each with one step
held at the right moment, what the runs found.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import cbor2
import nats
import pytest
from nats.js.errors import NotFoundError
from websockets.exceptions import ConnectionClosed

from node.protocol.subjects import STREAM_NAME, room_subject
from tests.cluster import FAST, NatsCluster, RawMqtt
from tests.integration.test_sse import data as sse_data
from tests.integration.test_sse import open_sse
from tests.servers import MS, NatsProcess, NodeProcess
from tests.wsclient import SECRET, RawClient, token, unique

pytestmark = pytest.mark.integration

SEED_ENV = "RTNODE_TEST_STATE_FAULTS_SEED"
KEYS = ("k0", "k1", "k2", "k3")
WRITERS = 4
WRITE_S = 14.0  # how long the writers write (the faults run within it)
REPLY_S = 30.0  # a publish not answered within this long is a stuck write
KINDS = ("pause-nats", "kill-nats", "kill-node", "recreate")
NAMESPACES = json.dumps({"st": {"state": True}})
KV_STREAM = "KV_RTNODE_STATE"  # the state bucket's stream (bridge.state_store)


@dataclass
class Ack:
    msg_id: str
    seq: int
    key: str
    unset: bool
    life: int  # the stream's life (0, then 1 after a recreation) it was sent in


@dataclass
class JoinRecord:
    name: str
    node: str
    life: int
    stays: bool
    joined_seq: int | None = None
    epoch: str | None = None
    state: dict[str, dict[str, Any]] | None = None  # key -> value, complete
    live: list[dict[str, Any]] = field(default_factory=list)
    ended: str = ""  # "" while open, "end" when it stayed until told to leave, else why not
    at: float = 0.0  # when it joined, since the start of the writes
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # an event came, or it ended


class Servers:
    """The nats-servers of a run: one (``NatsProcess``) or a 3-server cluster (``NatsCluster``,
    the streams with 3 replicas). Faults hit one server at a time, by PID."""

    def __init__(self, single: NatsProcess | None = None,
                 cluster: NatsCluster | None = None) -> None:
        self.single, self.cluster = single, cluster

    @property
    def urls(self) -> list[str]:
        return self.cluster.urls if self.cluster is not None else [self.single.url]  # type: ignore[union-attr]

    @property
    def count(self) -> int:
        return 3 if self.cluster is not None else 1

    def pid(self, i: int) -> int | None:
        if self.cluster is not None:
            proc = self.cluster.servers[i].proc
        else:
            proc = self.single.proc  # type: ignore[union-attr]
        return None if proc is None else proc.pid

    def pause(self, i: int) -> None:
        if self.cluster is not None:
            self.cluster.pause(i)
        else:
            pid = self.pid(i)
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # our own child, by PID

    def resume(self, i: int) -> None:
        if self.cluster is not None:
            self.cluster.resume(i)
        else:
            pid = self.pid(i)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def kill(self, i: int) -> None:
        if self.cluster is not None:
            self.cluster.kill(i)
        else:
            self.single.kill()  # type: ignore[union-attr]

    def restart(self, i: int) -> None:
        if self.cluster is not None:
            self.cluster.restart(i)
        else:
            self.single.start()  # type: ignore[union-attr]

    def healthy(self) -> bool:
        """Every replica of the room stream and of the state bucket is current."""
        if self.cluster is None:
            return True
        return all(self.cluster.stream_healthy(name) for name in (STREAM_NAME, KV_STREAM))

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout * MS * 1000
        while not await asyncio.to_thread(self.healthy):
            assert time.monotonic() < deadline, "the streams' replicas not current in time"
            await asyncio.sleep(0.2)  # polling the servers' monitoring endpoints


class Run:
    """The processes, clients and what they saw, for one seeded run."""

    def __init__(self, seed: int, servers: Servers, tmp: Path) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.servers = servers
        self.room = unique("st")
        self.subject = room_subject("default", self.room)
        env = {"RTNODE_JWT_SECRET": SECRET, "RTNODE_NAMESPACES": NAMESPACES}
        # Rooms stop 0.2 s after their last member leaves (1 s by default): a room starts
        # again and again during the writes, reading the state while writes are in flight.
        args = ["--stream-replicas", str(servers.count), "--room-idle-s", "0.2", *FAST]
        self.nodes = [NodeProcess(tmp / name, "--nats-url", ",".join(servers.urls), *args,
                                  name=name, env=env) for name in ("na", "nb")]
        self.life = 0
        self.go = asyncio.Event()  # cleared while a recreation waits for the writers
        self.go.set()
        self.idle = [False] * WRITERS
        self.idle_changed = asyncio.Event()
        self.stop_writing = asyncio.Event()
        self.acks: list[Ack] = []
        self.refused: list[tuple[str, dict[str, Any]]] = []  # publishes with a final error
        self.retries = 0
        self.reconnects = 0
        self.joins: list[JoinRecord] = []
        self.faults: list[str] = []
        self.old_events: dict[int, dict[str, Any]] | None = None  # the first life's stream
        self.old_epoch = ""
        self.problems: list[str] = []
        self.t0 = time.monotonic()

    def log(self, text: str) -> None:
        print(f"[state-faults seed={self.seed}] {text}", flush=True)

    # -- processes -------------------------------------------------------------------------

    def live_nodes(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    async def connect(self, rng: random.Random, sub: str) -> RawClient:
        """A connected client on a random live node, trying until one accepts it."""
        deadline = time.monotonic() + 40 * MS * 1000
        while True:
            nodes = self.live_nodes()
            if nodes:
                node = rng.choice(nodes)
                try:
                    c = await RawClient.connected(node.ws_url, token(sub), open_timeout=5)
                    c.node = node.name  # type: ignore[attr-defined]
                    return c
                except (OSError, ConnectionClosed, TimeoutError, AssertionError, Exception):
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{sub}: no node accepted a connection for 40 s")
            await asyncio.sleep(0.1)  # pacing of the reconnect attempts only

    async def wait_ready(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(n.wait_ready, 30) for n in self.nodes))

    # -- writers ---------------------------------------------------------------------------

    async def writer(self, w: int) -> None:
        rng = random.Random(f"{self.seed}-w{w}")
        # The node of each connection from a generator of its own: a reconnect (how many is
        # the run's) would move the writer's publishes.
        where = random.Random(f"{self.seed}-w{w}-where")
        pending: dict[str, dict[str, Any]] = {}  # msg_id -> the publish frame, sent again
        sent_life: dict[str, int] = {}
        c: RawClient | None = None
        n = 0
        try:
            while True:
                if not pending:
                    if self.stop_writing.is_set():
                        return
                    # The pace of a writer (not a wait for anything): ~80 publishes a second,
                    # so that the run stays within the room's history (10,000 events).
                    await asyncio.sleep(rng.uniform(0.02, 0.08))
                    if not self.go.is_set():
                        self.idle[w] = True
                        self.idle_changed.set()
                        await self.go.wait()
                        self.idle[w] = False
                    for _ in range(rng.randint(1, 8)):
                        key = rng.choice(KEYS)
                        msg_id = f"w{w}-{n}"
                        frame: dict[str, Any] = {"type": "publish", "id": msg_id,
                                                 "room": self.room, "msg_id": msg_id,
                                                 "key": key}
                        if rng.random() < 0.25:
                            frame.update(event="unset", unset=True)
                        else:
                            frame.update(event="set", data={"w": w, "n": n})
                        pending[msg_id] = frame
                        sent_life[msg_id] = self.life
                        n += 1
                if c is None:
                    c = await self.connect(where, f"writer-{w}")
                try:
                    await c.send(*pending.values())
                    waiting = set(pending)
                    while waiting:
                        f = await c.recv(REPLY_S)
                        kind, rid = f.get("type"), f.get("id")
                        if kind == "disconnect":
                            raise ConnectionError(f"disconnect {f.get('code')}")
                        if rid not in waiting:
                            continue
                        waiting.discard(rid)
                        if kind == "published":
                            p = pending.pop(rid)
                            self.acks.append(Ack(rid, int(f["seq"]), p["key"],
                                                 bool(p.get("unset")), sent_life[rid]))
                        elif kind == "error" and f.get("retry"):
                            self.retries += 1  # still pending: sent again with its msg_id
                        else:
                            self.refused.append((rid, f))
                            pending.pop(rid)
                    if pending:
                        await asyncio.sleep(0.05)  # the pace of retries only
                except TimeoutError:
                    self.problems.append(f"writer {w}: no answer within {REPLY_S} s to "
                                         f"{sorted(pending)} on {getattr(c, 'node', '?')}")
                    return
                except (ConnectionClosed, ConnectionError, OSError):
                    self.reconnects += 1
                    with contextlib.suppress(Exception):
                        await c.close()
                    c = None
        finally:
            self.idle[w] = True
            self.idle_changed.set()
            if c is not None:
                with contextlib.suppress(Exception):
                    await c.close()

    # -- joiners ---------------------------------------------------------------------------

    async def joiner(self, rec: JoinRecord, rng: random.Random, until: asyncio.Event) -> None:
        try:
            c = await self.connect(rng, rec.name)
        except AssertionError as exc:
            rec.ended = str(exc)
            return
        rec.node = c.node  # type: ignore[attr-defined]
        held: dict[str, dict[str, Any]] = {}
        try:
            await c.send({"type": "join", "room": self.room, "id": "j"})
            stop = asyncio.ensure_future(until.wait())
            try:
                while True:
                    recv = asyncio.ensure_future(c.recv(3600))
                    # Retrieved even when this joiner is cancelled while it waits (teardown):
                    # else its end (the connection closed) is logged as never retrieved, in
                    # whatever test runs when it is collected.
                    recv.add_done_callback(_retrieve)
                    done, _ = await asyncio.wait({recv, stop},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if recv not in done:
                        recv.cancel()
                        with contextlib.suppress(BaseException):
                            await recv
                        rec.ended = "end"  # stayed until told to leave
                        return
                    f = recv.result()
                    kind = f.get("type")
                    if kind == "disconnect":
                        rec.ended = f"disconnect {f.get('code')}"
                        return
                    if f.get("room") != self.room:
                        continue
                    if kind == "joined":
                        rec.joined_seq, rec.epoch = int(f["seq"]), f.get("epoch")
                    elif kind == "error":
                        rec.ended = f"error {f}"
                        return
                    elif kind == "state":
                        for v in f["values"]:
                            held[v["key"]] = v
                        if not f.get("more"):
                            rec.state = dict(held)
                    elif kind == "event":
                        rec.live.append(f)
                        rec.changed.set()
            finally:
                stop.cancel()
        except (ConnectionClosed, OSError) as exc:
            rec.ended = f"closed {type(exc).__name__}"
        finally:
            rec.ended = rec.ended or "closed"
            rec.changed.set()
            with contextlib.suppress(Exception):
                await c.close()

    async def joiners(self, tasks: list[asyncio.Task[None]], until: asyncio.Event,
                      end: asyncio.Event) -> None:
        """Joiners come and go until the writers stop; a few stay to the end (``end``)."""
        rng = random.Random(f"{self.seed}-j")
        j = 0
        while not self.stop_writing.is_set():
            # The same draws for each arrival, whether it stays or not (when it is late is the
            # run's), so that a seed repeats them.
            maybe_stays = rng.random() < 0.3
            leave_after, pace = rng.uniform(0.1, 1.5), rng.uniform(0.2, 0.5)
            # Those that stay to the end come late: until then the rooms empty now and then.
            stays = time.monotonic() - self.t0 > 0.6 * WRITE_S and maybe_stays
            rec = JoinRecord(f"joiner-{j}", "?", self.life, stays, at=time.monotonic() - self.t0)
            self.joins.append(rec)
            leave = end if stays else asyncio.Event()
            tasks.append(asyncio.create_task(self.joiner(rec, random.Random(f"{self.seed}-j{j}"),
                                                         leave), name=rec.name))
            if not stays:
                asyncio.get_running_loop().call_later(leave_after, leave.set)
            j += 1
            # the pace of arrivals (not a wait for anything): 2-5 a second
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_writing.wait(), pace)
        until.set()

    # -- faults ----------------------------------------------------------------------------

    async def nemesis(self) -> None:
        rng = random.Random(f"{self.seed}-n")
        end = time.monotonic() + WRITE_S - 4.0
        await asyncio.sleep(rng.uniform(0.5, 2.0))  # some writes before the first fault
        kinds = list(KINDS)
        while time.monotonic() < end:
            kind = rng.choice(kinds)
            if kind == "recreate":
                kinds.remove(kind)  # once a run: it costs a node restart and a barrier
            t0 = time.monotonic()
            drawn = await getattr(self, "_" + kind.replace("-", "_"))(rng)
            await self.servers.wait_healthy()
            await self.wait_ready()
            gap = rng.uniform(0.5, 2.0)
            self.faults.append(f"{kind} at +{t0 - self.t0:.1f}s for {time.monotonic() - t0:.1f}s")
            self.log(f"fault {kind} [drew {drawn}, gap {gap:.2f}s] at +{t0 - self.t0:.1f}s for "
                     f"{time.monotonic() - t0:.1f}s")
            await asyncio.sleep(gap)  # quiet time between faults

    # Each fault returns what it drew (its target and length), for the line that says it.

    async def _pause_nats(self, rng: random.Random) -> str:
        i, paused = rng.randrange(self.servers.count), rng.uniform(1.0, 3.0)
        self.servers.pause(i)
        try:
            await asyncio.sleep(paused)
        finally:
            self.servers.resume(i)
        return f"server {i} {paused:.2f}s"

    async def _kill_nats(self, rng: random.Random) -> str:
        i, down = rng.randrange(self.servers.count), rng.uniform(0.3, 1.5)
        await asyncio.to_thread(self.servers.kill, i)
        await asyncio.sleep(down)
        await asyncio.to_thread(self.servers.restart, i)
        return f"server {i} {down:.2f}s"

    async def _kill_node(self, rng: random.Random) -> str:
        node, down = rng.choice(self.nodes), rng.uniform(0.2, 1.0)
        proc = node.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # our own child, by PID
            await asyncio.to_thread(proc.wait, 10)
        await asyncio.sleep(down)
        node.start()
        return f"{node.name} {down:.2f}s"

    async def _recreate(self, rng: random.Random) -> str:
        """The writers finish what they sent and wait; the stream (read first) is deleted;
        a node killed and restarted creates it again (a new epoch); the writers go on."""
        self.go.clear()
        while not all(self.idle):
            self.idle_changed.clear()
            await self.idle_changed.wait()
        nc = await nats.connect(servers=self.servers.urls)
        try:
            js = nc.jetstream()
            info = await js.stream_info(STREAM_NAME)
            self.old_epoch = (info.config.metadata or {}).get("rtnode_epoch", "")
            self.old_events = await read_room(js, self.subject)
            deadline = time.monotonic() + 60
            while True:  # a cluster slow to answer (a loaded machine): ask again
                try:
                    await js.delete_stream(STREAM_NAME)
                    break
                except NotFoundError:
                    break  # an earlier try that timed out deleted it
                except nats.errors.TimeoutError:
                    assert time.monotonic() < deadline, "the stream could not be deleted"
        finally:
            await nc.close()
        self.life += 1
        drawn = await self._kill_node(rng)
        await self.wait_ready()
        self.go.set()
        return drawn


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def read_room(js: Any, subject: str) -> dict[int, dict[str, Any]]:
    """Every event of the room in the stream: seq -> the event map (with its Nats-Msg-Id)."""
    out: dict[int, dict[str, Any]] = {}
    seq = 1
    while True:
        try:
            msg = await js.get_msg(STREAM_NAME, seq=seq, subject=subject, next=True)
        except NotFoundError:
            return out
        event = cbor2.loads(msg.data)
        event["seq"] = msg.seq
        event["_msg_id"] = (msg.headers or {}).get("Nats-Msg-Id", "")
        out[msg.seq] = event
        seq = msg.seq + 1


def state_at(events: dict[int, dict[str, Any]], upto: int | None = None) -> dict[str, int]:
    """key -> the seq of its value as of ``upto`` (every event when None): the highest seq
    of the key, unless that one is an unset."""
    latest: dict[str, dict[str, Any]] = {}
    for seq in sorted(events):
        if upto is not None and seq > upto:
            break
        ev = events[seq]
        latest[ev["key"]] = ev
    return {k: ev["seq"] for k, ev in latest.items() if not ev.get("unset")}


def check_join(rec: JoinRecord, events: dict[int, dict[str, Any]] | None,
               problems: list[str]) -> None:
    """A joiner's frames against the stream of its life (None: not known)."""
    if rec.joined_seq is None or rec.state is None:
        return  # ended before its state came (a fault): nothing to hold it to
    who = f"{rec.name}@{rec.node} joined.seq={rec.joined_seq}"
    state = {k: int(v["seq"]) for k, v in rec.state.items()}
    above = {k: s for k, s in state.items() if s > rec.joined_seq}
    if above:
        problems.append(f"{who}: state values above joined.seq: {above}")
    last = rec.joined_seq
    for ev in rec.live:
        seq, key = int(ev["seq"]), ev.get("key")
        if seq <= last:
            problems.append(f"{who}: live event {seq} after {last} (order, duplicate)")
        last = max(last, seq)
        if key in state and seq <= state[key]:
            problems.append(f"{who}: live event {seq} of {key} not newer than its state "
                            f"value {state[key]}")
    if events is None:
        return
    want = state_at(events, rec.joined_seq)
    if state != want:
        diff = sorted(k for k in set(state) | set(want) if state.get(k) != want.get(k))
        low = min([state.get(k, rec.joined_seq) for k in diff] + [want.get(k, rec.joined_seq)
                                                                   for k in diff])
        around = [(s, events[s]["key"], "unset" if events[s].get("unset") else "set")
                  for s in sorted(events)
                  if low <= s <= rec.joined_seq and events[s]["key"] in diff]
        problems.append(f"{who} (at +{rec.at:.1f}s, ended {rec.ended!r}): state "
                        f"{sorted(state.items())} != the stream's as of joined.seq "
                        f"{sorted(want.items())}; events of {diff} since {low}: {around}")
    for k, v in rec.state.items():
        ev = events.get(int(v["seq"]))
        if ev is None or ev.get("key") != k or ev.get("data") != v.get("data"):
            problems.append(f"{who}: state value {k}={v} is not the stream's event {ev}")


async def api_state(http: aiohttp.ClientSession, node: NodeProcess,
                    room: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token('backend', kind='service')}"}
    async with http.get(f"{node.base}/api/state", params={"room": room},
                        headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def final_views(run: Run, node: NodeProcess) -> dict[str, dict[str, int]]:
    """What ``node`` serves as the room's state, door by door: key -> seq."""
    views: dict[str, dict[str, int]] = {}
    c = await RawClient.connected(node.ws_url, token("final"))
    try:
        await c.send({"type": "join", "room": run.room, "id": "j"})
        held: dict[str, int] = {}
        while True:
            f = await c.recv(10)
            if f.get("room") == run.room and f.get("type") == "state":
                held.update({v["key"]: int(v["seq"]) for v in f["values"]})
                if not f.get("more"):
                    break
        views["ws"] = held
    finally:
        await c.close()
    async with open_sse(SimpleNamespace(http=SimpleNamespace(port=node.http_port)),
                        [run.room]) as sse:
        await sse.joined()
        msg = await sse.message()
        assert msg["event"] == "state", msg
        views["sse"] = {v["key"]: int(v["seq"]) for v in sse_data(msg)["values"]}
    async with aiohttp.ClientSession() as http:
        body = await api_state(http, node, run.room)
        views["http"] = {v["key"]: int(v["seq"]) for v in body["values"]}
    dev = f"dev-{node.name}"
    m = await RawMqtt.connect(node.mqtt_port, dev, token(dev, kind="device"), clean=True)
    try:
        await m.subscribe(f"rooms/{run.room}")
        held = {}
        for _ in range(len(views["ws"])):
            _topic, payload, packet_id, qos, _dup, retain = await m.publish_in(10)
            if qos:
                m.puback(packet_id)
            if retain:
                value = cbor2.loads(payload)
                held[value["key"]] = int(value["seq"])
        views["mqtt"] = held
    finally:
        await m.drop()
    return views


@pytest.mark.parametrize("nats_servers", ["one", "cluster"])
async def test_state_rooms_under_faults(nats_servers: str, request: pytest.FixtureRequest,
                                        tmp_path: Path) -> None:
    seed = int(os.environ.get(SEED_ENV) or random.randrange(2**32))
    print(f"\n[state-faults] {SEED_ENV}={seed} ({nats_servers})", flush=True)
    servers = (Servers(cluster=request.getfixturevalue("cluster")) if nats_servers == "cluster"
               else Servers(single=request.getfixturevalue("nats_proc")))
    run = Run(seed, servers, tmp_path)
    for node in run.nodes:
        node.start()
    tasks: list[asyncio.Task[None]] = []
    end_joiners = asyncio.Event()
    joiners_done = asyncio.Event()
    try:
        await run.wait_ready()
        t0 = run.t0 = time.monotonic()
        writers = [asyncio.create_task(run.writer(w), name=f"writer-{w}") for w in range(WRITERS)]
        arrivals = asyncio.create_task(run.joiners(tasks, joiners_done, end_joiners))
        nemesis = asyncio.create_task(run.nemesis())
        await asyncio.sleep(WRITE_S)  # the length of the run (every check waits for events)
        await nemesis
        run.stop_writing.set()
        run.go.set()
        async with asyncio.timeout(60 * MS * 1000):
            await asyncio.gather(*writers)
        await arrivals
        await servers.wait_healthy()
        await run.wait_ready()
        run.log(f"writes done at {time.monotonic() - t0:.1f}s: {len(run.acks)} acked, "
                f"{len(run.refused)} refused, {run.retries} retried, {run.reconnects} "
                f"reconnects; faults: {run.faults or 'none'}")

        nc = await nats.connect(servers=servers.urls)
        try:
            js = nc.jetstream()
            info = await js.stream_info(STREAM_NAME)
            epoch = (info.config.metadata or {}).get("rtnode_epoch", "")
            events = await read_room(js, run.subject)
        finally:
            await nc.close()
        truth = state_at(events)
        top = max(events, default=0)

        # The joiners that stay: wait until they have every event (or they ended early).
        async with asyncio.timeout(20 * MS * 1000):
            for rec in run.joins:
                if not rec.stays:
                    continue
                while (not rec.ended and rec.epoch == epoch
                       and (rec.live[-1]["seq"] if rec.live else rec.joined_seq or 0) < top):
                    rec.changed.clear()
                    await rec.changed.wait()
        end_joiners.set()
        await asyncio.gather(*tasks)

        problems = run.problems
        # (2) every publish answered (the writers returned with nothing pending), and every
        # acknowledged seq holds its event in the stream of its life.
        for ack in run.acks:
            held = events if ack.life == run.life else (
                run.old_events if ack.life == run.life - 1 else None)
            if held is None:
                continue
            ev = held.get(ack.seq)
            if ev is None or ev.get("msg_id") != ack.msg_id or ev.get("key") != ack.key:
                problems.append(f"ack {ack} not in the stream (seq {ack.seq}: {ev})")
        for rid, f in run.refused:
            problems.append(f"publish {rid} refused for good: {f}")

        # (3) each joiner against the stream of its epoch.
        checked = stayed = 0
        for rec in run.joins:
            life_events = (events if rec.epoch == epoch else
                           run.old_events if rec.epoch == run.old_epoch else None)
            check_join(rec, life_events, problems)
            if rec.stays and rec.ended == "end" and rec.state is not None and rec.epoch == epoch:
                view = {k: int(v["seq"]) for k, v in rec.state.items()}
                for ev in rec.live:
                    if ev.get("unset"):
                        view.pop(ev["key"], None)
                    else:
                        view[ev["key"]] = int(ev["seq"])
                stayed += 1
                if view != truth:
                    problems.append(f"{rec.name}@{rec.node} stayed: holds {sorted(view.items())}"
                                    f" != the stream's {sorted(truth.items())}")
            checked += rec.state is not None

        # (1) every door of every node serves the stream's latest per key.
        for node in run.nodes:
            views = await final_views(run, node)
            for door, view in views.items():
                if view != truth:
                    problems.append(f"{node.name} {door}: {sorted(view.items())} != the "
                                    f"stream's {sorted(truth.items())}")

        # (4) no traceback in the nodes' logs.
        for node in run.nodes:
            text = node.log_path.read_text(errors="replace")
            if "Traceback" in text:
                at = text.index("Traceback")
                problems.append(f"{node.name} logged a traceback:\n{text[at - 300:at + 3000]}")

        run.log(f"stream: {len(events)} events of the room, top seq {top}, final state "
                f"{sorted(truth.items())}; {len(run.joins)} joiners ({checked} got a state, "
                f"{stayed} stayed to the end); "
                f"{time.monotonic() - t0:.1f}s")
        assert not problems, f"seed {seed}:\n" + "\n".join(problems[:30])
    finally:
        end_joiners.set()
        run.stop_writing.set()
        run.go.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for i in range(servers.count):
            servers.resume(i)
        for node in run.nodes:
            node.stop()
