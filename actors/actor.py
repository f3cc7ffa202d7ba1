"""The Actor base class and the restart policy an actor kind declares."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .mailbox import Overflow

if TYPE_CHECKING:
    from .ref import ActorRef

__all__ = ["A", "Actor", "RestartPolicy"]

log = logging.getLogger("actors")


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How an actor kind recovers from a failing tell handler or on_start.

    Attributes:
        max_restarts: restarts allowed within ``window_s``; one more failure escalates.
        window_s: length of the sliding window in which restarts are counted.
        min_backoff_s: delay before the first restart of a window; doubles with each
            further restart in the window.
        max_backoff_s: cap on that delay.
    """

    max_restarts: int = 5
    window_s: float = 60.0
    min_backoff_s: float = 0.1
    max_backoff_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        if self.window_s <= 0:
            raise ValueError("window_s must be > 0")
        if not 0 <= self.min_backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 <= min_backoff_s <= max_backoff_s")

    def backoff(self, attempt: int) -> float:
        """Delay before restart number ``attempt`` (1-based) of the current window.

        Args:
            attempt: 1 for the first restart in the window, 2 for the second, ...

        Returns:
            ``min_backoff_s * 2 ** (attempt - 1)``, capped at ``max_backoff_s``.
        """
        # The exponent is clamped so a huge attempt number cannot overflow the float.
        exponent = min(max(attempt - 1, 0), 64)
        return float(min(self.min_backoff_s * 2.0**exponent, self.max_backoff_s))


class Actor:
    """Base class of all actors: subclass it and override the hooks you need.

    The class attributes below are read once, from the first instance, when the actor is
    spawned; they configure the actor's mailbox and supervision for its whole life.

    Attributes:
        kind: label used for auto-generated names (``"<kind>-<n>"``) and for stats.
        mailbox_size: maximum number of queued messages (tells and asks together).
        on_overflow: what to do with a message arriving at a full mailbox.
        batch_size: messages handled per wake-up before yielding to the event loop.
        restart: None stops the actor on a tell failure; a RestartPolicy restarts it.
        idle_timeout_s: passivate (stop) after this long without a message; None never.
        routine_failures: exception types that are the outside world's doing, not a bug (a
            store that does not answer in time): a failure of one of them is logged in one
            line at WARNING, without a traceback. It is supervised as any other.
        ref: this actor's own reference, set by the runtime before ``on_start``.
    """

    kind: ClassVar[str] = "actor"
    mailbox_size: ClassVar[int] = 1024
    on_overflow: ClassVar[Overflow] = Overflow.REJECT
    batch_size: ClassVar[int] = 64
    restart: ClassVar[RestartPolicy | None] = None
    idle_timeout_s: ClassVar[float | None] = None
    routine_failures: ClassVar[tuple[type[BaseException], ...]] = ()

    ref: ActorRef[Any]

    # A subclass without __slots__ has a __dict__ as usual; one with them (an actor there are
    # thousands of) lists its own.
    __slots__ = ("ref",)

    async def on_start(self) -> None:
        """Called in the actor's task before the first message is handled.

        Messages told meanwhile are queued. Raising here counts as a failure.
        """

    def receive_now(self, message: Any) -> bool:
        """Handle a message given to ``ActorRef.handle_now``, without waiting, if this actor
        can; return False to have it told instead (then ``on_receive`` handles it).

        Called only while nothing else of the actor runs. Raising counts as a failing tell.
        """
        return False

    async def on_receive(self, message: Any) -> Any:
        """Handle one message; the return value is the reply to an ``ask()``.

        Args:
            message: whatever was passed to ``tell()`` or ``ask()``.

        Returns:
            The reply (ignored for a tell).
        """
        log.warning("actor %s: unhandled message %r", self.ref.name, message)
        return None

    async def on_stop(self) -> None:
        """Called once when this instance stops (also before a restart replaces it).

        Not called for an instance whose ``on_start`` failed, nor after a forced cancel.
        """

    async def on_failure(self, exc: BaseException) -> None:
        """Called when a tell handler (or ``on_start``) of this instance raised.

        Args:
            exc: the exception. Exceptions raised here are logged and ignored.
        """

    def on_mailbox_full(self, message: Any) -> None:
        """Overflow.CALLBACK hook, run synchronously in the sender's context.

        It must not block (schedule work instead, e.g. a disconnect). The message is dropped.
        During a restart's backoff it runs on the instance being replaced.

        Args:
            message: the message that did not fit.
        """

    def on_undelivered(self, message: Any) -> None:
        """Called for each tell still queued when the actor stops for good without handling
        it (it escalated: no restart left; or it was stopped without draining). Synchronous,
        on the last instance (one whose ``on_start`` failed, after a failed restart); it must
        not block. The message is dropped after it. Queued asks get ActorDeadError instead.

        Args:
            message: the tell that will never be handled.
        """

    def can_passivate(self) -> bool:
        """Return False to veto an idle stop (e.g. a room that still has members)."""
        return True


A = TypeVar("A", bound=Actor)
