"""A terminated actor leaves no reference cycle: refcounting frees its cell, instance and
mailbox at once, instead of a full garbage collection (long pauses under connection churn)."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from actors import Actor, ActorDeadError, ActorSystem, Escalated, RestartPolicy
from actors.cell import ActorCell
from actors.mailbox import Mailbox


class Echo(Actor):
    kind = "echo"

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def on_receive(self, message: Any) -> Any:
        if message == "boom":
            raise ValueError("boom")
        self.seen.append(message)
        return message


class Fragile(Actor):
    kind = "fragile"
    restart = RestartPolicy(max_restarts=1, window_s=60.0, min_backoff_s=0.0, max_backoff_s=0.0)

    async def on_receive(self, message: Any) -> Any:
        raise ValueError(message)


def _runtime_objects(garbage: list[Any]) -> list[str]:
    gc.collect()
    kinds = (ActorCell, Mailbox, Echo, Fragile)
    return sorted({type(o).__qualname__ for o in garbage if isinstance(o, kinds)})


async def _spawn_and_stop() -> None:
    async with ActorSystem() as system:
        refs = [system.spawn(Echo) for _ in range(100)]
        for i, ref in enumerate(refs):
            ref.tell(i)
            assert await ref.ask("ping") == "ping"
            if i % 3 == 0:
                ref.tell("boom")  # a failing tell (no policy): the actor stops itself
        for i, ref in enumerate(refs):
            await ref.stop(drain=i % 2 == 0)


async def _escalate_and_stop() -> None:
    async with ActorSystem(on_escalation=lambda ref, exc: None) as system:
        refs = [system.spawn(Fragile) for _ in range(20)]
        for ref in refs:
            ref.tell("first")
            ref.tell("second")
        for ref in refs:
            await ref.stop()


async def test_stopped_actors_leave_no_cycle(saved_garbage: list[Any]) -> None:
    await _spawn_and_stop()  # in a function of its own: its locals are gone afterwards
    assert _runtime_objects(saved_garbage) == []


async def test_escalated_actors_leave_no_cycle(saved_garbage: list[Any]) -> None:
    await _escalate_and_stop()
    assert _runtime_objects(saved_garbage) == []


async def test_a_stopped_ref_refuses_as_before() -> None:
    async with ActorSystem(on_escalation=lambda ref, exc: None) as system:
        ref = system.spawn(Echo, name="e")
        await ref.stop()
        assert not ref.is_alive and ref.queued == 0
        with pytest.raises(ActorDeadError, match=r"actor 'e' stopped$"):
            ref.tell(1)
        with pytest.raises(ActorDeadError, match=r"actor 'e' stopped$"):
            await ref.ask(1)
        with pytest.raises(ActorDeadError):
            await ref.wait_for_room(0)
        await ref.stop()  # idempotent
        assert repr(ref) == "<ActorRef 'e' kind='echo' dead>"
        fragile = system.spawn(Fragile, name="f")
        fragile.tell("first")
        fragile.tell("second")
        await fragile.stop()
        with pytest.raises(Escalated, match="escalated after 1 restarts"):
            fragile.tell(1)
