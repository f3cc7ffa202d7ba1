"""Processes the benchmarks start: spawn, stop by PID, CPU seconds, logs, and the event loop.

Every process a benchmark starts goes through :func:`spawn` (its own process group, and on Linux
it dies with the benchmark) and is ended by :func:`stop` or :func:`stop_all` (SIGTERM, SIGKILL
after :data:`STOP_TIMEOUT_S`, children left behind killed by PID). :func:`run_loop` runs one
measurement on uvloop when installed and turns SIGTERM into ``KeyboardInterrupt``, as Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tests.servers import http_get  # the tests' own, as tests.cluster uses it

__all__ = [
    "READY_TIMEOUT_S",
    "REPO",
    "SETUP_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "ClientProcs",
    "children_of",
    "cmdline",
    "cpu_seconds",
    "die_with_parent",
    "http_get",
    "log_lines",
    "run_loop",
    "size",
    "spawn",
    "stop",
    "stop_all",
    "terminated",
    "wait_line",
]

REPO = Path(__file__).resolve().parent.parent

READY_TIMEOUT_S = 30.0
SETUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
_PR_SET_PDEATHSIG = 1
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# The servers' start-up banners and goodbyes on stdout: not worth reporting.
_BANNER = ("rtnode bench ready", "  http ", "  websocket ", "  nats ", "  dev token ",
           "  mqtt ", "rtnode bench stopped", "baseline ready")


def children_of(pid: int) -> list[int]:
    """The PIDs of ``pid``'s children (Linux /proc; [] elsewhere)."""
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids.extend(int(x) for x in (task / "children").read_text().split())
    except OSError:
        return []
    return kids


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child: its own process group, and ``sig`` when the benchmark dies (Linux).

    Its own group, so that a Ctrl-C reaches the benchmark only, which then stops it in order.
    Runs between fork and exec (``preexec_fn``) or first thing in a worker process.
    """
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def spawn(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in the repository, its stdout and stderr to ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)


def stop(proc: subprocess.Popen[bytes], what: str, notes: list[str]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; children left behind are killed by PID."""
    if proc.poll() is not None:
        notes.append(f"{what} had already exited with {proc.returncode}")
        return
    kids = {pid: cmdline(pid) for pid in children_of(proc.pid)}
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
        if cmd and cmdline(pid) == cmd:  # still the same process, still alive
            deadline = time.monotonic() + 5
            while cmdline(pid) == cmd and time.monotonic() < deadline:
                time.sleep(0.1)
            if cmdline(pid) == cmd:
                notes.append(f"{what}'s child {pid} ({cmd.split()[0]}) outlived it: killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def stop_all(procs: list[tuple[str, subprocess.Popen[bytes]]], notes: list[str]) -> None:
    """:func:`stop` on every (name, process) in parallel (each is bounded)."""
    if not procs:
        return
    with ThreadPoolExecutor(max_workers=len(procs)) as pool:
        for _ in pool.map(lambda p: stop(p[1], p[0], notes), procs):
            pass


def wait_line(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait until ``proc`` has written ``text`` to its log ``path`` (False if it exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            if text in path.read_text(errors="replace"):
                return True
        time.sleep(0.05)
    return False


def log_lines(path: Path, start: int = 0, end: int | None = None) -> list[str]:
    """Non-empty lines of a server's output between byte offsets, without its banner."""
    try:
        data = path.read_bytes()[start:end]
    except OSError:
        return []
    return [line for line in data.decode(errors="replace").splitlines()
            if line.strip() and not line.startswith(_BANNER)]


def size(path: Path) -> int:
    """The size of ``path`` in bytes (0 when it does not exist)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def terminated(signum: int, frame: Any) -> None:
    """SIGTERM outside the event loop: stop the servers and clean up, as on Ctrl-C.

    Install it with ``signal.signal(signal.SIGTERM, terminated)``.
    """
    raise KeyboardInterrupt


def run_loop(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on uvloop when installed; SIGTERM cancels it and raises KeyboardInterrupt."""
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    interrupted = False

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
        await coro

    try:
        runner(guarded())
    except asyncio.CancelledError:
        if not interrupted:
            raise
    finally:
        signal.signal(signal.SIGTERM, terminated)  # the loop's handler is gone with it
    if interrupted:
        raise KeyboardInterrupt


class ClientProcs:
    """Load generator processes (multiprocessing, spawned), seen from the benchmark: process
    ``j`` runs ``target(pipe, *args_of(j))`` and answers each command on its pipe with one
    message; :meth:`stop` sends ``("stop",)``. Blocking, bounded waits."""

    def __init__(self, n: int, target: Callable[..., None],
                 args_of: Callable[[int], tuple[Any, ...]], name: str = "bench-load") -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for j in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=target, args=(child, *args_of(j)), daemon=True, name=name)
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)

    def cpu(self) -> float:
        """CPU seconds of the processes so far."""
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def ask(self, msgs: list[tuple[Any, ...]], timeout: float) -> list[tuple[Any, ...]]:
        """Send ``msgs[j]`` to process ``j``; their answers, in order (TimeoutError when one
        has not answered within ``timeout`` s)."""
        for pipe, msg in zip(self.pipes, msgs, strict=True):
            pipe.send(msg)
        out: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + timeout
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"a load generator process did not answer {msgs[0][0]!r} "
                                   f"within {timeout:.0f} s")
            out.append(pipe.recv())
        return out

    def stop(self) -> None:
        """Ask every process to stop; kill one still running after STOP_TIMEOUT_S."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send(("stop",))
        for p in self.procs:
            p.join(STOP_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join(5)
        for pipe in self.pipes:
            pipe.close()
