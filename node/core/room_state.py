"""A state room's values as one :class:`~node.core.room.RoomActor` knows them. Pure: data in,
data out, the caller passes the time.

The room reads the values from the state port once, feeds every event it delivers, and copies
them for each join as of the join's seq (``node.core.room`` says why and when).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

__all__ = ["RoomValues", "apply_value", "with_stored"]


def apply_value(values: dict[str, dict[str, Any]], key: str, value: dict[str, Any]) -> None:
    """Apply one event (as a value, with its ``seq``) to ``values``: only over a lower seq; an
    unset removes the key."""
    held = values.get(key)
    if held is not None and held.get("seq", 0) >= value["seq"]:
        return
    if value.get("unset"):
        values.pop(key, None)
    else:
        values[key] = value


def _apply_in_order(values: dict[str, dict[str, Any]],
                    updates: list[tuple[int, str, dict[str, Any]]],
                    stored: list[dict[str, Any]] | None) -> None:
    """Apply ``updates`` (seq, key, value) and the ``stored`` event frames to ``values`` in seq
    order: an unset removes its key, and forgets its seq (an older value applied after it
    would bring the key back)."""
    for frame in stored or ():
        key, seq = frame.get("key"), frame.get("seq")
        if isinstance(key, str) and type(seq) is int:
            updates.append((seq, key, {k: v for k, v in frame.items() if k != "type"}))
    updates.sort(key=lambda item: item[0])
    for _, key, value in updates:
        apply_value(values, key, value)


def with_stored(read: list[dict[str, Any]], stored: list[dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """A state port's values (``read``) with the ``stored`` event frames applied over them in
    seq order (``node.core.room.stored_lately``: those whose state may not be written yet),
    ordered by key.

    Example:
        values = with_stored(await state.values(t, r), await stored_lately(store, t, r, seq))
    """
    values: dict[str, dict[str, Any]] = {}
    for value in read:
        key, seq = value.get("key"), value.get("seq")
        if isinstance(key, str) and type(seq) is int:
            values[key] = value
    _apply_in_order(values, [], stored)
    return [values[k] for k in sorted(values)]


class RoomValues:
    """The values of one state room, kept by its room actor.

    Args:
        grace_s: How long delivered events are kept for a read that may not hold them yet
            (their state written by another node, a moment after the stream's ack).

    Example:
        values = RoomValues(30.0)
        values.delivered(seq, frame, now)          # every event the room delivers
        need = values.take_read(read, at, room.last_seq, now)  # a read of the state port
        frames = values.upto(joined_seq)           # a join's copy
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        # key -> (time delivered, value), the oldest first.
        self._recent: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._values: dict[str, dict[str, Any]] | None = None
        self.read_at = 0.0

    @property
    def known(self) -> bool:
        """Whether the values were read (until then, a join must wait for a read)."""
        return self._values is not None

    def stale(self, now: float) -> bool:
        """Whether the last read is older than ``grace_s`` (read again, in the background)."""
        return now - self.read_at > self.grace_s

    def delivered(self, seq: int, frame: dict[str, Any], now: float) -> None:
        """Feed one delivered event frame of the room (one with a ``key``)."""
        key = frame.get("key")
        if not isinstance(key, str):
            return
        value = {k: v for k, v in frame.items() if k != "type"}
        value["seq"] = seq
        recent = self._recent
        recent[key] = (now, value)
        recent.move_to_end(key)
        while recent:
            first = next(iter(recent.values()))
            if now - first[0] <= self.grace_s:
                break
            recent.popitem(last=False)
        if self._values is not None:
            apply_value(self._values, key, value)

    def take_read(self, read: list[dict[str, Any]], at: float, last_seq: int,
                  now: float, stored: list[dict[str, Any]] | None = None) -> int | None:
        """Take a read of the state port (asked for at ``at``), with the events delivered
        within ``grace_s`` merged in, and the ``stored`` ones.

        Args:
            read: The port's values.
            at: When the read was asked for.
            last_seq: The room's position (the last seq it delivered).
            now: The time now.
            stored: Event frames (with ``seq``) the room read from the stream up to its
                position, for its first read: the latest events stored before the room
                started, never delivered to it, whose state may still be being written by the
                node that stored them (their publishers not answered yet), so not in ``read``.
                A contiguous range of seqs: an unset among them is applied in its place.

        Returns:
            For the first read, the highest seq it holds: joins must wait until the room has
            delivered it. None for a later read (a refresh), which keeps the room's own value
            of a key whose read value the room has not delivered yet.
        """
        old = self._values
        # A refresh starts from the room's own values: a read never lowers one of them (the
        # bucket never holds a lower seq than an event delivered, except from a replica that
        # is behind: direct gets are answered by any replica), and a key absent from the read
        # but held here was set by an event the room delivered (its unset would have removed it,
        # or comes live, soon).
        values: dict[str, dict[str, Any]] = {} if old is None else dict(old)
        for value in read:
            key, seq = value.get("key"), value.get("seq")
            if not isinstance(key, str) or type(seq) is not int:
                continue
            if old is not None:
                held = values.get(key)
                if seq > last_seq or (held is not None and held["seq"] >= seq):
                    continue  # the newer one comes live, soon; or the room's is as new
            values[key] = value
        _apply_in_order(values, [(value["seq"], key, value) for key, (delivered_at, value)
                                 in self._recent.items() if now - delivered_at <= self.grace_s],
                        stored)
        self._values, self.read_at = values, at
        if old is not None:
            return None
        return max((v["seq"] for v in values.values()), default=0)

    def upto(self, seq: int) -> list[dict[str, Any]]:
        """The values with a seq up to ``seq``, ordered by key (a join's copy)."""
        values = self._values or {}
        return [values[k] for k in sorted(values) if values[k]["seq"] <= seq]
