"""Many deadlines on one loop timer.

A loop timer (``loop.call_later``) costs ~800 bytes on uvloop (its handle, a libuv timer and
their arguments). A node arms one for every connection that waits for something far away (its
token's expiry), so 10,000 idle connections held 8 MB of timers. :class:`Deadlines` keeps its
deadlines in a heap (~150 bytes each) and arms one loop timer for the earliest.

Callbacks run in deadline order (ties in the order they were added), from the loop, as
``loop.call_later`` would run them; one that raises goes to the loop's exception handler and
the others still run. A cancelled deadline stays in the heap until it comes up or the heap is
compacted (when most of it is cancelled).

Example:
    deadlines = Deadlines()
    handle = deadlines.call_later(3600.0, on_expiry, "alice")
    handle.cancel()
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any

__all__ = ["Deadline", "Deadlines"]

# A loop timer may fire this much before its time (asyncio's clock resolution; libuv counts
# milliseconds): the deadlines that close are due too, or the timer would be re-armed for them
# over and over.
_EARLY_S = 0.001
# Compacted when more than this many cancelled deadlines wait, and they are a quarter of the
# heap or more (the pattern of connections: a connect deadline cancelled, an expiry kept, which
# leaves half the heap dead for good with a "most of it" rule). Each compaction is paid for by
# a third of the live ones having been cancelled since.
_COMPACT_AFTER = 64


class Deadline:
    """One deadline of :class:`Deadlines` (like an ``asyncio.TimerHandle``)."""

    __slots__ = ("args", "fn", "owner", "seq", "when")

    def __init__(self, owner: Deadlines, when: float, seq: int,
                 fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.owner = owner
        self.when = when
        self.seq = seq
        self.fn: Callable[..., object] | None = fn
        self.args = args

    def __lt__(self, other: Deadline) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)

    def cancel(self) -> None:
        """The callback will not run (nothing happens if it ran or was cancelled already)."""
        if self.fn is not None:
            self.fn = None
            self.args = ()
            self.owner._cancelled()

    def cancelled(self) -> bool:
        """True once cancelled, or once its callback ran."""
        return self.fn is None


class Deadlines:
    """Deadlines of one event loop (the running one at first use unless given), on one loop
    timer at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._heap: list[Deadline] = []
        self._seq = itertools.count()
        self._dead = 0  # cancelled deadlines still in the heap
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None

    def __len__(self) -> int:
        """Deadlines that will still run."""
        return len(self._heap) - self._dead

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> Deadline:
        """Run ``fn(*args)`` in ``delay`` seconds (from the loop)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = Deadline(self, loop.time() + max(0.0, delay), next(self._seq), fn, args)
        heapq.heappush(self._heap, deadline)
        if self._armed_at is None or deadline.when < self._armed_at:
            self._arm(deadline.when)
        return deadline

    def close(self) -> None:
        """Cancel every deadline and the loop timer."""
        for deadline in self._heap:
            deadline.fn, deadline.args = None, ()
        self._heap.clear()
        self._dead = 0
        self._disarm()

    def _cancelled(self) -> None:
        self._dead += 1
        heap = self._heap
        if self._dead > _COMPACT_AFTER and self._dead * 4 >= len(heap):
            self._heap = [d for d in heap if d.fn is not None]
            heapq.heapify(self._heap)
            self._dead = 0
            if not self._heap:
                self._disarm()

    def _arm(self, when: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = when
        self._timer = self._loop.call_at(when, self._run)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._armed_at = None

    def _run(self) -> None:
        self._timer = self._armed_at = None
        loop = self._loop
        assert loop is not None
        now = loop.time() + _EARLY_S
        # self._heap each time: a callback may add or cancel deadlines (and compact the heap).
        while self._heap and self._heap[0].when <= now:
            deadline = heapq.heappop(self._heap)
            fn, args = deadline.fn, deadline.args
            if fn is None:
                self._dead -= 1
                continue
            deadline.fn, deadline.args = None, ()
            try:
                fn(*args)
            except Exception as exc:  # as the loop treats a timer's callback
                loop.call_exception_handler({
                    "message": f"Exception in deadline callback {fn!r}",
                    "exception": exc,
                })
        heap = self._heap
        if heap and (self._armed_at is None or heap[0].when < self._armed_at):
            self._arm(heap[0].when)
