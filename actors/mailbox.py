"""The mailbox: a FIFO of envelopes with a wake-up for its single consumer.

The hot path (``put``) is a ``deque.append`` plus, only when the consumer is parked, one
``Future.set_result``: no task, lock or timer is created per message.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import Any

__all__ = ["Envelope", "Mailbox", "Overflow"]


class Overflow(enum.Enum):
    """What happens when a message arrives at a full mailbox.

    Attributes:
        REJECT: ``tell()`` and ``ask()`` raise MailboxFull; the queue is untouched.
        DROP_OLDEST: the oldest queued message is discarded to make room (if it was an ask,
            its caller gets MailboxFull).
        CALLBACK: ``Actor.on_mailbox_full(message)`` is called synchronously in the sender's
            context and the new message is dropped (an ``ask()`` also raises MailboxFull,
            since no reply can ever come).
    """

    REJECT = "reject"
    DROP_OLDEST = "drop_oldest"
    CALLBACK = "callback"


class Envelope:
    """One queued message, with the future of the asker when it is an ask.

    Attributes:
        message: the payload given to ``tell()`` or ``ask()``.
        future: where the reply goes; None for a tell.
    """

    # __slots__ because one envelope is allocated per message on the hot path.
    __slots__ = ("future", "message")

    def __init__(self, message: Any, future: asyncio.Future[Any] | None = None) -> None:
        self.message = message
        self.future = future

    def __repr__(self) -> str:
        kind = "tell" if self.future is None else "ask"
        return f"<Envelope {kind} {self.message!r}>"


def _expire(waiter: asyncio.Future[bool]) -> None:
    # Timer callback: the wait ended by timeout rather than by a message or a wake().
    if not waiter.done():
        waiter.set_result(False)


class Mailbox:
    """An unbounded FIFO of envelopes for exactly one consumer.

    Capacity and overflow are decided by the owner (it knows the policy and the counters);
    the mailbox only queues and wakes.
    """

    __slots__ = ("_loop", "_queue", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # None while empty and parked: an idle actor holds no deque (624 bytes each; a node
        # with 10,000 connections has 20,000 idle actors: theirs and their personal rooms').
        self._queue: deque[Envelope] | None = None
        # Only exists while the consumer is parked in wait(); None means "nobody to wake".
        self._waiter: asyncio.Future[bool] | None = None

    def __len__(self) -> int:
        queue = self._queue
        return 0 if queue is None else len(queue)

    def __bool__(self) -> bool:
        return bool(self._queue)

    @property
    def waiting(self) -> bool:
        """The consumer is parked in :meth:`wait`."""
        return self._waiter is not None

    def put(self, envelope: Envelope) -> None:
        """Append an envelope and wake the consumer if it is parked."""
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        queue.append(envelope)
        if self._waiter is not None:
            self.wake()

    def popleft(self) -> Envelope:
        """Remove and return the oldest envelope (IndexError when empty)."""
        if self._queue is None:
            raise IndexError("pop from an empty mailbox")
        return self._queue.popleft()

    def drain(self) -> list[Envelope]:
        """Remove and return every queued envelope, oldest first."""
        queue = self._queue
        self._queue = None
        return [] if queue is None else list(queue)

    def wake(self) -> None:
        """Wake the parked consumer, if any (also used to signal a stop request)."""
        waiter = self._waiter
        if waiter is not None:
            # Cleared at once so the next put() in the same loop step skips the wake-up.
            self._waiter = None
            if not waiter.done():
                waiter.set_result(True)

    async def wait(self, max_wait_s: float | None = None) -> bool:
        """Park until a message arrives, wake() is called, or ``max_wait_s`` elapses.

        Args:
            max_wait_s: seconds to wait at most; None waits without limit.

        Returns:
            False only when ``max_wait_s`` elapsed; True otherwise (including when messages
            were already queued).
        """
        if self._queue:
            return True
        self._queue = None  # parked: the deque goes until the next put
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._waiter = waiter
        # One timer per idle period, not per message: this is what keeps passivation cheap.
        handle = None if max_wait_s is None else self._loop.call_later(max_wait_s, _expire, waiter)
        try:
            return await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None
            if handle is not None:
                handle.cancel()
