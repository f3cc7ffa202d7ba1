"""The node's reading of what nats-server sends (``bridge._nats_patches._parse``) against
nats-py's own parser.

Seeded streams of server protocol (MSG and HMSG with and without a reply, to a room's route,
whose messages of one read are handed over as one list, to a raw route that takes each at once,
to a :func:`~bridge._nats_patches.direct_dispatch` subscription, to a subscription with
a queue and to none; PING, PONG, +OK, -ERR, INFO; and lines nats-py's patterns read in their
own way: doubled spaces, tabs, a sid of ``+1`` or ``1_0``, counts that are not digits, unknown
operations) are cut into random chunks and fed to both parsers, each with a client of its own.
Both must hand over the same messages in the same order, call the same handlers, count the
same, raise the same error at the same point and leave the same buffer and state.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

from bridge import _nats_patches
from bridge._nats_patches import GatheringRoute, RawRoute, _Direct

SEED = int(os.environ.get("RTNODE_TEST_NATS_PARSER_SEED", "3817"))
STREAMS = 300


class _Gathering(GatheringRoute):
    __slots__ = ()

    def item(self, subject: bytes, data: bytes, headers: bytes | None) -> Any:
        if data == b"boom":
            raise ValueError("a route's bug: logged, the message dropped, the reading goes on")
        return None if data == b"skip" else ("raw", data, headers)


class _World:
    """A client (never connected) with one subscription of each kind, recording what each
    hands over and what the parser calls."""

    def __init__(self) -> None:
        _nats_patches.install()
        self.nc = nc = Client()
        self.log: list[Any] = []
        log = self.log
        # A room's stored events: each read's as one list (logged one by one, as nats-py's
        # own dispatch hands them over, lists of one); and a route that takes each at once.
        self.lists: list[int] = []

        def gathered(items: list[Any]) -> None:
            self.lists.append(len(items))
            log.extend(items)

        route = _Gathering(nc, 1, "live.>", gathered)
        plain = RawRoute(nc, 7, "plain.>", lambda data, hdr: log.append(("plain", data, hdr)))
        direct = Subscription(nc, 2, "_INBOX.>")
        direct._pending_queue = _Direct(  # type: ignore[assignment]
            direct, lambda m: log.append(("direct", m.subject, m.reply, m.data, m.headers)))
        self.queued = Subscription(nc, 3, "q.>")
        # A direct one that ends after 2 messages (nats-py then drops it from _subs).
        limited = Subscription(nc, 5, "l.>")
        limited._max_msgs = 2
        limited._pending_queue = _Direct(  # type: ignore[assignment]
            limited, lambda m: log.append(("limited", m.subject, m.data)))
        # A direct one with a small pending-bytes limit (nats-py calls a larger message a
        # slow consumer's and drops it).
        small = Subscription(nc, 6, "s.>")
        small._pending_bytes_limit = 120
        small._pending_queue = _Direct(  # type: ignore[assignment]
            small, lambda m: log.append(("small", m.subject, m.data)))
        subs: dict[int, Any] = {1: route, 2: direct, 3: self.queued, 5: limited, 6: small,
                                7: plain}
        nc._subs.update(subs)
        self.direct = direct

        async def ping() -> None:
            log.append(("ping",))

        async def pong() -> None:
            log.append(("pong",))

        async def info(srv: Any) -> None:
            log.append(("info", srv))

        async def err(text: str) -> None:
            log.append(("err", text))

        nc._process_ping = ping  # type: ignore[method-assign]
        nc._process_pong = pong  # type: ignore[method-assign]
        nc._process_info = info  # type: ignore[method-assign]
        nc._process_err = err  # type: ignore[method-assign]

        async def error(exc: Exception) -> None:
            log.append(("error_cb", type(exc).__name__))

        nc._error_cb = error
        self.parser = Parser(nc)

    def outcome(self) -> Any:
        queued = []
        while not self.queued._pending_queue.empty():
            m = self.queued._pending_queue.get_nowait()
            queued.append((m.subject, m.reply, m.data, m.headers))
        p = self.parser
        return (self.log, queued, dict(self.nc.stats),
                [s._received for s in self.nc._subs.values()],
                self.direct._pending_size, self.queued._pending_size,
                bytes(p.buf), p.state, p.needed, p.header_needed)


def _subject(rng: random.Random) -> bytes:
    return b".".join(rng.choice([b"live", b"t", b"_INBOX", b"room-1", b"a_b", b"q", b"x9"])
                     for _ in range(rng.randint(1, 4)))


def _payload(rng: random.Random) -> bytes:
    return rng.choice([b"", b"\r\n", b"MSG x 1 3\r\n", b'{"seq":1}', b"skip", b"boom",
                       rng.randbytes(rng.randint(0, 300))])


def _headers(rng: random.Random) -> bytes:
    return rng.choice([
        b"NATS/1.0\r\nNats-Sequence: 7\r\nNats-Stream: r\r\n\r\n",
        b"NATS/1.0 503\r\n\r\n",
        b"NATS/1.0 404 No Messages\r\n\r\n",
        b"NATS/1.0\r\n\r\n",
        b"NATS/1.0\r\nA:b\r\n bad name: x\r\n\xff: y\r\n\r\n",
    ])


def _message(rng: random.Random) -> bytes:
    sid = rng.choice([b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"1", b"1", b"2"])
    reply = rng.choice([b"", b"", b"_INBOX.r.1", b"7"])
    data = _payload(rng)
    subject = _subject(rng)
    if rng.random() < 0.5:
        line = b"MSG " + subject + b" " + sid + (b" " + reply if reply else b"")
        return line + b" %d\r\n" % len(data) + data + b"\r\n"
    hdr = _headers(rng)
    line = b"HMSG " + subject + b" " + sid + (b" " + reply if reply else b"")
    return line + b" %d %d\r\n" % (len(hdr), len(hdr) + len(data)) + hdr + data + b"\r\n"


def _odd(rng: random.Random) -> bytes:
    """A line nats-py reads in its own way, or refuses."""
    data = b"abc"
    return rng.choice([
        b"MSG  live.a 1 3\r\nabc\r\n",
        b"MSG live.a  1 3\r\nabc\r\n",
        b"MSG live.a 1  3\r\nabc\r\n",
        b"MSG\tlive.a 1 3\r\nabc\r\n",
        b"MSG live.a\t1 3\r\nabc\r\n",
        b"MSG live.a 1 3 \r\nabc\r\n",
        b"MSG li\tve 1 3\r\nabc\r\n",
        b"MSG li\tve 1  3\r\nabc\r\n",
        b"MSG  1 r\tq 3\r\nabc\r\n",
        b"HMSG  2 r\tq 12 15\r\nNATS/1.0\r\n\r\nabc\r\n",
        b"MSG live.a 1 r\x0b 3\r\nabc\r\n",
        b"MSG live.a 2 r\x0c 3 3\r\nabc\r\n",
        b"HMSG li\rve 2 12 15\r\nNATS/1.0\r\n\r\nabc\r\n",
        # Whitespace but a space next to a reply (sid 2 hands the reply over): each one of the
        # five must send the line to nats-py's reading.
        b"MSG live.a 2 r\t 3\r\nabc\r\n",
        b"MSG live.a 2 r\n 3\r\nabc\r\n",
        b"MSG live.a 2 r\x0b 3\r\nabc\r\n",
        b"MSG live.a 2 r\x0c 3\r\nabc\r\n",
        b"MSG live.a 2 r\r 3\r\nabc\r\n",
        b"HMSG live.a 2 r\x0b 12 15\r\nNATS/1.0\r\n\r\nabc\r\n",
        b"MSG live.a +1 3\r\nabc\r\n",
        b"MSG live.a 1_0 3\r\nabc\r\n",
        b"MSG live.a x 3\r\nabc\r\n",
        b"MSG live.a 1 3x\r\nabc\r\n",
        b"MSG live.a 1 r r 3\r\nabc\r\n",
        b"MSG live.a 1\r\n",
        b"HMSG live.a 1 12 15\r\nNATS/1.0\r\n\r\n" + data + b"\r\n",
        b"HMSG live.a 1 r 1x 3\r\nabc\r\n",
        b"HMSG live.a 1 12\r\n",
        b"msg live.a 1 3\r\nabc\r\n",
        b"MSGX live.a 1 3\r\nabc\r\n",
        b"HMSG  live.a 2 12 15\r\nNATS/1.0\r\n\r\nabc\r\n",
        b"MSG live.a 2 3\nabc\r\n",
        b"+OK\r\n", b"+OK \r\n", b"PING\r\n", b"PONG\r\n", b"PING  \r\n",
        b"-ERR 'Stale Connection'\r\n", b"-ERR\r\n",
        b'INFO {"server_id":"x","max_payload":1048576}\r\n',
        b"WHAT is this\r\n",
    ])


def _stream(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 40)):
        r = rng.random()
        parts.append(_message(rng) if r < 0.75 else _odd(rng) if r < 0.9 else
                     rng.choice([b"PING\r\n", b"PONG\r\n", b"+OK\r\n"]))
    if rng.random() < 0.2:  # a stream that ends in the middle of something
        parts.append(_message(rng)[:rng.randint(1, 20)])
    return b"".join(parts)


async def _feed(parse: Any, world: _World, stream: bytes, cuts: list[int]) -> Any:
    error = None
    start = 0
    for end in [*cuts, len(stream)]:
        try:
            await parse(world.parser, stream[start:end])
        except ProtocolError as exc:
            error = str(exc)
            break
        start = end
    return error, world.outcome()


async def test_the_node_reads_every_stream_as_nats_py_does() -> None:
    rng = random.Random(SEED)
    kinds = {"raw": 0, "plain": 0, "direct": 0, "limited": 0, "small": 0, "error_cb": 0,
             "error": 0, "lists": 0}
    for i in range(STREAMS):
        stream = _stream(rng)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1,
                                                             rng.randint(0, 12))))
        if rng.random() < 0.3:  # byte by byte: every place a read can end
            cuts = list(range(1, len(stream)))
        world = _World()
        ours = await _feed(_nats_patches._parse, world, stream, cuts)
        theirs = await _feed(_nats_patches._ORIGINAL_PARSE, _World(), stream, cuts)
        assert ours == theirs, f"stream {i} (seed {SEED}): {stream[:300]!r} cut at {cuts}"
        for entry in ours[1][0]:
            if entry[0] in kinds:
                kinds[entry[0]] += 1
        kinds["error"] += ours[0] is not None
        kinds["lists"] += any(n > 1 for n in world.lists)
    # The streams reached every path: raw routes (lists of several among them), acks handed
    # over, and refusals.
    assert min(kinds.values()) > 10, kinds


@pytest.mark.parametrize("line", [b"MSG live.a 1 5\r\n", b"HMSG live.a 1 _INBOX.x 12 17\r\n"])
async def test_a_message_split_anywhere_is_handed_over_once(line: bytes) -> None:
    hdr = b"NATS/1.0\r\n\r\n" if line.startswith(b"H") else b""
    stream = line + hdr + b"hello\r\n"
    for cut in range(1, len(stream)):
        world = _World()
        await _nats_patches._parse(world.parser, stream[:cut])
        assert world.log == []
        await _nats_patches._parse(world.parser, stream[cut:])
        assert world.log == [("raw", b"hello", hdr or None)], cut
        assert world.parser.buf == bytearray()
