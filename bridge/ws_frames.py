"""Where a client's WebSocket frames begin and end, and the one kind the bridge reads itself.

websockets' sans-I/O parser reads every frame in a generator (a step per header field, a
``Frame`` and an ``Opcode`` per frame): ~6 us per small message here, a tenth of what the node
spends on an event. Nearly every frame a client sends is of one kind: a whole message in one
frame (FIN), text or binary, masked, no extension bit, within ``max_size``. The bridge
(bridge/ws.py) reads those itself, with websockets' own unmasking (~1 us), and gives every
other frame to websockets whole, so websockets' parser is always at a frame boundary when it
gets one: pings, pongs, closes, fragments, compressed frames and every malformed frame are
websockets', exactly as before. :func:`scan` only finds where a frame ends; it judges nothing
websockets would judge otherwise (a frame it calls ``SIMPLE`` is one websockets would yield
as it is, ``tests/unit/test_ws_frames.py`` compares the two on seeded hostile streams).
"""

from __future__ import annotations

import struct

try:  # websockets' own unmasking, as its parser does it
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = ["BROKEN", "OTHER", "PARTIAL", "SIMPLE", "apply_mask", "scan"]

#: A whole final text or binary frame, masked, without extension bits, within max_size.
SIMPLE = 0
#: A whole frame of any other kind: websockets' to read.
OTHER = 1
#: Not all of the frame is here yet (its length within max_size): wait for more.
PARTIAL = 2
#: A header websockets refuses as soon as it has it, whatever follows: a reserved opcode or
#: no mask (1002), a length beyond max_size (1009).
BROKEN = 3

_OPCODES = frozenset((0, 1, 2, 8, 9, 10))

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


def scan(buf: bytes | bytearray, pos: int, max_size: int) -> tuple[int, int, int]:
    """The frame that starts at ``buf[pos]``: ``(kind, payload_start, end)``.

    For ``SIMPLE`` its payload is ``buf[payload_start:end]``, masked with the 4 bytes before
    it, and ``buf[pos] & 0x0F`` is its opcode (1 text, 2 binary). For ``OTHER`` the frame is
    ``buf[pos:end]``. For ``PARTIAL`` and ``BROKEN``, ``payload_start`` and ``end`` are 0.
    """
    n = len(buf) - pos
    if n < 2:
        return PARTIAL, 0, 0
    head1 = buf[pos]
    head2 = buf[pos + 1]
    if not head2 & 0x80 or head1 & 0x0F not in _OPCODES:
        return BROKEN, 0, 0
    length = head2 & 0x7F
    start = pos + 2
    if length == 126:
        if n < 4:
            return PARTIAL, 0, 0
        length = _U16.unpack_from(buf, start)[0]
        start += 2
    elif length == 127:
        if n < 10:
            return PARTIAL, 0, 0
        length = _U64.unpack_from(buf, start)[0]
        start += 8
    if length > max_size:
        return BROKEN, 0, 0
    start += 4  # the mask
    end = start + length
    if end > len(buf):
        return PARTIAL, 0, 0
    if head1 == 0x81 or head1 == 0x82:
        return SIMPLE, start, end
    return OTHER, start, end
