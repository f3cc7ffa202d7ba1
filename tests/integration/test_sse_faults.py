"""SSE subscribers that resume with ``Last-Event-ID`` get every acknowledged event once, in order.

A seeded, randomized fault test of PROTOCOL.md section 7 ("a reconnecting EventSource sends
``Last-Event-ID``, and the node resumes every room from it as in section 2"). Real parts only: a
3-server NATS cluster with the R3 room stream, two node processes (A and B), publishers
acknowledged through WebSocket and ``POST /api/publish`` (each event with its own ``msg_id``,
retried until acknowledged), and six SSE subscribers of one to three of three rooms (four
joined before the first publish, two that first join during the faults, live only). Each
subscriber opens ``GET /sse`` on A or B at random, reads a while, and leaves (a clean close,
or an abort; two "steady" ones keep each stream until the node ends it), then reconnects, as
an EventSource does, with the ``id`` of the last message it read as ``Last-Event-ID``. A
subscriber that has read no event yet resumes from its first stream's ``: joined`` cursor (a
script can; an EventSource would reconnect live only).

Meanwhile a seeded nemesis (``tests.jepsen.nemesis``) kills (-9) and pauses nats-servers, cuts
node B's NATS link (B reaches the servers through TCP proxies), kills (-9) and restarts nodes,
and makes the stream leader step down. At the end the stored events are read from JetStream;
each subscriber keeps the stream it has open (or opens one) until it has them all, and the
checker holds each subscriber to the promise:

- per room, the seqs it read over all its streams are exactly the stored ones after its first
  ``: joined`` cursor, each once, in increasing order (no loss, no copy across reconnects);
- every ``id`` names every room, its pair for the event's room is the event's seq, and no pair
  ever goes back, within a stream or from one stream to the next;
- a resume is whole: the ``: joined`` cursor of a stream is its ``Last-Event-ID`` (nothing
  here trims history or recreates the stream, so a resume that is not whole is a failure
  even though the cursor says it);
- a stream that sits 8 s without an event, after the faults healed and the publishers
  finished, while events are missing, is stuck;
- no traceback in the nodes' logs.

Publishers: every acknowledged event is stored once, with the seq it was acknowledged with.

``RTNODE_TEST_SSE_FAULTS_SEED`` repeats a run's choices (printed at the start; random by
default): the faults (kinds, targets as drawn, lengths, gaps; a line each in the report), the
subscribers' rooms and delays and their choices for their n-th attempt to open a stream, each
publisher's rooms and pace and the node of its n-th attempt. ``RTNODE_TEST_SSE_FAULTS_SECONDS``
is the length of the fault phase (20 s). The interleaving with the servers is not reproducible
(nor how many faults and attempts fit), only the choices are.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.sse import RESYNC_EVENT, parse_cursor
from tests.cluster import NatsCluster, TcpProxy, cluster_node
from tests.integration.test_device_faults import (
    Shared,
    attempt_rng,
    check_publishers,
    print_report,
    start_publishers,
    stop_all,
)
from tests.jepsen.harness import read_truth
from tests.jepsen.nemesis import Nemesis
from tests.servers import free_ports
from tests.wsclient import token

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("RTNODE_TEST_SSE_FAULTS_SEED") or random.randrange(1 << 32))
SECONDS = float(os.environ.get("RTNODE_TEST_SSE_FAULTS_SECONDS", "20"))
KINDS = ("kill-nats", "pause-nats", "cut-link", "kill-node", "step-down")
FINAL_S = 25.0  # the subscribers' last streams: every stored event by then
STALL_S = 8.0  # a last stream with events missing and none arriving for this long is stuck


# -- what the subscribers saw -----------------------------------------------------------------

@dataclass
class Got:
    room: str
    seq: int
    conn: int  # stream number within the subscriber


@dataclass
class Conn:
    node: str
    t: float
    since: dict[str, int]  # its Last-Event-ID
    joined: dict[str, int] | None = None  # its ": joined" cursor
    ended: float = 0.0
    how: str = ""  # close, abort, eof, disconnect event, error event, lost, http <status>


@dataclass
class SubLog:
    name: str
    rooms: list[str]
    steady: bool = False  # keeps each stream until the node ends it (or the run does)
    got: list[Got] = field(default_factory=list)
    conns: list[Conn] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # violations seen while running
    start: dict[str, int] | None = None  # the first stream's joined cursor
    last_id: str | None = None  # what the next stream sends as Last-Event-ID
    cursor: dict[str, int] = field(default_factory=dict)  # the cursor of last_id
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # the first stream joined
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    def seqs(self, room: str) -> set[int]:
        return {g.seq for g in self.got if g.room == room}

    def has_all(self, stored: dict[str, list[int]]) -> bool:
        start = self.start or {}
        return all({s for s in stored[r] if s > start.get(r, 0)} <= self.seqs(r)
                   for r in self.rooms)


# -- one SSE stream, read by a task into a queue ---------------------------------------------

async def _read_stream(resp: aiohttp.ClientResponse, queue: asyncio.Queue[Any]) -> None:
    """Put each message (a dict of fields) and comment (a str) on ``queue``; at the end the
    exception, or EOFError. Only this task reads: a cancelled readline would lose bytes."""
    fields: dict[str, str] = {}
    try:
        while True:
            line = await resp.content.readline()
            if not line:
                raise EOFError("stream ended")
            text = line.decode().rstrip("\r\n")
            if not text:
                if fields:
                    queue.put_nowait(fields)
                    fields = {}
                continue
            if text.startswith(":"):
                queue.put_nowait(text)
                continue
            name, _, value = text.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
    except Exception as exc:
        queue.put_nowait(exc)


def _message(log: SubLog, conn: Conn, n: int, msg: dict[str, str]) -> str | None:
    """Record one message of stream ``n``; the reason the stream ends, or None."""
    if "id" not in msg:
        if msg.get("event") in ("error", "disconnect"):
            return f"{msg['event']} event {msg.get('data', '')[:80]}"
        return None  # a volatile event: none are published here
    if msg.get("event") == RESYNC_EVENT:  # a resume not whole, said: still a failure here
        log.problems.append(f"stream {n} on {conn.node}: {RESYNC_EVENT} {msg.get('data')}")
        return None
    if conn.joined is None:
        log.problems.append(f"stream {n} on {conn.node}: a message before ': joined': {msg}")
    try:
        cursor = parse_cursor(msg["id"])
        event = json.loads(msg["data"])
        room, seq = str(event["room"]), int(event["seq"])
    except Exception as exc:
        log.problems.append(f"stream {n}: unreadable message {msg} ({exc!r})")
        return None
    if set(cursor) != set(log.rooms) or cursor.get(room) != seq:
        log.problems.append(f"stream {n}: id {msg['id']} for {room}:{seq}")
    back = {r: (log.cursor.get(r), s) for r, s in cursor.items() if s < log.cursor.get(r, 0)}
    if back:
        log.problems.append(f"stream {n} on {conn.node}: the cursor went back at {room}:{seq}: "
                            f"{back}")
    log.got.append(Got(room, seq, n))
    log.last_id, log.cursor = msg["id"], cursor
    log.progress.set()
    return None


@dataclass
class SseShared(Shared):
    stopped: float = 0.0  # when the last phase began (sh.stop set)


async def subscriber(log: SubLog, sh: SseShared, seeds: random.Random,
                     delay: float = 0.0) -> None:
    await asyncio.sleep(delay)  # a late subscriber: its first stream is live only
    tok = token(log.name)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while not sh.done.is_set():
            rng = attempt_rng(seeds)
            node = sh.node(rng)
            headers = {"Authorization": f"Bearer {tok}"}
            if log.last_id is not None:
                headers["Last-Event-ID"] = log.last_id
            conn = Conn(node.name, time.monotonic(), dict(log.cursor))
            log.conns.append(conn)
            n = len(log.conns) - 1
            reader: asyncio.Task[None] | None = None
            try:
                async with http.get(node.base + "/sse", headers=headers,
                                    params=[("room", r) for r in log.rooms]) as resp:
                    if resp.status != 200:
                        body = (await resp.text())[:200]
                        conn.how = f"http {resp.status}"
                        if resp.status not in (502, 503):
                            log.problems.append(f"stream {n} on {node.name}: HTTP "
                                                f"{resp.status} {body}")
                        raise ConnectionError(conn.how)
                    queue: asyncio.Queue[Any] = asyncio.Queue()
                    reader = asyncio.create_task(_read_stream(resp, queue))
                    how = rng.choice(["close", "abort"])
                    until = time.monotonic() + (rng.uniform(0.3, 2.5) if rng.random() < 0.7
                                                else rng.uniform(0.0, 0.3))
                    quiet_since = time.monotonic()
                    while True:
                        if sh.stop.is_set():
                            # The last stream: this one, if open when the faults are over (a
                            # stream that lived through them must not be stuck after).
                            how = "final"
                            if log.has_all(sh.stored or {}) or sh.done.is_set():
                                break
                            quiet = time.monotonic() - max(quiet_since, sh.stopped)
                            if conn.joined is not None and quiet > STALL_S:
                                log.problems.append(
                                    f"stream {n} on {node.name} (opened "
                                    f"{conn.t - sh.stopped:+.1f} s from the last phase): "
                                    f"stuck {STALL_S:.0f} s after the faults healed, cursor "
                                    f"{log.cursor}")
                                how = "stuck"
                                break
                            left = 0.5
                        elif log.steady:
                            left = 0.5
                        else:
                            left = until - time.monotonic()
                            if left <= 0:
                                break
                        try:
                            item = await asyncio.wait_for(queue.get(), left)
                        except TimeoutError:
                            continue
                        if isinstance(item, BaseException):
                            how = ("eof" if isinstance(item, EOFError)
                                   else f"lost ({type(item).__name__})")
                            break
                        if isinstance(item, str):
                            if item.startswith(": joined "):
                                _joined(log, conn, n, item[len(": joined "):])
                                quiet_since = time.monotonic()
                            continue
                        ended = _message(log, conn, n, item)
                        quiet_since = time.monotonic()
                        if ended is not None:
                            how = ended
                            break
                    if how == "abort" and resp.connection is not None \
                            and resp.connection.transport is not None:
                        resp.connection.transport.abort()
                    conn.how = how
            except (aiohttp.ClientError, OSError, TimeoutError, ConnectionError) as exc:
                if not conn.how:
                    conn.how = f"lost ({type(exc).__name__})"
            finally:
                if reader is not None:
                    reader.cancel()
                    await asyncio.wait({reader})
            conn.ended = time.monotonic()
            if sh.stored is not None and log.has_all(sh.stored):
                return
            await _pause(rng, 0.05, 0.5 if conn.joined is not None else 0.3)


def _joined(log: SubLog, conn: Conn, n: int, text: str) -> None:
    try:
        cursor = parse_cursor(text)
    except Exception as exc:
        log.problems.append(f"stream {n}: bad ': joined {text}' ({exc!r})")
        return
    conn.joined = cursor
    if set(cursor) != set(log.rooms):
        log.problems.append(f"stream {n}: ': joined {text}' does not name every room")
    for room, since in conn.since.items():
        now = cursor.get(room, since)
        if now < since:
            log.problems.append(f"stream {n} on {conn.node}: resumed {room} behind its "
                                f"Last-Event-ID: {since} -> {now}")
        elif now != since:
            log.problems.append(f"stream {n} on {conn.node}: resume of {room} not whole "
                                f"(said by the cursor): {since} -> {now}")
    if log.start is None:
        log.start = cursor
        log.last_id, log.cursor = text, dict(cursor)  # resume from here (see the docstring)
        log.ready.set()


async def _pause(rng: random.Random, low: float, high: float) -> None:
    """Space a subscriber's reconnects (not for correctness)."""
    await asyncio.sleep(rng.uniform(low, high))


