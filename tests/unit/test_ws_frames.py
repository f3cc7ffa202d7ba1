"""The bridge's own reading of simple client frames (bridge/ws_frames.py, ``WsConnection``)
against websockets reading every frame (``bridge.ws.SPLIT`` off).

Seeded streams of client frames, hostile ones among them (unmasked, extension bits, reserved
opcodes, lengths past ``max_size`` or encoded oddly, control frames too long, fragments out
of place, invalid UTF-8, compressed frames with and without permessage-deflate, a close in
the middle), cut into random chunks, go to a connection that splits them; the same stream
goes to one that does not, one frame per read. Both must tell the actor the same messages
and refusals, in the same order, close with the same code and write the same bytes (pongs,
the close answer): frames are taken one after the other, whatever the reads.

(Without splitting, frames that arrive in one read are all parsed by websockets before the
first is handled: a close frame after a text frame with invalid UTF-8 is answered before the
text fails, and the connection ends with the client's code instead of 1007. Split, the first
failure ends it, in any reads.)
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import zlib
from typing import Any

import pytest
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol

from bridge import ws
from bridge.ws_frames import BROKEN, OTHER, PARTIAL, SIMPLE, apply_mask, scan

SEED = int(os.environ.get("RTNODE_TEST_WS_FRAMES_SEED", "6455"))
MAX_SIZE = 4096
_KEYS = random.Random(SEED + 1)  # masking keys


class _Transport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(bytes(data))

    def writelines(self, parts: list[bytes]) -> None:
        self.out.append(b"".join(parts))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.out.append(b"<eof>")


class _Ref:
    queued = 0

    def __init__(self) -> None:
        self.items: list[Any] = []

    def handle_now(self, item: Any) -> bool:
        self.items.append(item)
        return True

    def tell(self, item: Any) -> None:
        self.items.append(item)


class _Bridge:
    def decode(self, message: str | bytes, codec: Any) -> list[Any]:
        return [("message", type(message).__name__, message)]


def _connection(split: bool, deflate: bool) -> tuple[ws.WsConnection, _Transport, _Ref]:
    proto = ServerProtocol(max_size=MAX_SIZE)
    proto.state = State.OPEN
    if deflate:
        proto.extensions = [PerMessageDeflate(False, False, 15, 15)]
    proto.parser = Protocol.parse(proto)
    next(proto.parser)
    transport, ref = _Transport(), _Ref()
    saved = ws.SPLIT
    ws.SPLIT = split
    try:
        conn = ws.WsConnection(_Bridge(), transport, "peer", proto)  # type: ignore[arg-type]
    finally:
        ws.SPLIT = saved
    conn._ref = ref
    return conn, transport, ref


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True,
          length: str = "minimal", declared: int | None = None) -> bytes:
    """One client frame; ``length``: minimal, 16 or 64 (the 16- or 64-bit form whatever the
    size); ``declared``: a length other than the payload's."""
    n = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    m = 0x80 if masked else 0
    if length == "minimal" and n < 126:
        head += bytes([m | n])
    elif length in ("minimal", "16") and n < 65536:
        head += bytes([m | 126]) + struct.pack("!H", n)
    else:
        head += bytes([m | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = _KEYS.randbytes(4)
    return head + key + apply_mask(payload, key)


def _deflated(data: bytes) -> bytes:
    z = zlib.compressobj(wbits=-15)
    out = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4] if out.endswith(b"\x00\x00\xff\xff") else out


def _text(rng: random.Random) -> bytes:
    return "".join(rng.choice("ab{}\"':, é€😀\n") for _ in range(rng.randint(0, 300))).encode()


def _stream(rng: random.Random, deflate: bool) -> bytes:
    """A client's input: mostly simple frames, some of every other kind."""
    out = b""
    for _ in range(rng.randint(1, 25)):
        r = rng.random()
        if r < 0.45:
            out += frame(rng.choice((1, 2)), _text(rng), length=rng.choice(
                ("minimal",) * 8 + ("16", "64")))
        elif r < 0.5:
            out += frame(1, b"\xff\xfe" + _text(rng))  # invalid UTF-8
        elif r < 0.58:
            parts = [_text(rng) for _ in range(rng.randint(2, 4))]
            for k, part in enumerate(parts):
                last = k == len(parts) - 1
                out += frame(1 if k == 0 else 0, part, fin=last)
                if not last and rng.random() < 0.4:
                    out += frame(9, b"in between")
        elif r < 0.66:
            out += frame(rng.choice((9, 10)), os.urandom(rng.randint(0, 125)))
        elif r < 0.7 and deflate:
            out += frame(rng.choice((1, 2)), _deflated(_text(rng)), rsv=4)
        elif r < 0.95:
            bad = rng.choice(("unmasked", "rsv", "opcode", "toolong", "control", "cont",
                              "huge64", "declared", "textinfrag"))
            if bad == "unmasked":
                out += frame(1, b"x", masked=False)
            elif bad == "rsv":
                out += frame(2, b"x", rsv=rng.choice((1, 2, 4)))
            elif bad == "opcode":
                out += frame(rng.choice((3, 7, 11, 15)), b"x")
            elif bad == "toolong":
                out += frame(2, b"y" * (MAX_SIZE + 1))
            elif bad == "control":
                out += frame(9, b"p" * 126)
            elif bad == "cont":
                out += frame(0, b"orphan")
            elif bad == "huge64":
                out += frame(2, b"", declared=1 << 63, length="64")
            elif bad == "declared":
                out += frame(2, b"short", declared=rng.randint(6, MAX_SIZE))
            else:
                out += frame(1, b"start", fin=False) + frame(1, b"not a continuation")
        else:
            code = struct.pack("!H", rng.choice((1000, 1001, 4000)))
            out += frame(8, code + b"bye")
    return out


def _frame_ends(stream: bytes) -> list[int]:
    """Where websockets' parser finds each frame's end (until a partial or broken one)."""
    ends, pos = [], 0
    while pos < len(stream):
        kind, _, end = scan(stream, pos, MAX_SIZE)
        if kind in (PARTIAL, BROKEN):
            break
        ends.append(end)
        pos = end
    return ends


def _feed(conn: ws.WsConnection, stream: bytes, cuts: list[int], eof: bool) -> None:
    last = 0
    for cut in [*cuts, len(stream)]:
        if cut > last:
            conn.data_received(stream[last:cut])
        last = cut
    if eof:
        conn.eof_received()


def _outcome(conn: ws.WsConnection, ref: _Ref) -> tuple[Any, ...]:
    close = conn.proto.close_sent
    return (ref.items, None if close is None else close.code, conn.closing,
            conn._failure is not None, type(conn.proto.parser_exc).__name__)


async def test_simple_frames_read_here_as_websockets_reads_every_frame() -> None:
    rng = random.Random(SEED)
    _KEYS.seed(SEED + 1)
    kinds: set[str] = set()
    codes: set[int] = set()
    for run in range(400):
        deflate = rng.random() < 0.3
        stream = _stream(rng, deflate)
        eof = rng.random() < 0.2
        if eof and rng.random() < 0.5:  # the client went away in the middle of a frame
            stream = stream[:rng.randint(1, len(stream))]
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 8))))
        split, t_split, r_split = _connection(True, deflate)
        plain, t_plain, r_plain = _connection(False, deflate)
        _feed(split, stream, cuts, eof)
        _feed(plain, stream, _frame_ends(stream), eof)
        assert _outcome(split, r_split) == _outcome(plain, r_plain), (run, stream[:200], cuts)
        assert t_split.out == t_plain.out, run
        kinds.update(type(i).__name__ if not isinstance(i, tuple) else i[1]
                     for i in r_split.items)
        if split.proto.close_sent is not None:
            codes.add(int(split.proto.close_sent.code))
        elif isinstance(split.proto.parser_exc, EOFError):
            codes.add(1006)
    # the streams reached every outcome: text and binary messages, refusals of each kind
    assert {"str", "bytes", "Shutdown"} <= kinds
    assert {1000, 1002, 1006, 1007, 1009, 4000} <= codes, codes


