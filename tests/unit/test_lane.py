"""The lane (actors/lane.py): one waiter per turn of the loop, in order, everything else first."""

from __future__ import annotations

import asyncio
import functools
import itertools
import random

import pytest

from actors import Lane


class Turns:
    """Counts the turns of the loop: a callback that schedules itself again each turn."""

    def __init__(self) -> None:
        self.n = 0
        self._stopped = False
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        if not self._stopped:
            self.n += 1
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._stopped = True


async def _through(lane: Lane) -> None:
    if not lane.take():
        await lane.wait()


async def test_one_taker_per_turn_then_free_again() -> None:
    lane = Lane()
    assert lane.take()
    assert not lane.take()  # this turn's place is taken
    await asyncio.sleep(0)
    assert lane.take()
    assert lane.waited == 0


async def test_waiters_go_one_per_turn_in_the_order_they_came() -> None:
    lane = Lane()
    turns = Turns()
    went: list[tuple[int, int]] = []

    async def waiter(i: int) -> None:
        await _through(lane)
        went.append((i, turns.n))

    await asyncio.gather(*(waiter(i) for i in range(20)))
    turns.stop()
    assert [i for i, _ in went] == list(range(20))
    assert all(b > a for (_, a), (_, b) in itertools.pairwise(went))  # a turn each
    assert lane.waited == 19 and len(lane) == 0


async def test_a_cancelled_waiter_is_skipped_and_the_rest_go() -> None:
    lane = Lane()
    assert lane.take()
    went: list[int] = []

    async def waiter(i: int) -> None:
        await lane.wait()
        went.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(4)]
    await asyncio.sleep(0)  # all four are waiting
    tasks[1].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert went == [0, 2, 3]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert lane.take()  # nothing left behind: the lane is free again


async def test_callbacks_on_turns_go_one_per_turn_in_order_and_a_cancelled_one_is_skipped(
        ) -> None:
    # What a WebSocket upgrade waits with (bridge/ws.py): a turn's future and a callback on
    # it, no task.
    lane = Lane()
    turns = Turns()
    assert lane.take()
    went: list[tuple[int, int]] = []
    four = asyncio.Event()

    def opened(i: int, future: asyncio.Future[None]) -> None:
        if not future.cancelled():
            went.append((i, turns.n))
            if len(went) == 4:
                four.set()

    futures = [lane.turn() for _ in range(5)]
    for i, future in enumerate(futures):
        future.add_done_callback(functools.partial(opened, i))
    futures[2].cancel()
    await four.wait()
    turns.stop()
    assert [i for i, _ in went] == [0, 1, 3, 4]
    assert all(b > a for (_, a), (_, b) in itertools.pairwise(went))  # a turn each
    assert lane.waited == 5 and len(lane) == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_other_work_keeps_its_pace_while_the_lane_has_a_backlog(seed: int) -> None:
    """A task that is not in the lane needs a few turns per step; it finishes its steps while a
    burst of hundreds of lane waiters is still waiting (without the lane, each of those would
    have taken its turn ahead of it)."""
    rng = random.Random(seed)
    lane = Lane()
    left = rng.randint(200, 400)
    waiters = [asyncio.create_task(_through(lane)) for _ in range(left)]
    steps = rng.randint(5, 20)

    async def member() -> int:
        for _ in range(steps):
            for _ in range(rng.randint(1, 3)):  # an event's hops: a few turns each
                await asyncio.sleep(0)
        return len(lane)

    waiting_when_done = await member()
    assert waiting_when_done > left - steps * 3 - 2  # at most one waiter went per turn
    await asyncio.gather(*waiters)
    assert len(lane) == 0


async def test_after_a_busy_turn_none_goes_but_one_goes_at_least_every_max_hold() -> None:
    """A loop whose every turn is busy (here: a callback that takes 5 ms each turn) lets a
    waiter go only every max_hold_s; once the turns are short again, one per turn."""
    import time

    lane = Lane(busy_turn_s=0.002, max_hold_s=0.02)
    loop = asyncio.get_running_loop()
    busy = True

    def hog() -> None:
        if busy:
            time.sleep(0.005)
            loop.call_soon(hog)

    loop.call_soon(hog)
    went: list[float] = []
    four = asyncio.Event()

    async def waiter() -> None:
        await _through(lane)
        went.append(loop.time())
        if len(went) == 4:
            four.set()

    tasks = [asyncio.create_task(waiter()) for _ in range(6)]
    await four.wait()
    gaps = [b - a for a, b in itertools.pairwise(went[1:4])]
    assert all(g >= 0.015 for g in gaps), gaps  # held while the turns are busy
    busy = False
    await asyncio.gather(*tasks)
    assert len(went) == 6 and len(lane) == 0
