"""``python -m bench consume``: events/s and CPU per event of durable consumers, five ways, one run.

A nats-server with JetStream of its own (temporary directory, free port) holds the room stream
``RTNODE_ROOMS``, created with the node's configuration (:class:`bridge.nats_link.StreamSettings`,
per-room history unlimited), and ``--events`` CBOR event maps over ``--rooms`` rooms
``r:0``... of tenant ``default``, published with JetStream acks. Then each of these reads all of
them from a fresh durable and acks each one, in turn:

1. **baseline**: a plain nats-py durable pull consumer (``js.pull_subscribe``, ``fetch(100)``,
   the body decoded with cbor2, ``msg.ack()``), one process;
2. **ReplayConsumer**: :class:`bridge.replay.ReplayConsumer`, ``async for ev in c: await
   ev.ack()``, one process;
3. **group of 3**: three processes of ``ReplayConsumer(partitions=3)``, each acking what it
   gets, until their union has every event;
4. **rtnode consume**: the CLI, its JSON lines read from a pipe by this process;
5. **webhook**: :func:`bridge.webhook.post_events` (concurrency 16, ``serial_rooms=True``) to an
   aiohttp receiver in this process answering 204.

Every process runs on uvloop when installed, as the node and ``rtnode consume`` do.
The consumer processes (1, 2, 3, 5) connect, say ``ready`` and wait for ``go`` on stdin, so that
their start-up is not measured. For each way: events/s over the wall time from the first event
to the last; the CPU seconds per event, from /proc, of the consumer process(es) and of the
nats-server between the same two moments (the webhook receiver's CPU, this process, is shown
apart); events lost and delivered twice. The baseline's row comes first, the others with their
ratio to it. The exit status is 1 when an event was lost or delivered twice (nothing is killed,
so the group must not deliver twice either).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import REPO, cpu_seconds, die_with_parent

__all__ = ["main"]

TENANT = "default"
PATTERN = "r:*"
GROUP_SIZE = 3
HOOK_CONCURRENCY = 16
START_TIMEOUT_S = 30.0       # a consumer process connected and ready
GRACE_S = 0.5                # after the last event: time for a duplicate to show up
PROGRESS_EVERY_S = 0.05      # a worker's count line at most this often
STOP_TIMEOUT_S = 10.0


def _log(text: str) -> None:
    print(f"bench consume: {text}", file=sys.stderr, flush=True)


# -- the consumer processes ------------------------------------------------------------------

class _Tally:
    """What one worker received: seqs, first and last time; its count on stdout, throttled."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.failed = False
        self.first = 0.0
        self.last = 0.0

    def add(self, seq: int) -> None:
        if not self.seqs:
            self.first = time.time()
            print(f"first {self.first}", flush=True)
        self.seqs.append(seq)
        self.last = time.time()

    async def report(self) -> None:
        shown = -1
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            if len(self.seqs) != shown:
                shown = len(self.seqs)
                print(f"count {shown}", flush=True)


async def _baseline(nc: Any, durable: str, tally: _Tally) -> None:
    import cbor2
    import nats.errors
    from nats.js.api import AckPolicy, ConsumerConfig

    from node.protocol.subjects import STREAM_NAME, room_subject

    js = nc.jetstream()
    sub = await js.pull_subscribe(
        room_subject(TENANT, "*"), durable=durable, stream=STREAM_NAME,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1000,
                              ack_wait=30))
    while True:
        try:
            msgs = await sub.fetch(100, timeout=2)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            cbor2.loads(msg.data)
            tally.add(msg.metadata.sequence.stream)
            await msg.ack()


async def _replay(nc: Any, durable: str, tally: _Tally, partitions: int) -> None:
    from bridge.replay import ReplayConsumer

    async with ReplayConsumer(nc, tenant=TENANT, rooms=PATTERN, durable=durable,
                              partitions=partitions) as consumer:
        async for ev in consumer:
            tally.add(ev.seq)
            await ev.ack()


async def _hook(nc: Any, durable: str, url: str) -> None:
    from bridge.replay import ReplayConsumer
    from bridge.webhook import post_events

    async with ReplayConsumer(nc, tenant=TENANT, rooms=PATTERN, durable=durable,
                              serial_rooms=True) as consumer:
        await post_events(consumer, url, concurrency=HOOK_CONCURRENCY)


