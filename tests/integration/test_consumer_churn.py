"""A group of durable consumers whose processes come, go and crash at random (seeded) while
events are stored: every room's events are handled complete and in order.

Each worker is a :class:`bridge.replay.ReplayConsumer` with ``partitions=3`` on a NATS
connection of its own; a crash closes that connection without closing the consumer (nothing
nakked, nothing unpinned, like ``kill -9``); a graceful stop closes the consumer. New workers
join at random, which moves partitions between live workers (release, unpin, reset at the ack
floor). ``RTNODE_TEST_CHURN_SEED`` repeats a run's schedule.

What must hold, per room: the union of what the workers handled is exactly what was stored;
taken in the order it was handled, with repeats removed, it is the stored order; an event is
handled again only by another worker than the one that handled it first (a handover, never a
worker repeating itself).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from bridge.replay import ReplayConsumer
from tests.servers import NatsProcess
from tests.stored import store, tenant

pytestmark = pytest.mark.integration

ROOMS = [f"churn:{i}" for i in range(8)]
EVENTS_PER_ROOM = 150


@dataclass
class Worker:
    name: str
    nc: NATS
    consumer: ReplayConsumer
    task: asyncio.Task[None] | None = None
    handled: list[tuple[float, str, int]] = field(default_factory=list)


async def start_worker(name: str, url: str, opts: dict[str, Any], rng: random.Random,
                       log: list[tuple[float, str, str, int]]) -> Worker:
    nc = NATS()
    await nc.connect(url)
    consumer = await ReplayConsumer(nc, **opts).open()
    worker = Worker(name, nc, consumer)
    pause = rng.random() * 0.004

    async def run() -> None:
        async for ev in consumer:
            log.append((time.monotonic(), name, ev.room, ev.seq))
            if pause:
                await asyncio.sleep(pause)
            await ev.ack()

    worker.task = asyncio.ensure_future(run())
    return worker


async def stop_worker(worker: Worker, crash: bool) -> None:
    if crash:  # kill -9: the connection goes, nothing is nakked or unpinned
        await worker.nc.close()
    else:
        await worker.consumer.close()
        await worker.nc.close()
    assert worker.task is not None
    worker.task.cancel()
    await asyncio.gather(worker.task, return_exceptions=True)


async def test_workers_come_go_and_crash_each_room_stays_whole_and_in_order(
    make_node: Any, shared_nats: NatsProcess
) -> None:
    seed = int(os.environ.get("RTNODE_TEST_CHURN_SEED") or random.randrange(1 << 30))
    print(f"\nRTNODE_TEST_CHURN_SEED={seed}")
    # The schedule draws from a generator of its own (the workers' pace from another), the
    # same draws at each step whatever is live, so that a seed repeats it: the action was drawn
    # only with two workers live or more, and a choice among them draws more or fewer bits
    # with their number (a worker's iteration may end on its own).
    rng, pace_rng = random.Random(seed), random.Random(seed + 1)
    node = await make_node()
    t = tenant()
    opts: dict[str, Any] = {"tenant": t, "rooms": "churn:*", "durable": "churny",
                            "partitions": 3, "priority_timeout_s": 1.0,
                            "fetch_timeout_s": 0.4, "batch": 20}
    log: list[tuple[float, str, str, int]] = []
    stored: dict[str, list[int]] = {room: [] for room in ROOMS}

    async def publish() -> None:
        for k in range(EVENTS_PER_ROOM):
            for room in ROOMS:
                stored[room] += await store(node, t, room, 1, k)
            await asyncio.sleep(0.01)

    workers: list[Worker] = []
    n = 0

    async def add() -> None:
        nonlocal n
        n += 1
        workers.append(await start_worker(f"w{n}", shared_nats.url, opts, pace_rng, log))

    await add()
    await add()
    publisher = asyncio.ensure_future(publish())
    crashed: set[str] = set()
    try:
        # 8 changes, about one every 0.6 s, while the events are stored.
        for _ in range(8):
            wait, drawn, pick = rng.random(), rng.choice(["add", "stop", "crash"]), rng.random()
            await asyncio.sleep(0.3 + wait * 0.6)
            live = [w for w in workers if w.task is not None and not w.task.done()]
            action = drawn if len(live) > 1 else "add"
            if action == "add":
                await add()
            else:
                victim = live[int(pick * len(live))]
                if action == "crash":
                    crashed.add(victim.name)
                await stop_worker(victim, crash=action == "crash")
                victim.task = None
            print(f"  {action}: live {[w.name for w in workers if w.task is not None]}")
        await add()  # at least one fresh worker at the end
        await asyncio.wait_for(publisher, 60)
        total = sum(len(v) for v in stored.values())
        deadline = time.monotonic() + 60
        while len({(room, seq) for _, _, room, seq in log}) < total:
            assert time.monotonic() < deadline, (
                f"only {len({(r, s) for _, _, r, s in log})} of {total} handled")
            await asyncio.sleep(0.1)
    finally:
        publisher.cancel()
        for w in workers:
            if w.task is not None:
                await stop_worker(w, crash=False)
    repeats = 0
    for room in ROOMS:
        handled = [(who, seq) for _, who, r, seq in sorted(log) if r == room]
        first: dict[int, str] = {}
        order: list[int] = []
        for who, seq in handled:
            if seq in first:
                repeats += 1
                assert first[seq] != who, f"{who} handled {room} seq {seq} twice"
                continue
            first[seq] = who
            order.append(seq)
        assert order == stored[room], f"{room}: handled out of order or incomplete"
    print(f"  {len(log)} handled for {total} stored, {repeats} repeats after handovers, "
          f"{n} workers, {len(crashed)} crashed, "
          f"{sum(w.consumer.takeovers for w in workers)} partitions taken over")
