"""Group commit (bridge/room_store.py): publishes that gather while others are in flight are
stored as JetStream atomic batches, and each publisher still gets its own event's seq, once.
Fewer publishes in flight than the node's ``group_after`` go one by one, each sent from
synchronous code with its ack taken in a callback, and retried on its own after a fault: the
same rules hold for them.

A nats-server with ``sync_interval: always`` (an fsync per stored write, as the embedded one)
and a node; publishers keep many publishes in flight (so batches form), each with its own
``msg_id``, and now and then send again an id already acknowledged (a client retry: a batch
holding it is refused as a whole and its events go again one by one). With faults, a seeded
nemesis kills (-9) and restarts the nats-server or pauses it while they publish; a publish
answered with an error, or lost with its connection, is sent again with the same ``msg_id``.

What must hold: every acknowledged event is in the room's history at the seq its publisher
was given, with its data; no event is stored twice; a retry of an acknowledged id gets the
first seq back; and batches were stored (the node's ``/metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import NatsProcess, NodeProcess, running_node
from tests.wsclient import SECRET, RawClient, token

pytestmark = pytest.mark.integration

SEEDS = [int(s) for s in os.environ.get("RTNODE_TEST_GROUP_SEEDS", "7").split(",")]
PUBLISHERS = 6
EVENTS = 300  # per publisher, at least (with faults: as many as they publish meanwhile)
WINDOW = 60  # publishes a publisher keeps in flight
ROOMS = 2


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsProcess]:
    conf = tmp_path / "nats.conf"
    conf.write_text("jetstream { sync_interval: always }\n")
    server = NatsProcess(tmp_path / "nats", args=["-c", str(conf)]).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def node(tmp_path: Path, nats: NatsProcess) -> Iterator[NodeProcess]:
    with running_node(tmp_path / "node", "--nats-url", nats.url, "--log-level", "warning",
                      "--rate-per-s", "100000", "--rate-burst", "100000",
                      env={"RTNODE_JWT_SECRET": SECRET}) as proc:
        yield proc


class Publisher:
    """Publishes events to ``room``, ``window`` in flight (and ``again`` ids already acked,
    now and then), each until it is acked."""

    def __init__(self, url: str, room: str, tag: str, rng: random.Random,
                 window: int = WINDOW, again: int = 3) -> None:
        self.url, self.room, self.tag, self.rng = url, room, tag, rng
        self.window, self.again = window, again
        self.acked: dict[str, int] = {}  # msg_id -> seq
        self.next = 0  # the events 0 .. next-1 were sent

    def frame(self, i: int) -> dict[str, Any]:
        return {"type": "publish", "id": f"{self.tag}-{i}", "room": self.room, "event": "e",
                "data": {"p": self.tag, "i": i}, "msg_id": f"{self.tag}-{i}"}

    def unacked(self) -> list[int]:
        return [i for i in range(self.next) if f"{self.tag}-{i}" not in self.acked]

    async def run(self, deadline: float, stop: asyncio.Event) -> None:
        """Publish new events until ``stop`` (at least ``EVENTS``), then until all are acked."""
        todo: list[int] = []
        loop = asyncio.get_running_loop()
        while todo or not stop.is_set() or self.next < EVENTS:
            assert loop.time() < deadline, f"{self.tag}: {len(self.unacked())} never acked"
            try:
                client = await RawClient.connected(self.url, token(self.tag), open_timeout=5)
            except Exception:  # the node refuses while NATS is away: try again
                await asyncio.sleep(0.2)
                continue
            try:
                while todo or not stop.is_set() or self.next < EVENTS:
                    assert loop.time() < deadline, f"{self.tag}: {len(self.unacked())} never acked"
                    if not todo:
                        todo = list(range(self.next, self.next + self.window))
                        self.next += self.window
                    chunk, todo = todo[:self.window], todo[self.window:]
                    frames = [self.frame(i) for i in chunk]
                    if self.rng.random() < 0.3:  # a client retry of ids already acked
                        frames += [self.frame(i)
                                   for i in self.rng.sample(range(self.next), self.again)
                                   if f"{self.tag}-{i}" in self.acked]
                    self.rng.shuffle(frames)
                    await client.send(*frames)
                    todo = sorted(set(todo) | set(await self._answers(
                        client, {f["id"] for f in frames})))
            except AssertionError:
                raise
            except Exception:  # the connection closed or went quiet: send again what is unacked
                todo = self.unacked()
            finally:
                with contextlib.suppress(Exception):
                    await client.close()

    async def _answers(self, client: RawClient, ids: set[str]) -> list[int]:
        """Wait for every answer of ``ids``; returns the events to send again."""
        failed = []
        while ids:
            f = await client.recv(30)
            if f.get("type") == "disconnect":
                raise ConnectionError(f)
            if f.get("id") not in ids:
                continue
            ids.discard(f["id"])
            i = int(f["id"].rpartition("-")[2])
            if f["type"] == "published":
                first = self.acked.setdefault(f["id"], f["seq"])
                assert f["seq"] == first, (f, "a retry of an acked id got another seq")
            else:
                assert f["type"] == "error" and f.get("retry"), f
                failed.append(i)
        return failed


async def _history(url: str, room: str) -> list[dict[str, Any]]:
    reader = await RawClient.connected(url, token("reader"))
    try:
        events: list[dict[str, Any]] = []
        since = 0
        while True:
            page = await reader.request({"type": "history", "room": room,
                                         "since": {"seq": since}, "limit": 1000}, timeout=30)
            assert page["type"] == "history", page
            events += page["events"]
            if not page["events"] or events[-1]["seq"] >= page["seq"]:
                return events
            since = events[-1]["seq"]
    finally:
        await reader.close()


async def _nemesis(nats: NatsProcess, rng: random.Random, faults: int) -> list[str]:
    done = []
    for _ in range(faults):
        await asyncio.sleep(rng.uniform(0.3, 1.2))
        assert nats.proc is not None
        if rng.random() < 0.5:
            down = rng.uniform(0.2, 1.0)
            nats.kill()
            await asyncio.sleep(down)
            await asyncio.to_thread(nats.start)
            done.append(f"kill -9, down {down:.1f} s")
        else:
            pause = rng.uniform(0.3, 1.5)
            nats.proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(pause)
            nats.proc.send_signal(signal.SIGCONT)
            done.append(f"pause {pause:.1f} s")
    return done


async def _run(node: NodeProcess, nats: NatsProcess, seed: int, faults: int,
               lone: bool = False) -> None:
    """``lone``: 4 publishers, 2 in flight and 1 id again each (at most 12 in flight, fewer
    than the node's group_after of 16): every publish goes on its own, none in a batch."""
    rng = random.Random(seed)
    rooms = [f"chat:gc-{seed}-{r}" for r in range(ROOMS)]
    shape = {"window": 2, "again": 1} if lone else {}
    pubs = [Publisher(node.ws_url, rooms[p % ROOMS], f"p{seed}x{p}", random.Random(rng.random()),
                      **shape)
            for p in range(4 if lone else PUBLISHERS)]
    deadline = asyncio.get_running_loop().time() + 120
    stop = asyncio.Event()
    work = [asyncio.create_task(p.run(deadline, stop)) for p in pubs]
    try:
        history = await _nemesis(nats, rng, faults) if faults else []
        stop.set()
        await asyncio.gather(*work)
    finally:
        for task in work:
            task.cancel()
    stored = {room: await _history(node.ws_url, room) for room in rooms}
    for room, events in stored.items():
        keys = [(e["data"]["p"], e["data"]["i"]) for e in events]
        assert len(keys) == len(set(keys)), f"{room}: an event was stored twice ({history})"
        by_key = {(e["data"]["p"], e["data"]["i"]): e["seq"] for e in events}
        for p in pubs:
            if p.room != room:
                continue
            for msg_id, seq in p.acked.items():
                i = int(msg_id.rpartition("-")[2])
                assert by_key.get((p.tag, i)) == seq, (
                    f"{msg_id} acked at {seq}, stored at {by_key.get((p.tag, i))} ({history})")
            assert len(p.acked) == p.next >= EVENTS
    if lone:
        assert node.metric("rtnode_store_batches") == 0, "publishes gathered into a batch"
    else:
        assert node.metric("rtnode_store_batches") > 0, "no atomic batch was stored"
    print(f"seed {seed}: faults {history}; batches {node.metric('rtnode_store_batches'):.0f} "
          f"({node.metric('rtnode_store_batched'):.0f} events), "
          f"undone {node.metric('rtnode_store_batches_undone'):.0f}, "
          f"retries {node.metric('rtnode_jetstream_retries'):.0f}")


@pytest.mark.parametrize("seed", SEEDS)
async def test_batched_publishes_each_get_their_own_seq_once(
        node: NodeProcess, nats: NatsProcess, seed: int) -> None:
    await _run(node, nats, seed, faults=0)
    # a retry of an acked id sits in most batches: they are refused whole and sent again
    assert node.metric("rtnode_store_batches_undone") > 0


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", SEEDS)
async def test_nothing_acked_is_lost_or_doubled_when_nats_fails_under_batches(
        node: NodeProcess, nats: NatsProcess, seed: int) -> None:
    await _run(node, nats, seed, faults=3)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", SEEDS)
async def test_nothing_acked_is_lost_or_doubled_when_nats_fails_under_lone_publishes(
        node: NodeProcess, nats: NatsProcess, seed: int) -> None:
    await _run(node, nats, seed, faults=3, lone=True)
