"""Durable consumers that crash and work in groups (issue 14, "Done when"), with real
``rtnode consume`` processes killed with SIGKILL, and a poison event through the Python API.

Each worker's stdout is read as it comes, with the time each line arrived; what a worker
printed is what reached its stdout, including lines still in the pipe when it was killed.
Run with ``-s`` to see the measured figures (time to take over, events/s).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
import termios
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from bridge.replay import ReplayConsumer
from node.core.events import event_body
from tests.servers import MS, NatsProcess
from tests.stored import WHO, store, tenant

pytestmark = pytest.mark.integration

ACK_WAIT_S = 30.0  # ReplayConsumer's default: a takeover must not wait for it
# A takeover comes after about the priority timeout (5 s by default); events that come back
# only by ack_wait come about ACK_WAIT_S after the kill, a little less after the next start:
# half of it tells the two apart.
TAKEOVER_BOUND_S = ACK_WAIT_S / 2
_RTNODE = Path(sys.executable).with_name("rtnode")
RTNODE = [str(_RTNODE)] if _RTNODE.exists() else [sys.executable, "-m", "node"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("RTNODE_")}



def durable(base: str) -> str:
    """A durable name no other run on the shared nats-server uses."""
    return f"{base}-{uuid.uuid4().hex[:6]}"


def scaled(seconds: float) -> float:
    """A deadline, scaled by RTNODE_TEST_TIMESCALE."""
    return seconds * MS * 1000



async def publish_paced(node: Any, tenant: str, rooms: Sequence[str], n: int, rate: float,
                        stored: dict[str, list[int]]) -> None:
    """Store ``n`` events round-robin over ``rooms`` at about ``rate`` per second, adding
    each seq to ``stored[room]`` once the store acked it."""
    t0 = time.monotonic()
    for i in range(n):
        room = rooms[i % len(rooms)]
        body = event_body(room, "reading", {"i": i}, WHO, None, f"m{i}")
        seq, _ = await node.store.publish(tenant, room, body, f"{tenant}:{room}:{i}")
        stored[room].append(seq)
        ahead = t0 + (i + 1) / rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)  # pacing, not waiting for something


@dataclass(frozen=True)
class Printed:
    """One JSON line of ``rtnode consume``: when the test read it, its room and seq."""

    at: float
    room: str
    seq: int


@dataclass
class Worker:
    """One ``rtnode consume`` process; its stdout lines are collected as they come.

    ``changed`` is notified at every line and at EOF (one condition for all the workers of a
    test, see :func:`until`). With ``stop_reading_at``, the test stops reading its stdout after
    that many lines, as a slow reader would, until it is killed: the worker then blocks in a
    write once the pipe (shrunk to one page) and the reader's 8 KiB buffer are full (about 85
    lines), in the middle of what it fetched.
    """

    name: str
    args: list[str]
    changed: asyncio.Condition
    log_dir: Path
    stop_reading_at: int | None = None
    lines: list[Printed] = field(default_factory=list)
    junk: list[bytes] = field(default_factory=list)
    eof: bool = False
    ended_by_test: bool = False
    started: float = 0.0
    killed_at: float | None = None
    proc: asyncio.subprocess.Process | None = None
    _reader: asyncio.Task[None] | None = None
    _transport: asyncio.ReadTransport | None = None
    _go_on: asyncio.Event = field(default_factory=asyncio.Event)
    _pipe: tuple[int, int] = (-1, 0)  # its stdout's read end, and the pipe's size

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / f"{self.name}.stderr"

    def _open_stderr(self) -> Any:
        return open(self.stderr_path, "wb")  # a local file: opening it does not block

    async def start(self) -> Worker:
        self.started = time.monotonic()
        r, w = os.pipe()
        with contextlib.suppress(OSError):  # Linux only: a one-page pipe
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
        self._pipe = (r, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ))
        try:
            with self._open_stderr() as err:
                self.proc = await asyncio.create_subprocess_exec(
                    *RTNODE, "consume", *self.args, stdout=w, stderr=err, env=ENV)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        stdout = asyncio.StreamReader(limit=4096)  # reading pauses at 2 * limit buffered
        self._transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdout), os.fdopen(r, "rb", 0))
        self._reader = asyncio.create_task(self._read(stdout), name=f"read[{self.name}]")
        return self

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        try:
            while True:
                if self.stop_reading_at is not None and len(self.lines) >= self.stop_reading_at:
                    await self._go_on.wait()
                line = await stdout.readline()
                if not line.endswith(b"\n"):  # EOF; a cut last line was never printed
                    break
                try:
                    ev = json.loads(line)
                    printed = Printed(time.monotonic(), ev["room"], int(ev["seq"]))
                except (ValueError, KeyError, TypeError):
                    self.junk.append(line)
                    continue
                self.lines.append(printed)
                async with self.changed:
                    self.changed.notify_all()
        finally:
            self.eof = True
            if self._transport is not None:
                self._transport.close()
            async with self.changed:
                self.changed.notify_all()

    async def wait_blocked(self, timeout: float = 10.0) -> None:
        """Wait until its stdout pipe is full (after ``stop_reading_at``): it is then blocked
        in a write."""
        fd, size = self._pipe
        deadline = time.monotonic() + scaled(timeout)
        while True:
            queued = array.array("i", [0])
            fcntl.ioctl(fd, termios.FIONREAD, queued)
            if queued[0] > size - 512:  # no room for one more line
                return
            assert time.monotonic() < deadline, f"{self.name}: pipe never filled ({queued[0]})"
            assert self.proc is not None and self.proc.returncode is None, self.stderr()
            await asyncio.sleep(0.01)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""

    @property
    def died(self) -> bool:
        """It ended while the test did not end it."""
        return self.eof and not self.ended_by_test

    async def _collect(self) -> None:
        assert self.proc is not None and self._reader is not None
        await asyncio.wait_for(self.proc.wait(), 10)
        self._go_on.set()
        await asyncio.wait_for(asyncio.shield(self._reader), 10)  # the rest of the pipe

    async def kill(self) -> None:
        """SIGKILL, then read what it printed before it died (still in the pipe)."""
        assert self.proc is not None
        self.ended_by_test = True
        self.proc.kill()
        self.killed_at = time.monotonic()
        await self._collect()

    async def stop(self) -> int:
        """SIGTERM; its exit code once all its output is read."""
        assert self.proc is not None
        self.ended_by_test = True
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        await self._collect()
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def cleanup(self) -> None:
        """Kill it if it still runs (by PID: only our own process)."""
        self.ended_by_test = True
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), 10)
        self._go_on.set()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader


async def until(changed: asyncio.Condition, predicate: Callable[[], bool], timeout: float,
                what: str, workers: Sequence[Worker]) -> None:
    """Wait until ``predicate()`` holds; fail at once if a worker died, or after ``timeout``
    seconds (scaled), with the workers' stderr."""

    def report() -> str:
        return "\n".join(
            f"--- {w.name}: {len(w.lines)} lines, rc {w.proc and w.proc.returncode}, junk "
            f"{w.junk[:3]}\n{w.stderr()}" for w in workers)

    try:
        async with changed:
            await asyncio.wait_for(
                changed.wait_for(lambda: predicate() or any(w.died for w in workers)),
                max(0.1, scaled(timeout)))
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}\n"
                             + report()) from None
    for w in workers:
        if w.died:
            raise AssertionError(f"{w.name} exited while waiting for {what}\n" + report())


