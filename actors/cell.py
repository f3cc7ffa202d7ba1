"""ActorCell: the runtime behind one ActorRef (task, mailbox, instance, supervision).

Internal module: user code talks to ActorRef and ActorSystem only.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .actor import Actor, RestartPolicy
from .errors import ActorDeadError, ActorError, Escalated, MailboxFull
from .mailbox import Envelope, Mailbox, Overflow
from .ref import ActorRef
from .supervision import Backoff, CellHost, RestartWindow

if TYPE_CHECKING:
    from .stats import KindStats

__all__ = ["ActorCell", "StoppedCell"]

log = logging.getLogger("actors")

#: An actor (without an idle timeout) that had nothing to do for this long rests: its task
#: ends (a task, its coroutines and its future are ~1.5 KB, and a node holds two idle actors
#: per connection), and its next message or a stop starts a new one. Its system looks for
#: them every REST_AFTER_S (one timer for all: see ActorSystem._sweep_rest); an actor with
#: messages closer together than that keeps its task.
REST_AFTER_S = 0.5


class _FailedNow(Envelope):
    """Queued when a message handled at once (:meth:`ActorCell.handle_now`) raised: the task
    takes it as a tell whose handler raised, in order, and recovers or stops the actor."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        super().__init__(None)
        self.error = error


#: The cell's current envelope while a message is handled at once: nothing else runs then.
_NOW = Envelope(None)


