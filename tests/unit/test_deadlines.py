"""Deadlines (actors/deadlines.py): many deadlines on one loop timer. A fake loop's clock is
moved by seeded random steps while deadlines are added and cancelled, callbacks included; what
runs, and in which order, is compared with a plain list. Then the same on the real loop."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from actors.deadlines import Deadline, Deadlines


class FakeLoop:
    """time() and call_at() of a loop whose clock the test moves; at most one timer is live."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[list[Any]] = []  # [when, fn, cancelled]
        self.errors: list[BaseException] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, fn: Any) -> Any:
        timer = [when, fn, False]
        self.timers.append(timer)

        class Handle:
            def cancel(self) -> None:
                timer[2] = True
        return Handle()

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context["exception"])

    def advance(self, to: float) -> None:
        self.now = to
        while True:
            due = [t for t in self.timers if not t[2] and t[0] <= to]
            if not due:
                break
            timer = min(due, key=lambda t: t[0])
            timer[2] = True
            timer[1]()
        live = [t for t in self.timers if not t[2]]
        assert len(live) <= 1, "one loop timer at a time"
        self.timers = live


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_random_deadlines_run_once_in_order_unless_cancelled(seed: int) -> None:
    rng = random.Random(seed)
    loop = FakeLoop()
    deadlines = Deadlines(loop)  # type: ignore[arg-type]
    ran: list[int] = []
    expected: dict[int, tuple[float, int]] = {}  # id -> (when, order added)
    handles: dict[int, Deadline] = {}
    ids = iter(range(10**9))

    def add(delay: float) -> None:
        i = next(ids)
        handles[i] = deadlines.call_later(delay, fire, i)
        expected[i] = (loop.now + delay, i)

    def fire(i: int) -> None:
        assert i in expected, f"{i} ran after it was cancelled or twice"
        assert expected[i][0] <= loop.now + 0.001, "ran early"
        del expected[i]
        ran.append(i)
        if rng.random() < 0.3:  # a callback adds a deadline, maybe one due at once
            add(rng.choice([0.0, rng.uniform(0, 5)]))
        if expected and rng.random() < 0.2:  # or cancels another one
            victim = rng.choice(list(expected))
            handles[victim].cancel()
            del expected[victim]
        if rng.random() < 0.05:
            raise RuntimeError("a callback that fails")

    for _ in range(400):
        action = rng.random()
        if action < 0.5:
            add(rng.uniform(0, 10))
        elif action < 0.7 and expected:
            victim = rng.choice(list(expected))
            handles[victim].cancel()
            handles[victim].cancel()  # twice: nothing more
            del expected[victim]
        else:
            before = dict(expected)
            to = loop.now + rng.uniform(0, 3)
            due = sorted((w, o, i) for i, (w, o) in before.items() if w <= to)
            start = len(ran)
            loop.advance(to)
            # What was due before the step ran in deadline order (callbacks may add more).
            firsts = [i for i in ran[start:] if i in before]
            assert firsts == [i for _, _, i in due if i in firsts]
            assert not any(w <= to for w, _ in expected.values()), "a due deadline did not run"
        assert len(deadlines) == len(expected)
    for _ in range(200):  # callbacks add more now and then, fewer and fewer
        loop.advance(loop.now + 10)
    assert not expected and len(deadlines) == 0
    assert all(isinstance(e, RuntimeError) for e in loop.errors)


def test_many_cancelled_deadlines_are_compacted_away() -> None:
    loop = FakeLoop()
    deadlines = Deadlines(loop)  # type: ignore[arg-type]
    handles = [deadlines.call_later(3600, print) for _ in range(1000)]
    for h in handles[:900]:
        h.cancel()
    assert len(deadlines) == 100 and len(deadlines._heap) < 500
    deadlines.close()
    assert len(deadlines) == 0 and not [t for t in loop.timers if not t[2]]


def test_a_cancelled_one_beside_each_kept_one_does_not_stay() -> None:
    # Connections: each arms a connect deadline and an expiry, then cancels the first.
    loop = FakeLoop()
    deadlines = Deadlines(loop)  # type: ignore[arg-type]
    for _ in range(1000):
        deadlines.call_later(10, print).cancel()
        deadlines.call_later(3600, print)
    assert len(deadlines) == 1000 and len(deadlines._heap) <= 1000 * 4 // 3 + 1


async def test_on_the_real_loop_they_run_in_order_and_not_early() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    rng = random.Random(7)
    ran: list[tuple[Deadline, float]] = []
    done = loop.create_future()
    delays = [rng.uniform(0, 0.2) for _ in range(200)]
    handles: list[Deadline] = []

    def fire(i: int) -> None:
        ran.append((handles[i], loop.time()))
        if len(ran) == len(delays):
            done.set_result(None)

    for i, d in enumerate(delays):  # the loop's clock may move while they are added
        handles.append(deadlines.call_later(d, fire, i))
    await asyncio.wait_for(done, 10)
    order = [(h.when, h.seq) for h, _ in ran]
    assert order == sorted(order)
    assert all(now >= h.when - 0.002 for h, now in ran)