def check_handover(workers: Sequence[Worker], victim: Worker,
                   stored: dict[str, list[int]]) -> dict[str, int]:
    """Check each room's events across a worker killed with SIGKILL and its successors.

    Per room, in the order the lines were read (all workers merged), after dropping seqs seen
    before, the seqs are exactly the stored ones, in order. A seq is printed twice only as a
    re-print by a survivor, after the kill, of an event the killed worker printed (it may have
    died between print and ack, or before its acks left the process). Within one worker a
    room never goes backwards except for such a re-print.

    Returns:
        Per room, how many of the killed worker's events a survivor printed again.
    """
    assert victim.killed_at is not None
    by_victim = {(p.room, p.seq) for p in victim.lines}
    for w in workers:
        assert not w.junk, (w.name, w.junk[:3])
        assert {p.room for p in w.lines} <= set(stored), (w.name, {p.room for p in w.lines})
        counts: dict[tuple[str, int], int] = {}
        highest: dict[str, int] = {}
        for p in w.lines:
            key = (p.room, p.seq)
            counts[key] = counts.get(key, 0) + 1
            assert counts[key] == 1, f"{w.name} printed {p.room} seq {p.seq} twice"
            if p.seq <= highest.get(p.room, 0):
                assert w is not victim and key in by_victim, (
                    f"{w.name}: {p.room} went back from seq {highest[p.room]} to {p.seq}")
            else:
                highest[p.room] = p.seq
            if w is not victim and key in by_victim:
                assert p.at >= victim.killed_at, (
                    f"{w.name} printed {p.room} seq {p.seq} while {victim.name} (which printed "
                    "it too) was alive")
    survivors = [p for w in workers if w is not victim for p in w.lines]
    assert len({(p.room, p.seq) for p in survivors}) == len(survivors), (
        "two survivors printed the same event")
    reprints: dict[str, int] = {}
    for room, seqs in stored.items():
        seen: set[int] = set()
        order: list[int] = []
        for p in sorted((p for w in workers for p in w.lines if p.room == room),
                        key=lambda p: p.at):
            if p.seq in seen:
                reprints[room] = reprints.get(room, 0) + 1
                continue
            seen.add(p.seq)
            order.append(p.seq)
        if order != seqs:
            missing = sorted(set(seqs) - seen)[:10]
            extra = sorted(seen - set(seqs))[:10]
            wrong = next((i for i, (a, b) in enumerate(zip(order, seqs, strict=False))
                          if a != b), None)
            raise AssertionError(f"{room}: {len(order)} events printed, {len(seqs)} stored; "
                                 f"missing {missing}, extra {extra}, first out of order at "
                                 f"{wrong}: {order[wrong - 2:wrong + 3] if wrong else None}")
    return reprints


