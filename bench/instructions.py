"""``python -m bench instructions``: instructions per connect and per event, counted by callgrind.

On a VM, CPU seconds per connect or per event vary by ~10% from run to run (and ``perf stat``
has no hardware counters there). valgrind's callgrind counts the instructions a process runs
(``Ir``), which repeat within ~1%: a change of a few percent in the node's cost shows in one run.

Each server runs under ``valgrind --tool=callgrind``, a fresh process per run: rtnode (one
node, its embedded nats-server) and the plain ``websockets`` server of
:mod:`bench.baseline_server`. The clients run in this process, not under valgrind. After a
warm-up of every workload, for each measurement the server's counters are zeroed
(``callgrind_control -z PID``), the workload runs, the work it set off is waited for (see
:data:`DEFERRED_S`), and the counters are dumped (``callgrind_control -d PID``); the count is
divided by the work:

1. **connect**: ``--connects`` connections, ``--concurrency`` opening at a time, each the
   WebSocket handshake, then ``connect`` with a token of its own user and ``join`` (rooms of
   ``--room-size``), until ``joined``; on the baseline, the handshake until its
   ``{"type":"joined"}``. rtnode twice: with user tokens (each has a personal room,
   ``@user:<sub>``) and with service tokens (none). The connections stay open until the dump.
2. **event**: ``--rooms`` rooms of 2 members, each member publishing ``--events`` events with
   ``--window`` of them unacknowledged (rtnode: its ``published`` replies; the baseline has
   none: events received from the other member). Per event delivered to the other member.
3. **quiet event**: one room of 2 members, one of them publishing ``--quiet-events`` events
   one at a time, each once the one before has reached the other member (and its
   ``published`` reply has come back), ``--quiet-gap-s`` apart: what an event costs when it
   shares no loop step, no write and no store round trip with others (a quiet room, the
   latency figure's case). Per event delivered to the other member.
4. **device ingest** (rtnode only: the baseline has no MQTT, its column shows ``-``):
   ``--devices`` MQTT 3.1.1 devices on the node's MQTT port (device tokens, clean session, no
   keep-alive), each publishing ``--device-events`` events (CBOR) at QoS 1 to
   ``rooms/<room>/up``, ``--window`` of them unacknowledged, to a room one WebSocket member
   joined beforehand. The node stores each in JetStream, then sends its PUBACK, and delivers
   it to the member. Per event the member received: every one must arrive, once (the run
   fails when none arrives and no PUBACK comes for :data:`INGEST_STALL_S`).

Only the server process is counted: rtnode's nats-server runs outside valgrind (Go, not the
node's code). The node runs as ``rtnode run`` would restart itself (``PYTHONMALLOC=malloc``,
jemalloc preloaded when the system has it: :func:`node.memory.wanted_env`), so it does not
re-exec, which valgrind would not follow; the baseline with Python's own allocator. Under
valgrind a server runs ~50 times slower: the defaults take ~4-5 minutes on 2 cores.

Progress on stderr, the table on stdout (median and range over ``--repeat`` runs), the figures
in JSON with ``--json PATH``. ``--keep-dumps DIR`` keeps each figure's dump, to see where its
instructions go by C function: ``callgrind_annotate --inclusive=yes
DIR/rtnode-1-ingest.callgrind`` shows the share of cbor2, pydantic, orjson and the interpreter.
The exit status is 2 without valgrind (``apt-get install valgrind``, or ``make
bench-instructions``), 1 when a run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.instructions_clients import (
    close,
    connects,
    devices,
    disconnect,
    exchange,
    ingest,
    member,
    one_at_a_time,
    pairs,
)
from bench.nodes import (
    SECRET,
    NodeProcess,
    node_command,
    open_limits,
    wait_ready,
)
from bench.procs import cpu_seconds, run_loop, spawn, stop, wait_line
from node.memory import wanted_env
from node.nats_server import free_port

__all__ = ["ROWS", "dump_instructions", "main", "newest_dump", "parse_args", "render", "spread"]


READY_TIMEOUT_S = 120.0  # valgrind starts the node in ~20-40 s on 2 cores, loaded more
CTL_TIMEOUT_S = 60.0  # one callgrind_control command (a dump of the node: ~1 s)
# A workload's work goes on after its last reply: timers of 5 s (connect_timeout_s,
# http_header_timeout_s, http_keepalive_s) fire for each connection; a room stops 1 s after its
# last member left. So a figure's count goes on for DEFERRED_S after the workload, and the next
# workload starts DEFERRED_S after the connections of the last one closed; then, either way,
# once the server is idle: under SETTLE_CPU of a core over SETTLE_STEP_S. Without the wait, the
# service-token figure came out 1.77M or 1.83M per connect (whether those timers fired before
# the dump); with it, 1.77M-1.81M over 4 runs (the user-token figure within 0.8%, the event
# figure 0.5%). The idle node's own timers (~0.5M instructions a second under valgrind) add ~1%
# to the connect figures.
DEFERRED_S = 6.0
SETTLE_STEP_S = 0.5
SETTLE_CPU = 0.05
SETTLE_TIMEOUT_S = 30.0
WARM_CONNECTS = 20
WARM_EVENTS = 20
WARM_DEVICES = 2  # each publishing WARM_EVENTS: the MQTT door's code paths, before any count
# The device ingest figure fails when no PUBACK and no event reaches the member for this long:
# an event acknowledged but never delivered (a refused uplink is acknowledged too).
INGEST_STALL_S = 60.0
# The node's timers that run per held connection, whose count depends on wall time (which
# valgrind stretches ~50 times), not on the work: presence entries refreshed every third of
# presence_ttl_s (10 s: each member's, several times during a connect figure) and pings every
# heartbeat_s. An hour each keeps them out of every figure.
QUIET_TIMERS = ("--presence-ttl-s", "3600", "--heartbeat-s", "3600")
# Past 200 connections gone, the node gives memory back (node/memory.MemoryReturn's min_drop),
# and once more 65 s later: work that would land in a later figure's count.
MAX_CONNECTS = 199

SYSTEMS = ("rtnode", "websockets")
# (key, label, rtnode's figure, the baseline's figure): the baseline has no token kinds, and no
# MQTT (None: its column and the ratio show "-", its JSON null).
ROWS: tuple[tuple[str, str, str, str | None], ...] = (
    ("connect_user", "per connect, user token (personal room)", "connect_user", "connect"),
    ("connect_service", "per connect, service token (no personal room)", "connect_service",
     "connect"),
    ("event", "per event delivered to the other member", "event", "event"),
    ("quiet_event", "per event, one at a time (a quiet room)", "quiet_event", "quiet_event"),
    ("ingest", "per device event (MQTT QoS 1 -> stored -> delivered to a WebSocket member)",
     "ingest", None),
)


def _log(msg: str) -> None:
    print(f"[bench instructions] {msg}", file=sys.stderr, flush=True)


# -- callgrind's dumps (no I/O) ---------------------------------------------------------------


def dump_instructions(text: str) -> int:
    """The instructions (``Ir``) one callgrind dump counted: its ``summary:`` line, else
    ``totals:``.

    ``summary:`` is callgrind's own counter since the last zero or dump (what valgrind prints
    as "Collected" at exit). ``totals:`` adds up the costs the dump lists, and in dumps of the
    node it came out higher: by ~25M in the first dump after a zero (on ~230M, the same each
    run), by ~1M in later ones, while summary grew in proportion to the work (20, 40 and 80
    connects: 45.0M, 90.4M, 182.0M).

    Args:
        text: The dump file's content (callgrind format: ``events: Ir ...`` names the columns).

    Raises:
        ValueError: The text has neither line, or no ``Ir`` column.
    """
    events = re.search(r"^events:[ \t]*(.*)$", text, re.M)
    names = events.group(1).split() if events else ["Ir"]
    if "Ir" not in names:
        raise ValueError(f"callgrind dump without Ir: events: {' '.join(names)}")
    column = names.index("Ir")
    for key in ("summary", "totals"):
        line = re.search(rf"^{key}:[ \t]*(.*)$", text, re.M)
        if line:
            values = line.group(1).split()
            return int(values[column]) if len(values) > column else 0
    raise ValueError("callgrind dump without a summary: or totals: line")


def newest_dump(names: Iterable[str], out: str) -> str | None:
    """The newest dump among file ``names`` of ``--callgrind-out-file=out``, or None.

    ``callgrind_control -d`` writes ``<out>.<n>``, ``n`` counting up from 1 (``<out>.<n>-<tid>``
    with ``--separate-threads``; ``<out>`` itself is written at exit). The highest ``n`` is the
    newest: 10 after 9, whatever their order by name or modification time.
    """
    pattern = re.compile(re.escape(out) + r"\.(\d+)(-\d+)?")
    best: tuple[int, str] | None = None
    for name in names:
        m = pattern.fullmatch(name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), name)
    return best[1] if best else None


# -- the table (no I/O) ------------------------------------------------------------------------


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of ``values``."""
    return statistics.median(values), min(values), max(values)