async def _worker(args: argparse.Namespace) -> _Tally:
    """One consumer process: connect, ``ready``, wait for ``go``, consume until SIGTERM; what
    it received."""
    import nats

    nc = await nats.connect(args.nats_url, name=f"bench-{args.worker}",
                            max_reconnect_attempts=0)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    tally = _Tally()
    reporter = asyncio.create_task(tally.report())
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        if args.worker == "baseline":
            await _baseline(nc, args.durable, tally)
        elif args.worker == "hook":
            await _hook(nc, args.durable, args.post)
        else:
            await _replay(nc, args.durable, tally, args.partitions)
    except asyncio.CancelledError:
        pass
    except Exception as exc:  # one line on stderr; the bench reports the exit status
        print(f"bench consume {args.worker}: {type(exc).__name__}: {exc}", file=sys.stderr)
        tally.failed = True
    finally:
        reporter.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)
    return tally


# -- the bench process -------------------------------------------------------------------------

@dataclass
class _Run:
    """One way of consuming: what it received and what it cost."""

    name: str
    expected: list[int]           # the stream seqs stored
    seqs: list[int] = field(default_factory=list)
    first: float = 0.0            # time.time() of the first event
    last: float = 0.0             # and of the last one
    consumer_cpu: float = 0.0     # CPU seconds between the two
    server_cpu: float = 0.0
    note: str = ""
    error: str | None = None

    def lost(self) -> int:
        return len(set(self.expected) - set(self.seqs))

    def duplicated(self) -> int:
        return len(self.seqs) - len(set(self.seqs))

    def rate(self) -> float:
        return len(set(self.seqs)) / (self.last - self.first) if self.last > self.first else 0.0


class _Watch:
    """CPU of the consumer process(es) and of the nats-server at the first and last event."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.pids: list[int] = []
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None

    def sample(self) -> tuple[float, float]:
        return sum(cpu_seconds(p) for p in self.pids), cpu_seconds(self.server_pid)

    def first(self) -> None:
        if self.start is None:
            self.start = self.sample()

    def done(self, run: _Run) -> None:
        self.end = self.sample()
        if self.start is not None:
            run.consumer_cpu = self.end[0] - self.start[0]
            run.server_cpu = self.end[1] - self.start[1]


async def _spawn(cmd: list[str], stdin: bool) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *cmd, cwd=REPO, stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stderr=None, preexec_fn=die_with_parent)  # its errors go to our stderr as they are


async def _stop(procs: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S, each by PID."""
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            _log(f"process {proc.pid} did not exit after SIGTERM: killed")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)


async def _until(done: Callable[[], bool], procs: list[asyncio.subprocess.Process],
                 timeout: float, what: str) -> str | None:
    """Wait (bounded) for ``done``; what went wrong, or None."""
    deadline = time.monotonic() + timeout
    while not done():
        for proc in procs:
            if proc.returncode is not None:
                return f"a consumer process exited with {proc.returncode}"
        if time.monotonic() > deadline:
            return f"not {what} within {timeout:.0f} s"
        await asyncio.sleep(0.01)
    return None


async def _workers(run: _Run, kind: str, n: int, url: str, tmp: Path, watch: _Watch,
                   timeout: float, *, count: int = 1, partitions: int = 1,
                   post: str = "", received: Callable[[], int] | None = None) -> None:
    """``count`` consumer processes of ``kind``; ends when ``received()`` (default: the sum of
    their counts) reaches ``n``."""
    counts = [0] * count
    results = [tmp / f"{kind}-{partitions}-{i}.json" for i in range(count)]
    procs = [await _spawn([sys.executable, "-m", "bench", "consume", "--worker", kind,
                           "--nats-url", url, "--durable", f"bench-{kind}-{partitions}",
                           "--partitions", str(partitions), "--post", post,
                           "--result", str(results[i])], stdin=True)
             for i in range(count)]
    watch.pids = [p.pid for p in procs]

    ready = [asyncio.Event() for _ in procs]

    async def read(i: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            word, _, value = raw.decode().strip().partition(" ")
            if word == "ready":
                ready[i].set()
            elif word == "first":
                watch.first()
            elif word == "count":
                counts[i] = int(value)

    readers = [asyncio.create_task(read(i, p)) for i, p in enumerate(procs)]
    try:
        run.error = await _until(lambda: all(r.is_set() for r in ready), procs,
                                 START_TIMEOUT_S, "every consumer process ready")
        if run.error is not None:
            return
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        got = received or (lambda: sum(counts))
        run.error = await _until(lambda: got() >= n, procs, timeout, "every event")
        watch.done(run)
        await asyncio.sleep(GRACE_S)
    finally:
        await _stop(procs)
        for task in readers:
            task.cancel()
    if kind == "hook":
        return
    spread = []
    for path in results:
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):
            run.error = run.error or "a consumer process wrote no result"
            continue
        run.seqs += res["seqs"]
        spread.append(len(res["seqs"]))
        if res["seqs"]:
            run.first = min(run.first or res["first"], res["first"])
            run.last = max(run.last, res["last"])
    if count > 1:
        run.note = "events per process: " + "/".join(map(str, spread))


