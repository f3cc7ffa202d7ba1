"""Room fan-out, end to end through JetStream: rtnode against a plain websockets broadcast server.

``python -m bench [--subscribers 100] [--events 2000] [--payload-bytes 100] [--codec json|cbor]
[--skip-baseline] [--in-flight 256] [--timeout-s 120]`` (or ``make bench ARGS="..."``):

1. starts an rtnode node as a subprocess (with its embedded nats-server) on free ports, in a
   temporary data directory, with limits high enough that the benchmark measures fan-out, not
   rate limiting;
2. opens S subscriber WebSockets that ``connect`` and ``join`` one room, and one publisher that
   publishes M events to it, pipelined: several ``publish`` frames per WebSocket message, its
   ``published`` replies read by a task of their own;
3. measures delivered events/s (S*M over the time from the first publish sent to the last event
   received by the last subscriber), publish->deliver latency over every delivery (or an even
   sample of about a million), and publish->``published`` latency;
4. does the same against ``bench.baseline_server`` (``websockets.broadcast``, one event per
   message, also a subprocess) with the same clients;
5. prints a table and the ratio. Never asserts: losses, duplicates, disconnects and anything the
   node logged are printed as figures.

Both publishers obey the same window: at most ``--in-flight`` events published and not yet
received, on average over the subscribers (a broadcast server has no acks to pace on, and the
node cuts off a client with more than 1024 frames queued). Each measurement is bounded by
``--timeout-s``, and ends early when deliveries stop; partial counts are then reported.

Every subscriber checks what it receives: events carry their index ``i`` in ``data`` (next to the
send time ``t`` and the padding), so missing, duplicated and reordered events are counted per
subscriber.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from node.nats_server import free_port
from node.protocol.frames import CBOR
from node.protocol.tokens import mint_token

__all__ = ["BenchConfig", "RunResult", "main", "run_baseline", "run_rtnode"]

ROOM = "bench:fanout"
EVENT = "bench:tick"
SECRET = "bench-secret-" + os.urandom(16).hex()
RIGHTS = ["join", "publish", "history", "presence"]
REPO = Path(__file__).resolve().parent.parent

READY_TIMEOUT_S = 30.0
SETUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
STALL_S = 20.0  # no delivery for this long: the run is over (reported)
STALL_AFTER_PUBLISHER_S = 3.0  # the same, once the publisher has ended
GRACE_S = 1.0  # after the last expected event: time for stray (duplicate) frames to show up
MAX_LATENCY_SAMPLES = 1_000_000
MAX_MESSAGE_BYTES = 60_000  # publisher messages stay under the node's max_frame_bytes (65536)
MAX_BATCH = 32
_PR_SET_PDEATHSIG = 1

# Event frames as the node writes them in JSON (compact, data keys in the publisher's order):
# counting the marker counts frames; the regex reads only the publisher's index and send time.
_EVENT_MARK = '"type":"event"'
_EVENT_RE = re.compile(r'"data":\{"i":(\d+),"t":([-+0-9.eE]+)')


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark invocation measures."""

    subscribers: int = 100
    events: int = 2000
    payload_bytes: int = 100
    codec: str = "json"
    skip_baseline: bool = False
    in_flight: int = 256
    timeout_s: float = 120.0

    @property
    def batch(self) -> int:
        """Publish frames per WebSocket message (kept under the node's frame limit)."""
        per_frame = self.payload_bytes + 160
        return max(1, min(MAX_BATCH, self.in_flight, MAX_MESSAGE_BYTES // per_frame))


@dataclass
class SubStats:
    """What one subscriber received."""

    index: int
    events: int = 0  # event frames received (duplicates included)
    distinct: int = 0
    duplicates: int = 0
    out_of_order: int = 0  # events whose index is lower than the previous one's
    unparsed: int = 0  # event frames whose index/time could not be read
    other: Counter[str] = field(default_factory=Counter)  # non-event frames, by type
    notes: list[str] = field(default_factory=list)  # errors, disconnects (first few)
    closed: str | None = None  # close code and reason when the connection ended early
    last_at: float = 0.0  # time.time() of the last event received
    done_at: float = 0.0  # time.time() when every event had arrived
    last_index: int = -1
    seen: bytearray = field(default_factory=bytearray)


@dataclass
class RunResult:
    """Figures of one system under test (rtnode or the baseline)."""

    name: str
    config: BenchConfig
    subs: list[SubStats] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, publish -> deliver
    acks: list[float] = field(default_factory=list)  # seconds, publish -> published
    t0: float = 0.0  # first publish sent
    sent: int = 0
    sent_done_at: float = 0.0
    acked: int = 0
    acked_ids: bytearray = field(default_factory=bytearray)  # 1 where ``published`` came
    last_ack_at: float = 0.0
    pub_errors: Counter[str] = field(default_factory=Counter)
    pub_notes: list[str] = field(default_factory=list)
    timed_out: bool = False
    stalled: str | None = None
    error: str | None = None  # the run could not take place (server did not start...)
    server_log: list[str] = field(default_factory=list)  # up to the stop signal
    shutdown_log: list[str] = field(default_factory=list)  # after it
    server_counters: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds during the measurement
    cpu_wall: float = 0.0  # wall seconds over which ``cpu`` was taken

    @property
    def expected(self) -> int:
        return self.config.subscribers * self.config.events

    @property
    def delivered(self) -> int:
        return sum(s.distinct for s in self.subs)

    @property
    def end(self) -> float:
        return max((s.done_at or s.last_at for s in self.subs), default=0.0)

    @property
    def elapsed(self) -> float:
        return self.end - self.t0 if self.t0 and self.end > self.t0 else 0.0

    @property
    def rate(self) -> float:
        return self.delivered / self.elapsed if self.elapsed else 0.0


# ---------------------------------------------------------------------------------------------
# Receiving


class _Collector:
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
        n = text.count(_EVENT_MARK)
        if n:
            got = 0
            for i_s, t_s in _EVENT_RE.findall(text):
                self._event(sub, int(i_s), float(t_s), now)
                got += 1
            if got != n:
                sub.unparsed += n - got
                sub.events += n - got
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


async def _read_subscriber(ws: ClientConnection, sub: SubStats, col: _Collector,
                           finished: asyncio.Event) -> None:
    message = col.message
    try:
        async for msg in ws:
            message(sub, msg, time.time())
    except ConnectionClosed:
        pass
    except Exception as exc:  # a bug of the benchmark's own: reported, not hidden
        sub.closed = f"reader failed: {exc!r}"
        return
    if not finished.is_set():
        sub.closed = f"{ws.close_code} {ws.close_reason or ''}".strip()


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


async def _until(ws: ClientConnection, codec: str, rid: str) -> dict[str, Any]:
    """Read frames until the reply with id ``rid`` (or a disconnect); other frames are dropped."""
    while True:
        for f in _decode(codec, await ws.recv()):
            if isinstance(f, dict) and (f.get("id") == rid or f.get("type") == "disconnect"):
                return f


async def _rtnode_subscriber(url: str, cfg: BenchConfig, index: int) -> ClientConnection:
    ws = await _open(url, cfg.codec)
    tok = mint_token(SECRET, sub=f"bench-sub-{index}", rooms={"*": RIGHTS})
    await ws.send(_encode(cfg.codec, [
        {"type": "connect", "id": "connect", "token": tok},
        {"type": "join", "id": "join", "room": ROOM},
    ]))
    reply = await _until(ws, cfg.codec, "join")
    if reply.get("type") != "joined":
        raise RuntimeError(f"subscriber {index}: join answered {reply}")
    return ws


async def _rtnode_publisher(url: str, cfg: BenchConfig) -> ClientConnection:
    ws = await _open(url, cfg.codec)
    tok = mint_token(SECRET, sub="bench-publisher", rooms={"*": RIGHTS})
    await ws.send(_encode(cfg.codec, [{"type": "connect", "id": "connect", "token": tok}]))
    reply = await _until(ws, cfg.codec, "connect")
    if reply.get("type") != "connected":
        raise RuntimeError(f"publisher: connect answered {reply}")
    return ws


async def _publish_rtnode(ws: ClientConnection, res: RunResult, col: _Collector) -> None:
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
        while k < cfg.events and not reader.done():
            n = min(cfg.batch, cfg.events - k)
            await col.window(k + n)
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


async def _publish_baseline(ws: ClientConnection, res: RunResult, col: _Collector) -> None:
    """Publish M events, one per message, within the delivery window (the server has no acks)."""
    cfg = res.config
    pad = "x" * cfg.payload_bytes
    for i in range(cfg.events):
        await col.window(i + 1)
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


async def _measure(res: RunResult, url: str, rtnode: bool,
                   cpu_probe: Callable[[], dict[str, float]]) -> None:
    """Open the clients, publish, wait for every delivery (bounded), close everything."""
    cfg = res.config
    sem = asyncio.Semaphore(50)
    opened: list[ClientConnection | None] = [None] * cfg.subscribers
    subs: list[ClientConnection] = []
    publisher: ClientConnection | None = None

    async def one(i: int) -> None:
        async with sem:
            opened[i] = await (_rtnode_subscriber(url, cfg, i) if rtnode
                               else _baseline_client(url))

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
            _rtnode_publisher(url, cfg) if rtnode else _baseline_client(url), SETUP_TIMEOUT_S
        )
        col = _Collector(res)
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
    except (TimeoutError, OSError, ConnectionClosed, RuntimeError) as exc:
        res.error = res.error or f"set-up failed: {exc!r}"
    finally:
        finished.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conns = [ws for ws in [*opened, publisher] if ws is not None]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True), 10
            )
        for ws in conns:
            ws.transport.abort()