def first_after(workers: Sequence[Worker], room: str, after: float) -> float | None:
    """When the first line of ``room`` printed by one of ``workers`` after ``after`` was read."""
    times = [p.at for w in workers for p in w.lines if p.room == room and p.at >= after]
    return min(times) if times else None


# -- 1. one consumer, killed -------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["reading", "stopped"])
async def test_killed_consumer_goes_on_at_its_first_unacked_event(
    make_node: Any, shared_nats: NatsProcess, tmp_path: Path, reader: str
) -> None:
    """Killed with -9 once 1,000 of 3,000 events were read from its stdout, with events
    fetched and not printed yet: the next run starts at the event after the last one printed
    (or re-prints that one, if the kill came between its print and its ack) after about the
    takeover time, not ack_wait, and prints the rest in order.

    ``reading``: the test goes on reading until the kill lands (the worker runs freely, the
    kill usually lands while it waits for its next batch). ``stopped``: the test stops reading
    at 1,000 lines, as a slow reader would; the worker blocks in a write in the middle of its
    batch, about 80 lines later (a one-page pipe and an 8 KiB read buffer), and is killed
    there: every line it wrote before must be acked.
    """
    node = await make_node()
    t, other = tenant(), tenant()
    seqs = await store(node, t, "crash:a", 1500)
    for room in ("crash:a", "crash:b"):  # another tenant's rooms, in the middle of the stream
        await store(node, other, room, 3)
    seqs += await store(node, t, "crash:a", 1500, 1500)
    changed = asyncio.Condition()
    # --takeover 2 (default 5): the second run waits that long for the dead run's pin to go.
    # One process at a time here, so no live worker can lose its pin to a shorter timeout.
    args = ["--durable", durable("d1"), "--rooms", "crash:*", "--tenant", t,
            "--takeover", "2", "--nats-url", shared_nats.url]
    first = Worker("run1", args, changed, tmp_path,
                   stop_reading_at=1000 if reader == "stopped" else None)
    second = Worker("run2", args, changed, tmp_path)
    try:
        await first.start()
        await until(changed, lambda: len(first.lines) >= 1000, 30, "1,000 lines", [first])
        if reader == "stopped":
            await first.wait_blocked()
        await first.kill()
        n = len(first.lines)
        print(f"\nrun 1: killed once 1,000 lines were read; it had printed {n}, "
              f"{n / max(1e-6, first.lines[-1].at - first.lines[0].at):.0f} events/s")
        assert not first.junk, first.junk[:3]
        assert [p.seq for p in first.lines] == seqs[:n]
        assert n < len(seqs), "the kill must land mid-stream"

        await second.start()
        await until(changed, lambda: bool(second.lines) and second.lines[-1].seq >= seqs[-1],
                    40, "the second run to reach the last event", [second])
        assert await second.stop() == 0, second.stderr()
    finally:
        await asyncio.gather(first.cleanup(), second.cleanup())
    got = [p.seq for p in second.lines]
    to_first = second.lines[0].at - second.started
    span = max(1e-6, second.lines[-1].at - second.lines[0].at)
    print(f"run 2: first line {to_first:.2f} s after start (seq {got[0]}; after the kill "
          f"seq {seqs[n - 1]} was printed last), {len(got)} lines at {len(got) / span:.0f} "
          "events/s")
    assert not second.junk, second.junk[:3]
    assert got[0] in (seqs[n - 1], seqs[n]), (
        f"first line seq {got[0]}: expected {seqs[n]} (after the last printed event) or "
        f"{seqs[n - 1]} (the last printed, if killed before its ack left); that is event "
        f"#{seqs.index(got[0]) + 1 if got[0] in seqs else '?'} of 3,000")
    assert got == seqs[seqs.index(got[0]):]
    assert to_first < TAKEOVER_BOUND_S, f"{to_first:.1f} s: waited for ack_wait"


