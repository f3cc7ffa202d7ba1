"""Durable replay consumers under nats-server faults: seeded kills, pauses and leader
step-downs of a 3-server cluster (R3 room stream), and crashes of the consumer processes.

A group of :class:`bridge.replay.ReplayConsumer` workers (``partitions`` 2, or 1 where the
standbys pull too; each given the three servers' URLs and owning its connection, as a backend
runs them) handles the events of a few rooms while they are stored through an in-process node.
Some events are poison: their handler naks them every time, so they are dead-lettered after
``max_deliver`` deliveries (to a stream of the test's own, so that the dead letters can be
read at the end). Meanwhile a seeded
schedule of faults runs, one at a time: kill -9 of a nats-server (restarted on its store), a
SIGSTOP pause, a step-down of the room stream's leader or of a partition's consumer leader, a
worker's crash (its connection closed under it, the event in hand never settled, like
``kill -9``; a fresh worker replaces it) and a newcomer (which moves partitions).
``RTNODE_TEST_REPLAY_FAULTS_SEED`` repeats a run's schedule.

What must hold, against the stream read at the end:

* every stored event of the rooms is acked by some worker, or (a poison event) dead-lettered
  with reason ``max_deliver`` and never acked; nothing else is dead-lettered;
* per room, the events in the order first handed out are the stored order (no skip, no
  out-of-order handoff);
* an event is handed out again only where the docs allow it (at least once): after it was
  handed out and not acked, or after a takeover of its partition (which resets to the ack
  floor: events acked above the floor come again). The checker counts the repeats by cause;
  a repeat of an acked event with neither a takeover nor a fault before it fails;
* every worker's iteration ends only by the test (no ReplayError) and nothing logs a
  traceback; everything is handled within a bounded time after the last fault healed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from bridge.replay import ReplayConsumer, ReplayError, partition_of
from node.core.events import event_body
from node.protocol.subjects import STREAM_NAME, room_from_subject
from tests.cluster import NatsCluster
from tests.servers import MS, wait_until
from tests.stored import WHO, tenant

pytestmark = pytest.mark.integration

ROOMS = [f"rf:{i}" for i in range(6)]
EVENTS_PER_ROOM = 40
POISON_EVERY = 17       # about one event in 17 is poison
FAULTS = 7
MAX_DELIVER = 3
KINDS = ("kill-nats", "pause-nats", "stream-step-down", "consumer-step-down", "crash-worker",
         "add-worker")
SETTLE_S = 40 * 1000 * MS   # everything handled within this after the last fault healed


@dataclass
class Worker:
    name: str
    nc: NATS
    consumer: ReplayConsumer
    task: asyncio.Task[None] | None = None
    crashed: bool = False
    error: BaseException | None = None


@dataclass
class Record:
    """What the handlers did, in the order they did it."""

    # (monotonic when handed out, worker, room, seq, delivered, "ack" or "nak"), once settled
    handed: list[tuple[float, str, str, int, int, str]] = field(default_factory=list)
    acked: dict[int, str] = field(default_factory=dict)   # seq -> first worker that acked it
    changed: asyncio.Event = field(default_factory=asyncio.Event)


def is_poison(i: int, room_index: int) -> bool:
    return (i + 3 * room_index) % POISON_EVERY == POISON_EVERY - 1


async def connect(cluster: NatsCluster) -> NATS:
    async def quiet(exc: Exception) -> None:
        pass

    nc = NATS()
    await nc.connect(servers=cluster.urls, connect_timeout=2, max_reconnect_attempts=-1,
                     reconnect_time_wait=0.3, error_cb=quiet)
    return nc


async def read_all(js: Any, subject: str) -> list[Any]:
    """Every message stored on ``subject``, in stream order (an ephemeral consumer; read
    again from the start when JetStream does not answer, for up to 20 s)."""
    deadline = time.monotonic() + 20
    while True:
        out: list[Any] = []
        try:
            sub = await js.pull_subscribe(subject, config=ConsumerConfig(
                ack_policy=AckPolicy.NONE))
            try:
                while True:
                    try:
                        out += await sub.fetch(200, timeout=0.5)
                    except TimeoutError:  # nats' own, or asyncio's (nats-py's fetch raises both)
                        if (await sub.consumer_info()).num_pending == 0:
                            return out
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        except nats.errors.Error as exc:
            if time.monotonic() > deadline:
                raise
            print(f"  reading {subject}: {exc!r}; again")
            await asyncio.sleep(0.2)


async def test_replay_consumers_under_nats_faults(cluster: NatsCluster, make_node: Any,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    seed = int(os.environ.get("RTNODE_TEST_REPLAY_FAULTS_SEED") or random.randrange(1 << 30))
    print(f"\nRTNODE_TEST_REPLAY_FAULTS_SEED={seed}")
    # The schedule (faults, their targets and lengths) draws from a generator of its own, so
    # that a seed repeats it: drawn from one generator with the publisher and the handlers,
    # it changed with the timing of their draws.
    rng = random.Random(seed)
    publish_rng, handler_rng = random.Random(seed + 1), random.Random(seed + 2)
    # one JetStream consumer whose standbys pull too, or a group of two partitions
    partitions = rng.choice([1, 2, 2])
    caplog.set_level(logging.INFO, logger="bridge.replay")
    node = await make_node(nats_url=",".join(cluster.urls), stream_replicas=3,
                           nats_connect_timeout_s=20)
    t = tenant()
    durable = "faulty"
    dlq_subject = f"rt.dlq.{t}.{durable}"
    admin = await connect(cluster)
    js = admin.jetstream(timeout=10)
    # The dead letters go to a replicated stream: JetStream publishes, read back at the end.
    await js.add_stream(StreamConfig(name=f"DLQ_{t}", subjects=[f"rt.dlq.{t}.>"], num_replicas=3))

    opts: dict[str, Any] = {"tenant": t, "rooms": "rf:*", "durable": durable,
                            "partitions": partitions, "priority_timeout_s": 1.0,
                            "fetch_timeout_s": 0.5, "ack_wait_s": 3.0, "batch": 10,
                            "max_deliver": MAX_DELIVER}
    record = Record()
    workers: list[Worker] = []
    faults: list[tuple[float, float, str]] = []   # (started, healed, what)
    stored: dict[str, list[int]] = {room: [] for room in ROOMS}
    poison: set[int] = set()
    t0 = time.monotonic()

    async def open_worker(name: str) -> Worker:
        for _ in range(40):  # during a fault the durable may not answer: try again, bounded
            # the consumer owns its connection (connect_nats), as in the README's example
            consumer = ReplayConsumer(",".join(cluster.urls), **opts)
            try:
                await consumer.open()
            except ReplayError as exc:
                print(f"  {time.monotonic() - t0:5.1f}s {name} open: {exc}")
                await asyncio.sleep(0.25)
                continue
            nc = consumer._nc
            assert nc is not None
            return Worker(name, nc, consumer)
        raise AssertionError(f"{name} never opened")

    async def run(worker: Worker) -> None:
        pace = handler_rng.random() * 0.01
        try:
            async for ev in worker.consumer:
                # poison by its content: the handler may see it before the publisher has
                # its seq
                outcome = "nak" if is_poison(ev.data["i"], ROOMS.index(ev.room)) else "ack"
                at = time.monotonic()  # handed out: the order of the check
                if pace:
                    await asyncio.sleep(pace)
                if outcome == "nak":
                    await ev.nak(delay=handler_rng.uniform(0.05, 0.8))  # its room waits meanwhile
                else:
                    await ev.ack()
                    record.acked.setdefault(ev.seq, worker.name)
                record.handed.append((at, worker.name, ev.room, ev.seq, ev.delivered,
                                      outcome))
                record.changed.set()
        except ReplayError as exc:
            if not worker.crashed:
                worker.error = exc
                print(f"  {time.monotonic() - t0:5.1f}s {worker.name} stopped: {exc}")
        except asyncio.CancelledError:
            if worker.crashed:
                return
            raise

    n = 0

    async def add() -> Worker:
        nonlocal n
        n += 1
        worker = await open_worker(f"w{n}")
        worker.task = asyncio.ensure_future(run(worker))
        workers.append(worker)
        return worker

    async def crash(worker: Worker) -> None:
        """kill -9 of a consumer process: the event in hand is never settled, nothing is
        nakked or unpinned, the connection just ends."""
        worker.crashed = True
        assert worker.task is not None
        worker.task.cancel()
        await asyncio.gather(worker.task, return_exceptions=True)
        await worker.nc.close()

    async def publish() -> None:
        for k in range(EVENTS_PER_ROOM):
            for r, room in enumerate(ROOMS):
                body = event_body(room, "reading", {"i": k}, WHO, None, f"m{k}")
                key = f"{t}:{room}:{k}"
                for attempt in range(10):
                    try:
                        seq, _ = await node.store.publish(t, room, body, key)
                        break
                    except Exception as exc:  # past the store's deadline: same key again
                        print(f"  publish {room} {k} attempt {attempt}: {exc!r}")
                else:
                    raise AssertionError(f"{room} {k} never stored")
                if is_poison(k, r):
                    poison.add(seq)
                stored[room].append(seq)
            await asyncio.sleep(publish_rng.uniform(0.05, 0.45))  # stored while the faults run

    def stream_ok() -> bool:
        return cluster.stream_healthy(STREAM_NAME)

    def part_name(i: int) -> str:
        return durable if partitions == 1 else f"{durable}-{i}"

    async def consumer_leader_step_down() -> str:
        name = part_name(rng.randrange(partitions))
        try:
            msg = await admin.request(
                f"$JS.API.CONSUMER.LEADER.STEPDOWN.{STREAM_NAME}.{name}", b"", timeout=5)
            answer = json.loads(msg.data)
        except Exception as exc:
            answer = {"error": repr(exc)}
        return f"{name} {'ok' if answer.get('success') else answer}"

    async def target() -> int:
        """A server: the stream's leader, a partition's consumer leader, or any (the same
        draws whichever it is)."""
        pick, part, anyone = rng.random(), rng.randrange(partitions), rng.randrange(3)
        if pick < 0.33:
            leader = await asyncio.to_thread(cluster.stream_leader, STREAM_NAME)
            if leader is not None:
                return leader
        elif pick < 0.66:
            with contextlib.suppress(Exception):
                info = await js.consumer_info(
                    STREAM_NAME, part_name(part), timeout=2)
                name = (info.cluster.leader if info.cluster else None) or ""
                if name.startswith("n"):
                    return int(name[1:])
        return anyone

    async def fault(kind: str) -> str:
        if kind == "kill-nats":
            i = await target()
            cluster.kill(i)
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            await asyncio.to_thread(cluster.restart, i, 20.0)
            return f"n{i}"
        if kind == "pause-nats":
            i = await target()
            cluster.pause(i)
            try:
                await asyncio.sleep(rng.uniform(0.5, 3.0))
            finally:
                cluster.resume(i)
            return f"n{i}"
        if kind == "stream-step-down":
            try:
                answer = await cluster.step_down(STREAM_NAME)
            except Exception as exc:  # an election under way: said, the run goes on
                return f"failed: {exc!r}"
            return "ok" if answer.get("success") else str(answer)
        if kind == "consumer-step-down":
            return await consumer_leader_step_down()
        live = [w for w in workers if not w.crashed and w.error is None]
        # One draw however many are live (a worker may have stopped with an error): a choice
        # among them drew nothing when none was, and bits in a number that depends on how
        # many, which moved the rest of the schedule.
        pick = rng.random() if kind == "crash-worker" else 0.0
        if kind == "crash-worker" and live:
            victim = live[int(pick * len(live))]
            await crash(victim)
            fresh = await add()
            return f"{victim.name} (replaced by {fresh.name})"
        fresh = await add()
        return fresh.name

    await add()
    await add()
    publisher = asyncio.ensure_future(publish())
    try:
        for _ in range(FAULTS):
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            kind = rng.choice(KINDS)
            started = time.monotonic()
            what = await fault(kind)
            healed = time.monotonic()
            faults.append((started, healed, f"{kind} {what}"))
            print(f"  {started - t0:5.1f}s {kind:<18} {what} ({healed - started:.1f}s)")
            # the next fault waits for a healthy stream (bounded: a wait that gives up is
            # said, and the run goes on)
            try:
                await asyncio.to_thread(wait_until, stream_ok, 20.0, 0.1, "healthy stream")
            except AssertionError as exc:
                print(f"  not healthy: {exc}")
        await asyncio.wait_for(publisher, 60)
        last_heal = max((h for _, h, _ in faults), default=time.monotonic())

        # -- wait until every stored event is acked or dead-lettered ------------------------
        every = {seq for seqs in stored.values() for seq in seqs}
        good = every - poison
        dead: dict[int, list[dict[str, str]]] = {}

        async def read_dead() -> None:
            for m in await read_all(js, dlq_subject):
                h = dict(m.headers or {})
                dead.setdefault(int(h["Rtnode-Seq"]), []).append(h)

        def state() -> list[str]:
            """Each worker: crashed, error, partitions pinned (serving) and assigned, rooms
            blocked, events held."""
            return [f"{w.name} crashed={w.crashed} error={w.error} "
                    f"serving={w.consumer.serving} "
                    f"assigned={[p.index for p in w.consumer._parts if p.assigned]} "
                    f"blocked={w.consumer._blocked} "
                    f"queued={[h.seq for h in w.consumer._queue]} "
                    f"unsettled={list(w.consumer._unsettled)}" for w in workers]

        deadline = time.monotonic() + SETTLE_S
        while True:
            missing = good - record.acked.keys()
            if not missing:
                dead.clear()
                await read_dead()
                if poison <= dead.keys():
                    break
            assert time.monotonic() < deadline, (
                f"seed {seed}: {len(missing)} stored events never acked "
                f"({sorted(missing)[:20]}), poison not dead-lettered "
                f"{sorted(poison - dead.keys())}; workers {state()}; handed out: "
                f"{[h for h in record.handed if h[3] in missing | (poison - dead.keys())]}")
            record.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(record.changed.wait(), 0.5)
        settled_after = time.monotonic() - last_heal
        # a moment for late redeliveries to show (a repeat that would come, comes now)
        quiet_until = time.monotonic() + opts["ack_wait_s"] + 1.0
        while time.monotonic() < quiet_until:
            record.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(record.changed.wait(), quiet_until - time.monotonic())
    finally:
        publisher.cancel()
        for w in workers:
            assert w.task is not None
            w.task.cancel()
            await asyncio.gather(w.task, return_exceptions=True)
            with contextlib.suppress(Exception):  # a crashed one: its tasks are cancelled
                await w.consumer.close()

    # -- read the stream: what is stored in the tenant's rooms ------------------------------
    stream_rooms: dict[str, list[int]] = {room: [] for room in ROOMS}
    for m in await read_all(js, f"rt.room.{t}.*"):
        stream_rooms[room_from_subject(m.subject)[1]].append(m.metadata.sequence.stream)
    await admin.close()

    # -- check ------------------------------------------------------------------------------
    problems: list[str] = []
    assert stream_rooms == stored, f"seed {seed}: the stream holds other events than acked"
    for room in ROOMS:
        first: list[int] = []
        seen: set[int] = set()
        for _, _, r, seq, _, _ in sorted(record.handed):
            if r == room and seq not in seen:
                seen.add(seq)
                first.append(seq)
        if first != stored[room]:
            problems.append(f"{room}: handed out first in order {first}, stored {stored[room]}")
    if set(record.acked) & poison:
        problems.append(f"poison events acked: {sorted(set(record.acked) & poison)}")
    wrong_dead = {seq: hs for seq, hs in dead.items()
                  if seq not in poison or any(h.get("Rtnode-Reason") != "max_deliver"
                                              for h in hs)}
    if wrong_dead:
        problems.append(f"unexpected dead letters: {wrong_dead}")
    if any(len(hs) > 1 for hs in dead.values()):
        problems.append("an event dead-lettered twice: "
                        f"{ {s: len(hs) for s, hs in dead.items() if len(hs) > 1} }")

    # Repeats of an acked event, by cause: after a takeover of its partition or a worker's
    # crash (documented), after a fault of the servers (a lost ack: at least once), or none.
    shift = time.time() - time.monotonic()
    takeovers = sorted((r.created - shift, int(r.getMessage().split("partition ")[1].split()[0]))
                       for r in caplog.records if "serves partition" in r.getMessage())
    causes: Counter[str] = Counter()
    acked_at: dict[int, tuple[float, str]] = {}
    handed = sorted(record.handed)
    for when, who, room, seq, _, outcome in handed:
        if seq in acked_at:
            at, by = acked_at[seq]
            if any(at <= c <= when and p == partition_of(room, partitions)
                   for c, p in takeovers):
                causes["takeover"] += 1
            elif any(s - 1.0 <= when and at <= h + opts["ack_wait_s"] + 2
                     for s, h, _ in faults):
                causes["fault"] += 1
            else:
                causes["unexplained"] += 1
                problems.append(f"{room} seq {seq} acked by {by}, handed again to {who} "
                                f"{when - at:.2f}s later with no takeover nor fault between")
        elif outcome == "ack":
            acked_at[seq] = (when, who)
    errors = [w.name for w in workers if w.error is not None]
    if errors:
        problems.append(f"workers whose iteration failed: "
                        f"{[(w.name, str(w.error)) for w in workers if w.error]}")
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    if tracebacks:
        problems.append(f"tracebacks logged: {tracebacks}")
    partitions = Counter(partition_of(room, partitions) for room in ROOMS)
    print(f"  {sum(map(len, stored.values()))} stored ({len(poison)} poison) in rooms over "
          f"partitions {dict(partitions)}; {len(record.handed)} handed out, "
          f"{len(record.acked)} acked, {sum(map(len, dead.values()))} dead letters; repeats of "
          f"acked events {dict(causes)}; {len(takeovers)} takeovers, {n} workers; all settled "
          f"{settled_after:.1f}s after the last heal; {time.monotonic() - t0:.1f}s in all")
    assert not problems, f"seed {seed}:\n" + "\n".join(problems)
