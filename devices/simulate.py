"""A fleet of simulated devices: ``rtnode devices simulate --count N --room R --rate HZ``.

Each device ``sim-<i>`` is a :class:`devices.sdk.Device` (the MQTT tunnel, full semantics: each
reading is a ``publish`` with a ``msg_id``, retried across reconnects, and counted as acked
when the node answers ``published``). It publishes the event ``reading`` with data
``{"t": <temperature, float>, "i": <reading number>}`` to the room at ``rate`` Hz, and answers
the rpc ``read`` with its last reading (None before the first). Tokens are minted with the
node's key by the caller (see ``node.cli``), one per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from devices.sdk import ClientError, Device
from node.protocol.tokens import mint_token

__all__ = ["SimStats", "simulate"]

# Readings of one device waiting for their ``published``; beyond it ticks are skipped.
MAX_IN_FLIGHT = 64


@dataclass
class SimStats:
    """What the fleet did so far."""

    sent: int = 0
    acked: int = 0
    failed: int = 0
    skipped: int = 0
    rpc_answered: int = 0

    def line(self, elapsed: float, connected: int, count: int) -> str:
        return (f"[{elapsed:6.1f}s] devices {connected}/{count} connected  sent {self.sent}  "
                f"acked {self.acked}  failed {self.failed}  rpc answered {self.rpc_answered}")


async def _device_loop(dev: Device, index: int, room: str, rate: float, count: int,
                       stats: SimStats, last: dict[str, Any], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    period = 1.0 / rate
    in_flight: set[asyncio.Task[None]] = set()

    async def one(reading: dict[str, Any]) -> None:
        try:
            await dev.publish(room, "reading", reading)
            stats.acked += 1
        except ClientError:
            stats.failed += 1

    start = loop.time() + period * index / max(count, 1)  # spread the fleet over a period
    k = 0
    try:
        while not stop.is_set():
            delay = start + k * period - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    break
            k += 1
            if len(in_flight) >= MAX_IN_FLIGHT:
                stats.skipped += 1
                continue
            t = 20.0 + 3.0 * math.sin(time.time() / 60 + index) + random.uniform(-0.2, 0.2)
            reading = {"t": round(t, 2), "i": k}
            last["reading"] = reading
            stats.sent += 1
            task = asyncio.create_task(one(reading))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.wait(in_flight)


async def simulate(
    host: str,
    port: int,
    *,
    count: int,
    room: str,
    rate: float,
    secret: str | bytes,
    duration: float | None = None,
    stop: asyncio.Event | None = None,
    tenant: str = "default",
    algorithm: str = "HS256",
    issuer: str = "",
    audience: str = "",
    out: Callable[[str], None] = print,
    min_backoff_s: float = 0.5,
    max_backoff_s: float = 10.0,
) -> SimStats:
    """Run ``count`` devices publishing readings to ``room`` at ``rate`` Hz each.

    Args:
        host: The node's MQTT host.
        port: The node's MQTT port.
        secret: The key tokens are signed with (the node's HS256 secret, or a PEM key).
        duration: Seconds to run; None runs until ``stop`` is set (or the task is cancelled).
        stop: Set it to end the run early.
        out: Receives one progress line per second, and a last one at the end.

    Returns:
        The counters of the run.
    """
    if count < 1 or rate <= 0:
        raise ValueError("count must be at least 1 and rate positive")
    stop = stop or asyncio.Event()
    stats = SimStats()
    loop = asyncio.get_running_loop()
    began = loop.time()

    def provider(dev_id: str) -> Callable[[], Awaitable[str]]:
        async def mint() -> str:
            return mint_token(secret, sub=dev_id, tenant=tenant, kind="device",
                              rooms={room: ["join", "publish"]}, algorithm=algorithm,
                              issuer=issuer, audience=audience)

        return mint

    async with contextlib.AsyncExitStack() as stack:
        fleet: list[Device] = []
        loops: list[asyncio.Task[None]] = []
        for i in range(count):
            dev_id = f"sim-{i}"
            dev = Device(host, port, dev_id, token_provider=provider(dev_id),
                         min_backoff_s=min_backoff_s, max_backoff_s=max_backoff_s)
            last: dict[str, Any] = {"reading": None}

            def make_read(last: dict[str, Any] = last) -> Any:
                async def read(params: Any, from_: dict[str, Any]) -> Any:
                    stats.rpc_answered += 1
                    return last["reading"]

                return read

            dev.rpc("read")(make_read())
            await stack.enter_async_context(dev)
            fleet.append(dev)
            loops.append(asyncio.create_task(
                _device_loop(dev, i, room, rate, count, stats, last, stop)))

        async def report() -> None:
            tick = 1
            while True:
                await asyncio.sleep(max(0.0, began + tick - loop.time()))
                tick += 1
                out(stats.line(loop.time() - began, sum(d.connected for d in fleet), count))

        reporter = asyncio.create_task(report())
        try:
            if duration is None:
                await stop.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), duration)
        finally:
            stop.set()
            reporter.cancel()
            await asyncio.wait([*loops, reporter])
            out(stats.line(loop.time() - began, sum(d.connected for d in fleet), count)
                + "  (done)")
    return stats
