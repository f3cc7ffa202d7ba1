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
before batches form, and those of quiet moments).
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import pytest

from node.core.ports import LiveMessage
from tests.wsclient import unique

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

    def on_live(msg: LiveMessage) -> None:
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
