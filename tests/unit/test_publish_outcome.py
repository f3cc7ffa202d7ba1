"""``_Outcome`` (bridge/room_store.py), what ``publish_soon`` returns: it answers as an asyncio
future does (done, cancelled, result, exception, a second settle refused, callbacks once each,
in the order added), except that the callbacks added before it is settled are called at once,
within the settling call, and one that raises does not keep the others from being called.

A seeded differential run against ``asyncio.Future`` (``RTNODE_TEST_OUTCOME_SEEDS``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Any

import pytest

from bridge.room_store import _Outcome
from node.core.ports import StoreError

SEEDS = [int(s) for s in os.environ.get("RTNODE_TEST_OUTCOME_SEEDS", "1,2,3,4").split(",")]


def _look(thing: Any) -> tuple[Any, ...]:
    """What a caller can read of it, errors included."""
    seen: list[Any] = [thing.done(), thing.cancelled()]
    for read in (thing.result, thing.exception):
        try:
            got = read()
        except BaseException as exc:  # what is raised is what is compared
            seen.append(("raised", type(exc).__name__))
        else:
            seen.append(got if not isinstance(got, BaseException) else ("exc", str(got)))
    return tuple(seen)


@pytest.mark.parametrize("seed", SEEDS)
async def test_it_answers_as_a_future_does_with_callbacks_at_once(seed: int) -> None:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    for _ in range(300):
        outcome, future = _Outcome(), loop.create_future()
        called: dict[str, list[int]] = {"o": [], "f": []}
        added: list[int] = []
        for step in range(rng.randint(1, 12)):
            what = rng.random()
            if what < 0.4:
                outcome.add_done_callback(lambda o, k=step, c=called: c["o"].append(k))
                future.add_done_callback(lambda f, k=step, c=called: c["f"].append(k))
                added.append(step)
                if outcome.done():  # added once settled: in the next step, as a future's
                    assert step not in called["o"]
                continue
            if what < 0.6:
                op: Any = ("set_result", (rng.randrange(10**6), rng.random() < 0.2))
            elif what < 0.8:
                op = ("set_exception", StoreError(f"refused {step}", retry=rng.random() < 0.5))
            else:
                op = ("cancel", None)
            settles = not outcome.done()
            answers = []
            for thing in (outcome, future):
                method = getattr(thing, op[0])
                try:
                    answers.append(method() if op[1] is None else method(op[1]))
                except asyncio.InvalidStateError:
                    answers.append("refused")
            assert answers[0] == answers[1], op
            assert _look(outcome) == _look(future)
            if settles:  # every callback added so far was called within that call, in order
                assert called["o"] == added
                assert called["f"] == []  # the future's wait for the next step
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert called["o"] == called["f"], "the same callbacks, once each, in order"
        assert _look(outcome) == _look(future)


async def test_a_failing_callback_is_logged_and_the_others_are_called(
        caplog: pytest.LogCaptureFixture) -> None:
    outcome = _Outcome()
    called: list[str] = []

    def fails(_: Any) -> None:
        raise RuntimeError("a publisher's bug")

    outcome.add_done_callback(lambda o: called.append("first"))
    outcome.add_done_callback(fails)
    outcome.add_done_callback(lambda o: called.append(f"last {o.result()}"))
    with caplog.at_level(logging.ERROR, logger="bridge.store"):
        outcome.set_result((7, False))  # never raises to whoever settles it
    assert called == ["first", "last (7, False)"]
    assert "callback of a publish failed" in caplog.text
    with pytest.raises(asyncio.InvalidStateError):
        outcome.set_exception(StoreError("late"))
    assert outcome.result() == (7, False)