def _figure(values: Sequence[float]) -> str:
    med, lo, hi = spread(values)
    if len(values) == 1:
        return f"{med:,.0f}"
    return f"{med:,.0f} ({lo:,.0f}-{hi:,.0f}, {(hi - lo) / med:.1%})"


def _baseline(figures: dict[str, dict[str, list[float]]], theirs: str | None
              ) -> list[float] | None:
    """The baseline's figure of a row, or None where it has none (``theirs`` None: no MQTT)."""
    if theirs is None:
        return None
    return figures["websockets"].get(theirs) or None


def render(figures: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    """The table: a row per figure of :data:`ROWS`, rtnode, the baseline and their ratio
    (``-`` for both where the baseline has no such figure).

    Args:
        figures: ``{"rtnode": {"connect_user": [per run...], ...}, "websockets": {...}}``.
        args: The command line (:func:`parse_args`), for the notes.
    """
    runs = "1 run" if args.repeat == 1 else f"median (min-max, spread) of {args.repeat} runs"
    lines = [f"instructions of the server process (callgrind), {runs}; "
             "python -m bench instructions"]
    rows = [("", "rtnode", "websockets", "rtnode/websockets")]
    for _key, label, ours, theirs in ROWS:
        a, b = figures["rtnode"][ours], _baseline(figures, theirs)
        if b is None:
            rows.append((label, _figure(a), "-", "-"))
        else:
            rows.append((label, _figure(a), _figure(b),
                         f"{statistics.median(a) / statistics.median(b):.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        lines.append(f"{r[0]:<{widths[0]}}  " + "  ".join(
            f"{cell:>{w}}" for cell, w in zip(r[1:], widths[1:], strict=True)))
    notes = (
        f"connect = the handshake, then connect with a token and join (rooms of "
        f"{args.room_size}), until joined: {args.connects} connections, {args.concurrency} "
        "opening at a time; the baseline has no tokens, its one figure is in both rows",
        f"event = {args.rooms} rooms x 2 members, each publishing {args.events} events, "
        f"{args.window} in flight; rtnode also stores each event in JetStream and sends the "
        "publisher its published reply and the echo of its event",
        f"one at a time = one member publishing {args.quiet_events} events, each once the one "
        f"before has reached the other member (rtnode: and been acknowledged), "
        f"{args.quiet_gap_s:g} s apart",
        f"device event = {args.devices} MQTT devices, each publishing {args.device_events} "
        f"events at QoS 1, {args.window} unacknowledged, to a room one WebSocket member is in: "
        "per event it received; rtnode stores each in JetStream before its PUBACK; the "
        "baseline has no MQTT (-)",
        "only the server process is counted: rtnode's embedded nats-server is not",
    )
    for note in notes:
        lines += textwrap.wrap(note, 100, initial_indent="  note: ", subsequent_indent="    ")
    return "\n".join(lines)


# -- the servers under callgrind ---------------------------------------------------------------


class CallgrindServer:
    """One server process under callgrind, in a temporary directory: zero, dump, stop by PID.

    Args:
        kind: ``rtnode`` (a node and its embedded nats-server) or ``websockets``.
        tmp: Its directory (log, data, dumps); the caller removes it.
        connections: The most a workload holds (the node's limits are raised for them).
        keep: Copy each figure's dump there as ``<kind>-<run>-<figure>.callgrind``, for
            ``callgrind_annotate`` (None: the dumps go with ``tmp``).
        run: The run's number, in those names.
    """

    def __init__(self, kind: str, tmp: Path, connections: int, keep: Path | None = None,
                 run: int = 1) -> None:
        self.kind = kind
        self.keep, self.run = keep, run
        self.port = free_port()
        self.out = tmp / "callgrind.out"
        self.log = tmp / "server.log"
        self._dumps = 0  # the number of the newest dump read
        self._node: NodeProcess | None = None
        self.mqtt_port: int | None = None  # rtnode's MQTT door (the baseline has none)
        vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}",
              "--trace-children=no"]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "LD_PRELOAD")}
        if kind == "rtnode":
            # The environment `rtnode run` would restart itself with (node/cli.py): given it,
            # the node does not, and the process valgrind counts is the node.
            node_env = wanted_env(env)
            if node_env is None or wanted_env(node_env) is not None:
                raise RuntimeError("node.memory.wanted_env: the node would re-exec itself")
            node_env["RTNODE_JWT_SECRET"] = SECRET
            self.mqtt_port = free_port()
            cmd = node_command(self.port, self.mqtt_port, tmp / "data",
                               extra=[*open_limits(connections), *QUIET_TIMERS])
            self._node = NodeProcess("bench", vg + cmd, self.log, node_env, self.port,
                                     self.mqtt_port)
            self.proc = self._node.proc
        else:
            cmd = [sys.executable, "-m", "bench.baseline_server", "--port", str(self.port)]
            self.proc = spawn(vg + cmd, self.log, env)

    def wait_ready(self) -> None:
        """Wait (bounded) until it serves; check the process is the one callgrind counts.

        Raises:
            RuntimeError: It exited, did not get ready in time, or runs outside valgrind.
        """
        if self._node is not None:
            error = wait_ready([self._node], READY_TIMEOUT_S)  # notes its nats-server too
            if error:
                raise RuntimeError(f"{error}: {self._tail()}")
        elif not wait_line(self.log, "baseline ready", self.proc, READY_TIMEOUT_S):
            raise RuntimeError(f"{self.kind} did not start: {self._tail()}")
        # A process that exec'd again runs natively (--trace-children=no): nothing counted.
        exe = os.readlink(f"/proc/{self.proc.pid}/exe")
        if "callgrind" not in exe:
            raise RuntimeError(f"{self.kind} (pid {self.proc.pid}) runs {exe}, not under "
                               "callgrind: did it re-exec itself?")

    def zero(self) -> None:
        """Set its counters to 0."""
        self._control("-z")

    def dump(self, figure: str) -> int:
        """The instructions it ran since :meth:`zero` (a dump, read back; kept as ``figure``'s
        with ``keep``)."""
        self._control("-d")
        name = newest_dump(os.listdir(self.out.parent), self.out.name)
        number = int(name.split(".")[-1].split("-")[0]) if name else 0
        if name is None or number <= self._dumps:
            raise RuntimeError(f"callgrind_control -d wrote no new dump in {self.out.parent}")
        self._dumps = number
        path = self.out.parent / name
        if self.keep is not None:
            shutil.copyfile(path, self.keep / f"{self.kind}-{self.run}-{figure}.callgrind")
        return dump_instructions(path.read_text(errors="replace"))

    def stop(self, notes: list[str]) -> None:
        """SIGTERM, SIGKILL if it lingers, its children (nats-server) by PID."""
        if self._node is not None:
            self._node.stop(notes)
        else:
            stop(self.proc, self.kind, notes)

    def _control(self, flag: str) -> None:
        # callgrind_control exits with 0 even when it found no such process: read what it said.
        try:
            done = subprocess.run(["callgrind_control", flag, str(self.proc.pid)],
                                  capture_output=True, text=True, timeout=CTL_TIMEOUT_S,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"callgrind_control {flag} took over {CTL_TIMEOUT_S:.0f} s"
                               ) from None
        if "OK" not in done.stdout:
            said = (done.stdout + done.stderr).strip().splitlines()
            raise RuntimeError(f"callgrind_control {flag} {self.proc.pid}: "
                               f"{said[0] if said else done.returncode}")

    def _tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:]) or "no output"