async def _wait_done(col: _Collector, res: RunResult, pub: asyncio.Task[None]) -> str | None:
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


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM outside the event loop: stop the servers and clean up, as on Ctrl-C."""
    raise KeyboardInterrupt


def _run_loop(coro: Any) -> None:
    """Run ``coro`` on uvloop when installed; SIGTERM cancels it and raises KeyboardInterrupt."""
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    interrupted = False

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None

        def stop() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
        await coro

    try:
        runner(guarded())
    except asyncio.CancelledError:
        if not interrupted:
            raise
    finally:
        signal.signal(signal.SIGTERM, _terminated)  # the loop's handler is gone with it
    if interrupted:
        raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------
# Server processes


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def _children_of(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids.extend(int(x) for x in (task / "children").read_text().split())
    except OSError:
        return []
    return kids


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _child_setup() -> None:  # runs in the child between fork and exec
    # Dies with the benchmark even if the benchmark is killed (Linux); its own process group,
    # so that a Ctrl-C reaches the benchmark only, which then stops the server in order.
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                stdin=subprocess.DEVNULL, preexec_fn=_child_setup)


def _stop(proc: subprocess.Popen[bytes], what: str, notes: list[str]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; children left behind are killed by PID."""
    if proc.poll() is not None:
        notes.append(f"{what} had already exited with {proc.returncode}")
        return
    kids = {pid: _cmdline(pid) for pid in _children_of(proc.pid)}
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        proc.wait(STOP_TIMEOUT_S)
        took = time.monotonic() - started
        if took > 2:
            notes.append(f"{what} took {took:.1f} s to exit after SIGTERM")
    except subprocess.TimeoutExpired:
        notes.append(f"{what} did not exit {STOP_TIMEOUT_S:.0f} s after SIGTERM: killed")
        proc.kill()
        proc.wait(10)
    for pid, cmd in kids.items():
        if cmd and _cmdline(pid) == cmd:  # still the same process, still alive
            deadline = time.monotonic() + 5
            while _cmdline(pid) == cmd and time.monotonic() < deadline:
                time.sleep(0.1)
            if _cmdline(pid) == cmd:
                notes.append(f"{what}'s child {pid} ({cmd.split()[0]}) outlived it: killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# The node's start-up banner and goodbye on stdout: not worth reporting.
_BANNER = ("rtnode bench ready", "  http ", "  websocket ", "  nats ", "  dev token ",
           "rtnode bench stopped", "baseline ready")


def _log_lines(path: Path, start: int = 0, end: int | None = None) -> list[str]:
    """Non-empty lines of a server's output between byte offsets, without its banner."""
    try:
        data = path.read_bytes()[start:end]
    except OSError:
        return []
    return [line for line in data.decode(errors="replace").splitlines()
            if line.strip() and not line.startswith(_BANNER)]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


_COUNTERS = (
    "rtnode_published", "rtnode_events_in", "rtnode_events_delivered", "rtnode_gap_repairs",
    "rtnode_live_dropped", "rtnode_events_replayed", "rtnode_slow_consumer_disconnects",
    "rtnode_rate_limited", "rtnode_jetstream_retries", "rtnode_jetstream_errors",
)


def _scrape(base: str) -> dict[str, float]:
    """The node's counters that tell about fan-out, mailbox overflows and failures by actor
    kind, live connection actors and open connections."""
    status, body = _http_get(base + "/metrics", timeout=5)
    out: dict[str, float] = {}
    if status != 200:
        return out
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        metric, brace, labels = name.partition("{")
        metric = metric.removesuffix("_total")
        try:
            number = float(value)
        except ValueError:
            continue
        if metric in _COUNTERS:
            out[metric] = number
        elif metric in ("rtnode_actor_overflows", "rtnode_actor_failures",
                        "rtnode_actor_restarts") and number:
            out[metric + brace + labels] = number
        elif metric == "rtnode_actors" and 'kind="connection"' in labels:
            out["rtnode_connection_actors"] = number
        elif metric == "rtnode_connections":
            out["rtnode_open_connections"] = out.get("rtnode_open_connections", 0) + number
    return out


def _scrape_settled(base: str, timeout: float = 3.0) -> dict[str, float]:
    """Scrape once every client is closed: wait (bounded) for the node to let them go."""
    deadline = time.monotonic() + timeout
    while True:
        counters = _scrape(base)
        alive = counters.get("rtnode_connection_actors", 0) + counters.get(
            "rtnode_open_connections", 0)
        if not alive or time.monotonic() > deadline:
            return counters
        time.sleep(0.1)


def run_rtnode(cfg: BenchConfig) -> RunResult:
    """Start a node subprocess, measure fan-out through it, stop it. Never raises on figures."""
    res = RunResult("rtnode", cfg, acked_ids=bytearray(cfg.events))
    tmp = Path(tempfile.mkdtemp(prefix="rtnode-bench-"))
    log_path = tmp / "node.log"
    http_port, mqtt_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "node", "run", "--http-port", str(http_port),
           "--mqtt-port", str(mqtt_port), "--data-dir", str(tmp / "data"),
           "--node-name", "bench", "--rate-per-s", "1000000", "--rate-burst", "1000000",
           "--max-errors-per-min", "1000000", "--slow-consumer-bytes", "67108864",
           "--log-level", "warning"]
    if cfg.payload_bytes + 1024 > MAX_MESSAGE_BYTES:
        cmd += ["--max-frame-bytes", str(2 * (cfg.payload_bytes + 1024))]
    env = {**os.environ, "RTNODE_JWT_SECRET": SECRET}
    base = f"http://127.0.0.1:{http_port}"
    proc: subprocess.Popen[bytes] | None = None
    notes: list[str] = []
    stop_at: int | None = None
    try:
        proc = _spawn(cmd, log_path, env)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while _http_get(base + "/readyz")[0] != 200:
            if proc.poll() is not None:
                res.error = f"node exited with {proc.returncode} before /readyz was 200"
                return res
            if time.monotonic() > deadline:
                res.error = f"node not ready after {READY_TIMEOUT_S:.0f} s"
                return res
            time.sleep(0.1)
        node_pid = proc.pid
        kids = {pid: _cmdline(pid) for pid in _children_of(node_pid)}

        def probe() -> dict[str, float]:
            out = {"node": _cpu_seconds(node_pid)}
            for pid, cmd in kids.items():
                name = "nats-server" if "nats-server" in cmd else f"node child {pid}"
                out[name] = out.get(name, 0.0) + _cpu_seconds(pid)
            return out

        _run_loop(_measure(res, f"ws://127.0.0.1:{http_port}/ws", True, probe))
        res.server_counters = _scrape_settled(base)
    finally:
        if proc is not None:
            stop_at = _size(log_path)
            _stop(proc, "node", notes)
        res.server_log = _log_lines(log_path, 0, stop_at)
        res.shutdown_log = [*_log_lines(log_path, stop_at or _size(log_path)), *notes]
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _wait_line(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait until ``proc`` has written ``text`` to its log ``path`` (False if it exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            if text in path.read_text(errors="replace"):
                return True
        time.sleep(0.05)
    return False


def run_baseline(cfg: BenchConfig) -> RunResult:
    """Start ``bench.baseline_server`` as a subprocess, measure the same fan-out, stop it."""
    res = RunResult("baseline", cfg)
    port = free_port()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rtnode-bench-baseline-") as tmp:
        log_path = Path(tmp) / "baseline.log"
        proc = _spawn(
            [sys.executable, "-m", "bench.baseline_server", "--port", str(port)], log_path,
            {**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)},
        )
        try:
            if not _wait_line(log_path, "baseline ready", proc, READY_TIMEOUT_S):
                res.error = "baseline server did not start"
                return res
            _run_loop(_measure(res, f"ws://127.0.0.1:{port}", False,
                               lambda: {"baseline server": _cpu_seconds(proc.pid)}))
        finally:
            stop_at = _size(log_path)
            _stop(proc, "baseline server", notes)
            res.server_log = _log_lines(log_path, 0, stop_at)
            res.shutdown_log = [*_log_lines(log_path, stop_at), *notes]
    return res


# ---------------------------------------------------------------------------------------------
# Report


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _figures(res: RunResult) -> dict[str, Any]:
    lat = sorted(res.latencies)
    acks = sorted(res.acks)
    return {
        "rate": res.rate,
        "p50": _pct(lat, 0.50), "p99": _pct(lat, 0.99), "max": lat[-1] if lat else None,
        "ack50": _pct(acks, 0.50), "ack99": _pct(acks, 0.99),
    }


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts) if len(parts) <= 12 else ",".join(parts[:12]) + ",..."