def test_scan_finds_each_kind_and_where_it_ends() -> None:
    simple = frame(1, b"hello")
    assert scan(simple, 0, MAX_SIZE) == (SIMPLE, 6, 11)
    two = simple + frame(2, b"x" * 200, length="16")
    assert scan(two, 11, MAX_SIZE) == (SIMPLE, 11 + 8, len(two))
    assert scan(frame(9, b"p"), 0, MAX_SIZE)[0] == OTHER
    assert scan(frame(1, b"x", fin=False), 0, MAX_SIZE)[0] == OTHER
    assert scan(frame(1, b"x", masked=False), 0, MAX_SIZE) == (BROKEN, 0, 0)
    assert scan(frame(3, b"x")[:2], 0, MAX_SIZE) == (BROKEN, 0, 0)  # from its first 2 bytes
    assert scan(frame(1, b"x", rsv=4), 0, MAX_SIZE)[0] == OTHER
    for cut in range(len(simple)):
        assert scan(simple[:cut], 0, MAX_SIZE) == (PARTIAL, 0, 0)
    assert scan(frame(2, b"", declared=MAX_SIZE + 1), 0, MAX_SIZE) == (BROKEN, 0, 0)
    assert scan(frame(2, b"", declared=1 << 63, length="64")[:10], 0, MAX_SIZE) == (
        BROKEN, 0, 0)


@pytest.mark.parametrize("split", [True, False])
async def test_a_partial_frame_at_the_end_of_the_stream_fails_as_websockets_fails(
        split: bool) -> None:
    conn, _, ref = _connection(split, False)
    conn.data_received(frame(1, b"whole") + frame(1, b"cut short")[:5])
    conn.eof_received()
    assert ref.items == [("message", "str", "whole")]
    assert isinstance(conn.proto.parser_exc, EOFError)  # websockets' 1006: nothing is sent
    await asyncio.sleep(0)


async def test_a_frame_trickling_in_is_kept_in_one_buffer_that_grows() -> None:
    """A large frame that comes a few bytes at a time is appended to one buffer in place (no
    copy of all so far per read: a hostile client trickling a frame costs O(n), not O(n^2)),
    and read whole once its last byte is in."""
    conn, _, ref = _connection(True, False)
    payload = bytes(range(256)) * 12  # 3,072 bytes, within MAX_SIZE
    data = frame(2, payload) + frame(1, b"next")
    conn.data_received(data[:3])
    carry = conn._carry
    assert isinstance(carry, bytearray)
    for k in range(3, len(data), 7):
        conn.data_received(data[k:k + 7])
        assert ref.items or conn._carry is carry, "copied while it trickled in"
    assert ref.items == [("message", "bytes", payload), ("message", "str", "next")]
    assert conn._carry == b""
