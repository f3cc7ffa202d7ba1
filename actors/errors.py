"""Exceptions raised by the actor runtime.

Hierarchy::

    ActorError                  root of everything this package raises
     +-- ActorDeadError         the actor is stopping or stopped: nothing was delivered
     |    +-- Escalated         it stopped because it exceeded its restart budget
     +-- MailboxFull            the mailbox was full and the overflow policy refused the message
     +-- AskTimeout             no reply within the ask timeout (also a ``TimeoutError``)
"""

from __future__ import annotations

__all__ = ["ActorDeadError", "ActorError", "AskTimeout", "Escalated", "MailboxFull"]


class ActorError(Exception):
    """Root of the actor runtime's exceptions."""


class ActorDeadError(ActorError):
    """The target actor is stopping or stopped, so the message was not (or will not be) handled."""


class Escalated(ActorDeadError):
    """The actor failed more often than its RestartPolicy allows and was stopped."""


class MailboxFull(ActorError):
    """The actor's mailbox was full and its overflow policy dropped or refused the message."""


class AskTimeout(ActorError, TimeoutError):
    """No reply arrived within the ask timeout.

    The message itself is not withdrawn: the actor still handles it, and the reply is discarded.
    """
