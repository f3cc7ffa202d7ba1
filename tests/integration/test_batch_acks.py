"""A batch's acks are handed out as its commit's answer is read (bridge/room_store.py,
``_Outcome``), and a lone publish's as its ack is, on a real node and nats-server.

Why: the batch's events come back live just before the commit's answer, and each member's
outbox writes once per loop step. Handed out in the step that reads the answer, a publisher's
``published`` replies go out in the same write as the events; through asyncio futures they came
two steps later (the commit's task, then each future's callbacks), in a write of their own.

Seeded bursts of publishes (``RTNODE_TEST_ACK_SEED``) straight to the node's store, with a room
subscribed live: every publish is settled once, with a seq of its own; the seqs are those the
stream delivered live with the same bodies, in the order published within each batch; and each
publish that went in a batch was handed its seq inside the NATS read loop (the loop step that
read the answer), not in a later step; so was each one sent on its own (the first of a burst,
before batches form, and those of quiet moments). The live events of one read reach the room's
callback in one call.

And over the network, hostile: publishers that reset their sockets while their batches are in
flight leave the others whole (every reply, every stored event once, in order).
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import pytest

from node.core.ports import LiveMessage
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("RTNODE_TEST_ACK_SEED", "2411"))


async def test_a_batch_is_handed_out_in_the_step_that_reads_its_commit(make_node: Any) -> None:
    rng = random.Random(SEED)
    node = await make_node()
    store = node.store
    if not store.link.atomic_batches:
        pytest.fail("this nats-server does not take atomic batches")
    room = unique("acks")
    live: dict[int, bytes] = {}
    everything_live = asyncio.Event()
    expected = 0

    handovers: list[int] = []  # live events per call: those one read brought

    def on_live(msgs: list[LiveMessage]) -> None:
        handovers.append(len(msgs))
        for msg in msgs:
            if msg.seq is not None:
                live[msg.seq] = msg.body
        if len(live) >= expected > 0:
            everything_live.set()

    sub = await store.subscribe("default", room, on_live)
    reading = store.link.nc._reading_task
    settled: dict[int, tuple[int, bool]] = {}  # publish -> (seq, settled in the read loop)
    sent: dict[int, bytes] = {}
    batched0, retries0 = store.batched, store.retries
    try:
        for burst in range(rng.randint(4, 7)):
            for _ in range(rng.randint(40, 400)):
                i = len(sent)
                sent[i] = b"%d:%d:" % (burst, i) + rng.randbytes(rng.randint(0, 64))

                def done(outcome: Any, i: int = i) -> None:
                    assert i not in settled, "settled twice"
                    seq, duplicate = outcome.result()
                    assert not duplicate
                    settled[i] = (seq, asyncio.current_task() is reading)

                store.publish_soon("default", room, sent[i], f"ack-{room}-{i}").add_done_callback(
                    done)
            await asyncio.sleep(rng.choice([0, 0.001, 0.01]))
        expected = len(sent)
        for _ in range(500):  # every publish answered (bounded: 10 s)
            if len(settled) == len(sent):
                break
            await asyncio.sleep(0.02)
        assert len(settled) == len(sent)
        await asyncio.wait_for(everything_live.wait(), 10)
    finally:
        await sub.unsubscribe()
    seqs = [settled[i][0] for i in range(len(sent))]
    assert len(set(seqs)) == len(seqs), "a seq given twice"
    assert {seq: sent[i] for i, seq in enumerate(seqs)} == live, "a seq of another event"
    assert store.batched - batched0 > 0, "no batch formed"
    assert store.batched - batched0 < len(sent), "none went on its own"
    assert store.retries == retries0, "a publish was tried again (not what this test is for)"
    late = [i for i, (_, in_read_loop) in settled.items() if not in_read_loop]
    assert not late, f"{len(late)} publishes settled in a later step"
    # A batch's events come back together: handed to the room in one call per read.
    assert max(handovers) > 1 and sum(handovers) == len(live), handovers


@pytest.mark.parametrize("seed", [SEED, SEED + 1])
async def test_publishers_that_vanish_mid_batch_leave_the_others_whole(
        make_node: Any, seed: int) -> None:
    """Seeded publishers keep hundreds of publishes in flight in one room, so that batches
    form; some reset their socket (no close frame) right after a burst, while its events are
    gathering, committing or being answered. Each survivor gets a ``published`` reply for
    every publish, with a seq of its own; a member of the room receives every stored event
    once, in order, the survivors' at the seqs they were given and every other one from a
    publisher that vanished; and the node goes on serving a client that comes afterwards."""
    from node.protocol.frames import CBOR

    rng = random.Random(seed)
    node = await make_node(rate_per_s=1_000_000, rate_burst=1_000_000)
    url = ws_url(node)
    room = unique("vanish")
    watcher = await RawClient.connected(url, token("watcher"))
    assert (await watcher.request({"type": "join", "room": room}))["type"] == "joined"
    publishers = [await RawClient.connected(url, token(f"pub{k}")) for k in range(8)]
    got: list[dict[str, Any]] = []

    async def watch() -> None:  # read as they come: a member that reads late is cut (4008)
        while True:
            f = await watcher.recv(60)
            if f.get("type") == "event" and f.get("room") == room:
                got.append(f)

    watching = asyncio.create_task(watch())
    vanish = set(rng.sample(range(len(publishers)), 3))
    sent: dict[int, int] = dict.fromkeys(range(len(publishers)), 0)
    batched0 = node.store.batched
    for burst in range(4):
        for k, c in enumerate(publishers):
            if k in vanish and burst >= 2:
                continue  # gone
            frames = [{"type": "publish", "id": f"p{sent[k] + i}", "room": room, "event": "e",
                       "data": {"k": k, "i": sent[k] + i}} for i in range(rng.randint(50, 150))]
            sent[k] += len(frames)
            await c.send(*frames)
            if k in vanish and burst == 1:
                c.ws.transport.abort()  # a reset, while its publishes are in flight
        await asyncio.sleep(rng.choice([0, 0.001, 0.005]))
    acked: dict[tuple[int, int], int] = {}
    for k, c in enumerate(publishers):
        if k in vanish:
            continue
        while sum(1 for kk, _ in acked if kk == k) < sent[k]:
            f = await c.recv(20)
            if f.get("type") == "published":
                acked[(k, int(f["id"][1:]))] = f["seq"]
            else:
                assert f.get("type") == "event", f
    assert node.store.batched > batched0, "no batch formed"
    for _ in range(500):  # what the vanished ones sent is stored or dropped (bounded: 10 s)
        store = node.store
        if not (store._queued or store._commits or store._acks or store._alone_tasks):
            break
        await asyncio.sleep(0.02)
    stored = await node.store.read("default", room, 0, 100_000)
    for _ in range(500):
        if len(got) >= len(stored) or watching.done():
            break
        await asyncio.sleep(0.02)
    watching.cancel()
    assert [e["seq"] for e in got] == [ev.seq for ev in stored], "each stored event once"
    by_seq = {e["seq"]: (e["data"]["k"], e["data"]["i"]) for e in got}
    assert by_seq == {ev.seq: (CBOR.decode(ev.body)[0]["data"]["k"],
                               CBOR.decode(ev.body)[0]["data"]["i"]) for ev in stored}
    assert {by_seq[seq]: seq for seq in acked.values()} == acked, "a seq of another event"
    assert all(k in vanish for k, _ in set(by_seq.values()) - set(acked))
    assert len(set(by_seq.values())) == len(by_seq), "an event stored twice"
    late = await RawClient.connected(url, token("late"))
    reply = await late.request({"type": "publish", "room": room, "event": "e", "data": 1})
    assert reply["type"] == "published" and reply["seq"] > max(by_seq)
