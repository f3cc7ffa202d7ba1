"""Giving memory back once a crowd of connections has gone (issue 12).

What a connection held is freed when it closes, but not given back to the system: aiohttp's
objects of a connection form reference cycles that only a full collection frees, and the
allocator keeps the freed memory for reuse. After a spike of 10,000 connections the process
would keep its peak RSS for good. So the node watches its open connections; when they have
dropped well below their peak (by half, and by at least ``min_drop``), it runs a full
collection and asks the C allocator to give back what is free (jemalloc's purge, or
``malloc_trim`` on glibc; nothing elsewhere); once more a minute later, when what the gone
users left of their rate limits (kept for their next connection) no longer binds and is
forgotten too. The loop stands still meanwhile: on a 2-core VM, after 2,000 connections
went, ~150 ms for the collection (~50,000 objects of theirs: the same work Python's own full
collection would do later) and ~50 ms for the trim; after 10,000 of distinct users, ~2 s each
time.

How much comes back depends on the allocator of small objects. CPython's own (pymalloc) keeps
an arena of 1 MiB as long as one object in it lives, and the objects that outlive a crowd
(rate buckets, cached tokens) are spread over all of them: after 1,500 connections, 7 of
37 MiB came back. ``rtnode run`` therefore starts the node with ``PYTHONMALLOC=malloc`` (see
:func:`wanted_env`), with jemalloc preloaded as that allocator where the system has it (it
packs small objects by size, as pymalloc does, and purges free pages on demand; glibc's
``malloc_trim`` returns its free pages too, at a cost in CPU per event), and the cache of
verified tokens is emptied first: 48 of 56 MiB came back after 2,000 connections
(tests/integration/test_idle_memory.py). The tables that grew for the crowd (actors by name,
connections, rpc routes, the NATS client's subscriptions, presence entries) keep the size of
their peak until they grow again: the node sizes them to what is left before the collection
(~4 MiB after 4,000 connections).

Example:
    watch = MemoryReturn()
    if watch.due(open_now, most_open_since_last_call):  # every few seconds
        release()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["GC_THRESHOLDS", "MemoryReturn", "allocator", "jemalloc", "release", "tune_collector",
           "wanted_env"]

log = logging.getLogger("node.memory")

# The allocator the node runs with (PYTHONMALLOC), unless one is set already.
NODE_ALLOCATOR = "malloc"


def jemalloc() -> str | None:
    """jemalloc's library name when the system has it (Debian: ``libjemalloc2``), else None."""
    return ctypes.util.find_library("jemalloc")


def wanted_env(env: dict[str, str],
               find_jemalloc: Callable[[], str | None] = jemalloc) -> dict[str, str] | None:
    """The environment to start the node process with, or None when ``env`` is it already:
    ``PYTHONMALLOC`` as :data:`NODE_ALLOCATOR` unless the user set one (theirs is kept), and
    jemalloc preloaded as that allocator when the system has it and ``LD_PRELOAD`` is not set.

    glibc's malloc spreads Python's small objects over the heap where jemalloc packs them by
    size as CPython's own allocator does: the rooms workload took 15-20% more CPU per event
    with glibc's, and after a crowd of 4,000 idle connections left, jemalloc gave back more
    (RSS 75 -> 118 -> 80 MiB, against 75 -> 119 -> 84 with glibc's)."""
    if "PYTHONMALLOC" in env:
        return None
    out = {**env, "PYTHONMALLOC": NODE_ALLOCATOR}
    if "LD_PRELOAD" not in env:
        lib = find_jemalloc()
        if lib:
            out["LD_PRELOAD"] = lib
    return out


def allocator() -> str:
    """What this process's Python objects come from: ``jemalloc`` (preloaded as the C
    allocator), ``malloc`` (the C library's) or ``pymalloc`` (CPython's own)."""
    if os.environ.get("PYTHONMALLOC") not in ("malloc", "malloc_debug"):
        return "pymalloc"
    return "jemalloc" if _symbol("mallctl") is not None else "malloc"


def _symbol(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(None), name)  # the process's symbols, a preloaded library's
    except (OSError, AttributeError):
        return None


