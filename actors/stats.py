"""Per-kind statistics of an actor system."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KindStats"]


@dataclass(slots=True)
class KindStats:
    """Statistics for one actor kind.

    ``actors`` and ``mailbox_depth`` are current values computed when ``stats()`` is called;
    the other fields are cumulative counters for the life of the system.

    Attributes:
        actors: actors of this kind currently alive (accepting messages).
        mailbox_depth: messages currently queued across those actors (not the one in hand).
        handled: messages processed, including those whose handler raised.
        failures: tell-handler, on_start and factory failures (an ask error is not one).
        restarts: restarts performed under a RestartPolicy.
        overflows: messages that met a full mailbox.
        escalations: actors stopped for exceeding their restart budget.
    """

    actors: int = 0
    mailbox_depth: int = 0
    handled: int = 0
    failures: int = 0
    restarts: int = 0
    overflows: int = 0
    escalations: int = 0