class ActorCell:
    """Runs one actor: a single task handling its mailbox one message at a time.

    Args:
        name: unique name in the system.
        instance: the first instance (already built by the system from ``factory``).
        factory: builds fresh instances on restart.
        counters: the KindStats of this actor's kind, updated in place.
        host: the owning system.
        loop: the running event loop.

    Raises:
        ValueError: the actor class declares an invalid mailbox_size, batch_size or
            idle_timeout_s.
    """

    # Two cells per idle connection (its own and its personal room's): no __dict__.
    __slots__ = (
        "__weakref__",
        "_backoff",
        "_batch_size",
        "_capacity",
        "_closed",
        "_context",
        "_counters",
        "_current",
        "_dead_cls",
        "_dead_msg",
        "_factory",
        "_host",
        "_idle_since",
        "_idle_timeout",
        "_instance",
        "_mailbox",
        "_overflow_policy",
        "_rest_due",
        "_restarts",
        "_resting",
        "_room_waiters",
        "_started",
        "_task",
        "_terminated",
        "kind",
        "loop",
        "name",
        "ref",
    )

    def __init__(
        self,
        *,
        name: str,
        instance: Actor,
        factory: Callable[[], Actor],
        counters: KindStats,
        host: CellHost,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        cls = type(instance)
        if cls.mailbox_size < 1:
            raise ValueError(f"{cls.__name__}.mailbox_size must be >= 1")
        if cls.batch_size < 1:
            raise ValueError(f"{cls.__name__}.batch_size must be >= 1")
        if cls.idle_timeout_s is not None and cls.idle_timeout_s <= 0:
            raise ValueError(f"{cls.__name__}.idle_timeout_s must be > 0 or None")
        self.name = name
        self.kind = cls.kind
        self.loop = loop
        # Configuration is frozen at spawn so a restart cannot change the mailbox's contract.
        self._capacity = cls.mailbox_size
        self._overflow_policy = cls.on_overflow
        self._batch_size = cls.batch_size
        self._restarts = None if cls.restart is None else RestartWindow(cls.restart)
        self._idle_timeout = cls.idle_timeout_s
        # Only a restart calls it again: an actor that never restarts keeps none (a closure
        # over the instance is ~0.2 KB, per connection).
        self._factory = factory if self._restarts is not None else None
        self._counters = counters
        self._host = host
        self._mailbox = Mailbox(loop)
        self._instance = instance
        self._started = False  # on_start of the current instance completed (so on_stop is due)
        self._closed = False  # no longer accepting messages
        self._terminated = False
        self._dead_cls: type[ActorDeadError] = ActorDeadError
        self._dead_msg: str | None = None  # "actor <name> stopped", made when first needed
        self._current: Envelope | None = None
        # Producers parked in wait_for_room(): (level, future), woken once depth <= level.
        # Producers waiting for room in the mailbox; None while none waits (most never do).
        self._room_waiters: list[tuple[int, asyncio.Future[None]]] | None = None
        self._backoff: Backoff | None = None  # made at the first restart
        self._task: asyncio.Task[None] | None = None
        # Resting: no task until the next message (REST_AFTER_S); its tasks share a context.
        self._resting = False
        self._rest_due = False  # the waiting task is woken to end: it rests
        self._idle_since = 0.0
        self._context: contextvars.Context | None = None
        self.ref: ActorRef[Any] = ActorRef(self)
        instance.ref = self.ref

    # -- public to the package ------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        """True while the actor accepts messages."""
        return not self._closed

    @property
    def depth(self) -> int:
        """Number of queued messages."""
        return len(self._mailbox)

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The actor's task: None before ``start()`` and while the actor rests."""
        return self._task

    def start(self) -> None:
        """Create the actor's task."""
        # Every task of the actor runs in the context of its spawner, as one long task would
        # (not in the context of whoever's message wakes it from rest).
        self._context = contextvars.copy_context()
        self._run(self._main(boot=True))

    def _run(self, coro: Any) -> None:
        self._task = self.loop.create_task(coro, name=f"actor[{self.name}]",
                                           context=self._context)
        # Safety net: a task cancelled before its first step never runs _main's finally.
        self._task.add_done_callback(self._task_done)  # a bound method: no closure per actor

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task is not self._task:
            return
        if self._resting:
            # A done task keeps its coroutine and name (~500 bytes): a resting actor holds
            # none, and a message or a stop gives it a new one.
            self._task = None
        else:
            self._finalize()

    def _wake(self) -> None:
        """A resting actor gets a task again (a message came, or a stop)."""
        self._resting = False
        self._run(self._main(boot=False))

    def rest_if_idle(self, now: float) -> bool | None:
        """For the system's sweep: tell a task waiting since REST_AFTER_S ago to end (True),
        say it is not due yet (False), or that it is no longer waiting (None)."""
        if self._closed or self._resting or not self._mailbox.waiting or self._mailbox:
            return None
        if now - self._idle_since < REST_AFTER_S:
            return False
        self._rest_due = True
        self._mailbox.wake()
        return True

    def enqueue(self, envelope: Envelope) -> None:
        """Queue an envelope, applying the overflow policy when the mailbox is full.

        Raises:
            ActorDeadError: the actor is stopping or stopped.
            MailboxFull: the policy refused the message.
        """
        if self._closed:
            raise self._dead_error()
        mailbox = self._mailbox
        if len(mailbox) >= self._capacity:
            self._overflow(envelope)
            return
        mailbox.put(envelope)
        if self._resting:
            self._wake()

    def handle_now(self, message: Any) -> bool:
        """Handle a tell at once, in the caller's step, if the actor would take it next anyway
        and need not wait to handle it; False when it was not handled (then ``tell`` it).

        It is handled when the actor is idle (its task waits for a message, or it rests), its
        mailbox is empty, it has no idle timeout, and its instance's ``receive_now`` takes it
        (returns True), in the actor's context as its task would. Nothing of the actor runs
        meanwhile, so the order of its messages and their one-at-a-time handling hold as for a
        tell; no task wakes for it. A ``receive_now`` that raises is a failing tell: the task
        recovers or stops the actor before it handles anything told after.
        """
        mailbox = self._mailbox
        context = self._context
        if (self._current is not None or self._closed or mailbox or not self._started
                or self._idle_timeout is not None or not (self._resting or mailbox.waiting)
                or context is None):
            return False
        self._current = _NOW
        try:
            taken = context.run(self._instance.receive_now, message)
        except Exception as exc:
            self._counters.handled += 1
            mailbox.put(_FailedNow(exc))  # wakes a waiting task
            if self._resting:
                self._wake()
            return True
        finally:
            self._current = None
        if taken:
            self._counters.handled += 1
        return taken

    async def wait_for_room(self, level: int) -> None:
        """Wait until at most ``level`` messages are queued.

        Raises:
            ActorDeadError: the actor is stopping or stopped (also when it stops meanwhile).
        """
        if self._closed:
            raise self._dead_error()
        if len(self._mailbox) <= level:
            return
        future: asyncio.Future[None] = self.loop.create_future()
        waiter = (level, future)
        if self._room_waiters is None:
            self._room_waiters = []
        self._room_waiters.append(waiter)
        try:
            await future
        finally:
            waiters = self._room_waiters
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    self._room_waiters = None

    def request_stop(self, *, drain: bool) -> None:
        """Stop accepting messages and make the task wind down (does not wait)."""
        if self._terminated:
            return
        self._close()
        if not drain:
            self._fail_pending()
        self._mailbox.wake()
        if self._resting:
            self._wake()  # its task runs on_stop
        # A stop request cuts a restart backoff short: waiting it out would only delay the stop.
        if self._backoff is not None:
            self._backoff.interrupt()

    # The timeout is part of the public API (it triggers a cancel, not just an error).
    async def stop(self, *, drain: bool, timeout: float | None) -> None:
        """Request a stop and wait for termination, cancelling the task after ``timeout``."""
        self.request_stop(drain=drain)
        task = self._task
        if task is None or task.done():
            return
        if task is asyncio.current_task():
            # Called from the actor's own handler: the loop exits once the handler returns.
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            log.warning("actor %s did not stop within %ss; cancelling it", self.name, timeout)
            task.cancel()
            await asyncio.wait({task})

    # -- overflow and shutdown helpers ----------------------------------------------------

    def _overflow(self, envelope: Envelope) -> None:
        self._counters.overflows += 1
        policy = self._overflow_policy
        if policy is Overflow.DROP_OLDEST:
            dropped = self._mailbox.popleft()
            self._mailbox.put(envelope)
            future = dropped.future
            if future is not None and not future.done():
                future.set_exception(
                    MailboxFull(f"mailbox of actor {self.name!r} overflowed; ask was dropped")
                )
            log.debug("actor %s: mailbox full, dropped oldest message", self.name)
            return
        if policy is Overflow.CALLBACK:
            try:
                self._instance.on_mailbox_full(envelope.message)
            except Exception:
                # The sender is an innocent party: a broken hook must not blow up its tell().
                log.exception("actor %s: on_mailbox_full raised", self.name)
            if envelope.future is None:
                return
        raise MailboxFull(f"mailbox of actor {self.name!r} is full ({self._capacity} messages)")

    def _dead_error(self) -> ActorDeadError:
        # A fresh instance each time: sharing one exception across futures mixes tracebacks.
        return self._dead_cls(self._stopped_msg())

    def _stopped_msg(self) -> str:
        if self._dead_msg is None:
            self._dead_msg = f"actor {self.name!r} stopped"
        return self._dead_msg

    def _mark_dead(self, cls: type[ActorDeadError], reason: str) -> None:
        self._dead_cls = cls
        self._dead_msg = f"actor {self.name!r} stopped{reason}"

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A producer waiting for room would otherwise wait forever: nothing is taken any more.
        self._wake_room_waiters()
        # Synchronous, in the same loop step as the decision: a get_or_spawn right after
        # this creates a fresh actor instead of returning one that is going away.
        self._host._cell_closed(self)

    def _wake_room_waiters(self) -> None:
        waiters = self._room_waiters
        if not waiters:
            return
        depth = len(self._mailbox)
        for waiter in list(waiters):
            level, future = waiter
            if self._closed or depth <= level:
                waiters.remove(waiter)
                if not future.done():
                    if self._closed:
                        future.set_exception(self._dead_error())
                    else:
                        future.set_result(None)

    def _fail_pending(self) -> None:
        dropped_tells = 0
        for envelope in self._mailbox.drain():
            future = envelope.future
            if future is None:
                dropped_tells += 1
                if type(envelope) is not _FailedNow:
                    # Its sender may wait on what it asked for (a room's join): the actor
                    # says what a tell it will never handle means.
                    try:
                        self._instance.on_undelivered(envelope.message)
                    except Exception:
                        log.exception("actor %s: on_undelivered raised", self.name)
            elif not future.done():
                future.set_exception(self._dead_error())
        if dropped_tells:
            log.debug("actor %s: discarded %d queued tell(s)", self.name, dropped_tells)

    def _finalize(self) -> None:
        if self._terminated:
            return
        self._close()
        current = self._current
        if current is not None and current.future is not None and not current.future.done():
            current.future.set_exception(self._dead_error())
        self._fail_pending()
        self._terminated = True
        self._host._cell_terminated(self)
        # The ref outlives the cell (callers keep it): pointing it at a small stand-in breaks
        # the ref <-> cell cycle, so refcounting frees the cell, its instance and its mailbox
        # at once instead of leaving them to a full garbage collection.
        self.ref._rebind(StoppedCell(self, self._dead_cls, self._stopped_msg()))

    def _own_cancel(self) -> bool:
        # Distinguishes "our task is being cancelled" from a CancelledError that a handler
        # merely let escape (e.g. it awaited a future someone else cancelled).
        task = self._task
        return task is not None and task.cancelling() > 0

    async def _guard(self, hook: str, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            if self._own_cancel():
                raise
            log.error("actor %s: %s was cancelled", self.name, hook)
        except Exception:
            log.exception("actor %s: %s raised", self.name, hook)

    # -- the task -------------------------------------------------------------------------

    async def _main(self, boot: bool) -> None:
        try:
            if not boot or await self._boot():
                if await self._process():
                    return  # resting: the actor lives on without a task
            self._close()
            self._fail_pending()
            await self._stop_instance()
        except asyncio.CancelledError:
            log.warning("actor %s was cancelled before it stopped", self.name)
            raise
        except Exception:
            # Defensive: hooks are guarded, so this would be a bug in the runtime itself.
            log.exception("actor %s: internal error in the actor runtime", self.name)
        finally:
            if not self._resting:
                self._finalize()

    async def _boot(self) -> bool:
        error = await self._start_instance()
        if error is None:
            return True
        return await self._recover(error, "on_start")

    async def _start_instance(self) -> BaseException | None:
        try:
            await self._instance.on_start()
        except asyncio.CancelledError as exc:
            if self._own_cancel():
                raise
            return exc
        except Exception as exc:
            return exc
        self._started = True
        return None

    async def _stop_instance(self) -> None:
        if not self._started:
            return
        self._started = False
        await self._guard("on_stop", self._instance.on_stop())

    async def _process(self) -> bool:
        """Handle messages until the actor stops (False) or rests (True: see REST_AFTER_S)."""
        mailbox = self._mailbox
        batch_size = self._batch_size
        loop = self.loop
        while True:
            if not mailbox:
                if self._closed:
                    return False
                if self._idle_timeout is not None:  # it passivates instead of resting
                    if not await mailbox.wait(self._idle_timeout) and self._try_passivate():
                        return False
                    continue
                self._idle_since = loop.time()
                self._host._cell_idle(self)
                await mailbox.wait()
                if self._rest_due:
                    self._rest_due = False
                    if not mailbox and not self._closed:
                        self._resting = True
                        return True
                continue
            handled = 0
            while mailbox and handled < batch_size:
                envelope = mailbox.popleft()
                handled += 1
                if self._room_waiters:  # one falsy check per message when nobody waits
                    self._wake_room_waiters()
                if type(envelope) is _FailedNow:
                    error: BaseException | None = envelope.error
                else:
                    error = await self._handle(envelope)
                if error is not None and not await self._recover(error, "on_receive"):
                    return False
            if handled >= batch_size:
                # Fairness: a busy actor must not starve the rest of the loop.
                await asyncio.sleep(0)

    async def _handle(self, envelope: Envelope) -> BaseException | None:
        """Run the handler; return the exception only when a tell failed."""
        self._current = envelope
        future = envelope.future
        error: BaseException
        try:
            result = await self._instance.on_receive(envelope.message)
        except asyncio.CancelledError as exc:
            if self._own_cancel():
                raise
            error = exc
        except Exception as exc:
            error = exc
        else:
            self._counters.handled += 1
            if future is not None and not future.done():
                future.set_result(result)
            return None
        finally:
            self._current = None
        self._counters.handled += 1
        if future is None:
            return error
        if not future.done():
            if isinstance(error, asyncio.CancelledError):
                # Delivered as-is, it would look to the asker as if *it* had been cancelled.
                wrapped = ActorError(f"handler of actor {self.name!r} was cancelled")
                wrapped.__cause__ = error
                error = wrapped
            future.set_exception(error)
        return None

    def _try_passivate(self) -> bool:
        if self._mailbox or self._closed:
            return False
        try:
            allowed = self._instance.can_passivate()
        except Exception:
            log.exception("actor %s: can_passivate raised; staying alive", self.name)
            return False
        if not allowed:
            return False
        log.debug("actor %s passivated after %ss idle", self.name, self._idle_timeout)
        self._mark_dead(ActorDeadError, " (passivated)")
        self._close()
        return True

    # -- supervision ----------------------------------------------------------------------

    async def _report_failure(
        self, error: BaseException, during: str, instance: Actor | None
    ) -> None:
        self._counters.failures += 1
        if self._routine(error):
            # While stopping, the outside world going away first (a store closed under a
            # start) is part of the stop, not news.
            log.log(logging.INFO if self._closed else logging.WARNING,
                    "actor %s failed in %s: %r", self.name, during, error)
        else:
            log.error("actor %s failed in %s: %r", self.name, during, error, exc_info=error)
        if instance is not None:
            await self._guard("on_failure", instance.on_failure(error))

    async def _recover(self, error: BaseException, during: str) -> bool:
        """Handle a failure of the current instance; True once a fresh instance runs."""
        await self._report_failure(error, during, self._instance)
        while True:
            attempt = self._admit_restart(error)
            if attempt is None:
                return False
            await self._stop_instance()
            assert self._restarts is not None  # _admit_restart returns None without a policy
            if not self._closed:
                if self._backoff is None:
                    self._backoff = Backoff(self.loop)
                await self._backoff.sleep(self._restarts.policy.backoff(attempt))
            if self._closed and not self._mailbox:
                # Stopped during the backoff with nothing left to drain: no point restarting.
                return False
            try:
                assert self._factory is not None  # kept whenever there is a restart policy
                instance = self._factory()
            except Exception as exc:
                error = exc
                await self._report_failure(exc, "factory", None)
                continue
            instance.ref = self.ref
            self._instance = instance
            start_error = await self._start_instance()
            if start_error is None:
                log.info("actor %s restarted (restart %d in window)", self.name, attempt)
                return True
            error = start_error
            await self._report_failure(error, "on_start", instance)
            if self._closed:
                # Stopping: a restart follows at once (no backoff while stopping), and one
                # that cannot start either will not drain the mailbox: trying again and again
                # would only end in an escalation, logged as an error of a clean stop.
                self._mark_dead(ActorDeadError, f" while stopping: its restart failed ({error!r})")
                return False

    def _admit_restart(self, error: BaseException) -> int | None:
        """Return the restart number within the window, or None when the actor must stop."""
        if self._restarts is None:
            self._mark_dead(ActorDeadError, f" after a failure: {error!r}")
            self._close()
            return None
        attempt = self._restarts.admit(self.loop.time())
        if attempt is None:
            self._escalate(error, self._restarts.policy)
            return None
        self._counters.restarts += 1
        return attempt

    def _routine(self, error: BaseException) -> bool:
        """Whether ``error`` is one of the actor's ``routine_failures`` (no traceback)."""
        return isinstance(error, type(self._instance).routine_failures)

    def _escalate(self, error: BaseException, policy: RestartPolicy) -> None:
        log.error(
            "actor %s exceeded %s restarts within %ss; escalating (%r)",
            self.name,
            policy.max_restarts,
            policy.window_s,
            error,
            exc_info=None if self._routine(error) else error,
        )
        self._counters.escalations += 1
        self._mark_dead(
            Escalated,
            f": escalated after {policy.max_restarts} restarts within {policy.window_s}s"
            f" ({error!r})",
        )
        self._close()
        self._host._cell_escalated(self, error)


class StoppedCell:
    """What an ActorRef points at once its actor has terminated: it refuses everything.

    Behaves exactly as the terminated ActorCell did (each refusal raises a fresh
    ActorDeadError, or Escalated, with the same message), without keeping the cell alive.
    """

    __slots__ = ("_dead_cls", "_dead_msg", "kind", "loop", "name")

    def __init__(self, cell: ActorCell, dead_cls: type[ActorDeadError], dead_msg: str) -> None:
        # Copies only: holding the cell itself would keep it (and its instance) alive.
        self.name = cell.name
        self.kind = cell.kind
        self.loop = cell.loop
        self._dead_cls = dead_cls
        self._dead_msg = dead_msg

    @property
    def is_alive(self) -> bool:
        """Always False."""
        return False

    @property
    def depth(self) -> int:
        """Always 0: a terminated actor's mailbox was emptied."""
        return 0

    def handle_now(self, message: Any) -> bool:
        """Never: ``tell`` says why."""
        return False

    def enqueue(self, envelope: Envelope) -> None:
        """Refuse the envelope.

        Raises:
            ActorDeadError: always.
        """
        raise self._dead_error()

    def _dead_error(self) -> ActorDeadError:
        # A fresh instance each time, as ActorCell does.
        return self._dead_cls(self._dead_msg)

    async def wait_for_room(self, level: int) -> None:
        """Refuse to wait.

        Raises:
            ActorDeadError: always.
        """
        raise self._dead_error()

    async def stop(self, *, drain: bool, timeout: float | None) -> None:
        """Nothing to do: the actor has already terminated."""