def _problems(res: RunResult) -> list[str]:
    """Per-subscriber anomalies, publisher errors and what the server logged."""
    cfg = res.config
    out: list[str] = []
    if res.error:
        out.append(f"run failed: {res.error}")
    if res.timed_out:
        out.append(f"timed out after {cfg.timeout_s:g} s: partial counts")
    if res.stalled:
        out.append(f"{res.stalled}: partial counts")
    if res.sent < cfg.events and not res.error:
        out.append(f"publisher sent {res.sent} of {cfg.events} events")
    # What a subscriber should have: rtnode, every event the node acknowledged as stored;
    # the baseline, every event the publisher sent. Missing ones of those are losses.
    if res.name == "rtnode":
        owed, owed_what = res.acked_ids, "acknowledged by the node"
    else:
        owed = bytearray(b"\x01" * res.sent + b"\x00" * (cfg.events - res.sent))
        owed_what = "sent"
    n_owed = sum(owed)

    def lost(s: SubStats) -> int:
        return sum(1 for o, g in zip(owed, s.seen, strict=False) if o and not g)

    bad = [s for s in res.subs
           if s.distinct != cfg.events or s.duplicates or s.unparsed or s.closed or s.notes]
    if bad:
        losses = {s.index: lost(s) for s in bad}
        dups = sum(s.duplicates for s in res.subs)
        out.append(f"{len(bad)} of {len(res.subs)} subscribers incomplete or odd; "
                   f"{n_owed} of {cfg.events} events {owed_what}; missing deliveries: "
                   f"{sum(losses.values())} of events {owed_what}, "
                   f"{res.expected - res.delivered} of all {res.expected}; duplicates: {dups}")
        groups: dict[str, list[int]] = {}
        for s in bad:
            line = (f"{s.events} event frames, {s.distinct} distinct, "
                    f"missing {losses[s.index]} of the {n_owed} {owed_what} "
                    f"({cfg.events - s.distinct} of all {cfg.events}), "
                    f"{s.duplicates} duplicates")
            if s.unparsed:
                line += f", {s.unparsed} unreadable"
            if s.closed:
                line += f", closed early ({s.closed})"
            if s.notes:
                line += f", frames: {'; '.join(s.notes)}"
            groups.setdefault(line, []).append(s.index)
        for line, indices in list(groups.items())[:20]:
            who = (f"subscriber {indices[0]}" if len(indices) == 1
                   else f"subscribers {_ranges(indices)} ({len(indices)})")
            out.append(f"  {who}: {line}")
        if len(groups) > 20:
            out.append(f"  ... and {len(groups) - 20} more kinds")
    disorder = sum(s.out_of_order for s in res.subs)
    if disorder:
        out.append(f"{disorder} deliveries arrived after a later-published event "
                   f"(publish order is per connection, not guaranteed across pipelined frames)")
    others: Counter[str] = Counter()
    for s in res.subs:
        others.update(s.other)
    if others:
        out.append("non-event frames at subscribers: "
                   + ", ".join(f"{k} x{v}" for k, v in others.most_common()))
    for reason, n in res.pub_errors.most_common():
        out.append(f"publisher: {reason} x{n}")
    out.extend(f"publisher: {note}" for note in res.pub_notes
               if not note.startswith("publisher connection closed: 1000"))
    for lines, when in ((res.server_log, "until stopped"), (res.shutdown_log, "while stopping")):
        if lines:
            shown = "" if len(lines) <= 40 else ", last 40 shown"
            out.append(f"{res.name} output {when} ({len(lines)} lines{shown}):")
            out.extend(f"  | {line[:300]}" for line in lines[-40:])
    return out