async def _cli(run: _Run, n: int, url: str, watch: _Watch, timeout: float) -> None:
    """``rtnode consume`` with its stdout to a pipe read here, line by line."""
    rtnode = str(Path(sys.executable).parent / "rtnode")
    proc = await _spawn([rtnode, "consume", "--durable", "bench-cli", "--rooms", PATTERN,
                         "--nats-url", url], stdin=False)
    watch.pids = [proc.pid]
    assert proc.stdout is not None
    stdout = proc.stdout
    buf = b""

    async def read() -> None:
        nonlocal buf
        while True:  # to the end of its output: a line printed twice after the last is counted
            chunk = await stdout.read(1 << 16)
            if not chunk:
                return
            if not run.seqs:
                watch.first()
                run.first = time.time()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            run.seqs += [json.loads(line)["seq"] for line in lines if line]
            run.last = time.time()

    reader = asyncio.create_task(read())
    try:
        run.error = await _until(lambda: len(run.seqs) >= n, [proc],
                                 timeout + START_TIMEOUT_S, "every event")
        watch.done(run)
        await asyncio.sleep(GRACE_S)
    finally:
        await _stop([proc])
        try:  # the rest of its output, up to its end (it has exited)
            await asyncio.wait_for(reader, STOP_TIMEOUT_S)
        except (TimeoutError, ValueError) as exc:
            run.error = run.error or f"reading its output: {type(exc).__name__}"


async def _webhook(run: _Run, n: int, url: str, tmp: Path, watch: _Watch,
                   timeout: float) -> None:
    """post_events in a process of its own to a receiver here answering 204."""
    from aiohttp import web

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        if not run.seqs:
            watch.first()
            run.first = time.time()
        run.seqs.append(int(request.headers["Rtnode-Event-Id"].rsplit("/", 1)[1]))
        run.last = time.time()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    own = resource.getrusage(resource.RUSAGE_SELF)
    try:
        await _workers(run, "hook", n, url, tmp, watch, timeout,
                       post=f"http://127.0.0.1:{port}/hook", received=lambda: len(run.seqs))
    finally:
        after = resource.getrusage(resource.RUSAGE_SELF)
        await runner.cleanup()
    spent = after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime
    run.note = f"receiver (bench process) {spent / max(1, len(run.seqs)) * 1e6:.0f} us/event"


async def _publish(url: str, n: int, rooms: int, seed: int) -> list[int]:
    """Create the room stream and store ``n`` events; their stream seqs."""
    import cbor2
    import nats

    from bridge.nats_link import StreamSettings
    from node.protocol.subjects import room_subject

    rng = random.Random(seed)
    nc = await nats.connect(url, name="bench-publisher")
    try:
        js = nc.jetstream()
        await js.add_stream(StreamSettings(history_size=0).config())
        seqs: list[int] = []
        window = 500
        for start in range(0, n, window):
            batch = []
            for i in range(start, min(n, start + window)):
                room = f"r:{rng.randrange(rooms)}"
                body = cbor2.dumps({
                    "event": "reading", "data": {"i": i, "v": rng.random()},
                    "ts": int(time.time() * 1000),
                    "from": {"user": "bench", "kind": "ws", "client_id": "bench-1"}})
                batch.append(js.publish(room_subject(TENANT, room), body, timeout=30))
            seqs += [ack.seq for ack in await asyncio.gather(*batch)]
        return seqs
    finally:
        await nc.close()


