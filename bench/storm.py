"""A reconnect storm: every client of one room comes back at once after its node restarts.

One nats-server with JetStream, a publishing node (``pub``) and the node under test (``storm``)
on it, each a process of its own, and ``--procs`` load processes holding ``--clients`` WebSocket
clients between them (each its own user). Each round, for the code under test and for the
baseline (the same storm on the node as it was before recoveries were batched, ``--baseline``,
this checkout with ``node/core/room.py`` as it was at ``--baseline``, the commit before, so that
nothing else differs; interleaved, ``--rounds`` times):

1. The clients connect to ``storm`` and join a room of their own round; ``--before`` events are
   published through ``pub``, and every client receives them live (its ``since``).
2. ``storm`` is stopped (SIGTERM: its clients are cut); ``--missed`` events are published
   through ``pub`` meanwhile; ``storm`` is started again on the same NATS.
3. Every client reconnects at once (``--concurrency`` handshakes in flight per load process)
   and joins with ``since`` (its last seq and the epoch): it must be ``recovered``, and get
   every event after its ``since``, in order, once. Figures: the time from the restarted node
   being ready to the last client holding all its events, the store requests the node made
   for the recoveries (``rtnode_recovery_reads``; the baseline has no such counter: its leader
   reads, ``rtnode_store_leader_reads``, are shown for both), the node's peak RSS (VmHWM of
   the restarted process), and events lost and duplicated (must be 0); clients refused (an
   error frame, e.g. 4500 when the store did not answer in time: they would retry) apart.
   Beside them, the time the same clients took for their first joins (plain, nothing to
   replay): what connecting alone costs, the floor of the storm's time.

Progress on stderr, the table on stdout. Run it with ``python -m bench storm``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

__all__ = ["main"]

SECRET = "bench-storm-secret-0123456789-0123456789-0123"
#: The last commit whose room actor reads for each recovering join on its own.
BASELINE_REV = "de5995f86c4e8ec5c3df7113c6f358b80de33978"
_METRICS = ("rtnode_recovery_reads", "rtnode_recovery_batches", "rtnode_store_leader_reads",
            "rtnode_events_replayed")


def _log(msg: str) -> None:
    print(f"[storm] {msg}", file=sys.stderr, flush=True)


# -- load processes ---------------------------------------------------------------------------


@dataclass
class _Client:
    sub: str
    since: int = 0
    epoch: str = ""
    seqs: list[int] = field(default_factory=list)
    recovered: bool | None = None
    done_at: float = 0.0
    error: str | None = None
    ws: Any = None
    want: int = 0  # the seq it waits for
    reached: asyncio.Event = field(default_factory=asyncio.Event)  # want received, or the end


async def _open(url: str, sub: str, secret: str) -> Any:
    from websockets.asyncio.client import connect
    from websockets.typing import Subprotocol

    from node.protocol.tokens import mint_token

    ws = await connect(url, subprotocols=[Subprotocol("rtnode.v1.json")], max_size=None,
                       open_timeout=60, ping_interval=None)
    tok = mint_token(secret, sub=sub, rooms={"*": ["join", "publish", "history"]})
    await ws.send(json.dumps({"type": "connect", "token": tok}))
    return ws


async def _frames(ws: Any) -> Any:
    from node.protocol.frames import JSON

    async for data in ws:
        for frame in JSON.decode(data):  # one frame a line
            yield frame


async def _session(c: _Client, url: str, secret: str, room: str, join: dict[str, Any],
                   sem: asyncio.Semaphore, opened: asyncio.Event | None) -> Any:
    """Connect, join, and collect the room's event seqs until the close; ``c.reached`` is set
    once ``c.want`` has arrived (or on an error, or the close)."""
    async with sem:
        ws = c.ws = await _open(url, c.sub, secret)
        await ws.send(json.dumps({"type": "join", "room": room, "id": 1, **join}))
    try:
        async for f in _frames(ws):
            kind = f.get("type")
            if kind == "joined":
                c.epoch, c.recovered = f["epoch"], f.get("recovered")
                if "since" not in join:
                    c.since = f["seq"]
                if opened is not None:
                    opened.set()
            elif kind == "event" and f.get("room") == room:
                c.seqs.append(f["seq"])
                if f["seq"] >= c.want > 0 and not c.reached.is_set():
                    c.done_at = time.monotonic()
                    c.reached.set()
            elif kind in ("error", "disconnect"):
                c.error = f"{kind} {f.get('code')}"
                c.reached.set()
    except Exception as exc:  # the node was stopped: the close is the end of the phase
        if not type(exc).__name__.startswith("ConnectionClosed"):
            c.error = type(exc).__name__
    finally:
        c.reached.set()
    return ws


async def _all_reached(clients: list[_Client], timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(c.reached.wait() for c in clients)), timeout)


async def _load(conn: Connection, url: str, room: str, subs: list[str], concurrency: int
                ) -> None:
    clients = [_Client(sub) for sub in subs]
    sem = asyncio.Semaphore(concurrency)
    tasks: list[asyncio.Task[Any]] = []
    loop = asyncio.get_running_loop()
    while True:
        cmd, arg = await loop.run_in_executor(None, conn.recv)
        if cmd == "join":
            # Join live; the reading tasks end when the node cuts them.
            events = [asyncio.Event() for _ in clients]
            tasks = [asyncio.create_task(_session(c, url, SECRET, room, {}, sem, ev))
                     for c, ev in zip(clients, events, strict=True)]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in events)), arg)
            conn.send(sum(1 for c in clients if c.recovered is not None))
        elif cmd == "live":  # wait until every client has received seq ``arg`` live
            for c in clients:
                c.want = arg
                if c.seqs and c.seqs[-1] >= arg:
                    c.reached.set()
            await _all_reached(clients, 60)
            for c in clients:
                c.since = c.seqs[-1] if c.seqs else c.since
            conn.send(sum(1 for c in clients if c.seqs and c.seqs[-1] >= arg))
        elif cmd == "cut":  # the node is stopping: wait for every connection to end
            for c in clients:
                c.want, c.reached = 0, asyncio.Event()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), arg)
            conn.send(len(tasks))
        elif cmd == "storm":
            room_seqs, timeout = arg
            last = room_seqs[-1]
            for c in clients:
                c.seqs, c.recovered, c.done_at, c.error = [], None, 0.0, None
                c.want, c.reached = last, asyncio.Event()
            joins = [{"since": {"seq": c.since, "epoch": c.epoch}} for c in clients]
            tasks = [asyncio.create_task(_session(c, url, SECRET, room, j, sem, None))
                     for c, j in zip(clients, joins, strict=True)]
            await _all_reached(clients, timeout)
            await asyncio.sleep(0.2)  # a duplicate after the last event would show here
            lost = dup = unrecovered = 0
            kinds: dict[str, int] = {}
            for c in clients:
                got = set(c.seqs)
                dup += len(c.seqs) - len(got)
                if c.error is not None:  # refused (e.g. 4500, retry): counted apart, not lost
                    kinds[c.error] = kinds.get(c.error, 0) + 1
                    continue
                lost += sum(1 for s in room_seqs if s > c.since and s not in got)
                unrecovered += c.recovered is not True
            done = [c.done_at for c in clients if c.done_at]
            conn.send({"done": len(done), "last": max(done, default=0.0), "lost": lost,
                       "dup": dup, "unrecovered": unrecovered, "errors": kinds})
        elif cmd == "close":
            async def close(ws: Any) -> None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 5)

            await asyncio.gather(*(close(c.ws) for c in clients if c.ws is not None))
            for t in tasks:
                t.cancel()
            conn.send(True)
            return


def _load_main(conn: Connection, url: str, room: str, subs: list[str], concurrency: int
               ) -> None:
    from bench.procs import run_loop

    with contextlib.suppress(KeyboardInterrupt):
        run_loop(_load(conn, url, room, subs, concurrency))


# -- the nodes ----------------------------------------------------------------------------------


class _Node:
    """``python -m node run`` from ``tree`` (this checkout, or a copy of the baseline)."""

    def __init__(self, tree: Path, data_dir: Path, nats_url: str, name: str,
                 http_port: int, mqtt_port: int, big: int) -> None:
        from bench.procs import die_with_parent

        self.base = f"http://127.0.0.1:{http_port}"
        self.ws_url = f"ws://127.0.0.1:{http_port}/ws"
        data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "node", "run", "--nats-url", nats_url,
               "--http-port", str(http_port), "--mqtt-port", str(mqtt_port),
               "--data-dir", str(data_dir), "--node-name", name,
               "--rate-per-s", "1000000", "--rate-burst", "1000000",
               "--max-errors-per-min", "1000000", "--log-level", "warning",
               "--max-connections", str(big), "--max-connections-per-ip", str(big),
               "--peer-failures-per-min", str(big), "--drain-timeout-s", "1"]
        env = {**os.environ, "RTNODE_JWT_SECRET": SECRET, "PYTHONPATH": str(tree)}
        with open(data_dir.parent / f"{name}.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent)

    def wait_ready(self, timeout: float) -> None:
        from bench.procs import http_get

        deadline = time.monotonic() + timeout
        while http_get(self.base + "/readyz")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {self.base} not ready ({self.proc.poll()})")
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        from bench.procs import http_get

        out: dict[str, float] = {}
        status, body = http_get(self.base + "/metrics", timeout=5)
        for line in body.decode(errors="replace").splitlines() if status == 200 else []:
            name, _, value = line.rpartition(" ")
            name = name.removesuffix("_total")
            if name in _METRICS:
                out[name] = float(value)
        return out

    def peak_rss_kib(self) -> int:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        from bench.procs import stop

        notes: list[str] = []
        stop(self.proc, "node", notes)
        for n in notes:
            _log(n)


async def _publish(url: str, room: str, n: int) -> list[int]:
    """Publish ``n`` events through ``url``; their seqs, in order."""
    ws = await _open(url, "storm-writer", SECRET)
    try:
        seqs: dict[str, int] = {}
        await ws.recv()  # connected
        for i in range(n):
            await ws.send(json.dumps({"type": "publish", "id": f"p{i}", "room": room,
                                      "event": "e", "data": i}))
        async for f in _frames(ws):
            if f.get("type") == "published":
                seqs[f["id"]] = f["seq"]
                if len(seqs) == n:
                    break
            elif f.get("type") == "error":
                raise RuntimeError(f"publish refused: {f}")
        return [seqs[f"p{i}"] for i in range(n)]
    finally:
        await ws.close()


@dataclass
class _Round:
    seconds: float | None  # None: no client recovered completely
    join_seconds: float  # the same clients' first joins (plain, nothing replayed)
    reads: float | None
    batches: float | None
    leader_reads: float
    replayed: float
    rss_ready_mib: float
    rss_peak_mib: float
    lost: int
    dup: int
    unrecovered: int
    errors: int
    recovered: int


async def _storm(args: argparse.Namespace, tree: Path, tmp: Path, nats_url: str,
                 pub_url: str, tag: str) -> _Round:
    from bench.procs import REPO
    from node.nats_server import free_port

    room = f"storm:{tag}-{uuid.uuid4().hex[:8]}"
    big = max(100_000, 2 * args.clients)
    http_port, mqtt_port = free_port(), free_port()
    data = tmp / f"storm-{tag}"

    def start() -> _Node:
        node = _Node(tree, data, nats_url, "storm", http_port, mqtt_port, big)
        node.wait_ready(60)
        return node

    node = await asyncio.to_thread(start)
    ctx = multiprocessing.get_context("spawn")
    subs = [f"storm-{tag}-{i}" for i in range(args.clients)]
    loads: list[tuple[Any, Connection]] = []
    try:
        for p in range(args.procs):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_load_main, daemon=True, args=(
                theirs, node.ws_url, room, subs[p::args.procs], args.concurrency))
            proc.start()
            loads.append((proc, mine))

        async def ask(cmd: str, arg: Any, timeout: float) -> list[Any]:
            for _, conn in loads:
                conn.send((cmd, arg))

            def gather() -> list[Any]:
                out = []
                for _, conn in loads:
                    if not conn.poll(timeout):
                        raise RuntimeError(f"load process silent after {cmd}")
                    out.append(conn.recv())
                return out

            return await asyncio.to_thread(gather)

        started = time.monotonic()
        joined = sum(await ask("join", args.timeout, args.timeout + 10))
        join_seconds = time.monotonic() - started
        _log(f"{tag}: {joined} clients joined in {join_seconds:.1f} s")
        before = await _publish(pub_url, room, args.before)
        live = sum(await ask("live", before[-1], 70))
        _log(f"{tag}: {live} clients at seq {before[-1]}; restarting the node")
        await asyncio.to_thread(node.stop)
        await ask("cut", args.timeout, args.timeout + 10)
        missed = await _publish(pub_url, room, args.missed)
        node = await asyncio.to_thread(start)
        m0 = node.metrics()
        rss_ready = node.peak_rss_kib()
        t0 = time.monotonic()
        results = await ask("storm", (before + missed, args.timeout), args.timeout + 30)
        last = max((r["last"] for r in results), default=0.0)
        m1 = node.metrics()
        peak = node.peak_rss_kib()
        await ask("close", None, 30)
    finally:
        for proc, conn in loads:
            with contextlib.suppress(Exception):
                conn.close()
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        await asyncio.to_thread(node.stop)

    def delta(name: str) -> float | None:
        if tree != REPO and name in ("rtnode_recovery_reads", "rtnode_recovery_batches"):
            return None  # not counted by the unbatched room
        return m1[name] - m0.get(name, 0.0) if name in m1 else None

    out = _Round(
        seconds=last - t0 if last else None, join_seconds=join_seconds,
        reads=delta("rtnode_recovery_reads"), batches=delta("rtnode_recovery_batches"),
        leader_reads=delta("rtnode_store_leader_reads") or 0.0,
        replayed=delta("rtnode_events_replayed") or 0.0,
        rss_ready_mib=rss_ready / 1024, rss_peak_mib=peak / 1024,
        lost=sum(r["lost"] for r in results), dup=sum(r["dup"] for r in results),
        unrecovered=sum(r["unrecovered"] for r in results),
        errors=sum(sum(r["errors"].values()) for r in results),
        recovered=sum(r["done"] for r in results))
    _log(f"{tag}: {out}")
    kinds: dict[str, int] = {}
    for r in results:
        for kind, n in r["errors"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    if kinds:
        _log(f"{tag}: clients refused or cut: {kinds}")
    return out


def _baseline_tree(rev: str, tmp: Path) -> Path:
    """A copy of this checkout's packages with ``node/core/room.py`` as it was at ``rev`` (the
    checkout itself is not touched)."""
    from bench.procs import REPO

    tree = tmp / f"baseline-{rev[:8]}"
    for package in ("actors", "node", "bridge", "devices"):
        shutil.copytree(REPO / package, tree / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    old = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:node/core/room.py"],
                         check=True, capture_output=True).stdout
    (tree / "node" / "core" / "room.py").write_bytes(old)
    return tree


def _span(xs: list[float | None], fmt: str) -> str:
    vals = sorted(x for x in xs if x is not None)
    if not vals:
        return "-"
    mid = vals[len(vals) // 2]
    if len(vals) == 1:
        return format(mid, fmt)
    return f"{format(mid, fmt)} ({format(vals[0], fmt)}-{format(vals[-1], fmt)})"


async def _run(args: argparse.Namespace) -> int:
    from bench.procs import REPO
    from tests.servers import NatsProcess

    tmp = Path(tempfile.mkdtemp(prefix="rtnode-bench-storm-"))
    server = NatsProcess(tmp / "nats")
    pub: _Node | None = None
    try:
        await asyncio.to_thread(server.start)
        from node.nats_server import free_port

        pub = _Node(REPO, tmp / "pub", server.url, "pub", free_port(), free_port(), 1000)
        await asyncio.to_thread(pub.wait_ready, 60)
        trees = {"batched (this tree)": REPO}
        if args.baseline != "none":
            trees[f"unbatched ({args.baseline[:8]} room)"] = await asyncio.to_thread(
                _baseline_tree, args.baseline, tmp)
        results: dict[str, list[_Round]] = {k: [] for k in trees}
        for r in range(args.rounds):
            for i, (name, tree) in enumerate(trees.items()):
                results[name].append(await _storm(args, tree, tmp, server.url,
                                                  pub.ws_url, f"r{r}{'ab'[i]}"))
    finally:
        if pub is not None:
            pub.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"reconnect storm: {args.clients} clients of one room ({args.procs} load processes, "
          f"{args.concurrency} handshakes in flight each), {args.before} events before the "
          f"restart, {args.missed} missed; median (min-max) of {args.rounds} round(s)")
    rows: list[tuple[str, Callable[[_Round], float | None], str]] = [
        ("time to the last recovered client (s)", lambda x: x.seconds, ".2f"),
        ("the same clients' first plain joins (s)", lambda x: x.join_seconds, ".2f"),
        ("clients recovered completely", lambda x: x.recovered, ".0f"),
        ("store requests for recoveries", lambda x: x.reads, ".0f"),
        ("recovery batches", lambda x: x.batches, ".0f"),
        ("stream leader reads (both)", lambda x: x.leader_reads, ".0f"),
        ("events replayed", lambda x: x.replayed, ".0f"),
        ("node RSS when ready (MiB)", lambda x: x.rss_ready_mib, ".1f"),
        ("node RSS peak (MiB)", lambda x: x.rss_peak_mib, ".1f"),
        ("lost", lambda x: x.lost, ".0f"),
        ("duplicated", lambda x: x.dup, ".0f"),
        ("joined but not recovered", lambda x: x.unrecovered, ".0f"),
        ("refused or cut (error frame, close)", lambda x: x.errors, ".0f"),
    ]
    names = list(results)
    print(f"{'':<40}" + "".join(f"{n:>28}" for n in names))
    for label, get, fmt in rows:
        print(f"{label:<40}" + "".join(f"{_span([get(x) for x in results[n]], fmt):>28}"
                                       for n in names))
    bad = any(x.lost or x.dup or x.unrecovered or x.errors
              for x in results["batched (this tree)"])
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench storm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=5000, help="clients of the room")
    parser.add_argument("--procs", type=int, default=4, help="load processes")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="handshakes in flight per load process")
    parser.add_argument("--before", type=int, default=5, help="events received live first")
    parser.add_argument("--missed", type=int, default=50, help="events stored while away")
    parser.add_argument("--rounds", type=int, default=1, help="storms of each, interleaved")
    parser.add_argument("--baseline", default=BASELINE_REV,
                        help="the commit whose node/core/room.py the baseline runs "
                             "('none': no baseline)")
    parser.add_argument("--timeout", type=float, default=120.0, help="bound of each phase (s)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
