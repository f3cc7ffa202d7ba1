"""The fan-out benchmark's counting (bench/fanout_clients.py ``Collector``): a message whose
frames are all new, consecutive events is counted at once; anything else (gaps, duplicates,
reordering, frames that are not events, events it cannot read) one frame at a time. Seeded
streams of both kinds must give the same figures either way, or the load generator's shortcut
would hide a loss or a duplicate the node caused."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import astuple

import pytest

from bench.fanout_clients import Collector
from bench.fanout_results import BenchConfig, RunResult, SubStats

EVENTS = 300


def _frame(i: int, t: float) -> str:
    return json.dumps({"type": "event", "room": "bench:fanout", "seq": i + 1,
                       "event": "bench:tick", "data": {"i": i, "t": t, "pad": "x" * 20},
                       "ts": 1}, separators=(",", ":"))


def _messages(rng: random.Random) -> list[str]:
    """A subscriber's stream: mostly in order, with seeded gaps, repeats, swaps, presence
    frames and an unreadable event, in messages of 1 to 12 frames."""
    order = list(range(EVENTS))
    for _ in range(rng.randrange(4)):
        del order[rng.randrange(len(order))]  # lost
    for _ in range(rng.randrange(4)):
        k = rng.randrange(len(order))
        order.insert(k + rng.randrange(3), order[k])  # duplicated
    for _ in range(rng.randrange(3)):
        k = rng.randrange(len(order) - 1)
        order[k], order[k + 1] = order[k + 1], order[k]  # reordered
    frames = [_frame(i, 100.0 + i / 1000) for i in order]
    for _ in range(rng.randrange(3)):
        frames.insert(rng.randrange(len(frames)), '{"type":"presence","room":"bench:fanout"}')
    if rng.random() < 0.3:
        frames.insert(rng.randrange(len(frames)), '{"type":"event","data":{"i":"?"}}')
    out = []
    while frames:
        n = rng.randint(1, 12)
        out.append("\n".join(frames[:n]))
        frames = frames[n:]
    return out


def _count(messages: list[str], shortcut: bool) -> tuple[tuple[object, ...], list[float]]:
    res = RunResult("rtnode", BenchConfig(subscribers=1, events=EVENTS))
    sub = SubStats(0, seen=bytearray(EVENTS))
    col = Collector(res)
    col.stride = 3
    if not shortcut:
        col._run = lambda *_: False  # type: ignore[method-assign]
    for k, msg in enumerate(messages):
        col.message(sub, msg, 200.0 + k)
    return (*astuple(sub), col.total, col.remaining), res.latencies


@pytest.mark.parametrize("seed", range(40))
def test_the_shortcut_counts_as_frame_by_frame_does(seed: int) -> None:
    async def run() -> None:  # the Collector's events need a running loop
        messages = _messages(random.Random(seed))
        fast, fast_lat = _count(messages, True)
        slow, slow_lat = _count(messages, False)
        assert fast == slow
        assert sorted(fast_lat) == pytest.approx(sorted(slow_lat))

    asyncio.run(run())


def test_an_unbroken_stream_is_all_counted_at_once() -> None:
    async def run() -> None:
        res = RunResult("rtnode", BenchConfig(subscribers=1, events=EVENTS))
        sub = SubStats(0, seen=bytearray(EVENTS))
        col = Collector(res)
        calls = []
        run_ = col._run
        col._run = lambda *a: calls.append(run_(*a)) or calls[-1]  # type: ignore[method-assign]
        for a in range(0, EVENTS, 10):
            col.message(sub, "\n".join(_frame(i, 1.0) for i in range(a, a + 10)), 2.0)
        assert all(calls) and len(calls) == EVENTS // 10
        assert (sub.distinct, sub.duplicates, sub.out_of_order, col.remaining) == (EVENTS, 0, 0, 0)
        assert col.all_done.is_set()

    asyncio.run(run())
