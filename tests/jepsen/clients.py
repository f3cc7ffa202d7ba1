"""The fault test's clients: publishers that retry with the same ``msg_id``, and subscribers
that are churned (closed and reopened, rejoining with ``since`` and ``epoch``).

Both speak raw frames (:class:`tests.jepsen.wire.Link`) so that every attempt, every
``joined`` and every event is recorded exactly as it crossed the wire. Every loop is bounded:
a publisher by its ``stop`` event, a count and each publish's deadline; a subscriber by its
``stop`` event and the open/request timeouts.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

from tests.jepsen.checker import (
    FAILED,
    OK,
    UNKNOWN,
    Joined,
    Publish,
    Received,
    SubscriberHistory,
)
from tests.jepsen.wire import Link, LinkLost
from tests.wsclient import token

__all__ = ["Publisher", "Subscriber", "Tally"]

OPEN_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 5.0


class Tally(Counter[str]):
    """Counts of what went wrong, and when each happened (monotonic times)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[tuple[float, str]] = []

    def hit(self, kind: str) -> None:
        self[kind] += 1
        self.times.append((time.monotonic(), kind))


class _Connector:
    """One link at a time, opened on the next URL in turn when the last one is gone."""

    def __init__(self, name: str, urls: Sequence[str], start: int) -> None:
        self.name = name
        self.urls = list(urls)
        self.index = start
        self.token = token(name)
        self.link: Link | None = None
        self.lock = asyncio.Lock()
        self.opened = 0
        self.open_failures = 0

    async def get(self, deadline: float) -> Link | None:
        """The live link, or a new one; None when none could be opened before ``deadline``."""
        async with self.lock:
            while self.link is None or not self.link.alive:
                if time.monotonic() >= deadline:
                    return None
                url = self.urls[self.index % len(self.urls)]
                self.index += 1
                try:
                    self.link = await Link.open(url, self.token, self._ignore,
                                                timeout=OPEN_TIMEOUT_S)
                    self.opened += 1
                except (OSError, LinkLost, TimeoutError, Exception):
                    self.open_failures += 1
                    await asyncio.sleep(0.2)
            return self.link

    @staticmethod
    def _ignore(frame: dict[str, Any], at: float) -> None:
        pass

    async def drop(self, link: Link) -> None:
        """Close ``link`` if it is still the current one (the next get() opens another)."""
        if self.link is link:
            self.link = None
        await link.close()

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
            self.link = None


