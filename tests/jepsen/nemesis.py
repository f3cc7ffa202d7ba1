"""The nemesis: one fault at a time, chosen by a seeded ``random.Random``, healed before the
next, with the cluster and both nodes healthy again (or a bounded wait that gave up) between.

Faults (kinds):

- ``kill-nats``: kill -9 of a nats-server (the stream leader half of the time), restarted on
  the same ports and store after 1-3 s;
- ``pause-nats``: SIGSTOP of a nats-server (the leader half of the time) for 1-4 s, SIGCONT;
- ``cut-link``: node B's NATS connections (it reaches NATS only through TCP proxies) cut for
  2-5 s, new ones refused meanwhile;
- ``kill-node``: kill -9 of node A or B, restarted on the same port after 0.5-2 s (its clients
  move to the other node or wait);
- ``step-down``: the stream leader asked to step down.

A seed repeats the schedule: the kinds, the targets as drawn (the leader, or a given server),
the lengths and the gaps (``Fault.drawn``). Each kind makes the same draws whatever the cluster
looks like; which server is the leader when asked, and how many faults fit in the time, are the
run's.

After each heal ``on_heal`` runs at once (the harness makes some subscribers reconnect then, when a
replica that was just paused or restarted may still be behind). Only processes this test
started are signalled, by PID.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from node.protocol.subjects import STREAM_NAME
from tests.cluster import NatsCluster, TcpProxy
from tests.servers import NodeProcess

__all__ = ["KINDS", "Fault", "Nemesis"]

KINDS = ("kill-nats", "pause-nats", "cut-link", "kill-node", "step-down")
LONGEST_FAULT_S = 6.0  # no fault starts later than this before the end


@dataclass
class Fault:
    kind: str
    target: str
    started: float  # monotonic
    healed: float = 0.0  # the fault undone (restarted, resumed, restored)
    healthy: float | None = None  # everything healthy again (None: the wait gave up)
    note: str = ""
    drawn: str = ""  # what the seed chose: the target as drawn, the length, the gap after

    def describe(self, t0: float) -> str:
        health = ("NOT healthy again" if self.healthy is None
                  else f"healthy +{self.healthy - self.healed:.1f}s")
        note = f" {self.note}" if self.note else ""
        return (f"{self.started - t0:6.1f}s {self.kind:<10} {self.target:<8} "
                f"{self.healed - self.started:4.1f}s, {health} [drew {self.drawn}]{note}")


class Nemesis:
    def __init__(self, rng: random.Random, cluster: NatsCluster, proxies: Sequence[TcpProxy],
                 nodes: Sequence[NodeProcess], *, kinds: Sequence[str] = KINDS,
                 gap_s: tuple[float, float] = (1.0, 3.0), heal_timeout_s: float = 15.0,
                 on_heal: Callable[[], Awaitable[None]] | None = None) -> None:
        self.rng = rng
        self.cluster = cluster
        self.proxies = list(proxies)
        self.nodes = list(nodes)
        self.kinds = list(kinds)
        self.gap_s = gap_s
        self.heal_timeout_s = heal_timeout_s
        self.on_heal = on_heal
        self.faults: list[Fault] = []
        self.deadline = time.monotonic() + 3600.0
        self.unhealthy = ""

    @property
    def healed_at(self) -> float | None:
        return self.faults[-1].healed if self.faults else None

    def counts(self) -> dict[str, int]:
        return dict(Counter(f.kind for f in self.faults))

    def slowest(self) -> str:
        """The fault after which the cluster and the nodes took longest to be healthy."""
        if not self.faults:
            return "no fault"
        worst = max(self.faults, key=lambda f: float("inf") if f.healthy is None
                    else f.healthy - f.healed)
        took = "never" if worst.healthy is None else f"{worst.healthy - worst.healed:.1f} s"
        return f"{took} (after {worst.kind} {worst.target})"

    def _left(self, most: float) -> float:
        return max(1.0, min(most, self.deadline - time.monotonic()))

    async def run(self, seconds: float, deadline: float | None = None) -> None:
        """Faults until ``seconds`` from now (the last one healed before returning); every
        wait (restarts, health) also ends by ``deadline``."""
        end = time.monotonic() + seconds
        self.deadline = end + 30.0 if deadline is None else deadline
        while time.monotonic() + LONGEST_FAULT_S < end:
            kind = self.rng.choice(self.kinds)
            fault = await getattr(self, "_" + kind.replace("-", "_"))()
            self.faults.append(fault)
            if self.on_heal is not None:
                await self.on_heal()
            fault.healthy = await self.wait_healthy(self._left(self.heal_timeout_s))
            if fault.healthy is None:
                fault.note += f" still: {self.unhealthy}"
            gap = self.rng.uniform(*self.gap_s)
            fault.drawn += f", gap {gap:.2f}s"
            await asyncio.sleep(min(gap, max(0.0, end - time.monotonic())))  # quiet time

    async def wait_healthy(self, timeout: float) -> float | None:
        """When the stream has a leader with current followers and both nodes are ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.unhealthy = await asyncio.to_thread(self._unhealthy)
            if not self.unhealthy:
                return time.monotonic()
            await asyncio.sleep(0.2)
        return None

    def _unhealthy(self) -> str:
        """What is not healthy ("" when all is)."""
        if not self.cluster.stream_healthy(STREAM_NAME):
            return "the stream has no leader with current followers"
        bad = {n.name: n.readyz() for n in self.nodes}
        bad = {name: ready for name, ready in bad.items() if ready[0] != 200}
        return ", ".join(f"node {name} /readyz {status} {body}"
                         for name, (status, body) in bad.items())

    def _nats_target(self) -> tuple[int, str]:
        """A server: the stream's leader half of the time, else any; and what was drawn.

        The same two draws whichever it is, and whether there is a leader or not: when the
        draws depended on that, a moment without a leader moved the rest of the schedule."""
        leader_first, anyone = self.rng.random() < 0.5, self.rng.randrange(
            len(self.cluster.servers))
        if leader_first:
            leader = self.cluster.stream_leader(STREAM_NAME)
            return (anyone if leader is None else leader), "leader"
        return anyone, self.cluster.servers[anyone].name

    async def _kill_nats(self) -> Fault:
        i, drawn = await asyncio.to_thread(self._nats_target)
        fault = Fault("kill-nats", self.cluster.servers[i].name, time.monotonic())
        self.cluster.kill(i)
        down = self.rng.uniform(1.0, 3.0)
        fault.drawn = f"{drawn} {down:.2f}s"
        await asyncio.sleep(down)
        try:
            await asyncio.to_thread(self.cluster.restart, i, self._left(15.0))
        except AssertionError as exc:
            fault.note = f"restart: {exc}"
        fault.healed = time.monotonic()
        return fault

    async def _pause_nats(self) -> Fault:
        i, drawn = await asyncio.to_thread(self._nats_target)
        fault = Fault("pause-nats", self.cluster.servers[i].name, time.monotonic())
        self.cluster.pause(i)
        paused = self.rng.uniform(1.0, 4.0)
        fault.drawn = f"{drawn} {paused:.2f}s"
        try:
            await asyncio.sleep(paused)
        finally:
            self.cluster.resume(i)
        fault.healed = time.monotonic()
        return fault

    async def _cut_link(self) -> Fault:
        fault = Fault("cut-link", "node B", time.monotonic())
        for proxy in self.proxies:
            await proxy.cut()
        cut = self.rng.uniform(2.0, 5.0)
        fault.drawn = f"node B {cut:.2f}s"
        try:
            await asyncio.sleep(cut)
        finally:
            for proxy in self.proxies:
                await proxy.restore()
        fault.healed = time.monotonic()
        return fault

    async def _kill_node(self) -> Fault:
        node = self.rng.choice(self.nodes)
        fault = Fault("kill-node", node.name, time.monotonic())
        proc = node.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # our own child, by PID
            await asyncio.to_thread(proc.wait, 10)
        down = self.rng.uniform(0.5, 2.0)
        fault.drawn = f"{node.name} {down:.2f}s"
        await asyncio.sleep(down)
        node.start()
        try:
            await asyncio.to_thread(node.wait_ready, self._left(20.0))
        except AssertionError as exc:
            fault.note = f"restart: {str(exc)[:200]}"
        fault.healed = time.monotonic()
        return fault

    async def _step_down(self) -> Fault:
        leader = await asyncio.to_thread(self.cluster.stream_leader, STREAM_NAME)
        name = "?" if leader is None else self.cluster.servers[leader].name
        fault = Fault("step-down", name, time.monotonic(), drawn="leader")
        try:
            answer = await self.cluster.step_down(STREAM_NAME)
            if not answer.get("success"):
                fault.note = f"answer {answer}"
        except Exception as exc:  # reported, not fatal: the run goes on
            fault.note = f"step-down failed: {exc!r}"
        fault.healed = time.monotonic()
        return fault
