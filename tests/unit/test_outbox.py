"""The outbox (node/core/outbox.py): frames pushed in one turn leave as one message, and a
node's outboxes share one scheduled flush per turn (FlushTurn)."""

from __future__ import annotations

import asyncio
from typing import Any

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