async def _bench(n: int, rooms: int, seed: int) -> tuple[list[_Run], float]:
    from tests.servers import NatsProcess

    tmp = Path(tempfile.mkdtemp(prefix="rtnode-bench-consume-"))
    server = NatsProcess(tmp / "nats")
    try:
        await asyncio.to_thread(server.start)
        assert server.proc is not None
        _log(f"nats-server {server.url} (pid {server.proc.pid}); storing {n} events "
             f"over {rooms} rooms")
        started = time.monotonic()
        expected = await _publish(server.url, n, rooms, seed)
        publish_rate = n / (time.monotonic() - started)
        timeout = 30.0 + n / 500
        runs: list[_Run] = []
        ways: list[tuple[str, Callable[[_Run, _Watch], Any]]] = [
            ("baseline: nats-py pull", lambda r, w: _workers(
                r, "baseline", n, server.url, tmp, w, timeout)),
            ("ReplayConsumer", lambda r, w: _workers(
                r, "replay", n, server.url, tmp, w, timeout)),
            (f"group of {GROUP_SIZE} (partitions={GROUP_SIZE})", lambda r, w: _workers(
                r, "replay", n, server.url, tmp, w, timeout, count=GROUP_SIZE,
                partitions=GROUP_SIZE)),
            ("rtnode consume | pipe", lambda r, w: _cli(r, n, server.url, w, timeout)),
            (f"webhook (concurrency {HOOK_CONCURRENCY})", lambda r, w: _webhook(
                r, n, server.url, tmp, w, timeout)),
        ]
        for i, (name, way) in enumerate(ways, 1):
            _log(f"[{i}/{len(ways)}] {name}")
            run = _Run(name, expected)
            await way(run, _Watch(server.proc.pid))
            _log(f"[{i}/{len(ways)}] {name}: {len(run.seqs)} received, {run.lost()} lost, "
                 f"{run.rate():,.0f} events/s" + (f"; {run.error}" if run.error else ""))
            runs.append(run)
        return runs, publish_rate
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(tmp, ignore_errors=True)


def _us(seconds: float, events: int) -> str:
    return f"{seconds / events * 1e6:.1f}" if events else "-"


def _table(runs: list[_Run]) -> tuple[list[str], bool]:
    """The printed rows, and whether an event was lost or delivered twice."""
    head = (f"{'consumer':<30} {'events/s':>9} {'x base':>7} {'CPU us/ev':>10} {'x base':>7} "
            f"{'nats us/ev':>10} {'lost':>5} {'dup':>5}")
    lines = [head, "-" * len(head)]
    base = runs[0]
    bad = False
    for run in runs:
        lost, dup = run.lost(), run.duplicated()
        bad = bad or lost > 0 or dup > 0
        events = len(set(run.seqs))
        rate, cpu = run.rate(), run.consumer_cpu / events if events else 0.0
        base_cpu = base.consumer_cpu / max(1, len(set(base.seqs)))
        ratio = f"{rate / base.rate():.2f}" if base.rate() and run is not base else "1.00"
        cpu_ratio = (f"{cpu / base_cpu:.2f}" if base_cpu and run is not base else "1.00")
        lines.append(f"{run.name:<30} {rate:>9,.0f} {ratio:>7} {_us(run.consumer_cpu, events):>10}"
                     f" {cpu_ratio:>7} {_us(run.server_cpu, events):>10} {lost:>5} {dup:>5}")
        for extra in (run.note, run.error and f"ERROR: {run.error}"):
            if extra:
                lines.append(f"    {extra}")
    return lines, bad


def _run_loop(coro: Any) -> Any:
    """``coro`` on uvloop when installed (as the node and ``rtnode consume`` run), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench consume", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=30000, help="events stored and read")
    parser.add_argument("--rooms", type=int, default=50, help="rooms they are spread over")
    parser.add_argument("--seed", type=int, default=None, help="repeat a run (default: random)")
    # The consumer processes: this command again, with --worker.
    for flag in ("--worker", "--nats-url", "--durable", "--post", "--result"):
        parser.add_argument(flag, default="", help=argparse.SUPPRESS)
    parser.add_argument("--partitions", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        die_with_parent()
        tally = _run_loop(_worker(args))
        Path(args.result).write_text(json.dumps(
            {"seqs": tally.seqs, "first": tally.first, "last": tally.last}))
        return 1 if tally.failed else 0
    if args.events < 1 or args.rooms < 1:
        parser.error("--events and --rooms must be positive")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    try:
        runs, publish_rate = _run_loop(_bench(args.events, args.rooms, seed))
    except KeyboardInterrupt:
        return 130
    print(f"durable consumers: {args.events} events over {args.rooms} rooms (seed {seed}), "
          f"each way from a fresh durable, every event acked; {os.cpu_count()} cores, "
          f"one nats-server (stored at {publish_rate:,.0f} events/s, JetStream acks)")
    print("events/s: wall time from the first event to the last; CPU: the consumer "
          "process(es), us per event over that time; nats us/ev: the nats-server's")
    lines, bad = _table(runs)
    for line in lines:
        print(line)
    return 1 if bad or any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
