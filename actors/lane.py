"""A lane: work that lets one of its waiters go per turn of the event loop.

asyncio runs what is ready in the order it became ready, with no priorities: a burst of costly
work from many actors at once (hundreds of clients connecting and joining in the same second)
lines up ahead of everything else, and every cheap step behind it (an event on its way to its
room's members) waits for the whole burst. Work that goes through a lane takes at most one
turn's worth of the loop at a time: each turn of the loop lets one waiter go, after everything
else that was ready in that turn. The rest of the loop keeps its pace, and the lane's work goes
as fast as the loop has nothing better to do (a loop with nothing else to run turns at once).

Waiters go in the order they came. An actor that waits for its turn before a costly message
holds its later messages back too, so each actor has at most one waiter: the lane goes round
the actors that have costly work, one message each.

Usage::

    if not lane.take():
        await lane.wait()
    ...  # the costly step
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["Lane"]


class Lane:
    """One waiter per turn of the loop, in the order they came; none in a turn that follows a
    busy one (longer than ``busy_turn_s``: what the waiters that went before set off is still
    being done), but one at least every ``max_hold_s``.

    Args:
        busy_turn_s: A turn of the loop longer than this holds the next waiter back a turn.
        max_hold_s: However busy the loop, a waiter goes at least this often.
    """

    __slots__ = ("_busy", "_last_turn", "_let_go", "_waiters", "busy_turn_s", "max_hold_s",
                 "waited")

    def __init__(self, busy_turn_s: float = 0.002, max_hold_s: float = 0.005) -> None:
        self.busy_turn_s = busy_turn_s
        self.max_hold_s = max_hold_s
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._busy = False  # someone went this turn: the next waits for the next turn
        self._last_turn = 0.0  # loop time of _next's last run (the start of a turn)
        self._let_go = 0.0  # loop time a waiter last went
        #: How many had to wait for their turn (not those that went at once).
        self.waited = 0

    def take(self) -> bool:
        """Take this turn's place if it is free and nobody waits (True); else call :meth:`wait`."""
        if self._busy or self._waiters:
            return False
        self._arm(asyncio.get_running_loop())
        return True

    async def wait(self) -> None:
        """Wait for a turn of the loop of one's own (after :meth:`take` said no)."""
        await self.turn()  # a waiter cancelled meanwhile is skipped by _next

    def turn(self) -> asyncio.Future[None]:
        """The future of a turn of one's own (after :meth:`take` said no): done when the turn
        comes. For a callback in turn without a task (``add_done_callback``); cancelled, it
        is skipped and takes no turn."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiters.append(future)
        self.waited += 1
        if not self._busy:
            self._arm(loop)
        return future

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._busy = True
        self._last_turn = self._let_go = loop.time()
        loop.call_soon(self._next)

    def __len__(self) -> int:
        """Waiters not yet let go (cancelled ones included until their turn)."""
        return len(self._waiters)

    def _next(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        turn, self._last_turn = now - self._last_turn, now
        waiters = self._waiters
        if waiters and turn > self.busy_turn_s and now - self._let_go < self.max_hold_s:
            loop.call_soon(self._next)  # the loop has more pressing work: the next turn
            return
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                self._let_go = now
                loop.call_soon(self._next)
                return
        self._busy = False
