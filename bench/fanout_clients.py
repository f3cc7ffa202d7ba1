"""The fan-out benchmark's clients: subscribers that count and time, publishers in a window.

:func:`measure` opens S subscribers and one publisher on rtnode (``connect``, ``join``, then
``publish`` frames pipelined a batch per message, ``published`` replies read by a task of their
own) or on ``bench.baseline_server`` (one event per message, no acks), publishes M events
within the in-flight window (or, paced, one per message at ``rate`` per second, whatever has
been delivered), and fills a :class:`~bench.fanout_results.RunResult`. The subscribers are
:class:`~bench.fanout_subscriber.Subscriber` (websockets' protocol, no task woken per message),
the publisher websockets' asyncio client.
Every subscriber checks what it receives: events carry their index ``i`` in ``data`` (next to
the send time ``t`` and the padding), so missing, duplicated and reordered events are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import operator
import re
import time
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bench.fanout_results import BenchConfig, RunResult, SubStats
from bench.fanout_subscriber import Subscriber
from bench.nodes import SECRET
from bench.procs import SETUP_TIMEOUT_S
from node.protocol.frames import CBOR
from node.protocol.tokens import mint_token

__all__ = ["EVENT", "ROOM", "Collector", "measure"]

ROOM = "bench:fanout"
EVENT = "bench:tick"
RIGHTS = ["join", "publish", "history", "presence"]

STALL_S = 20.0  # no delivery for this long: the run is over (reported)
STALL_AFTER_PUBLISHER_S = 3.0  # the same, once the publisher has ended
GRACE_S = 1.0  # after the last expected event: time for stray (duplicate) frames to show up
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

    def __init__(self, result: RunResult) -> None:
        cfg = result.config
        self.result = result
        self.events = cfg.events
        self.stride = max(1, -(-result.expected // MAX_LATENCY_SAMPLES))
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


async def _read_subscriber(ws: Subscriber, sub: SubStats, col: Collector,
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


async def _slot(res: RunResult, i: int, start: float) -> None:
    """Paced publishing: wait for event ``i``'s time (``start + i / rate``), whatever has been
    delivered; a publisher behind its schedule sends at once and the lag is noted."""
    due = start + i / res.config.rate
    now = time.time()
    if due > now:
        await asyncio.sleep(due - now)
    else:
        res.late = max(res.late, now - due)


# ---------------------------------------------------------------------------------------------
# Clients of rtnode


def _encode(codec: str, frames: list[dict[str, Any]]) -> str | bytes:
    if codec == "cbor":
        return b"".join(CBOR.encode(f) for f in frames)
    return "\n".join(json.dumps(f, separators=(",", ":")) for f in frames)


def _decode(codec: str, msg: str | bytes) -> list[Any]:
    if isinstance(msg, bytes):
        return CBOR.decode(msg)
    return [json.loads(line) for line in msg.split("\n") if line]


async def _open(url: str, codec: str | None) -> ClientConnection:
    return await connect(
        url, subprotocols=[f"rtnode.v1.{codec}"] if codec else None,
        max_size=None, compression=None, ping_interval=None, open_timeout=SETUP_TIMEOUT_S,
    )


async def _until(ws: ClientConnection | Subscriber, codec: str, rid: str) -> dict[str, Any]:
    """Read frames until the reply with id ``rid`` (or a disconnect); other frames are dropped."""
    while True:
        for f in _decode(codec, await ws.recv()):
            if isinstance(f, dict) and (f.get("id") == rid or f.get("type") == "disconnect"):
                return f


async def _rtnode_subscriber(url: str, cfg: BenchConfig, index: int) -> Subscriber:
    ws = await Subscriber.open(url, f"rtnode.v1.{cfg.codec}", SETUP_TIMEOUT_S)
    try:
        tok = mint_token(SECRET, sub=f"bench-sub-{index}", rooms={"*": RIGHTS})
        ws.send(_encode(cfg.codec, [
            {"type": "connect", "id": "connect", "token": tok},
            {"type": "join", "id": "join", "room": ROOM},
        ]))
        reply = await _until(ws, cfg.codec, "join")
        if reply.get("type") != "joined":
            raise RuntimeError(f"subscriber {index}: join answered {reply}")
    except BaseException:
        ws.abort()
        raise
    return ws


async def _rtnode_publisher(url: str, cfg: BenchConfig) -> ClientConnection:
    ws = await _open(url, cfg.codec)
    tok = mint_token(SECRET, sub="bench-publisher", rooms={"*": RIGHTS})
    await ws.send(_encode(cfg.codec, [{"type": "connect", "id": "connect", "token": tok}]))
    reply = await _until(ws, cfg.codec, "connect")
    if reply.get("type") != "connected":
        raise RuntimeError(f"publisher: connect answered {reply}")
    return ws


async def _publish_rtnode(ws: ClientConnection, res: RunResult, col: Collector) -> None:
    """Publish M events, a batch per message, within the delivery window; read the replies."""
    cfg = res.config
    sent_at = [0.0] * cfg.events
    answered = 0
    replied = asyncio.Event()
    pad = "x" * cfg.payload_bytes

    async def replies() -> None:
        nonlocal answered
        try:
            async for msg in ws:
                now = time.time()
                for f in _decode(cfg.codec, msg):
                    kind = f.get("type") if isinstance(f, dict) else None
                    rid = f.get("id") if isinstance(f, dict) else None
                    if kind == "published" and isinstance(rid, int) and 0 <= rid < cfg.events:
                        res.acks.append(now - sent_at[rid])
                        res.acked_ids[rid] = 1
                        res.acked += 1
                        res.last_ack_at = now
                        answered += 1
                    elif kind == "error":
                        res.pub_errors[f"error {f.get('code')} {f.get('reason')}"] += 1
                        answered += 1
                    else:
                        res.pub_errors[f"unexpected {kind}"] += 1
                        if len(res.pub_notes) < 5:
                            res.pub_notes.append(json.dumps(f, default=str)[:200])
                replied.set()
        except ConnectionClosed:
            pass
        res.pub_notes.append(f"publisher connection closed: {ws.close_code} {ws.close_reason}")
        replied.set()
        col.wake.set()

    reader = asyncio.create_task(replies(), name="bench.publisher.replies")
    try:
        k = 0
        start = time.time()
        while k < cfg.events and not reader.done():
            n = min(cfg.batch, cfg.events - k)
            await (_slot(res, k, start) if cfg.rate else col.window(k + n))
            if reader.done():
                break
            t = time.time()
            frames = []
            for j in range(k, k + n):
                sent_at[j] = t
                frames.append({"type": "publish", "id": j, "room": ROOM, "event": EVENT,
                               "data": {"i": j, "t": t, "pad": pad}})
            if not res.t0:
                res.t0 = t
            await ws.send(_encode(cfg.codec, frames))
            k += n
            res.sent = k
        res.sent_done_at = time.time()
        while answered < res.sent and not reader.done():
            replied.clear()
            await replied.wait()
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


# ---------------------------------------------------------------------------------------------
# Clients of the baseline


async def _baseline_client(url: str) -> ClientConnection:
    ws = await _open(url, None)
    await ws.recv()  # {"type":"joined"}: the server has added us to its set
    return ws


async def _baseline_subscriber(url: str) -> Subscriber:
    ws = await Subscriber.open(url, None, SETUP_TIMEOUT_S)
    try:
        await asyncio.wait_for(ws.recv(), SETUP_TIMEOUT_S)  # {"type":"joined"}: in its set
    except BaseException:
        ws.abort()
        raise
    return ws


async def _publish_baseline(ws: ClientConnection, res: RunResult, col: Collector) -> None:
    """Publish M events, one per message, within the delivery window (the server has no acks)."""
    cfg = res.config
    pad = "x" * cfg.payload_bytes
    start = time.time()
    for i in range(cfg.events):
        await (_slot(res, i, start) if cfg.rate else col.window(i + 1))
        t = time.time()
        frame = {"type": "event", "room": ROOM, "event": EVENT,
                 "data": {"i": i, "t": t, "pad": pad}}
        if not res.t0:
            res.t0 = t
        await ws.send(_encode(cfg.codec, [frame]))
        res.sent = i + 1
    res.sent_done_at = time.time()


# ---------------------------------------------------------------------------------------------
# One measured run


async def measure(res: RunResult, urls: list[str], rtnode: bool,
                  cpu_probe: Callable[[], dict[str, float]]) -> None:
    """Open the clients, publish, wait for every delivery (bounded), close everything.

    Args:
        res: Filled with what the subscribers and the publisher saw (never raises on figures).
        urls: Subscriber ``i`` connects to ``urls[i % len(urls)]``, the publisher to ``urls[0]``.
        rtnode: The server is a node (else ``bench.baseline_server``).
        cpu_probe: CPU seconds of the server processes so far, taken around the measurement.
    """
    cfg = res.config
    sem = asyncio.Semaphore(50)
    opened: list[Subscriber | None] = [None] * cfg.subscribers
    subs: list[Subscriber] = []
    publisher: ClientConnection | None = None

    async def one(i: int) -> None:
        async with sem:
            url = urls[i % len(urls)]
            opened[i] = await (_rtnode_subscriber(url, cfg, i) if rtnode
                               else _baseline_subscriber(url))

    tasks: list[asyncio.Task[Any]] = []
    finished = asyncio.Event()
    try:
        outcome = await asyncio.wait_for(
            asyncio.gather(*(one(i) for i in range(cfg.subscribers)), return_exceptions=True),
            SETUP_TIMEOUT_S,
        )
        failed = [exc for exc in outcome if exc is not None]
        if failed:
            res.error = f"{len(failed)} subscribers could not join: {failed[0]!r}"
            return
        subs = [ws for ws in opened if ws is not None]
        publisher = await asyncio.wait_for(
            _rtnode_publisher(urls[0], cfg) if rtnode else _baseline_client(urls[0]),
            SETUP_TIMEOUT_S,
        )
        col = Collector(res)
        res.subs = [SubStats(i, seen=bytearray(cfg.events)) for i in range(cfg.subscribers)]
        tasks = [asyncio.create_task(_read_subscriber(ws, s, col, finished))
                 for ws, s in zip(subs, res.subs, strict=True)]
        cpu0, wall0 = {**cpu_probe(), "clients": time.process_time()}, time.monotonic()
        pub = asyncio.create_task(
            _publish_rtnode(publisher, res, col) if rtnode
            else _publish_baseline(publisher, res, col)
        )
        tasks.append(pub)
        res.stalled = await _wait_done(col, res, pub)
        res.timed_out = not col.all_done.is_set() and not res.stalled
        cpu1 = {**cpu_probe(), "clients": time.process_time()}
        res.cpu_wall = time.monotonic() - wall0
        res.cpu = {k: v - cpu0[k] for k, v in cpu1.items() if k in cpu0}
        grace = GRACE_S if col.all_done.is_set() else 0.1
        await asyncio.wait({pub}, timeout=grace)  # the last replies
        await asyncio.sleep(grace)  # stray (duplicate) frames
        if pub.done() and not pub.cancelled() and pub.exception() is not None:
            res.pub_notes.append(f"publisher failed: {pub.exception()!r}")
    except (TimeoutError, OSError, ConnectionClosed, InvalidHandshake, RuntimeError) as exc:
        res.error = res.error or f"set-up failed: {exc!r}"
    finally:
        finished.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conns: list[Subscriber | ClientConnection] = [
            ws for ws in [*opened, publisher] if ws is not None]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True), 10
            )
        for ws in conns:
            ws.transport.abort()


async def _wait_done(col: Collector, res: RunResult, pub: asyncio.Task[None]) -> str | None:
    """Wait until every subscriber has every event, or the timeout, or a stall (returned)."""
    deadline = time.monotonic() + res.config.timeout_s
    last_total, last_progress = -1, time.monotonic()
    while not col.all_done.is_set():
        now = time.monotonic()
        if now >= deadline:
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(col.all_done.wait(), min(0.5, deadline - now))
        now = time.monotonic()
        if col.total != last_total:
            last_total, last_progress = col.total, now
        idle = now - last_progress
        if pub.done() and idle > STALL_AFTER_PUBLISHER_S:
            return (f"stopped waiting: the publisher had ended and no event arrived for "
                    f"{STALL_AFTER_PUBLISHER_S:.0f} s")
        if idle > STALL_S:
            return f"stopped waiting: no event arrived for {STALL_S:.0f} s"
    return None
