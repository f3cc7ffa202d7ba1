"""Reads of the room stream go over a NATS connection of their own, on a real node and
nats-server: history and recoveries are asked there, publishes and their acks
stay on the main connection, and while the reads connection is down reads use the main one
(nothing fails, nothing is missed live).

Why: nats-server answers one connection's messages in order, and a read waits for the stream
(flushing a write to disk): a burst of reads (room starts, history floods) on the one
connection held up the acks of every publish behind it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from typing import Any

import pytest

from node.core.ports import StoreError
from tests.servers import NatsProcess
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration


def _out(nc: Any) -> int:
    return int(nc.stats["out_msgs"])


async def test_history_goes_over_the_reads_connection(make_node) -> None:
    node = await make_node()
    link = node.nats
    main, reads = link.nc, link.reads
    assert reads is not main and reads.is_connected, "a reads connection of its own"
    room = unique("reads")
    c = await RawClient.connected(ws_url(node), token("reader"))
    await c.request({"type": "join", "room": room})
    seqs = []
    for i in range(5):
        pub = await c.request({"type": "publish", "room": room, "event": "e", "data": i})
        seqs.append(pub["seq"])
    main0, reads0 = _out(main), _out(reads)
    for _ in range(10):
        hist = await c.request({"type": "history", "room": room, "limit": 3})
        assert [e["seq"] for e in hist["events"]] == seqs[-3:]
    assert _out(reads) - reads0 >= 10, "every history read asked on the reads connection"
    assert _out(main) - main0 < 10, "not on the main one"


async def test_reads_use_the_main_connection_while_the_reads_one_is_down(make_node) -> None:
    node = await make_node()
    link = node.nats
    room = unique("fallback")
    c = await RawClient.connected(ws_url(node), token("reader"))
    pub = await c.request({"type": "publish", "room": room, "event": "before", "data": 1})
    await link.reads.close()  # as if lost for good
    assert link.reads is link.nc
    hist = await c.request({"type": "history", "room": room})
    assert [e["seq"] for e in hist["events"]] == [pub["seq"]]
    # a room started now (subscription and latest seq) gets what is published after its join
    watcher = await RawClient.connected(ws_url(node), token("watcher"))
    joined = await watcher.request({"type": "join", "room": room})
    assert joined["seq"] == pub["seq"]
    after = await c.request({"type": "publish", "room": room, "event": "after", "data": 2})
    [ev] = await watcher.events(1, room)
    assert ev["seq"] == after["seq"]


async def test_a_room_started_with_reads_apart_misses_nothing_published_meanwhile(
        make_node) -> None:
    """A starting room reads its latest seq on the main connection, right behind its
    subscription (not on the reads connection, where the read could overtake it): an event
    stored after the read comes live. Publishes go on throughout the joins of 30 new rooms:
    every event after each joined seq arrives, in order."""
    node = await make_node(heavy_requests_per_s=1000, rate_per_s=100000, rate_burst=100000)
    publisher = await RawClient.connected(ws_url(node), token("publisher"))
    rooms = [unique(f"race{i}") for i in range(30)]
    joiners = [await RawClient.connected(ws_url(node), token(f"j{i}")) for i in range(30)]
    stored: dict[str, list[int]] = {r: [] for r in rooms}
    stop = asyncio.Event()

    async def publish() -> None:
        i = 0
        while not stop.is_set() and i < 3000:
            room = rooms[i % len(rooms)]
            pub = await publisher.request({"type": "publish", "room": room, "event": "e",
                                           "data": i})
            stored[room].append(pub["seq"])
            i += 1

    task = asyncio.create_task(publish())
    joined = await asyncio.gather(*(j.request({"type": "join", "room": r})
                                    for j, r in zip(joiners, rooms, strict=True)))
    await asyncio.sleep(0.2)  # more events after every join
    stop.set()
    await task
    for j, r, ack in zip(joiners, rooms, joined, strict=True):
        assert ack["type"] == "joined", ack
        want = [s for s in stored[r] if s > ack["seq"]]
        got = await j.events(len(want), r)
        assert [e["seq"] for e in got] == want, r


async def test_a_node_without_a_reads_connection_starts_and_reads_on_the_main_one(
        make_node, tmp_path: Any) -> None:
    """A server that takes one connection of the node only (its max_connections): the reads
    connection is refused, the node starts anyway (it waited for ever before) and reads on
    the main connection."""
    conf = tmp_path / "one.conf"
    conf.write_text("max_connections: 1\n")
    server = NatsProcess(tmp_path / "nats", args=["-c", str(conf)]).start()
    try:
        node = await asyncio.wait_for(make_node(nats_url=server.url), 30)
        assert node.nats.reads is node.nats.nc
        room = unique("single")
        c = await RawClient.connected(ws_url(node), token("reader"))
        pub = await c.request({"type": "publish", "room": room, "event": "e", "data": 1})
        hist = await c.request({"type": "history", "room": room})
        assert [e["seq"] for e in hist["events"]] == [pub["seq"]]
        await c.close()
        await node.stop()
    finally:
        server.stop()


async def test_concurrent_leader_reads_each_get_their_own_room(make_node) -> None:
    """Leader reads await their answer on the store's reply inbox (a route of its own, not
    nats-py's request): many at once, over both connections and for rooms of seeded sizes,
    each gets its own room's latest seq; a room never written reads 0; the ask that meets a
    closed reads connection is asked again on the main one."""
    rng = random.Random(int(os.environ.get("RTNODE_TEST_READS_SEED", "3")))
    node = await make_node()
    store = node.store
    rooms = [unique(f"lead{i}") for i in range(12)]
    last = {room: 0 for room in rooms}
    for k in range(80):
        room = rng.choice(rooms[:-2])  # the last two stay empty
        seq, dup = await store.publish("default", room, b"x%d" % k, f"lead-{room}-{k}")
        assert not dup
        last[room] = seq
    asks = [(room, rng.random() < 0.5) for room in rooms for _ in range(rng.randint(1, 4))]
    rng.shuffle(asks)
    got = await asyncio.gather(*(store.last_seq("default", room, after_subscribe=main)
                                 for room, main in asks))
    assert list(got) == [last[room] for room, _ in asks]
    assert not store._gets, "nothing left waiting"
    pending = [asyncio.ensure_future(store.last_seq("default", room)) for room in rooms]
    await node.nats.reads.close()  # as if lost: asked again over the main connection
    assert list(await asyncio.gather(*pending)) == [last[room] for room in rooms]


async def test_a_direct_get_nobody_answers_yet_is_asked_again_within_the_deadline(
        make_node) -> None:
    """No server serves direct gets of a stream for a moment after it is created (503 "no
    responders"): a read then is asked again until the read deadline, not failed at once. A
    stream created 50-400 ms into the read (seeded) is read; one that never comes fails after
    the deadline with a StoreError."""
    node = await make_node()
    store, js = node.store, node.nats.js
    rng = random.Random(7)
    for i in range(4):
        name = unique(f"LATE{i}").replace("-", "_")
        subject = f"late.{name}"
        retries = store.direct_retries
        read = asyncio.create_task(store.direct_get({"last_by_subj": subject}, name))
        await asyncio.sleep(rng.uniform(0.05, 0.4))
        assert not read.done(), "still asking"
        await js.add_stream(name=name, subjects=[subject], allow_direct=True)
        await js.publish(subject, b"x")
        batch = await asyncio.wait_for(read, 10)
        assert store.direct_retries > retries
        assert len(batch.events) <= 1  # asked before or after the publish: both are right
        await js.delete_stream(name)
    store.read_timeout_s = 0.5
    started = asyncio.get_running_loop().time()
    with pytest.raises(StoreError) as failed:
        await store.direct_get({"last_by_subj": "never.there"}, "NEVER_THERE")
    assert failed.value.retry
    assert asyncio.get_running_loop().time() - started >= 0.45


async def test_a_stop_ends_the_reads_still_waiting_for_their_answers(
        nats_proc: NatsProcess) -> None:
    """A room that starts while the node stops asks for its last seq, or a member for history,
    and the server is slow to answer (paused here). The store's stop ends those reads at once
    ("node stopping"), as it does publishes waiting for their acks: NATS closes next, and
    each would wait out its deadline for an answer that cannot come (a node's stop was held
    ~5 s by a room starting in it, which then escalated with an error)."""
    from bridge.nats_link import NatsLink, StreamSettings
    from bridge.room_store import JetStreamRoomStore

    assert nats_proc.proc is not None
    link = NatsLink([nats_proc.url], name="n1", stream=StreamSettings())
    await link.connect()
    store = JetStreamRoomStore(link)
    await store.start()
    room = unique("stopping")
    try:
        os.kill(nats_proc.proc.pid, signal.SIGSTOP)
        try:
            reads = [asyncio.create_task(store.last_seq("default", room, after_subscribe=True)),
                     asyncio.create_task(store.last_seq("default", room)),
                     asyncio.create_task(store.read("default", room, 0, 10))]
            for _ in range(100):  # until each has sent its request (a loop step or two)
                if len(store._gets) + len(store._batches) == len(reads):
                    break
                await asyncio.sleep(0)
            assert len(store._gets) + len(store._batches) == len(reads)
            await store.stop()
            for read in reads:
                with pytest.raises(StoreError, match="node stopping"):
                    await read
        finally:
            os.kill(nats_proc.proc.pid, signal.SIGCONT)
    finally:
        await link.close()
