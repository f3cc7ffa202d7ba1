"""The fan-out benchmark's publishers, and one measured run.

:func:`measure` opens S subscribers (:mod:`bench.fanout_readers`: in the benchmark's process,
or in ``procs`` processes of their own) and one publisher on rtnode (``connect``, ``join``,
then ``publish`` frames pipelined a batch per message, ``published`` replies read by a task of
their own) or on ``bench.baseline_server`` (one event per message, no acks), publishes M events
within the in-flight window (or, paced, one per message at ``rate`` per second, whatever has
been delivered), and fills a :class:`~bench.fanout_results.RunResult`. The publisher is
websockets' asyncio client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bench.fanout_readers import (
    EVENT,
    RIGHTS,
    ROOM,
    Collector,
    LocalReaders,
    Progress,
    Readers,
    decode,
    encode,
    until,
)
from bench.fanout_results import BenchConfig, RunResult
from bench.nodes import SECRET
from bench.procs import SETUP_TIMEOUT_S
from node.protocol.tokens import mint_token

__all__ = ["EVENT", "ROOM", "Collector", "measure"]

STALL_S = 20.0  # no delivery for this long: the run is over (reported)
STALL_AFTER_PUBLISHER_S = 3.0  # the same, once the publisher has ended
GRACE_S = 1.0  # after the last expected event: time for stray (duplicate) frames to show up


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


async def _open(url: str, codec: str | None) -> ClientConnection:
    return await connect(
        url, subprotocols=[f"rtnode.v1.{codec}"] if codec else None,
        max_size=None, compression=None, ping_interval=None, open_timeout=SETUP_TIMEOUT_S,
    )


async def _rtnode_publisher(url: str, cfg: BenchConfig) -> ClientConnection:
    ws = await _open(url, cfg.codec)
    tok = mint_token(SECRET, sub="bench-publisher", rooms={"*": RIGHTS})
    await ws.send(encode(cfg.codec, [{"type": "connect", "id": "connect", "token": tok}]))
    reply = await until(ws, cfg.codec, "connect")
    if reply.get("type") != "connected":
        raise RuntimeError(f"publisher: connect answered {reply}")
    return ws


async def _publish_rtnode(ws: ClientConnection, res: RunResult, col: Progress) -> None:
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
                for f in decode(cfg.codec, msg):
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
            await ws.send(encode(cfg.codec, frames))
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



async def _publish_baseline(ws: ClientConnection, res: RunResult, col: Progress) -> None:
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
        await ws.send(encode(cfg.codec, [frame]))
        res.sent = i + 1
    res.sent_done_at = time.time()


# ---------------------------------------------------------------------------------------------
# One measured run


async def measure(res: RunResult, urls: list[str], rtnode: bool,
                  cpu_probe: Callable[[], dict[str, float]]) -> None:
    """Open the clients, publish, wait for every delivery (bounded), close everything.

    Args:
        res: Filled with what the subscribers and the publisher saw (never raises on figures).
            Its config's ``procs`` puts the subscribers in processes of their own.
        urls: Subscriber ``i`` connects to ``urls[i % len(urls)]``, the publisher to ``urls[0]``.
        rtnode: The server is a node (else ``bench.baseline_server``).
        cpu_probe: CPU seconds of the server processes so far, taken around the measurement.
    """
    cfg = res.config
    readers: LocalReaders | Readers = (Readers(res, urls, rtnode, cfg.procs) if cfg.procs > 1
                                       else LocalReaders(res, urls, rtnode))
    publisher: ClientConnection | None = None
    pub: asyncio.Task[None] | None = None
    try:
        res.error = await readers.open()
        if res.error:
            return
        publisher = await asyncio.wait_for(
            _rtnode_publisher(urls[0], cfg) if rtnode else _baseline_client(urls[0]),
            SETUP_TIMEOUT_S,
        )
        col = readers.progress

        def clients() -> float:
            return time.process_time() + readers.cpu()

        cpu0, wall0 = {**cpu_probe(), "clients": clients()}, time.monotonic()
        pub = asyncio.create_task(
            _publish_rtnode(publisher, res, col) if rtnode
            else _publish_baseline(publisher, res, col)
        )
        res.stalled = await _wait_done(col, res, pub)
        res.timed_out = not col.all_done.is_set() and not res.stalled
        cpu1 = {**cpu_probe(), "clients": clients()}
        res.cpu_wall = time.monotonic() - wall0
        res.cpu = {k: v - cpu0[k] for k, v in cpu1.items() if k in cpu0}
        grace = GRACE_S if col.all_done.is_set() else 0.1
        await asyncio.wait({pub}, timeout=grace)  # the last replies
        await asyncio.sleep(grace)  # stray (duplicate) frames
        if pub.done() and not pub.cancelled() and pub.exception() is not None:
            res.pub_notes.append(f"publisher failed: {pub.exception()!r}")
        await readers.collect()
    except (TimeoutError, OSError, EOFError, ConnectionClosed, InvalidHandshake,
            RuntimeError) as exc:
        res.error = res.error or f"set-up failed: {exc!r}"
    finally:
        if pub is not None:
            pub.cancel()
            await asyncio.gather(pub, return_exceptions=True)
        await readers.close()
        if publisher is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(publisher.close(), 10)
            publisher.transport.abort()


async def _wait_done(col: Progress, res: RunResult, pub: asyncio.Task[None]) -> str | None:
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
