"""A fleet of simulated devices: ``rtnode devices simulate --count N --room R --rate HZ``.

Each device ``sim-<i>`` is a :class:`devices.sdk.Device` (the MQTT tunnel, full semantics: each
reading is a ``publish`` with a ``msg_id``, retried across reconnects, and counted as acked
when the node answers ``published``). It publishes the event ``reading`` with data
``{"t": <temperature, float>, "i": <reading number>}`` to the room at ``rate`` Hz, and answers
the rpc ``read`` with its last reading (None before the first). Tokens are minted with the
node's key by the caller (see ``node.cli``), one per connection.

With ``state=True`` (``--state``) the fleet shows the reported/desired pattern of state rooms
(a namespace with ``state = true``):

- reported: each reading is the event ``reported`` in ``room``, whose key is the device's id
  (the node's default key), so the room's state holds each device's latest reading;
- desired: each device joins ``<room>-desired`` (:func:`desired_room`; same namespace, so a
  state room too) and follows the value of the key ``<its id>`` there: ``{"t": 22.5}`` or a
  bare number sets the temperature it steers to (its readings then carry ``"target"``);
  removing the key lets it drift again. A browser or a backend sets it with a publish of key
  ``sim-3`` in ``fleet:lab-desired`` (the console's publish form has a key field; HTTP:
  ``POST /api/publish {"room": "fleet:lab-desired", "event": "desired", "key": "sim-3",
  "data": {"t": 22.5}}``). A device that was offline gets the value at its next join.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from devices.sdk import ClientError, Device
from node.protocol.tokens import mint_token

__all__ = ["SimStats", "desired_room", "simulate"]

log = logging.getLogger("rtnode.simulate")

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
    desired_applied: int = 0
    state: bool = False

    def line(self, elapsed: float, connected: int, count: int) -> str:
        desired = f"  desired applied {self.desired_applied}" if self.state else ""
        return (f"[{elapsed:6.1f}s] devices {connected}/{count} connected  sent {self.sent}  "
                f"acked {self.acked}  failed {self.failed}  rpc answered {self.rpc_answered}"
                f"{desired}")


def desired_room(room: str) -> str:
    """The room where the desired values of ``room``'s devices are set (``--state``)."""
    return f"{room}-desired"


def _target(value: Any) -> float | None:
    """The temperature a desired value asks for: ``{"t": x}`` or a bare number."""
    if isinstance(value, dict):
        value = value.get("t")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


async def _follow_desired(dev: Device, room: str, last: dict[str, Any],
                          stats: SimStats) -> None:
    """Join the desired room and keep ``last["target"]`` = this device's desired value."""
    try:
        while True:
            try:
                await dev.join(room)
                break
            except ClientError as exc:
                if not exc.retry:
                    raise
        async for _ in dev.events():
            value = dev.values(room).get(dev.device_id)
            target = None if value is None else _target(value.data)
            if target != last.get("target"):
                last["target"] = target
                stats.desired_applied += 1
    except ClientError as exc:
        log.warning("! %s follows no desired value in %s: %s", dev.device_id, room, exc)


async def _device_loop(dev: Device, index: int, room: str, rate: float, count: int,
                       stats: SimStats, last: dict[str, Any], stop: asyncio.Event,
                       state: bool = False) -> None:
    loop = asyncio.get_running_loop()
    period = 1.0 / rate
    in_flight: set[asyncio.Task[None]] = set()

    async def one(reading: dict[str, Any]) -> None:
        try:
            if state:
                await dev.report(room, reading)
            else:
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
            reading: dict[str, Any] = {"t": round(t, 2), "i": k}
            target = last.get("target")
            if state and target is not None:
                # Steered: a third of the way to the target at each reading, plus noise.
                prev = last["reading"]["t"] if last.get("reading") else t
                reading = {"t": round(prev + (target - prev) / 3 + random.uniform(-0.05, 0.05), 2),
                           "i": k, "target": target}
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
    state: bool = False,
) -> SimStats:
    """Run ``count`` devices publishing readings to ``room`` at ``rate`` Hz each.

    Args:
        host: The node's MQTT host.
        port: The node's MQTT port.
        secret: The key tokens are signed with (the node's HS256 secret, or a PEM key).
        duration: Seconds to run; None runs until ``stop`` is set (or the task is cancelled).
        stop: Set it to end the run early.
        out: Receives one progress line per second, and a last one at the end.
        state: The reported/desired pattern (see the module docstring): readings are the
            event ``reported`` (key: the device id), and each device follows its key in
            :func:`desired_room` of ``room``.

    Returns:
        The counters of the run.
    """
    if count < 1 or rate <= 0:
        raise ValueError("count must be at least 1 and rate positive")
    stop = stop or asyncio.Event()
    stats = SimStats(state=state)
    rooms = {room: ["join", "publish"]}
    if state:
        rooms[desired_room(room)] = ["join"]
    loop = asyncio.get_running_loop()
    began = loop.time()

    def provider(dev_id: str) -> Callable[[], Awaitable[str]]:
        async def mint() -> str:
            return mint_token(secret, sub=dev_id, tenant=tenant, kind="device",
                              rooms=rooms, algorithm=algorithm,
                              issuer=issuer, audience=audience)

        return mint

    async with contextlib.AsyncExitStack() as stack:
        fleet: list[Device] = []
        loops: list[asyncio.Task[None]] = []
        followers: list[asyncio.Task[None]] = []
        for i in range(count):
            dev_id = f"sim-{i}"
            dev = Device(host, port, dev_id, token_provider=provider(dev_id),
                         min_backoff_s=min_backoff_s, max_backoff_s=max_backoff_s)
            last: dict[str, Any] = {"reading": None, "target": None}

            def make_read(last: dict[str, Any] = last) -> Any:
                async def read(params: Any, from_: dict[str, Any]) -> Any:
                    stats.rpc_answered += 1
                    return last["reading"]

                return read

            dev.rpc("read")(make_read())
            await stack.enter_async_context(dev)
            fleet.append(dev)
            loops.append(asyncio.create_task(
                _device_loop(dev, i, room, rate, count, stats, last, stop, state)))
            if state:
                followers.append(asyncio.create_task(
                    _follow_desired(dev, desired_room(room), last, stats)))

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
            for task in followers:
                task.cancel()
            await asyncio.wait([*loops, *followers, reporter])
            out(stats.line(loop.time() - began, sum(d.connected for d in fleet), count)
                + "  (done)")
    return stats