def _report(cfg: BenchConfig, results: list[RunResult]) -> None:
    args = (f"--subscribers {cfg.subscribers} --events {cfg.events} "
            f"--payload-bytes {cfg.payload_bytes} --codec {cfg.codec} --in-flight {cfg.in_flight}"
            + (" --skip-baseline" if cfg.skip_baseline else "")
            + (f" --timeout-s {cfg.timeout_s:g}" if cfg.timeout_s != 120.0 else ""))
    print()
    print(f"fan-out: {cfg.subscribers} subscribers x {cfg.events} events = "
          f"{cfg.subscribers * cfg.events} deliveries, {cfg.payload_bytes}-byte payload, "
          f"{cfg.codec}")
    print(f"machine: {platform.system()} {platform.machine()}, os.cpu_count() = "
          f"{os.cpu_count()}; the server process (the node and its nats-server, or the "
          f"baseline) and all clients share these cores")
    print(f"reproduce: python -m bench {args}")
    print(f"       or: make bench ARGS=\"{args}\"")
    print(f"publishers: at most {cfg.in_flight} events published and not yet received (on "
          f"average over the subscribers); rtnode: {cfg.batch} publish frames per message, "
          f"baseline: one event per message")
    print()
    header = (f"{'':<10} {'delivered':>17} {'deliveries/s':>13} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'max ms':>8} {'ack p50':>8} {'ack p99':>8} {'time s':>7} {'stored/s':>9}")
    print(header)
    print("-" * len(header))
    figs = {}
    for res in results:
        f = figs[res.name] = _figures(res)
        stored = ""
        if res.name == "rtnode" and res.acked and res.last_ack_at > res.t0:
            stored = f"{res.acked / (res.last_ack_at - res.t0):.0f}"
        print(f"{res.name:<10} {f'{res.delivered}/{res.expected}':>17} {f['rate']:>13.0f} "
              f"{_ms(f['p50']):>8} {_ms(f['p99']):>8} {_ms(f['max']):>8} "
              f"{_ms(f['ack50']):>8} {_ms(f['ack99']):>8} {res.elapsed:>7.2f} {stored:>9}")
    if "rtnode" in figs and "baseline" in figs:
        r, b = figs["rtnode"], figs["baseline"]

        def ratio(x: float | None, y: float | None) -> str:
            return f"{x / y:.2f}" if x and y else "-"

        print(f"ratio rtnode/baseline: deliveries/s {ratio(r['rate'], b['rate'])}, "
              f"p50 latency {ratio(r['p50'], b['p50'])}, p99 latency {ratio(r['p99'], b['p99'])}")
    print()
    for res in results:
        if res.cpu:
            used = ", ".join(f"{k} {v:.2f} s" for k, v in res.cpu.items())
            print(f"CPU while {res.name} was measured ({res.cpu_wall:.2f} s wall x "
                  f"{os.cpu_count()} cores): {used}")
    for res in results:
        lines = _problems(res)
        counters = dict(res.server_counters)
        alive = counters.pop("rtnode_connection_actors", 0)
        still_open = counters.pop("rtnode_open_connections", 0)
        if alive or still_open:
            lines.insert(0, f"after every client had closed: {alive:g} connection actors still "
                            f"alive, {still_open:g} WebSocket connections still open (node)")
        if counters:
            lines.insert(0, "node counters: " + ", ".join(
                f"{k.removeprefix('rtnode_')}={v:.0f}" for k, v in counters.items()))
        if lines:
            print()
            print(f"{res.name}:")
            for line in lines:
                print(f"  {line}")


