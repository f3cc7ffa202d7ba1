"""A room's live route reads the seq and the previous seq of each stored event from the raw
header block the stream's RePublish writes (``bridge.room_store._StoredRoute.item``).

On seeded blocks as nats-server writes them (the message's own headers, then the server's,
appended), it reads the server's seqs, whatever the message's own headers say: a backend may
publish into a room with headers named ``Nats-Sequence`` or ``Nats-Last-Sequence`` (a relay
copying another stream's message). On any block (values missing, empty, padded, not digits,
signed, with underscores, a name that only starts like the one read, a block cut short, names
repeated) it reads what ``int(header_value(...))`` reads."""

from __future__ import annotations

import logging
import os
import random

from nats.aio.client import Client

from bridge._nats_patches import header_value
from bridge.room_store import _StoredRoute
from node.core.ports import LiveMessage

SEED = int(os.environ.get("RTNODE_TEST_STORED_ROUTE_SEED", "5309"))
BLOCKS = 4000

_NAMES = [b"Nats-Sequence", b"Nats-Last-Sequence", b"Nats-Stream", b"Nats-Subject",
          b"Nats-Time-Stamp", b"Nats-Msg-Id", b"Nats-Sequence-Next", b"Nats-Last-Sequence2",
          b"nats-sequence", b"X-Nats-Sequence"]
_VALUES = [b"7", b" 7", b"7 ", b"  123456789012  ", b"", b" ", b"\t9\t", b"x", b"-3", b"+4",
           b"1_000", b"0", b"00012", b"9" * 30, b"1.5", b"\x0b5\x0c", b"\xff", b"1 2"]


def _reference(headers: bytes | None) -> tuple[int, int] | None:
    """What the route read before: two ``header_value`` calls."""
    try:
        seq = int(header_value(headers, b"Nats-Sequence") or b"x")
        prev = int(header_value(headers, b"Nats-Last-Sequence") or 0)
    except ValueError:
        return None
    return seq, prev


def _own_headers(rng: random.Random) -> list[bytes]:
    """A message's own header lines, some named as the server's."""
    return [rng.choice(_NAMES) + rng.choice([b":", b": ", b":  "]) + rng.choice(_VALUES)
            for _ in range(rng.randrange(0, 6))]


def _block(rng: random.Random) -> bytes | None:
    kind = rng.random()
    if kind < 0.05:
        return rng.choice([None, b""])
    if kind < 0.45:  # as nats-server writes a RePublish
        seq = rng.randrange(1, 2**40)
        lines = [b"Nats-Stream: RTNODE_ROOMS", b"Nats-Subject: rt.room.t.r",
                 b"Nats-Sequence: %d" % seq, b"Nats-Time-Stamp: 2026-12-07T12:00:00Z",
                 b"Nats-Last-Sequence: %d" % rng.randrange(0, seq)]
        rng.shuffle(lines)
    else:
        lines = _own_headers(rng)
    block = b"NATS/1.0" + rng.choice([b"", b" 100"]) + b"\r\n" + b"\r\n".join(lines)
    block += rng.choice([b"\r\n\r\n", b"\r\n", b""])  # whole, or cut short
    return block


def test_the_route_reads_both_seqs_as_header_value_does(caplog) -> None:
    caplog.set_level(logging.ERROR, logger="bridge.room_store")  # refusals are logged
    route = _StoredRoute(Client(), 1, "rt.live.t.>", lambda items: None)
    rng = random.Random(SEED)
    refused = read = 0
    for _ in range(BLOCKS):
        block = _block(rng)
        want = _reference(block)
        got = route.item(b"rt.live.t.r", b"body", block)
        if want is None:
            assert got is None, block
            refused += 1
        else:
            assert got == LiveMessage(want[0], want[1], b"body"), block
            read += 1
    # Both kinds came up often: the hostile blocks are not all refused, nor all read.
    assert refused > BLOCKS // 10 and read > BLOCKS // 3, (refused, read)


def test_the_server_s_seqs_are_read_whatever_the_message_s_own_headers_say() -> None:
    route = _StoredRoute(Client(), 1, "rt.live.t.>", lambda items: None)
    rng = random.Random(SEED + 1)
    for _ in range(BLOCKS):
        seq = rng.randrange(1, 2**40)
        prev = rng.choice([0, rng.randrange(0, seq)])
        # As nats-server 2.15 republishes (checked over the network in
        # tests/integration/test_backend_headers.py): the message's headers, then its own.
        server = [b"Nats-Stream: RTNODE_ROOMS", b"Nats-Subject: rt.room.t.r",
                  b"Nats-Sequence: %d" % seq, b"Nats-Time-Stamp: 2026-12-07T12:00:00Z",
                  b"Nats-Last-Sequence: %d" % prev]
        block = b"NATS/1.0\r\n" + b"\r\n".join(_own_headers(rng) + server) + b"\r\n\r\n"
        assert route.item(b"rt.live.t.r", b"body", block) == LiveMessage(seq, prev, b"body")