# -- 2. a group of three, one killed -----------------------------------------------------------


async def test_group_of_three_workers_survives_a_killed_worker(
    make_node: Any, shared_nats: NatsProcess, tmp_path: Path
) -> None:
    """Three workers of one durable with 3 partitions share 9 rooms while ~3,000 events come in;
    one is killed with -9 mid-stream: the others take its rooms over, none missing, each room
    in order (re-printing only what the dead one may not have acked)."""
    node = await make_node()
    t = tenant()
    rooms = [f"grp:r{i}" for i in range(9)]
    stored: dict[str, list[int]] = {room: [] for room in rooms}
    changed = asyncio.Condition()
    args = ["--durable", durable("g1"), "--partitions", "3", "--rooms", "grp:*",
            "--tenant", t, "--nats-url", shared_nats.url]
    workers = [Worker(f"w{i}", args, changed, tmp_path) for i in range(3)]
    publisher: asyncio.Task[None] | None = None
    deadline = time.monotonic() + scaled(60)

    def left() -> float:
        return deadline - time.monotonic()

    def printed() -> set[tuple[str, int]]:
        return {(p.room, p.seq) for w in workers for p in w.lines}

    try:
        for w in workers:
            await w.start()
        started = time.monotonic()
        publisher = asyncio.create_task(publish_paced(node, t, rooms, 3000, 250.0, stored),
                                        name="publisher")
        await until(changed, lambda: any(len(w.lines) >= 300 for w in workers), left(),
                    "a worker to print 300 lines", workers)
        victim = max(workers, key=lambda w: len(w.lines))
        assert not publisher.done(), "the kill must land mid-stream"
        before = {w.name: sorted({p.room for p in w.lines}) for w in workers}
        await victim.kill()
        assert victim.killed_at is not None
        await asyncio.wait_for(asyncio.shield(publisher), max(0.1, left()))
        survivors = [w for w in workers if w is not victim]
        want = {(room, seq) for room, seqs in stored.items() for seq in seqs}
        await until(changed, lambda: want <= printed(), left(), "every stored event",
                    survivors)
        for w in survivors:
            assert await w.stop() == 0, w.stderr()
    finally:
        if publisher is not None and not publisher.done():
            publisher.cancel()
            with contextlib.suppress(BaseException):
                await publisher
        await asyncio.gather(*(w.cleanup() for w in workers))
    total = sum(len(seqs) for seqs in stored.values())
    lines = [p for w in workers for p in w.lines]
    span = max(1e-6, max(p.at for p in lines) - started)
    taken = {p.room for p in victim.lines}
    takeover = [first_after(survivors, room, victim.killed_at) for room in sorted(taken)]
    print(f"\ngroup of 3: {total} events in {len(rooms)} rooms, {len(lines)} lines "
          f"({len(lines) / span:.0f}/s over {span:.1f} s); rooms before the kill {before}; "
          f"{victim.name} killed after {len(victim.lines)} lines; its rooms {sorted(taken)} "
          "taken over after "
          + ", ".join(f"{x - victim.killed_at:.2f} s" if x else "never" for x in takeover))
    reprints = check_handover(workers, victim, stored)
    last = {room: max(p.seq for p in victim.lines if p.room == room) for room in taken}
    print(f"re-printed after the takeover, per room: {reprints} (last printed by "
          f"{victim.name}: {last})")
    assert all(x is not None and x - victim.killed_at < TAKEOVER_BOUND_S for x in takeover)


