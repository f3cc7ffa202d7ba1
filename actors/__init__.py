"""A small asyncio actor runtime: one task per actor, bounded mailboxes, supervision.

See ``docs/actors.md`` for the guide.
"""

from __future__ import annotations

from .actor import Actor, RestartPolicy
from .errors import ActorDeadError, ActorError, AskTimeout, Escalated, MailboxFull
from .lane import Lane
from .mailbox import Overflow
from .ref import ActorRef
from .stats import KindStats
from .system import ActorSystem

__all__ = [
    "Actor",
    "ActorDeadError",
    "ActorError",
    "ActorRef",
    "ActorSystem",
    "AskTimeout",
    "Escalated",
    "KindStats",
    "Lane",
    "MailboxFull",
    "Overflow",
    "RestartPolicy",
]
