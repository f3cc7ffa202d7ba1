"""The outbox (node/core/outbox.py): frames pushed in one turn leave as one message, and a
node's outboxes share one scheduled flush per turn (FlushTurn)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from node.core.outbox import FlushTurn, Outbox
from node.protocol.frames import JsonCodec

JSON = JsonCodec()


class Messages:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def write_message(self, payload: bytes) -> None:
        self.messages.append(payload)

    def buffered_bytes(self) -> int:
        return 0


def _outbox(turn: FlushTurn | None, **kw: Any) -> tuple[Outbox, Messages]:
    sink = Messages()
    return Outbox(JSON, sink, limit=1 << 20, on_slow=lambda: None, flush_turn=turn, **kw), sink


async def test_outboxes_of_a_turn_flush_together_once_each_in_order() -> None:
    turn = FlushTurn()
    loop = asyncio.get_running_loop()
    scheduled = 0
    call_soon = loop.call_soon

    def counting(*args: Any, **kw: Any) -> Any:
        nonlocal scheduled
        scheduled += 1
        return call_soon(*args, **kw)

    loop.call_soon = counting  # type: ignore[method-assign]
    try:
        pairs = [_outbox(turn) for _ in range(5)]
        for i in range(3):
            for outbox, _ in pairs:
                outbox.send({"i": i})
        assert all(not sink.messages for _, sink in pairs)  # nothing written in the turn
    finally:
        loop.call_soon = call_soon  # type: ignore[method-assign]
    assert scheduled == 1  # one callback for the five outboxes
    await asyncio.sleep(0)
    for _, sink in pairs:
        assert [JSON.decode(m) for m in sink.messages] == [[{"i": 0}, {"i": 1}, {"i": 2}]]
    pairs[0][0].send({"i": 3})  # the next turn: flushed again
    await asyncio.sleep(0)
    assert JSON.decode(pairs[0][1].messages[-1]) == [{"i": 3}]


async def test_a_flush_early_and_a_closed_outbox_in_the_same_turn() -> None:
    turn = FlushTurn()
    (big, big_sink), (shut, shut_sink), (plain, plain_sink) = (
        _outbox(turn, max_message_bytes=64), _outbox(turn), _outbox(None))
    big.send({"pad": "x" * 10})
    big.send({"pad": "x" * 80})  # past max_message_bytes: written at once
    assert len(big_sink.messages) == 1
    big.send({"after": 1})
    shut.send({"gone": 1})
    shut.close()
    plain.send({"own": 1})  # without the node's FlushTurn: one of its own
    await asyncio.sleep(0)
    assert [JSON.decode(m) for m in big_sink.messages][1:] == [[{"after": 1}]]
    assert shut_sink.messages == []
    assert [JSON.decode(m) for m in plain_sink.messages] == [[{"own": 1}]]


class Buffered(Messages):
    """A transport whose unsent bytes are the messages written so far (none leave)."""

    def buffered_bytes(self) -> int:
        return sum(map(len, self.messages))


@pytest.mark.parametrize("seed", range(30))
async def test_push_many_does_what_pushing_one_by_one_does(seed: int) -> None:
    """Seeded: frames of random sizes, pushed in random groups (a room's run of events) or one
    by one, with a small message size and a small slow limit: the same messages are written,
    and the outbox turns slow at the same push, told once."""
    rng = random.Random(seed)
    max_message, limit = rng.choice([(64, 400), (200, 700), (1 << 20, 300)])
    groups = [[JSON.encode({"i": i, "pad": "x" * rng.randrange(40)})
               for i in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 25))]
    turns = [rng.random() < 0.3 for _ in groups]  # a loop turn ends after the group

    async def run(many: bool) -> tuple[list[bytes], list[bool], int]:
        sink = Buffered()
        slow = 0

        def on_slow() -> None:
            nonlocal slow
            slow += 1

        outbox = Outbox(JSON, sink, limit=limit, on_slow=on_slow,
                        max_message_bytes=max_message, flush_turn=FlushTurn())
        taken = []
        for group, turn in zip(groups, turns, strict=True):
            if many:
                taken.append(outbox.push_many(group, sum(map(len, group))))
            else:
                taken.append(all([outbox.push(data) for data in group]))
            if turn:
                await asyncio.sleep(0)
        await asyncio.sleep(0)
        return sink.messages, taken, slow

    one_by_one = await run(False)
    many = await run(True)
    assert many[0] == one_by_one[0]
    assert many[2] == one_by_one[2] <= 1
    # A group refused: the same group (one by one, the push that crossed the limit refused).
    assert many[1] == one_by_one[1]
