"""The node's own dedupe keys (node/core/events.py): distinct within a process, and a new
random prefix after a fork, so two workers forked from one parent never share keys."""

from __future__ import annotations

import os

from node.core import events
from node.core.events import _Keys


def test_keys_are_distinct_and_a_reseed_changes_the_prefix() -> None:
    keys = _Keys()
    drawn = [keys.next() for _ in range(10_000)]
    assert len(set(drawn)) == len(drawn)
    prefix = keys.prefix
    keys.reseed()
    assert keys.prefix != prefix
    assert keys.next() not in drawn


def test_a_forked_child_draws_its_own_prefix() -> None:
    parent = events._KEYS.prefix
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its prefix and leave without running anything else
        os.close(read)
        os.write(write, events._KEYS.prefix.encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child and child != parent