async def _settle(pid: int) -> None:
    """Wait :data:`DEFERRED_S`, then until ``pid`` is idle; after SETTLE_TIMEOUT_S, go on."""
    await asyncio.sleep(DEFERRED_S)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_STEP_S)
        now = cpu_seconds(pid)
        if now - last <= SETTLE_CPU * SETTLE_STEP_S:
            return
        last = now
    _log(f"pid {pid} still busy after {SETTLE_TIMEOUT_S:.0f} s: counted as is")


# -- one run -----------------------------------------------------------------------------------


async def _measure(server: CallgrindServer, args: argparse.Namespace) -> dict[str, float]:
    """Warm up, then every figure of ``server`` (instructions per unit)."""
    kind, port, pid = server.kind, server.port, server.proc.pid
    token_kinds = ("user", "service") if kind == "rtnode" else ("user",)
    for token_kind in token_kinds:
        await close(await connects(kind, port, args, WARM_CONNECTS, f"w{token_kind[0]}",
                                   token_kind))
    warm = await pairs(kind, port, 2, "wr")
    try:
        await exchange(kind, warm, WARM_EVENTS, args.window)
    finally:
        await close(ws for _, a, b in warm for ws in (a, b))
    if server.mqtt_port is not None:
        await _ingest(server, args, "wi", WARM_DEVICES, WARM_EVENTS, count=False)
    await _settle(pid)
    out: dict[str, float] = {}
    for token_kind in token_kinds:
        key = f"connect_{token_kind}" if kind == "rtnode" else "connect"
        server.zero()
        started = time.monotonic()
        conns = await connects(kind, port, args, args.connects, f"c{token_kind[0]}", token_kind)
        try:
            await _settle(pid)
            out[key] = server.dump(key) / args.connects
        finally:
            await close(conns)
        _log(f"{kind}: {out[key]:,.0f} instructions per connect"
             + (f" ({token_kind} token)" if kind == "rtnode" else "")
             + f", counted over {time.monotonic() - started:.0f} s")
        await _settle(pid)
    members = await pairs(kind, port, args.rooms, "r")
    try:
        await _settle(pid)
        server.zero()
        started = time.monotonic()
        delivered = await exchange(kind, members, args.events, args.window)
        await _settle(pid)
        out["event"] = server.dump("event") / delivered
    finally:
        await close(ws for _, a, b in members for ws in (a, b))
    _log(f"{kind}: {out['event']:,.0f} instructions per event ({delivered} delivered), "
         f"counted over {time.monotonic() - started:.0f} s")
    await _settle(pid)
    (room, a, b), = await pairs(kind, port, 1, "q")
    try:
        await _settle(pid)
        server.zero()
        started = time.monotonic()
        delivered = await one_at_a_time(kind, room, a, b, args.quiet_events, args.quiet_gap_s)
        await _settle(pid)
        out["quiet_event"] = server.dump("quiet_event") / delivered
    finally:
        await close((a, b))
    _log(f"{kind}: {out['quiet_event']:,.0f} instructions per event one at a time "
         f"({delivered} delivered), counted over {time.monotonic() - started:.0f} s")
    if server.mqtt_port is not None:
        await _settle(pid)
        out["ingest"] = await _ingest(server, args, "i", args.devices, args.device_events,
                                      count=True)
    return out