def _parse(argv: list[str]) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--subscribers", type=int, default=100, help="subscriber connections")
    p.add_argument("--events", type=int, default=2000, help="events published")
    p.add_argument("--payload-bytes", type=int, default=100, help="padding in each event")
    p.add_argument("--codec", choices=("json", "cbor"), default="json")
    p.add_argument("--skip-baseline", action="store_true", help="measure rtnode only")
    p.add_argument("--in-flight", type=int, default=256,
                   help="most events published and not yet received (on average over the "
                        "subscribers), for both servers")
    p.add_argument("--timeout-s", type=float, default=120.0,
                   help="bound of each measurement (partial counts are reported)")
    a = p.parse_args(argv)
    for name in ("subscribers", "events", "in_flight"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.payload_bytes < 0:
        p.error("--payload-bytes must not be negative")
    return BenchConfig(a.subscribers, a.events, a.payload_bytes, a.codec, a.skip_baseline,
                       a.in_flight, a.timeout_s)


def main(argv: list[str]) -> int:
    """Run the fan-out benchmark and print its figures. Returns 0 unless a run failed to start."""
    cfg = _parse(argv)
    print(f"rtnode fan-out benchmark: {cfg.subscribers} subscribers, {cfg.events} events, "
          f"{cfg.payload_bytes}-byte payload, {cfg.codec}", flush=True)
    results: list[RunResult] = []
    signal.signal(signal.SIGTERM, _terminated)
    try:
        print("  rtnode (through JetStream) ...", flush=True)
        results.append(run_rtnode(cfg))
        if not cfg.skip_baseline:
            print("  baseline (websockets.broadcast) ...", flush=True)
            results.append(run_baseline(cfg))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    _report(cfg, results)
    return 1 if any(r.error for r in results) else 0