class Publisher:
    """Publishes to random rooms at ``rate`` per second with at most ``window`` in flight.

    Each publish has its own ``msg_id`` and is retried (same ``msg_id``) on a timeout, a lost
    connection or a retryable error until ``op_timeout_s``; a request that times out also
    drops the connection (the next attempt opens one on the next node). Outcomes go to
    ``self.records`` as :class:`Publish`.
    """

    def __init__(self, name: str, urls: Sequence[str], rooms: Sequence[str], rng: random.Random,
                 *, rate: float, window: int, op_timeout_s: float, start: int = 0) -> None:
        self.name = name
        self.rooms = list(rooms)
        self.rng = rng
        # The retries' pauses from a generator of their own: drawn by the publishes in flight
        # as they fail, they moved the rooms of the publishes after them.
        self.retry_rng = random.Random(rng.random())
        self.rate = rate
        self.window = window
        self.op_timeout_s = op_timeout_s
        self.conn = _Connector(name, urls, start)
        self.records: list[Publish] = []
        self.errors = Tally()
        self.longest_ack_s = 0.0

    async def run(self, stop: asyncio.Event, max_ops: int) -> None:
        sem = asyncio.Semaphore(self.window)
        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        try:
            for i in range(max_ops):
                await sem.acquire()  # each publish ends by its deadline, so this does too
                if stop.is_set():
                    sem.release()
                    break
                room = self.rng.choice(self.rooms)
                task = asyncio.create_task(self._publish(f"{self.name}-{i}", room, i, sem))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at = max(next_at + interval, time.monotonic())
                with suppress(TimeoutError):
                    async with asyncio.timeout(next_at - time.monotonic()):
                        await stop.wait()
                if stop.is_set():
                    break
            if tasks:
                await asyncio.wait(list(tasks), timeout=self.op_timeout_s + 5)
        finally:
            for task in tasks:
                task.cancel()
            await self.conn.close()

    async def _publish(self, mid: str, room: str, i: int, sem: asyncio.Semaphore) -> None:
        started = time.monotonic()
        deadline = started + self.op_timeout_s
        attempts = 0
        frame = {"type": "publish", "room": room, "event": "jp", "data": {"i": i},
                 "msg_id": mid}
        try:
            while time.monotonic() < deadline:
                link = await self.conn.get(deadline)
                if link is None:
                    break
                attempts += 1
                left = deadline - time.monotonic()
                try:
                    reply = await link.request(frame, max(0.1, min(REQUEST_TIMEOUT_S, left)))
                except LinkLost:
                    self.errors.hit("lost")
                    continue
                except TimeoutError:
                    self.errors.hit("timeout")
                    await self.conn.drop(link)
                    continue
                kind = reply.get("type")
                if kind == "published" and isinstance(reply.get("seq"), int):
                    now = time.monotonic()
                    self.longest_ack_s = max(self.longest_ack_s, now - started)
                    self.records.append(Publish(mid, room, OK, reply["seq"], attempts, now))
                    return
                if kind == "error":
                    self.errors.hit(f"error {reply.get('code')}")
                    if not reply.get("retry"):
                        self.records.append(Publish(mid, room, FAILED, None, attempts))
                        return
                else:
                    self.errors.hit(f"reply {kind}")
                await asyncio.sleep(self.retry_rng.uniform(0.05, 0.3))
            self.records.append(Publish(mid, room, UNKNOWN, None, attempts))
        except asyncio.CancelledError:
            self.records.append(Publish(mid, room, UNKNOWN, None, attempts))
            raise
        finally:
            sem.release()


