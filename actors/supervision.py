"""Supervision helpers: the system-side hooks, the restart window, an interruptible backoff."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from .actor import RestartPolicy

if TYPE_CHECKING:
    from .cell import ActorCell

__all__ = ["Backoff", "CellHost", "RestartWindow"]


class CellHost(Protocol):
    """What a cell needs from its system (kept abstract to avoid an import cycle)."""

    def _cell_closed(self, cell: ActorCell) -> None:
        """The cell stopped accepting messages: drop it from the registry."""

    def _cell_escalated(self, cell: ActorCell, exc: BaseException) -> None:
        """The cell exceeded its restart budget."""

    def _cell_terminated(self, cell: ActorCell) -> None:
        """The cell's task has finished."""

    def _cell_idle(self, cell: ActorCell) -> None:
        """The cell's task waits for a message (it may rest: ``ActorCell.rest_if_idle``)."""


class RestartWindow:
    """Counts restarts in a sliding window of ``policy.window_s`` seconds.

    Args:
        policy: the actor kind's restart policy.
    """

    __slots__ = ("_times", "policy")

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        # A list, not a deque: a window holds at most max_restarts times, and a list is 56
        # bytes where a deque is 624. None until the first restart: every room actor has a
        # window, and most never restart.
        self._times: list[float] | None = None

    def admit(self, now: float) -> int | None:
        """Record a restart at ``now`` if the budget allows it.

        Args:
            now: the event loop's current time.

        Returns:
            The restart's 1-based number within the window (which sets the backoff), or None
            when ``max_restarts`` were already spent in the window (the caller escalates).
        """
        times = self._times
        if times is None:
            times = self._times = []
        while times and times[0] < now - self.policy.window_s:
            del times[0]
        if len(times) >= self.policy.max_restarts:
            return None
        times.append(now)
        return len(times)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Backoff:
    """A sleep that ``interrupt()`` can end early (a stop request must not wait it out).

    Args:
        loop: the running event loop.
    """

    __slots__ = ("_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    async def sleep(self, delay: float) -> None:
        """Wait ``delay`` seconds, or less if interrupted."""
        if delay <= 0:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        handle = self._loop.call_later(delay, _resolve, waiter)
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None
            handle.cancel()

    def interrupt(self) -> None:
        """End the current sleep now, if one is in progress."""
        if self._waiter is not None:
            _resolve(self._waiter)
