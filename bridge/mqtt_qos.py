"""QoS 1 downlinks of one MQTT session: packet ids, the in-flight window, cursors. Pure.

A device's QoS 1 subscriptions share one window of at most ``window`` unacknowledged
PUBLISHes (``mqtt_inflight``). Room events are offered in seq order; beyond the window they
wait, in order. Each room has:

* ``cursor``: the last seq the device acknowledged *in order* (every earlier one it was sent is
  acknowledged too): where a resumed session starts again;
* ``sent``: the highest seq written to the device: on a resume, what lies in
  ``(cursor, sent]`` is sent again with DUP set (MQTT 3.1.1, 4.4).

The packet id of an event is derived from its seq (``seq % 65535 + 1``), so a resumed session
on any node resends an unacknowledged message with its original packet id without storing it.
Two messages in flight cannot share an id: a message whose id is in use waits at the head of
the queue until that one is acknowledged (it would take 65535 seqs between two messages of one
window).

Retained messages (a state room's current values, sent on SUBSCRIBE) have seqs but do not move
cursors: they are sent once (and not again after a reconnect).

``bridge.mqtt_session`` feeds it and writes what it returns.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["Outgoing", "QosWindow", "RoomTrack", "packet_id_of"]


def packet_id_of(seq: int) -> int:
    """The packet id of the QoS 1 PUBLISH of event ``seq`` (1..65535)."""
    return seq % 0xFFFF + 1


@dataclass(slots=True)
class Outgoing:
    """One QoS 1 PUBLISH to write.

    Attributes:
        room: Its room (the topic is ``rooms/<room>``).
        seq: The event's seq.
        payload: The PUBLISH payload.
        retain: A retained message (a state room's value): moves no cursor.
        dup: Sent before (DUP flag).
    """

    room: str
    seq: int
    payload: bytes
    retain: bool = False
    dup: bool = False

    @property
    def packet_id(self) -> int:
        return packet_id_of(self.seq)


@dataclass(slots=True)
class RoomTrack:
    """One room's position: see the module's docstring."""

    cursor: int = 0
    sent: int = 0
    offered: int = 0  # the highest seq offered (sent or waiting): later offers must be above
    dup_upto: int = 0  # seqs up to this one were sent on an earlier connection
    # ``sent`` may be behind what an earlier connection sent (its session was taken without its
    # last state), until the resume has read the room's last seq: kept with the session.
    behind: bool = False
    # Seqs written and not yet acknowledged, in order, each with its acknowledged flag.
    pending: deque[list[int]] = field(default_factory=deque)


class QosWindow:
    """The QoS 1 window of one session.

    Args:
        window: At most this many PUBLISHes unacknowledged.

    Attributes:
        rooms: The tracked rooms.
        changed: Cursors or sent marks moved since the caller last cleared it (persist them).
        waiting_bytes: Payload bytes waiting beyond the window.
    """

    def __init__(self, window: int) -> None:
        self.window = max(1, window)
        self.rooms: dict[str, RoomTrack] = {}
        self.inflight: dict[int, Outgoing] = {}
        self.waiting: deque[Outgoing] = deque()
        self.waiting_bytes = 0
        self.changed = False

    def track(self, room: str, cursor: int, sent: int = 0) -> RoomTrack:
        """Start (or restart) tracking ``room`` from ``cursor``; seqs up to ``sent`` were
        sent before (they go again with DUP)."""
        track = self.rooms.get(room)
        if track is None:
            track = self.rooms[room] = RoomTrack()
        track.cursor = track.offered = cursor
        track.sent = max(cursor, sent)
        track.dup_upto = sent
        track.behind = False
        track.pending.clear()
        return track

    def untrack(self, room: str) -> None:
        """Forget ``room`` (unsubscribed): its waiting messages are dropped; its in-flight ones
        may still be acknowledged."""
        self.rooms.pop(room, None)
        kept = deque(m for m in self.waiting if m.room != room or m.retain)
        self.waiting = kept
        self.waiting_bytes = sum(len(m.payload) for m in kept)
        self.changed = True

    def offer(self, room: str, seq: int, payload: bytes) -> list[Outgoing]:
        """An event of ``room``, in seq order. Returns what to write now (maybe nothing: it
        waits beyond the window, or is not above what was offered before: dropped)."""
        track = self.rooms.get(room)
        if track is None or seq <= track.offered:
            return []
        track.offered = seq
        self.waiting.append(Outgoing(room, seq, payload, dup=seq <= track.dup_upto))
        self.waiting_bytes += len(payload)
        return self.pump()

    def offer_retained(self, room: str, seq: int, payload: bytes) -> list[Outgoing]:
        """A retained value of ``room`` (sent on SUBSCRIBE, before the room's events)."""
        self.waiting.append(Outgoing(room, seq, payload, retain=True))
        self.waiting_bytes += len(payload)
        return self.pump()

    def ack(self, packet_id: int) -> list[Outgoing]:
        """The device's PUBACK. Returns what the freed slot lets go now. An unknown id (a
        duplicate ack, or one of an earlier connection) changes nothing else."""
        msg = self.inflight.pop(packet_id, None)
        if msg is None:
            return []
        if not msg.retain:
            track = self.rooms.get(msg.room)
            if track is not None:
                pending = track.pending
                for entry in pending:
                    if entry[0] == msg.seq:
                        entry[1] = 1
                        break
                moved = False
                while pending and pending[0][1]:
                    track.cursor = max(track.cursor, pending.popleft()[0])
                    moved = True
                if moved:
                    self.changed = True
        return self.pump()

    def pump(self) -> list[Outgoing]:
        """Move waiting messages into the window, in order, while it has room."""
        out: list[Outgoing] = []
        waiting, inflight = self.waiting, self.inflight
        while waiting and len(inflight) < self.window:
            head = waiting[0]
            pid = head.packet_id
            if pid in inflight:
                break  # its id is in use (65535 seqs apart): it waits, and so does the rest
            waiting.popleft()
            self.waiting_bytes -= len(head.payload)
            inflight[pid] = head
            if not head.retain:
                track = self.rooms.get(head.room)
                if track is None:
                    del inflight[pid]  # unsubscribed meanwhile
                    continue
                track.pending.append([head.seq, 0])
                if head.seq > track.sent:
                    track.sent = head.seq
                    self.changed = True
            out.append(head)
        return out

    def drained(self, low: int) -> bool:
        """Whether at most ``low`` messages wait beyond the window (read the next page)."""
        return len(self.waiting) <= low

    def positions(self) -> tuple[dict[str, int], dict[str, int]]:
        """(cursors, sent marks) of every tracked room, to persist."""
        return ({r: t.cursor for r, t in self.rooms.items()},
                {r: t.sent for r, t in self.rooms.items()})