async def _ingest(server: CallgrindServer, args: argparse.Namespace, prefix: str, n: int,
                  events: int, count: bool) -> float:
    """A member in a room, then ``n`` MQTT devices publishing ``events`` events each to it.
    With ``count``, the events run between a zero and a dump, after the connects' work
    (:func:`_settle`): returns the instructions per event the member received (0.0 without)."""
    assert server.mqtt_port is not None
    kind, pid, room = server.kind, server.proc.pid, f"{prefix}-r0"
    per_event = 0.0
    ws = await member(kind, server.port, f"{prefix}-m", room)
    try:
        devs = await devices(server.mqtt_port, prefix, n, room)
        try:
            if count:
                await _settle(pid)
                server.zero()
            started = time.monotonic()
            delivered = await ingest(ws, devs, room, events, args.window, INGEST_STALL_S)
            if count:
                await _settle(pid)
                per_event = server.dump("ingest") / delivered
                _log(f"{kind}: {per_event:,.0f} instructions per device event ({delivered} "
                     f"delivered), counted over {time.monotonic() - started:.0f} s")
        finally:
            await disconnect(devs)
    finally:
        await close((ws,))
    return per_event


async def _run(kind: str, args: argparse.Namespace, into: dict[str, list[float]],
               run: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"rtnode-bench-instructions-{kind}-"))
    notes: list[str] = []
    server: CallgrindServer | None = None
    try:
        server = CallgrindServer(kind, tmp, args.connects, args.keep_dumps, run)
        started = time.monotonic()
        await asyncio.to_thread(server.wait_ready)
        _log(f"{kind} ready under callgrind in {time.monotonic() - started:.0f} s "
             f"(pid {server.proc.pid})")
        async with asyncio.timeout(args.timeout):
            for key, value in (await _measure(server, args)).items():
                into.setdefault(key, []).append(value)
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop, notes)
        shutil.rmtree(tmp, ignore_errors=True)
        for note in notes:
            _log(note)