# -- the checker ------------------------------------------------------------------------------

def check_subscriber(log: SubLog, stored: dict[str, list[int]]) -> list[str]:
    bad = list(log.problems)
    start = log.start or {}
    for room in log.rooms:
        due = [s for s in stored[room] if s > start.get(room, 0)]
        mine = [g for g in log.got if g.room == room]
        seqs = [g.seq for g in mine]
        missing = sorted(set(due) - set(seqs))
        if missing:
            first = missing[0]
            before = [g for g in mine if g.seq < first]
            after = [g for g in mine if g.seq > first]
            near = (f"last before it {before[-1].seq} on stream {before[-1].conn}, "
                    if before else "") + (f"next {after[0].seq} on stream {after[0].conn}"
                                          if after else "nothing after")
            bad.append(f"{room}: {len(missing)} of {len(due)} stored events never received: "
                       f"{missing[:10]} ({near}; streams: "
                       + "; ".join(_describe(log, i, room) for i in range(len(log.conns)))[:900]
                       + ")")
        extra = sorted(set(seqs) - set(stored[room]))
        if extra:
            bad.append(f"{room}: received seqs that are not stored: {extra[:10]}")
        for a, b in itertools.pairwise(mine):
            if b.seq <= a.seq:
                bad.append(f"{room}: doubled or out of order: {a.seq} (stream {a.conn}) then "
                           f"{b.seq} (stream {b.conn}): "
                           f"{_describe(log, a.conn, room)}; {_describe(log, b.conn, room)}")
                break
    return bad