# -- 3. a standby ------------------------------------------------------------------------------


async def test_standby_takes_over_when_the_active_worker_is_killed(
    make_node: Any, shared_nats: NatsProcess, tmp_path: Path
) -> None:
    """Two workers of one group with one partition: one prints, the other stands by; the
    active one killed with -9, the standby prints the rest in order within about
    ``--takeover`` seconds."""
    takeover_s = 2.0
    node = await make_node()
    t = tenant()
    rooms = ["sb:a", "sb:b"]
    stored: dict[str, list[int]] = {room: [] for room in rooms}
    changed = asyncio.Condition()
    args = ["--group", durable("sb"), "--partitions", "1", "--takeover", str(takeover_s),
            "--rooms", "sb:*", "--tenant", t, "--nats-url", shared_nats.url]
    workers = [Worker(name, args, changed, tmp_path) for name in ("a", "b")]
    publisher: asyncio.Task[None] | None = None
    deadline = time.monotonic() + scaled(40)

    def left() -> float:
        return deadline - time.monotonic()

    try:
        for w in workers:
            await w.start()
        publisher = asyncio.create_task(publish_paced(node, t, rooms, 1200, 200.0, stored),
                                        name="publisher")
        await until(changed, lambda: sum(len(w.lines) for w in workers) >= 200, left(),
                    "200 lines", workers)
        active = max(workers, key=lambda w: len(w.lines))
        standby = next(w for w in workers if w is not active)
        assert standby.lines == [], f"both print: {len(active.lines)}, {len(standby.lines)}"
        assert not publisher.done(), "the kill must land mid-stream"
        await active.kill()
        assert active.killed_at is not None
        assert standby.lines == [], "the standby printed before the active one was killed"
        await asyncio.wait_for(asyncio.shield(publisher), max(0.1, left()))
        want = {(room, seq) for room, seqs in stored.items() for seq in seqs}
        await until(changed,
                    lambda: want <= {(p.room, p.seq) for w in workers for p in w.lines},
                    left(), "every stored event", [standby])
        assert await standby.stop() == 0, standby.stderr()
    finally:
        if publisher is not None and not publisher.done():
            publisher.cancel()
            with contextlib.suppress(BaseException):
                await publisher
        await asyncio.gather(*(w.cleanup() for w in workers))
    waited = standby.lines[0].at - active.killed_at
    print(f"\nstandby: active {active.name} killed after {len(active.lines)} lines; "
          f"{standby.name} printed its first line {waited:.2f} s later (--takeover "
          f"{takeover_s}), {len(standby.lines)} lines")
    print(f"re-printed after the takeover, per room: {check_handover(workers, active, stored)}")
    assert waited < takeover_s + 3.0


