"""The fan-out benchmark's subscribers: they count and time what they receive, in the
benchmark's process or in processes of their own.

:class:`Collector` checks every event a subscriber receives (events carry their index ``i``
and send time ``t`` in ``data``): missing, duplicated and reordered events are counted per
subscriber. :class:`Readers` puts the subscribers in ``procs`` processes of their own: one
Python process at 100% of a core delivered 1.35M events/s to 1,000 subscribers, less than the
node can send on this 2-core machine, so the figure was the load generator's, not the node's.
The benchmark's process keeps the publisher and reads the readers' progress (deliveries and
subscribers done, per process) from shared memory; their counts, seen events and latency
samples come back over a pipe once the run is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import operator
import re
from collections.abc import Iterable
from multiprocessing.connection import Connection
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection

from bench.fanout_results import BenchConfig, RunResult, SubStats
from bench.fanout_subscriber import Subscriber
from bench.nodes import SECRET
from bench.procs import SETUP_TIMEOUT_S, ClientProcs, die_with_parent, run_loop
from node.protocol.frames import CBOR
from node.protocol.tokens import mint_token

__all__ = ["EVENT", "RIGHTS", "ROOM", "Collector", "LocalReaders", "Progress", "Readers",
           "decode", "encode", "open_subscriber", "read_subscriber", "until"]

ROOM = "bench:fanout"
EVENT = "bench:tick"
RIGHTS = ["join", "publish", "history", "presence"]

MAX_LATENCY_SAMPLES = 200_000

# Event frames as the node writes them in JSON (compact, data keys in the publisher's order):
# counting the marker counts frames; the regex reads only the publisher's index and send time.
_EVENT_MARK = '"type":"event"'
_EVENT_RE = re.compile(r'"data":\{"i":(\d+),"t":([-+0-9.eE]+)')
_first = operator.itemgetter(0)
_ONES = b"\x01" * 4096

# ---------------------------------------------------------------------------------------------
# Receiving


class Collector:
    """Counts and times the events of every subscriber of one run (the clients' hot path)."""

    def __init__(self, result: RunResult, max_samples: int = MAX_LATENCY_SAMPLES) -> None:
        cfg = result.config
        self.result = result
        self.events = cfg.events
        self.stride = max(1, -(-result.expected // max_samples))
        self.lat = result.latencies
        self.subscribers = cfg.subscribers
        self.remaining = cfg.subscribers
        self.all_done = asyncio.Event()
        self.total = 0  # distinct deliveries, all subscribers together
        self.window_total = cfg.in_flight * cfg.subscribers
        self.wake = asyncio.Event()

    async def window(self, upto: int) -> None:
        """Wait until events ``0..upto-1`` may be in flight: at most ``in_flight`` published
        and not yet received, on average over the subscribers (the same rule for both servers).
        """
        limit = self.window_total
        while upto * self.subscribers - self.total > limit:
            self.wake.clear()
            await self.wake.wait()

    def message(self, sub: SubStats, msg: str | bytes, now: float) -> None:
        if isinstance(msg, bytes):
            self._cbor(sub, msg, now)
        else:
            self._json(sub, msg, now)
        self.wake.set()

    def _json(self, sub: SubStats, text: str, now: float) -> None:
        found = _EVENT_RE.findall(text)
        if len(found) == 1 and "\n" not in text:  # one event, one frame (paced)
            i_s, t_s = found[0]
            self._event(sub, int(i_s), float(t_s), now)
            return
        if found and len(found) == text.count("\n") + 1 and self._run(sub, found, now):
            return  # every frame of the message an event (the publisher's data), all new
        n = text.count(_EVENT_MARK)
        if n:
            for i_s, t_s in found:
                self._event(sub, int(i_s), float(t_s), now)
            if len(found) != n:
                sub.unparsed += n - len(found)
                sub.events += n - len(found)
        if n != text.count("\n") + 1:
            for line in text.split("\n"):
                if line and _EVENT_MARK not in line:
                    try:
                        self._other(sub, json.loads(line))
                    except ValueError:
                        sub.other["<not json>"] += 1

    def _cbor(self, sub: SubStats, data: bytes, now: float) -> None:
        try:
            frames = CBOR.decode(data)
        except Exception:
            sub.other["<not cbor>"] += 1
            return
        for f in frames:
            if isinstance(f, dict) and f.get("type") == "event":
                d = f.get("data")
                try:
                    self._event(sub, int(d["i"]), float(d["t"]), now)
                except (TypeError, KeyError, ValueError):
                    sub.unparsed += 1
                    sub.events += 1
            else:
                self._other(sub, f)

    def _other(self, sub: SubStats, frame: Any) -> None:
        kind = frame.get("type", "?") if isinstance(frame, dict) else "?"
        sub.other[str(kind)] += 1
        if kind in ("error", "disconnect") and len(sub.notes) < 5:
            sub.notes.append(json.dumps(frame, default=str)[:200])

    def _run(self, sub: SubStats, found: list[tuple[str, str]], now: float) -> bool:
        """Count a message's events at once when they are new and consecutive (``i``, ``i+1``,
        ...), the usual case; else False, and nothing is counted (:meth:`_event` then counts
        them one by one). The same figures either way, for less than half the CPU per event
        (1.5 -> 0.65 us at 1,000 subscribers): the load generator shares the machine's two
        cores with the server it measures."""
        n = len(found)
        ids = list(map(int, map(_first, found)))
        a = ids[0]
        b = a + n
        seen = sub.seen
        if (a < 0 or b > self.events or ids != list(range(a, b))
                or seen.find(1, a, b) != -1):
            return False
        sub.events += n
        sub.last_at = now
        seen[a:b] = _ONES[:n] if n <= len(_ONES) else b"\x01" * n
        sub.distinct += n
        self.total += n
        if a < sub.last_index:
            sub.out_of_order += 1
        sub.last_index = b - 1
        if sub.distinct == self.events:
            sub.done_at = now
            self.remaining -= 1
            if self.remaining == 0:
                self.all_done.set()
        stride = self.stride
        k = -a % stride  # the first index of the message with i % stride == 0
        if k < n:
            self.lat.extend([now - float(t) for _, t in found[k::stride]])
        return True

    def _event(self, sub: SubStats, i: int, t: float, now: float) -> None:
        sub.events += 1
        sub.last_at = now
        if 0 <= i < self.events:
            if sub.seen[i]:
                sub.duplicates += 1
            else:
                sub.seen[i] = 1
                sub.distinct += 1
                self.total += 1
                if sub.distinct == self.events:
                    sub.done_at = now
                    self.remaining -= 1
                    if self.remaining == 0:
                        self.all_done.set()
        else:
            sub.unparsed += 1
        if i < sub.last_index:
            sub.out_of_order += 1
        sub.last_index = i
        if i % self.stride == 0:
            self.lat.append(now - t)


async def read_subscriber(ws: Subscriber, sub: SubStats, col: Collector,
                           finished: asyncio.Event) -> None:
    message = col.message

    def handler(msg: str | bytes, now: float) -> None:
        try:
            message(sub, msg, now)
        except Exception as exc:  # a bug of the benchmark's own: reported, not hidden
            if sub.closed is None:
                sub.closed = f"reader failed: {exc!r}"

    ws.stream(handler)
    await asyncio.shield(ws.closed)
    if not finished.is_set() and sub.closed is None:
        sub.closed = f"{ws.close_code} {ws.close_reason or ''}".strip()


# ---------------------------------------------------------------------------------------------
# Opening


def encode(codec: str, frames: list[dict[str, Any]]) -> str | bytes:
    if codec == "cbor":
        return b"".join(CBOR.encode(f) for f in frames)
    return "\n".join(json.dumps(f, separators=(",", ":")) for f in frames)


def decode(codec: str, msg: str | bytes) -> list[Any]:
    if isinstance(msg, bytes):
        return CBOR.decode(msg)
    return [json.loads(line) for line in msg.split("\n") if line]


async def until(ws: ClientConnection | Subscriber, codec: str, rid: str) -> dict[str, Any]:
    """Read frames until the reply with id ``rid`` (or a disconnect); other frames are dropped."""
    while True:
        for f in decode(codec, await ws.recv()):
            if isinstance(f, dict) and (f.get("id") == rid or f.get("type") == "disconnect"):
                return f


async def open_subscriber(url: str, cfg: BenchConfig, index: int, rtnode: bool,
                          secret: str = SECRET) -> Subscriber:
    """Subscriber ``index``, connected and joined to :data:`ROOM` (rtnode), or in the baseline
    server's set."""
    if not rtnode:
        ws = await Subscriber.open(url, None, SETUP_TIMEOUT_S)
        try:
            await asyncio.wait_for(ws.recv(), SETUP_TIMEOUT_S)  # {"type":"joined"}: in its set
        except BaseException:
            ws.abort()
            raise
        return ws
    ws = await Subscriber.open(url, f"rtnode.v1.{cfg.codec}", SETUP_TIMEOUT_S)
    try:
        tok = mint_token(secret, sub=f"bench-sub-{index}", rooms={"*": RIGHTS})
        ws.send(encode(cfg.codec, [
            {"type": "connect", "id": "connect", "token": tok},
            {"type": "join", "id": "join", "room": ROOM},
        ]))
        reply = await until(ws, cfg.codec, "join")
        if reply.get("type") != "joined":
            raise RuntimeError(f"subscriber {index}: join answered {reply}")
    except BaseException:
        ws.abort()
        raise
    return ws


# ---------------------------------------------------------------------------------------------
# The subscribers of a run, in the benchmark's process or in processes of their own

OPEN_CONCURRENCY = 50  # subscribers opening at a time, all processes together
CLOSE_S = 10.0
POLL_S = 0.001  # how often the benchmark reads the processes' progress while it waits on it


class Progress(Protocol):
    """What the publisher and the end of a run read of the subscribers' progress."""

    wake: asyncio.Event  # set to make :meth:`window` look again
    all_done: asyncio.Event  # every subscriber has every event

    @property
    def total(self) -> int:
        """Distinct deliveries, all subscribers together."""

    async def window(self, upto: int) -> None: ...


class LocalReaders:
    """The subscribers in the benchmark's own process (one :class:`Collector`)."""

    def __init__(self, res: RunResult, urls: list[str], rtnode: bool) -> None:
        self.res, self.urls, self.rtnode = res, urls, rtnode
        self.subs: list[Subscriber] = []
        self.progress: Progress = Collector(res)
        self._tasks: list[asyncio.Task[None]] = []
        self._finished = asyncio.Event()

    async def open(self) -> str | None:
        """Open, connect and join every subscriber; what failed, or None."""
        cfg = self.res.config
        subs, error = await _open_all(self.urls, cfg, self.rtnode, range(cfg.subscribers),
                                      OPEN_CONCURRENCY)
        self.subs = [ws for _, ws in subs]
        if error:
            return error
        self.res.subs = [SubStats(i, seen=bytearray(cfg.events)) for i in range(cfg.subscribers)]
        col = self.progress
        assert isinstance(col, Collector)
        self._tasks = [asyncio.create_task(read_subscriber(ws, s, col, self._finished))
                       for ws, s in zip(self.subs, self.res.subs, strict=True)]
        return None

    def cpu(self) -> float:
        return 0.0  # counted with the benchmark's own process

    async def collect(self) -> None:
        self._finished.set()

    async def close(self) -> None:
        self._finished.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await _close_all(self.subs)


class Readers:
    """The subscribers in ``procs`` processes of their own, subscriber ``i`` in process
    ``i % procs``. Their progress (deliveries, subscribers done) is read from shared memory
    (:attr:`progress` is this object); their counts and samples come back in :meth:`collect`.
    """

    def __init__(self, res: RunResult, urls: list[str], rtnode: bool, procs: int) -> None:
        cfg = res.config
        self.res = res
        self.subscribers = cfg.subscribers
        self.window_total = cfg.in_flight * cfg.subscribers
        self.wake = asyncio.Event()
        self.all_done = asyncio.Event()
        self.progress: Progress = self
        ctx = multiprocessing.get_context("spawn")
        self._counts = ctx.RawArray("q", 2 * procs)  # per process: deliveries, subscribers done
        self._watch: asyncio.Task[None] | None = None
        self._procs = ClientProcs(procs, _reader_main, lambda j: (
            self._counts, j, urls, rtnode, cfg, range(j, cfg.subscribers, procs),
            max(1, OPEN_CONCURRENCY // procs), MAX_LATENCY_SAMPLES // procs, SECRET),
            name="bench-readers")

    @property
    def total(self) -> int:
        return sum(self._counts[0::2])

    async def window(self, upto: int) -> None:
        """:meth:`Collector.window`, over every process."""
        limit = self.window_total
        # Shared memory of other processes: no event to wait on, so it is read every POLL_S.
        while upto * self.subscribers - self.total > limit:  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)

    async def open(self) -> str | None:
        timeout = SETUP_TIMEOUT_S + self.subscribers / 20
        replies = await self._ask(("open",), timeout)
        errors = [r[1] for r in replies if r[1]]
        self._watch = asyncio.create_task(self._watch_done())
        return "; ".join(errors) if errors else None

    def cpu(self) -> float:
        return self._procs.cpu()

    async def collect(self) -> None:
        """Every subscriber's counts and the latency samples, from every process."""
        subs: list[SubStats] = []
        for _, got, lat in await self._ask(("collect",), CLOSE_S):
            subs += got
            self.res.latencies += lat
        self.res.subs = sorted(subs, key=lambda s: s.index)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        with contextlib.suppress(TimeoutError, OSError, EOFError):
            await self._ask(("close",), CLOSE_S + 5)
        await asyncio.to_thread(self._procs.stop)

    async def _watch_done(self) -> None:
        done = self._counts
        while sum(done[1::2]) < self.subscribers:  # noqa: ASYNC110 (as in window)
            await asyncio.sleep(POLL_S)
        self.all_done.set()

    async def _ask(self, msg: tuple[Any, ...], timeout: float) -> list[tuple[Any, ...]]:
        procs = self._procs
        return await asyncio.to_thread(procs.ask, [msg] * len(procs.pipes), timeout)


async def _open_all(urls: list[str], cfg: BenchConfig, rtnode: bool, indices: Iterable[int],
                    concurrency: int, secret: str = SECRET,
                    ) -> tuple[list[tuple[int, Subscriber]], str | None]:
    """Open the subscribers ``indices`` (bounded in time); those opened, and what failed."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[int, Subscriber]:
        async with sem:
            return i, await open_subscriber(urls[i % len(urls)], cfg, i, rtnode, secret)

    opened: list[tuple[int, Subscriber]] = []
    try:
        outcome = await asyncio.wait_for(
            asyncio.gather(*(one(i) for i in indices), return_exceptions=True),
            SETUP_TIMEOUT_S + cfg.subscribers / 20)
    except TimeoutError as exc:
        return opened, f"subscribers could not join: {exc!r}"
    failed = [x for x in outcome if isinstance(x, BaseException)]
    opened = [x for x in outcome if not isinstance(x, BaseException)]
    if failed:
        return opened, f"{len(failed)} subscribers could not join: {failed[0]!r}"
    return opened, None


async def _close_all(subs: list[Subscriber]) -> None:
    """The closing handshake of every subscriber, bounded; then every socket is closed."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(ws.close() for ws in subs),
                                              return_exceptions=True), CLOSE_S)
    for ws in subs:
        ws.abort()


class _SharedCollector(Collector):
    """A reader process's :class:`Collector`: its progress also goes to shared memory."""

    def __init__(self, result: RunResult, max_samples: int, counts: Any, slot: int) -> None:
        super().__init__(result, max_samples)
        self.counts, self.slot = counts, 2 * slot

    def message(self, sub: SubStats, msg: str | bytes, now: float) -> None:
        super().message(sub, msg, now)
        counts, k = self.counts, self.slot
        counts[k] = self.total
        counts[k + 1] = self.subscribers - self.remaining


async def _serve(conn: Connection, counts: Any, slot: int, urls: list[str], rtnode: bool,
                 cfg: BenchConfig, indices: range, concurrency: int, max_samples: int,
                 secret: str) -> None:
    """A reader process: its subscribers, and the benchmark's commands on its pipe (the
    node's secret is the benchmark's: each process draws its own at import)."""
    loop = asyncio.get_running_loop()
    res = RunResult("readers", dataclasses.replace(cfg, subscribers=len(indices)))
    col = _SharedCollector(res, max_samples, counts, slot)
    finished = asyncio.Event()
    subs: list[Subscriber] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg[0] == "open":
                opened, error = await _open_all(urls, cfg, rtnode, indices, concurrency, secret)
                subs = [ws for _, ws in opened]
                if not error:
                    res.subs = [SubStats(i, seen=bytearray(cfg.events)) for i, _ in opened]
                    tasks = [asyncio.create_task(read_subscriber(ws, s, col, finished))
                             for ws, s in zip(subs, res.subs, strict=True)]
                conn.send(("ready", error))
            elif msg[0] == "collect":
                finished.set()
                conn.send(("collected", res.subs, res.latencies))
            elif msg[0] == "close":
                finished.set()
                await _close_all(subs)
                subs = []
                conn.send(("closed",))
            else:
                return
    finally:
        finished.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ws in subs:
            ws.abort()


def _reader_main(conn: Connection, counts: Any, slot: int, urls: list[str], rtnode: bool,
                 cfg: BenchConfig, indices: range, concurrency: int, max_samples: int,
                 secret: str) -> None:
    die_with_parent()
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):
        run_loop(_serve(conn, counts, slot, urls, rtnode, cfg, indices, concurrency,
                        max_samples, secret))