# -- the command line --------------------------------------------------------------------------


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return n


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``python -m bench instructions`` flags (``--help``); argparse exits 2 on bad ones."""
    parser = argparse.ArgumentParser(prog="python -m bench instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connects", type=_positive, default=100,
                        help=f"connections per connect figure (default 100, at most "
                             f"{MAX_CONNECTS})")
    parser.add_argument("--concurrency", type=_positive, default=10,
                        help="connections being opened at a time (default 10)")
    parser.add_argument("--room-size", type=_positive, default=50,
                        help="members per room of the connect figures (default 50)")
    parser.add_argument("--rooms", type=_positive, default=5,
                        help="rooms of 2 members of the event figure (default 5)")
    parser.add_argument("--events", type=_positive, default=100,
                        help="events each member publishes (default 100)")
    parser.add_argument("--window", type=_positive, default=4,
                        help="a member's events in flight, and a device's unacknowledged "
                             "PUBLISHes (default 4)")
    parser.add_argument("--quiet-events", type=_positive, default=100,
                        help="events of the one-at-a-time figure (default 100)")
    parser.add_argument("--quiet-gap-s", type=float, default=0.02,
                        help="pause between them, s (default 0.02)")
    parser.add_argument("--devices", type=_positive, default=10,
                        help="MQTT devices of the device ingest figure (default 10)")
    parser.add_argument("--device-events", type=_positive, default=100,
                        help="events each device publishes at QoS 1 (default 100)")
    parser.add_argument("--repeat", type=_positive, default=1,
                        help="runs of each server, interleaved (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="bound of one server's workloads, s (default 600)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures there")
    parser.add_argument("--keep-dumps", type=Path, metavar="DIR",
                        help="copy each figure's callgrind dump there "
                             "(<server>-<run>-<figure>.callgrind), for callgrind_annotate: "
                             "where a figure's instructions go, by C function")
    args = parser.parse_args(argv)
    if args.connects > MAX_CONNECTS:
        parser.error(f"--connects {args.connects}: at most {MAX_CONNECTS}: when more close, "
                     "the node gives memory back (node/memory.py), again 65 s later, work that "
                     "a later figure would count")
    return args


def _missing_tools() -> list[str]:
    return [t for t in ("valgrind", "callgrind_control") if shutil.which(t) is None]


def main(argv: list[str]) -> int:
    """Run it; the table on stdout. Exit status: 0, 1 when a run failed, 2 without valgrind."""
    args = parse_args(argv)
    missing = _missing_tools()
    if missing:
        print(f"bench instructions: {' and '.join(missing)} not found: apt-get install valgrind "
              "(or make bench-instructions)", file=sys.stderr)
        return 2
    if args.keep_dumps is not None:
        args.keep_dumps.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict[str, list[float]]] = {s: {} for s in SYSTEMS}

    async def runs() -> None:
        for i in range(args.repeat):
            for kind in SYSTEMS:
                _log(f"run {i + 1} of {args.repeat}: {kind}")
                await _run(kind, args, figures[kind], i + 1)

    try:
        run_loop(runs())
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"bench instructions: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the servers are stopped already
        print("bench instructions: interrupted", file=sys.stderr)
        return 130
    print(render(figures, args))
    if args.json is not None:
        args.json.write_text(json.dumps(_to_json(figures, args), indent=2) + "\n")
        _log(f"figures written to {args.json}")
    return 0


def _to_json(figures: dict[str, dict[str, list[float]]], args: argparse.Namespace
             ) -> dict[str, Any]:
    rows = {}
    names = ("median", "min", "max")
    for key, label, ours, theirs in ROWS:
        a, theirs_runs = spread(figures["rtnode"][ours]), _baseline(figures, theirs)
        b = spread(theirs_runs) if theirs_runs is not None else None
        rows[key] = {"label": label, "rtnode": dict(zip(names, a, strict=True)),
                     "websockets": dict(zip(names, b, strict=True)) if b is not None else None,
                     "ratio": a[0] / b[0] if b is not None else None}
    return {"unit": "instructions (callgrind Ir) of the server process",
            "args": {k: v for k, v in vars(args).items() if k not in ("json", "keep_dumps")},
            "runs": figures, "figures": rows}
