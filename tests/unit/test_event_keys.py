"""The node's own dedupe keys (node/core/events.py): distinct within a process, and a new
random prefix after a fork, so two workers forked from one parent never share keys; a client's
msg_id kept whole through a NATS header; a history page cut to what an outbox takes."""

from __future__ import annotations

import os

from node.core import events
from node.core.events import _Keys, dedupe_key
from node.protocol.frames import CBOR
from node.protocol.tokens import Principal


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


def test_a_msg_id_is_its_own_key_after_a_header_s_trims() -> None:
    """A header value loses its trailing whitespace and has CR and LF made spaces: msg_ids
    that would differ only there are escaped (``%`` too), each to its own key; the usual ones
    are kept as they are."""
    alice = Principal(sub="alice", tenant="t1")
    ids = ["a", "a ", "a\t", "a\rb", "a\nb", "a b", "a\u3000", "a\x85", "a%20", "a%", "a%25",
           "a\x00", "\u00e9\U0001f600", "m-1:x/y"]
    keys = [dedupe_key(alice, "chat:a", i) for i in ids]
    assert keys[0] == "t1/chat:a/alice/a" and keys[-1] == "t1/chat:a/alice/m-1:x/y"
    assert keys[-2] == "t1/chat:a/alice/\u00e9\U0001f600"
    assert len(set(keys)) == len(ids), keys
    assert all(k.isprintable() and " " not in k for k in keys), keys  # a header keeps them


def test_a_history_page_is_cut_to_its_budget_next_to_where_it_starts() -> None:
    from node.core.events import fit_history

    events = [{"seq": i, "data": "x" * 10} for i in range(1, 11)]
    size = len(CBOR.encode(events[0]))
    assert fit_history(events, CBOR.encode, 10 * size, keep_last=True) == (events, False)
    kept, more = fit_history(events, CBOR.encode, 3 * size, keep_last=True)
    assert more and [e["seq"] for e in kept] == [8, 9, 10]
    kept, more = fit_history(events, CBOR.encode, 3 * size, keep_last=False)
    assert more and [e["seq"] for e in kept] == [1, 2, 3]
    kept, more = fit_history(events, CBOR.encode, 1, keep_last=False)
    assert more and [e["seq"] for e in kept] == [1]  # at least one: paging moves on
