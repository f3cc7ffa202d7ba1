"""What a :class:`~node.core.room.RoomActor` is told and shares: its settings, the node-wide
counters, a member's place in it (:class:`Membership`), and the messages a connection or the
node sends it (:class:`Join`, :class:`Leave`, :class:`CheckGap`, :class:`Live`).

``node.core.room`` re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from node.core.outbox import Outbox
from node.core.ports import LiveMessage

__all__ = [
    "CheckGap",
    "Join",
    "Leave",
    "Live",
    "Membership",
    "RoomCounters",
    "RoomSettings",
]


@dataclass(slots=True)  # not frozen: one per read of the NATS connection, built quickly
class Live:
    """Live messages of the room, in stream order: those one read of the connection brought
    (or one the node makes itself, a presence leave of a member whose node died)."""

    messages: list[LiveMessage]


@dataclass(frozen=True, slots=True)
class RoomSettings:
    """Policy of one room, from its namespace."""

    history_size: int = 10000
    recovery_max: int = 10000
    presence: bool = True
    trim_to: int | None = None  # a namespace's history_size below the stream's: trim to it
    idle_s: float = 1.0  # a room without members stops after this long
    state: bool = False  # a state room: a non-silent join gets a ``state`` frame after joined


@dataclass
class RoomCounters:
    """Counters shared by every room of a node (exported as metrics)."""

    delivered: int = 0
    events_in: int = 0
    gap_repairs: int = 0
    replayed: int = 0
    live_dropped: int = 0
    undeliverable: int = 0  # stored messages that are not event maps: skipped
    rooms: int = 0  # room actors running (instances built and not stopped)
    # Store requests made for recovering joins (latest seq, has, count, read pages), and the
    # batches that made them: joins arriving together share one batch (node.core.room_recovery).
    recovery_reads: int = 0
    recovery_batches: int = 0


@dataclass(eq=False, slots=True)
class Membership:
    """One connection's place in one room.

    Created by the connection, owned by the room while joined: only the room writes ``cursor``
    (the last seq delivered). The connection reads it after the room is gone, to rejoin with
    ``since`` when a room actor had to be rebuilt.
    """

    client_id: str
    outbox: Outbox
    # Called by the room, with its name and this member, when the member is out of the room
    # without having left: the room actor stopped under it (its connection rejoins from
    # ``cursor``), or the room refused its join (``refused``).
    on_room_lost: Callable[[str, Membership], None]
    presence: bool = False
    cursor: int = 0
    replaying: bool = False
    # Live frames that arrived during the replay, with the room's per-codec encodings of each:
    # members joining together still cost one encoding per codec per event. A list of its own
    # only while replaying (the room sets one at the join); else the shared empty tuple.
    held: list[tuple[int | None, dict[str, Any], dict[str, bytes]]] | tuple[()] = ()
    # Called by the room, with its name and this member, once the member's position is fixed
    # (its replay read, if any; the room's live feed is subscribed by then): the connection
    # holds its publishes to the room until then, so that a client's own events, sent right
    # after its join, are stored after its position and reach it live. (Arguments rather
    # than a partial holding the member: that would be a reference cycle, left to the
    # garbage collector.)
    on_in_room: Callable[[str, Membership], None] | None = None
    # Set by the room when it handles the member's Leave. A Join may reach the room after its
    # Leave (one that found the mailbox full is told again later, while the Leave is taken at
    # once): a Join of a member that left is ignored, so a Leave is never undone. (A
    # connection makes a new Membership for every join.) Set by the connection too, at once,
    # when the client leaves before the room answered the join: the connection answers it
    # then, and the room answers nothing more for this member.
    left: bool = False
    # Set by the room when it refused this member's join with an error to the client (4500
    # with retry: "join again"): its connection does not rejoin by itself, the client does.
    refused: bool = False
    # Set by the connection for a join without ``since``: lost before its replay ended, it
    # rejoins live, as it began (not from cursor 0, the room's start).
    live: bool = False
    # Set by the connection for a join the client asked for (not silent), with its request id:
    # lost before its replay ended (``joined`` not sent yet), it is rejoined with that id, so
    # that the client still gets its ``joined``.
    announce: bool = False
    request_id: str | int | None = None
    # Set by the room when it sent the join's ``joined``.
    answered: bool = False


@dataclass(frozen=True, slots=True)
class Join:
    """Add a member. The room answers ``joined`` (unless ``silent``) through its outbox.

    Never dropped: a Join that finds the room's mailbox full is told again a moment later;
    one the room cannot take in within ``node.core.room.JOIN_RETRY_S`` is refused (``error``
    4500 with ``retry``, the client joins again; a ``silent`` one is rejoined by its
    connection from where it would have started).
    """

    member: Membership
    since_seq: int | None = None
    since_epoch: str | None = None
    request_id: str | int | None = None
    silent: bool = False
    #: Replay the room's last ``rewind`` stored events, then live (a join without ``since``).
    rewind: int | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    """Remove a member (no reply; the connection answers ``left`` itself).

    Never dropped: one that finds the room's mailbox full is taken at once, in the sender's
    step (a dict removal), so that a member that left gets nothing more.
    """

    member: Membership


@dataclass(frozen=True, slots=True)
class CheckGap:
    """The live feed may have lost events (e.g. after a NATS reconnect): compare with the store
    and read back what is missing, even if no later live event reveals the gap.

    Never dropped: one that finds the room's mailbox full is told again a moment later."""