def _describe(log: SubLog, i: int, room: str) -> str:
    c = log.conns[i]
    seqs = [g.seq for g in log.got if g.conn == i and g.room == room]
    span = f"{seqs[0]}..{seqs[-1]} ({len(seqs)})" if seqs else "nothing"
    joined = None if c.joined is None else c.joined.get(room)
    return (f"#{i} {c.node} since {c.since.get(room)} joined {joined} {c.how} got {span}")


# -- the run ----------------------------------------------------------------------------------

@pytest.mark.timeout(SECONDS + 150)
async def test_sse_resumes_get_every_acked_event_once_under_faults(
        tmp_path: Path, cluster: NatsCluster) -> None:
    print(f"\nsse faults: seed {SEED} (RTNODE_TEST_SSE_FAULTS_SEED={SEED}), "
          f"{SECONDS:.0f} s of faults")
    began = time.monotonic()
    rng = random.Random(SEED)
    tag = uuid.uuid4().hex[:6]
    rooms = [f"sse:{tag}:a", f"sse:{tag}:b", f"sse:{tag}:c"]
    # Node B reaches the servers through proxies only: its NATS link can be cut.
    proxies = [await TcpProxy(port, "127.0.0.1", s.port).start()
               for port, s in zip(free_ports(3), cluster.servers, strict=True)]
    nodes = [cluster_node(tmp_path, "a", cluster.urls),
             cluster_node(tmp_path, "b", [p.url for p in proxies])]
    notes: list[str] = []
    tasks: list[asyncio.Task[Any]] = []
    try:
        await asyncio.gather(*(asyncio.to_thread(n.wait_ready, 30) for n in nodes))
        sh = SseShared(nodes, rooms)
        subs = [SubLog(f"sub{i}-{tag}", sorted(rng.sample(rooms, rng.randint(1, 3))))
                for i in range(6)]
        subs[0].rooms = list(rooms)  # one subscriber of every room, in every run
        subs[1].steady = subs[5].steady = True
        early, late = subs[:4], subs[4:]
        for log in early:
            tasks.append(asyncio.create_task(subscriber(log, sh, random.Random(rng.random())),
                                             name=f"sse[{log.name}]"))
        # The early subscribers joined before the first publish: each is due every event.
        await asyncio.wait_for(asyncio.gather(*(log.ready.wait() for log in early)), 20)
        for log in late:  # joined during the faults: due what is stored after their cursor
            delay = rng.uniform(1.0, SECONDS - 6.0)
            tasks.append(asyncio.create_task(subscriber(log, sh, random.Random(rng.random()),
                                                        delay), name=f"sse[{log.name}]"))

        acked, pubs = start_publishers(sh, rng, SECONDS, 30)
        nemesis = Nemesis(random.Random(rng.random()), cluster, proxies, nodes, kinds=KINDS,
                          gap_s=(0.5, 2.0), heal_timeout_s=15.0)
        await nemesis.run(SECONDS)
        try:
            retries = await asyncio.wait_for(asyncio.gather(*pubs), 35)
        except TimeoutError:
            notes.append("publishers: still running after 35 s")
            retries = [0, 0]
        healthy = await nemesis.wait_healthy(20)
        if healthy is None:
            notes.append(f"not healthy at the end: {nemesis.unhealthy}")

        truth, _ = await read_truth(cluster.urls, rooms)
        stored = {r: sorted(s.seq for s in truth if s.room == r) for r in rooms}
        sh.stored = stored
        sh.stopped = time.monotonic()
        sh.stop.set()
        t_final = time.monotonic()
        await asyncio.wait(tasks, timeout=FINAL_S)
        final_s = time.monotonic() - t_final
        if not all(t.done() for t in tasks):
            notes.append(f"subscribers' last streams: still running after {FINAL_S:.0f} s")
        sh.done.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                notes.append(f"{task.get_name()} failed: {task.exception()!r}")

        tracebacks = []
        for node in nodes:
            with contextlib.suppress(FileNotFoundError):
                text = node.log_path.read_text(errors="replace")
                if "Traceback" in text:
                    at = text.index("Traceback")
                    tracebacks.append(f"node {node.name} logged a traceback: "
                                      f"{text[max(0, at - 300):at + 1500]}")
        problems = check_publishers(acked, truth) + notes + tracebacks
        lines = [f"seed {SEED}: {len(acked)} events acked "
                 f"({dict(Counter(a.via for a in acked))}), publish retries {retries}, "
                 f"stored {dict((r[-1], len(s)) for r, s in stored.items())}, "
                 f"last stream phase {final_s:.1f} s, run {time.monotonic() - began:.1f} s",
                 f"faults {nemesis.counts()}:"]
        lines += ["  " + f.describe(nemesis.faults[0].started) for f in nemesis.faults]
        for log in subs:
            counts = {r[-1]: len(log.seqs(r)) for r in log.rooms}
            copies = len(log.got) - sum(counts.values())
            hows = Counter(c.how.split(" ")[0] for c in log.conns)
            resumed = sum(1 for c in log.conns if c.since and c.joined is not None)
            steady = " (steady)" if log.steady else ""
            lines.append(f"  {log.name}{steady}: distinct {counts}, extra copies {copies}, "
                         f"streams {len(log.conns)} ({resumed} resumed) {dict(hows)}")
            problems += [f"{log.name}: {p}" for p in check_subscriber(log, stored)]
        report = print_report(lines, problems, nodes, 2000)
        assert not problems, report
    finally:
        await stop_all(tasks, nodes)
        for proxy in proxies:
            await proxy.stop()
