"""ActorSystem: spawns actors, keeps the name registry, aggregates stats, shuts down."""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from . import cell as _cell
from .actor import A
from .cell import ActorCell
from .errors import ActorError
from .ref import ActorRef
from .stats import KindStats

__all__ = ["ActorSystem"]

log = logging.getLogger("actors")

EscalationHandler = Callable[[ActorRef[Any], BaseException], None]


class ActorSystem:
    """A set of named actors sharing one event loop.

    Args:
        name: label for logs.
        on_escalation: called as ``on_escalation(ref, exc)`` when an actor exceeds its restart
            budget (after it was deregistered, so the handler may spawn a replacement).
            Exceptions it raises are logged.

    Example::

        async with ActorSystem() as system:
            ref = system.spawn(Counter, "counter")
            ref.tell(1)
            print(await ref.ask("total"))
    """

    def __init__(self, *, name: str = "system", on_escalation: EscalationHandler | None = None):
        self.name = name
        self._on_escalation = on_escalation
        # Only actors accepting messages are registered: a stopping actor's name is free again.
        self._registry: dict[str, ActorRef[Any]] = {}
        # Every actor whose task has not finished, registered or not (shutdown waits for them).
        self._cells: set[ActorCell] = set()
        self._counters: dict[str, KindStats] = {}
        # The registered names under each prefix names() was asked for, sorted, kept as actors
        # come and go: a node lists its rooms every second (its stats), and a pass over every
        # actor's name, each connection's too, was ~4% of a connect's instructions.
        self._sorted: dict[str, list[str]] = {}
        self._next_id: dict[str, int] = {}
        self._closed = False
        # Actors whose task waits for a message, looked at every REST_AFTER_S by one timer:
        # those still waiting since then rest (their task ends; see ActorCell).
        self._idle: dict[ActorCell, None] = {}
        self._rest_timer: asyncio.TimerHandle | None = None

    def spawn(self, factory: Callable[[], A], name: str | None = None) -> ActorRef[A]:
        """Build an actor with ``factory()`` and start it.

        Synchronous: the actor is registered before this returns, and its messages can be
        told at once (they are handled after ``on_start``). Must run inside the event loop.

        Args:
            factory: builds an instance; called again for a fresh instance on each restart.
            name: unique name; None picks ``"<kind>-<n>"``.

        Returns:
            The new actor's reference.

        Raises:
            ValueError: ``name`` is taken, or the actor class has an invalid configuration.
            ActorError: the system is shutting down.
            RuntimeError: no running event loop.
        """
        if self._closed:
            raise ActorError(f"actor system {self.name!r} is shut down")
        if name is not None and name in self._registry:
            raise ValueError(f"actor name {name!r} is already taken")
        loop = asyncio.get_running_loop()
        instance = factory()
        kind = type(instance).kind
        if name is None:
            name = self._auto_name(kind)
        elif name in self._registry:
            # The factory itself may have spawned under this name.
            raise ValueError(f"actor name {name!r} is already taken")
        counters = self._counters.get(kind)
        if counters is None:
            counters = KindStats()
        cell = ActorCell(
            name=name, instance=instance, factory=factory, counters=counters, host=self, loop=loop
        )
        # Recorded only once the cell accepted the class's configuration (it may raise).
        self._counters[kind] = counters
        self._registry[name] = cell.ref
        for prefix, names in self._sorted.items():
            if name.startswith(prefix):
                bisect.insort(names, name)
        self._cells.add(cell)
        cell.start()
        log.debug("system %s spawned actor %s", self.name, name)
        return cell.ref

    def compact(self) -> None:
        """Size the tables of actors to the actors there are now: a dict or set keeps the size
        of its peak (10,000 connections' actors: ~1.5 MB) until it grows again."""
        self._registry = dict(self._registry)
        self._cells = set(self._cells)

    def get(self, name: str) -> ActorRef[Any] | None:
        """Return the live actor registered under ``name``, or None."""
        return self._registry.get(name)

    def get_or_spawn(self, name: str, factory: Callable[[], A]) -> ActorRef[A]:
        """Return the actor named ``name``, spawning it with ``factory`` if there is none.

        Synchronous, hence atomic on the event loop: concurrent callers get the same actor
        and the factory runs once.
        """
        ref = self._registry.get(name)
        if ref is not None:
            return ref
        return self.spawn(factory, name)

    def stats(self) -> dict[str, KindStats]:
        """Return a snapshot of the statistics of every kind ever spawned, by kind."""
        snapshot = {
            kind: replace(counters, actors=0, mailbox_depth=0)
            for kind, counters in self._counters.items()
        }
        for cell in self._cells:
            stats = snapshot[cell.kind]
            if cell.is_alive:
                stats.actors += 1
            stats.mailbox_depth += cell.depth
        return snapshot

    def names(self, prefix: str = "") -> list[str]:
        """The names of the registered actors that start with ``prefix``, sorted.

        The first call for a prefix goes over every name; from then on the system keeps that
        prefix's names sorted as actors are spawned and stop, and a call copies them."""
        names = self._sorted.get(prefix)
        if names is None:
            names = self._sorted[prefix] = sorted(
                name for name in self._registry if name.startswith(prefix))
        return names.copy()

    @property
    def closing(self) -> int:
        """Actors that no longer accept messages and have not terminated yet (winding down:
        draining, ``on_stop``)."""
        return len(self._cells) - len(self._registry)

    def __len__(self) -> int:
        """Number of registered (alive) actors."""
        return len(self._registry)

    def __repr__(self) -> str:
        return f"<ActorSystem {self.name!r} actors={len(self._registry)}>"

    # Not asyncio.timeout(): expiry must cancel the actors' tasks, not just the caller.
    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every actor gracefully and in parallel; cancel those still running at timeout.

        After this no actor can be spawned. Idempotent.

        Args:
            timeout: seconds granted to the graceful stops (draining included).
        """
        self._closed = True
        cells = list(self._cells)
        for cell in cells:
            cell.request_stop(drain=True)
        current = asyncio.current_task()
        # An actor shutting the system down from its handler must not wait for itself.
        tasks = {task for cell in cells
                 if (task := cell.task) is not None and task is not current and not task.done()}
        if self._rest_timer is not None:
            self._rest_timer.cancel()
            self._rest_timer = None
        if not tasks:
            return
        log.info("system %s: stopping %d actor(s)", self.name, len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            log.warning(
                "system %s: %d actor(s) still running after %ss; cancelling them",
                self.name,
                len(pending),
                timeout,
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)

    async def __aenter__(self) -> ActorSystem:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # -- CellHost ---------------------------------------------------------------------------

    def _auto_name(self, kind: str) -> str:
        while True:
            n = self._next_id.get(kind, 0) + 1
            self._next_id[kind] = n
            name = f"{kind}-{n}"
            if name not in self._registry:
                return name

    def _cell_closed(self, cell: ActorCell) -> None:
        # Only if the name still maps to this very actor: it may have been re-spawned since.
        name = cell.name
        if self._registry.get(name) is cell.ref:
            del self._registry[name]
            for prefix, names in self._sorted.items():
                if name.startswith(prefix):
                    del names[bisect.bisect_left(names, name)]

    def _cell_escalated(self, cell: ActorCell, exc: BaseException) -> None:
        if self._on_escalation is None:
            return
        try:
            self._on_escalation(cell.ref, exc)
        except Exception:
            log.exception("system %s: on_escalation raised for actor %s", self.name, cell.name)

    def _cell_idle(self, cell: ActorCell) -> None:
        self._idle[cell] = None
        if self._rest_timer is None:
            self._rest_timer = cell.loop.call_later(_cell.REST_AFTER_S, self._sweep_rest,
                                                  cell.loop)

    def _sweep_rest(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for cell in list(self._idle):
            if cell.rest_if_idle(now) is not False:  # rested, or not waiting any more
                del self._idle[cell]
        self._rest_timer = (loop.call_later(_cell.REST_AFTER_S, self._sweep_rest, loop)
                            if self._idle else None)

    def _cell_terminated(self, cell: ActorCell) -> None:
        self._cells.discard(cell)
        self._idle.pop(cell, None)
        self._cell_closed(cell)
