"""``RecoveryBatch``: the recoveries of members of one room that join together, served by one
read of the store (sans I/O).

After a node restart, thousands of clients of a room rejoin with ``since`` within a second or
two. Served one by one, each costs the stream leader three round trips (the room's latest seq,
whether ``since`` is still stored, the replay read and its check) and the node one copy of what
it missed. A batch asks once for the room's latest seq (its ``target``, the same for every
member of the batch), reads once from the lowest ``since`` to ``target`` (starting at that
``since`` itself, so that the read also says whether it is still stored), and gives each member
its slice: an index into the batch's shared events, never a copy.

Memory is bounded per room, not per member: the batch keeps at most ``recovery_max + 1`` events
plus one page (a member that missed more is not recovered anyway), and the read skips ahead past
events no remaining member can use (a member far behind costs one window, as alone).

Usage::

    batch = RecoveryBatch(sinces, target, recovery_max, history_size)
    for since in batch.has_to_ask:
        batch.take_has(since, await store.has(tenant, room, since))
    if batch.count_needed:
        batch.take_count(await store.count(tenant, room))
    while (after := batch.next_read()) is not None:
        batch.take_page(await store.read(tenant, room, after, batch.page, before=target + 1))
    recovered, start = batch.outcome(since)   # its events: batch.events[start:]
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from node.core.ports import StoredEvent

__all__ = ["RECOVERY_PAGE", "RecoveryBatch"]

#: Events per read of a batch: a page of small events is ~100 KB, and one read of 1,000 costs
#: the store about as much as ten of 100.
RECOVERY_PAGE = 1000


def _seq(ev: StoredEvent) -> int:
    return ev.seq


class RecoveryBatch:
    """What one read must fetch for the ``since`` positions of several members, and what each
    of them gets.

    Args:
        sinces: The members' ``since`` seqs (their epochs already checked); repeats are fine.
        target: The room's position for every member of the batch (the stream's latest seq,
            or the room's own when that is higher).
        recovery_max: The most events a recovery replays (more: not recovered).
        history_size: The room's stream limit (0: none), for a ``since`` of 0.
        page: Events per read.
    """

    def __init__(self, sinces: Iterable[int], target: int, recovery_max: int,
                 history_size: int, page: int = RECOVERY_PAGE) -> None:
        self.target = target
        self.recovery_max = recovery_max
        self.history_size = history_size
        self.page = max(1, page)
        distinct = set(sinces)
        # Below target: served by the read. At or above it: nothing to replay, only a check.
        self._below = sorted(s for s in distinct if s < target)
        #: The ``since`` seqs that need ``has`` (beyond target: the read does not cover them).
        self.has_to_ask = sorted(s for s in distinct if s > target)
        #: Whether ``count`` is needed (a member with ``since`` 0 in a room with events).
        self.count_needed = bool(self._below) and self._below[0] == 0
        #: The events read, ascending, at most ``recovery_max + 1 + page`` of them.
        self.events: list[StoredEvent] = []
        self._has: dict[int, bool] = {}
        self._total: int | None = None
        # The next read starts after _after (None: nothing more to read). It starts at the
        # lowest since itself, so that its first event says whether that since is stored.
        self._after: int | None = max(0, self._below[0] - 1) if self._below else None
        # Members whose since is below _floor cannot recover (too far behind).
        self._floor = 0
        self.reads = 0

    def take_has(self, since: int, stored: bool) -> None:
        """The answer of ``store.has`` for one of ``has_to_ask``."""
        self._has[since] = stored

    def take_count(self, total: int) -> None:
        """The answer of ``store.count`` (asked when ``count_needed``)."""
        self._total = total

    def next_read(self) -> int | None:
        """The ``after`` of the next page to read (with ``limit=page``, ``before=target + 1``),
        or None once the read is complete."""
        return self._after

    def take_page(self, events: list[StoredEvent]) -> None:
        """One page read from ``next_read()`` (ascending, complete up to ``page`` events)."""
        self.reads += 1
        self.events.extend(events)
        if len(events) < self.page or events[-1].seq >= self.target:
            self._after = None  # complete up to target
        else:
            self._after = events[-1].seq
        keep = self.recovery_max + 1
        if len(self.events) > keep:
            # A member whose since lies before the window missed at least keep events: it
            # is not recovered, and what only it needed is dropped.
            del self.events[:len(self.events) - keep]
            self._floor = self.events[0].seq
        if self._after is None or self._floor == 0:
            return
        i = bisect_left(self._below, self._floor)
        if i == len(self._below):
            self._after = None  # nobody left who can recover: stop reading
            self.events = []
            return
        nxt = self._below[i]
        if nxt > self._after:
            # Every remaining member is past what has been read: skip to the lowest of them
            # (what lies between is useful to nobody).
            self.events = []
            self._floor = nxt
            self._after = nxt - 1

    def outcome(self, since: int) -> tuple[bool, int]:
        """Whether the member that joined with ``since`` is recovered, and where its events
        start in ``events`` (``len(events)`` when none; always so when not recovered)."""
        none = len(self.events)
        if since >= self.target:
            ok = since in (0, self.target) or self._has.get(since, False)
            return ok, none
        if since == 0:
            total = self._total if self._total is not None else 0
            if self.history_size and total >= self.history_size:
                return False, none  # the room may have been trimmed
        elif since < self._floor:
            return False, none  # more than recovery_max events missed
        else:
            i = bisect_left(self.events, since, key=_seq)
            if i == len(self.events) or self.events[i].seq != since:
                return False, none  # the last event it saw was trimmed: more may have been
        if since < self._floor:
            return False, none
        start = bisect_right(self.events, since, key=_seq)
        if len(self.events) - start > self.recovery_max:
            return False, none
        return True, start