class Subscriber:
    """Joins every room; every ``churn_s`` closes its connection, waits ``downtime_s`` (events
    are missed meanwhile), and opens a new one on the next node, rejoining each room with
    ``since`` = the last seq it received (or the seq of a ``joined`` that did not recover) and
    the epoch of its last ``joined``. Every ``joined`` and event goes to ``self.history``.
    """

    def __init__(self, name: str, urls: Sequence[str], rooms: Sequence[str], rng: random.Random,
                 *, churn_s: tuple[float, float], downtime_s: tuple[float, float],
                 start: int = 0) -> None:
        self.name = name
        self.urls = list(urls)
        self.index = start
        self.rooms = list(rooms)
        self.rng = rng
        self.churn_s, self.downtime_s = churn_s, downtime_s
        self.token = token(name)
        self.history = SubscriberHistory(name)
        self.cursor: dict[str, int] = {}
        self.epoch: dict[str, str] = {}
        self.first: dict[str, int] = {}
        self.received: dict[str, set[int]] = defaultdict(set)
        self.resets: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.pending: dict[tuple[int, int], tuple[str, int | None, float]] = {}
        self.conn_no = -1
        self.abandoned: set[int] = set()
        self.progress = asyncio.Event()
        self.connections = 0
        self.failures = Tally()
        self.link: Link | None = None
        self.kicked = False
        self.kicks = 0

    def _on_frame(self, conn: int, frame: dict[str, Any], at: float) -> None:
        if conn in self.abandoned:  # a join failed or timed out: it is being closed
            return
        kind = frame.get("type")
        if kind == "event":
            room, seq = frame.get("room"), frame.get("seq")
            if room in self.received and isinstance(seq, int):
                self.history.entries.append(Received(conn, room, seq, at))
                self.received[room].add(seq)
                self.cursor[room] = max(self.cursor.get(room, 0), seq)
                self.progress.set()
            return
        rid = frame.get("id")
        if not isinstance(rid, int):
            return
        pending = self.pending.pop((conn, rid), None)
        if pending is None or kind != "joined":
            return
        room, since, sent_at = pending
        seq, epoch = frame.get("seq"), frame.get("epoch")
        recovered, replayed = bool(frame.get("recovered")), frame.get("replayed") or 0
        if not isinstance(seq, int) or not isinstance(epoch, str):
            self.failures.hit("bad joined")
            return
        self.history.entries.append(
            Joined(conn, room, since, seq, epoch, recovered, int(replayed), sent_at, at))
        self.epoch[room] = epoch
        self.first.setdefault(room, seq)
        if since is None or not recovered:
            self.cursor[room] = seq  # nothing before it will come: that is the new cursor
        if since is not None and not recovered:
            self.resets[room].append((since, seq))  # what it says will never come
        self.progress.set()

    async def _open(self, stop: asyncio.Event) -> Link | None:
        while not stop.is_set():
            url = self.urls[self.index % len(self.urls)]
            self.index += 1
            self.conn_no += 1
            conn = self.conn_no
            for room in self.rooms:
                self.received.setdefault(room, set())
            try:
                link = await Link.open(url, self.token, functools.partial(self._on_frame, conn),
                                       timeout=OPEN_TIMEOUT_S)
            except Exception as exc:
                self.failures.hit(f"open {type(exc).__name__}")
                await asyncio.sleep(0.2)
                continue
            self.connections += 1
            if await self._join_all(link, conn):
                return link
            await link.close()
            await asyncio.sleep(0.2)
        return None

    async def _join_all(self, link: Link, conn: int) -> bool:
        async def join(room: str) -> bool:
            frame: dict[str, Any] = {"type": "join", "room": room}
            since = self.cursor.get(room) if room in self.epoch else None
            if since is not None:
                frame["since"] = {"seq": since, "epoch": self.epoch[room]}
            rid = link.next_id()
            self.pending[(conn, rid)] = (room, since, time.monotonic())
            try:
                reply = await link.request(frame, REQUEST_TIMEOUT_S, rid=rid)
            except (LinkLost, TimeoutError) as exc:
                self.abandoned.add(conn)  # a late joined or its events are not recorded
                self.failures.hit(f"join {type(exc).__name__}")
                return False
            finally:
                self.pending.pop((conn, rid), None)
            if reply.get("type") != "joined":
                self.abandoned.add(conn)
                self.failures.hit(f"join {reply.get('type')} {reply.get('code')}")
                return False
            return True

        results = await asyncio.gather(*(join(room) for room in self.rooms))
        return all(results)

    async def run(self, stop: asyncio.Event, churn: asyncio.Event) -> None:
        """Until ``stop``; connections are churned while ``churn`` is set."""
        try:
            while not stop.is_set():
                self.link = await self._open(stop)
                if self.link is None:
                    break
                # The same draws for every connection, whether it is kicked or not (kicks
                # come with the heals, as the run goes).
                hold, downtime = self.rng.uniform(*self.churn_s), self.rng.uniform(*self.downtime_s)
                waits: list[asyncio.Task[Any]] = [asyncio.create_task(self.link.done.wait()),
                                                  asyncio.create_task(stop.wait())]
                if churn.is_set():
                    waits.append(asyncio.create_task(asyncio.sleep(hold)))
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in waits:
                        task.cancel()
                kicked, self.kicked = self.kicked, False
                if not self.link.alive and not kicked:
                    self.failures.hit(f"lost (close {self.link.close_code})")
                await self.link.close()
                self.link = None
                if churn.is_set() and not stop.is_set() and not kicked:
                    with suppress(TimeoutError):
                        async with asyncio.timeout(downtime):
                            await stop.wait()
        finally:
            if self.link is not None:
                await self.link.close()

    async def kick(self) -> None:
        """Close the connection now; the next one opens at once (a rejoin right after a heal,
        when a replica that was paused or restarted may still be behind)."""
        link = self.link
        if link is not None and link.alive:
            self.kicked = True
            self.kicks += 1
            await link.close()

    def missing(self, stored: dict[str, list[int]]) -> int:
        """How many stored events above the first cursor this subscriber has not received and
        may still receive (a ``recovered: false`` join said those in its range never will)."""
        count = 0
        for room, seqs in stored.items():
            first = self.first.get(room)
            if first is None:
                count += len(seqs)
                continue
            got = self.received.get(room, set())
            resets = self.resets.get(room, [])
            count += sum(1 for s in seqs if s > first and s not in got
                         and not any(a < s <= b for a, b in resets))
        return count