# The collector's thresholds for a node that is up: young collections as often as Python's
# default (each is short), and a middle generation collected only every 1,000 of them (Python:
# 10). What a busy node allocates per event (a publish waiting for its batch's ack, a reply being
# written) lives a few hundred ms under load: it outlives young collections and is promoted, but
# has died by the time the middle generation is collected, so that collection no longer walks
# tens of thousands of in-flight objects (~30 ms each time), and fewer reach the oldest, whose
# every 25% growth costs a full collection of all live objects. Measured under `make bench`'s
# rooms workload (gc.callbacks over 20 s windows): collector time 2.4 s -> 1.15 s, CPU per
# event 91.1-92.5 -> 84.1-85.8 us (3 runs each). Before that, (700, 100, 10) against Python's
# (700, 10, 10): 2.5 s -> 1.6 s, full collections 5 -> 1. Cyclic garbage (the node makes none
# on its paths, tests/integration/test_gc_cycles.py) waits longer; memory.release collects.
GC_THRESHOLDS = (700, 1000, 10)


def tune_collector() -> None:
    """For a node that is up: what start-up built is moved out of the collector's view
    (``gc.freeze``: it lives as long as the node), and :data:`GC_THRESHOLDS`."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _malloc_trim() -> Callable[[int], int] | None:
    mallctl = _symbol("mallctl")
    if mallctl is not None:  # jemalloc: its free pages go back at once (all arenas: 4096)
        mallctl.restype = ctypes.c_int
        return lambda _pad: int(mallctl(b"arena.4096.purge", None, None, None, 0) == 0)
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release(caches: Iterable[Callable[[], None]] = ()) -> float:
    """Empty ``caches`` (each a function), run a full collection, then give the C allocator's
    free memory back. Returns the seconds it took (the loop stands still meanwhile).

    A cache filled while the crowd was there (verified tokens) holds objects spread among the
    crowd's freed memory, a few on each page: emptied, those pages can go back too."""
    start = time.perf_counter()
    for empty in caches:
        empty()
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
    return time.perf_counter() - start


class MemoryReturn:
    """When to :func:`release`: open connections fell by half from their peak since the last
    release, by at least ``min_drop``, and stopped falling (a crowd still leaving is waited
    for: one release once it has gone); and once more ``again_s`` later, when what the
    crowd's users left of their rate limits (for a minute: see ``NodeContext.sweep_limits``)
    no longer binds and can go too.

    At most one release per ``every_s`` for a drop: a client cycling a few hundred
    connections must not make the loop stand still every few seconds (a drop within it is
    released once it is over).

    Args:
        min_drop: Fewer connections gone than this is not worth a release.
        again_s: When the second release comes (None: none).
        every_s: The least time between two releases of a drop.
    """

    def __init__(self, min_drop: int = 200, again_s: float | None = 65.0,
                 every_s: float = 30.0) -> None:
        self.min_drop = min_drop
        self.again_s = again_s
        self.every_s = every_s
        self._next_at = float("-inf")  # no release of a drop before then
        self.peak = 0
        self.last_peak = 0  # the peak before the last release
        self.releases = 0
        self._last = 0  # open connections at the last call
        self._again_at: float | None = None

    def due(self, open_now: int, high: int | None = None, now: float = 0.0,
            settling: bool = False) -> bool:
        """Note ``open_now`` (and ``high``, the most open since the last call) at ``now``
        (seconds, any clock); True when a release is due. ``settling``: what left is still
        winding down (its actors' ``on_stop``, on a loaded machine a few seconds after the
        sockets closed), so its memory is not free yet: as if still falling."""
        falling = open_now < self._last or settling
        self._last = open_now
        self.peak = max(self.peak, open_now, high or 0)
        if (falling or self.peak - open_now < self.min_drop or open_now > self.peak // 2
                or now < self._next_at):
            if self._again_at is not None and now >= self._again_at:
                self._again_at = None
                self.releases += 1
                return True
            return False
        self.last_peak, self.peak = self.peak, open_now
        self.releases += 1
        self._next_at = now + self.every_s
        if self.again_s is not None:
            self._again_at = now + self.again_s
        return True