# -- 4. a poison event, through the API --------------------------------------------------------


async def test_poison_event_is_dead_lettered_blocking_or_skipping_its_room(
    make_node: Any, shared_nats: NatsProcess
) -> None:
    """An event nakked every time: with ``on_retry="block"`` its room waits for it until it
    is dead-lettered after ``max_deliver`` deliveries; with ``"skip"`` it is dead-lettered at
    its first nak and the room goes on. Other rooms go on, in order, either way."""
    node = await make_node()
    t = tenant()
    seqs: dict[str, list[int]] = {"poison:a": [], "poison:b": []}
    for i in range(4):  # a0 b0 a1 b1 ...: a1 is the poison event
        for room in seqs:
            seqs[room] += await store(node, t, room, 1, 10 * i)
    poison = seqs["poison:a"][1]
    nc = NATS()
    await nc.connect(shared_nats.url)
    try:
        for mode in ("block", "skip"):
            name = durable(f"p-{mode}")
            dlq = await nc.subscribe(f"rt.dlq.{t}.{name}")  # core NATS; no callback
            await nc.flush()
            yielded: dict[str, list[tuple[int, int]]] = {room: [] for room in seqs}
            dead_when_later_came: int | None = None
            started = time.monotonic()
            async with ReplayConsumer(nc, tenant=t, rooms="poison:*", durable=name,
                                      max_deliver=3, on_retry=mode) as consumer:
                while len(yielded["poison:a"]) < (6 if mode == "block" else 4) or len(
                        yielded["poison:b"]) < 4:
                    ev = await consumer.next(scaled(5))
                    assert ev is not None, (mode, yielded)
                    yielded[ev.room].append((ev.seq, ev.delivered))
                    if ev.seq == poison:
                        await ev.nak(delay=0.2)
                        continue
                    if ev.room == "poison:a" and ev.seq > poison and dead_when_later_came is None:
                        # Dead letters published before this event was yielded are in our
                        # subscription's queue once our own PING came back (same connection).
                        await nc.flush()
                        dead_when_later_came = dlq.pending_msgs
                    await ev.ack()
                assert await consumer.next(0.6) is None, (mode, "no more deliveries")
            elapsed = time.monotonic() - started
            a = seqs["poison:a"]
            expected_a = [(a[0], 1), (poison, 1)]
            if mode == "block":
                expected_a += [(poison, 2), (poison, 3)]
            assert yielded["poison:a"] == [*expected_a, (a[2], 1), (a[3], 1)], (mode, yielded)
            assert yielded["poison:b"] == [(s, 1) for s in seqs["poison:b"]], (mode, yielded)
            assert dead_when_later_came == 1, (
                f"{mode}: the later event of the room came before the dead letter")
            msg = await dlq.next_msg(timeout=scaled(2))
            h = msg.headers or {}
            reason, delivered = ("max_deliver", "3") if mode == "block" else ("skip", "1")
            assert (h.get("Rtnode-Seq"), h.get("Rtnode-Room"), h.get("Rtnode-Tenant"),
                    h.get("Rtnode-Durable"), h.get("Rtnode-Reason"),
                    h.get("Rtnode-Delivered")) == (
                str(poison), "poison:a", t, name, reason, delivered), (mode, h)
            assert b"reading" in msg.data  # the stored CBOR event map
            assert dlq.pending_msgs == 0, f"{mode}: one dead letter only"
            await dlq.unsubscribe()
            print(f"\n{mode}: poison seq {poison} dead-lettered ({reason}); "
                  f"{sum(map(len, yielded.values()))} yields in {elapsed:.2f} s")
    finally:
        await nc.close()
