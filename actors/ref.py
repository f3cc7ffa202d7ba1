"""ActorRef: the only handle other code holds on an actor."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Generic

from .actor import A
from .errors import AskTimeout
from .mailbox import Envelope

if TYPE_CHECKING:
    from .cell import ActorCell, StoppedCell

__all__ = ["ActorRef"]


class ActorRef(Generic[A]):
    """A reference to a running actor: send it messages, ask it questions, stop it.

    The reference stays the same across restarts (same name, same mailbox), so it is safe to
    keep. Once the actor stops, every ``tell()``/``ask()`` raises ActorDeadError.

    Attributes:
        name: the actor's unique name within its system.
        kind: the actor's ``Actor.kind``.
    """

    __slots__ = ("_cell", "kind", "name")

    def __init__(self, cell: ActorCell) -> None:
        self._cell: ActorCell | StoppedCell = cell
        self.name: str = cell.name
        self.kind: str = cell.kind

    def _rebind(self, cell: StoppedCell) -> None:
        """Point at the stand-in of a terminated actor (called once, by its cell)."""
        self._cell = cell

    @property
    def is_alive(self) -> bool:
        """True while the actor accepts messages (False once stopping or stopped)."""
        return self._cell.is_alive

    @property
    def queued(self) -> int:
        """Number of messages waiting in the mailbox."""
        return self._cell.depth

    async def wait_for_room(self, level: int) -> None:
        """Wait until at most ``level`` messages are queued (flow control for a producer).

        A producer reading from a socket checks ``queued`` before each ``tell()``; at a high
        mark it waits here for a lower ``level`` (hysteresis: one wake-up per many messages
        handled, not one per message), and meanwhile stops reading its socket.

        Args:
            level: the queue depth to wait for; returns at once when already there.

        Raises:
            ActorDeadError: the actor is stopping or stopped, now or while waiting.
        """
        await self._cell.wait_for_room(level)

    def tell(self, message: Any) -> None:
        """Queue a message without waiting.

        Args:
            message: any object; handled later by ``on_receive``.

        Raises:
            ActorDeadError: the actor is stopping or stopped.
            MailboxFull: the mailbox is full and the policy is REJECT.
        """
        self._cell.enqueue(Envelope(message))

    def handle_now(self, message: Any) -> bool:
        """Handle a tell at once, in the caller's step, when the actor is idle and its
        ``receive_now`` takes it; False when it did not (then ``tell`` it).

        For a producer of many messages (a socket reader): a message the actor can handle
        without waiting costs no wake-up of its task. The order of the actor's messages and
        their one-at-a-time handling are those of ``tell``. Never raises: a ``receive_now``
        that raises is a failing tell (the actor recovers or stops, as ``restart`` says).
        """
        return self._cell.handle_now(message)

    # A timeout argument (not asyncio.timeout around the call) because the default must apply
    # to every ask: a caller forgetting a deadline would otherwise wait forever on a stuck actor.
    async def ask(self, message: Any, timeout: float | None = 5.0) -> Any:
        """Send a message and wait for the handler's return value.

        Args:
            message: any object; handled by ``on_receive``.
            timeout: seconds to wait for the reply; None waits without limit.

        Returns:
            Whatever ``on_receive`` returned.

        Raises:
            ActorDeadError: the actor is stopped, or stopped before handling the message
                (Escalated if it stopped by escalation).
            MailboxFull: the mailbox refused the message, or dropped it (DROP_OLDEST).
            AskTimeout: no reply within ``timeout``; the actor still handles the message.
            Exception: whatever the handler raised (the actor keeps running).
        """
        cell = self._cell
        future: asyncio.Future[Any] = cell.loop.create_future()
        cell.enqueue(Envelope(message, future))
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await future
        except TimeoutError:
            # A handler may itself raise TimeoutError: only our own deadline becomes AskTimeout.
            if deadline.expired():
                raise AskTimeout(
                    f"actor {self.name!r} did not reply within {timeout}s to {message!r}"
                ) from None
            raise

    # Not asyncio.timeout(): expiry must cancel the actor's task, not just the waiting caller.
    async def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the actor gracefully and wait until it has fully terminated.

        From the call on, no new message is accepted. Idempotent. Called from inside the
        actor's own handler it only requests the stop (awaiting it there would deadlock).

        Args:
            drain: True handles what is already queued before ``on_stop``; False fails queued
                asks with ActorDeadError and discards queued tells.
            timeout: seconds to wait before cancelling the actor's task; None waits.
        """
        await self._cell.stop(drain=drain, timeout=timeout)

    def __repr__(self) -> str:
        state = "alive" if self.is_alive else "dead"
        return f"<ActorRef {self.name!r} kind={self.kind!r} {state}>"
