"""Only a server's status line gives a message a ``Status`` (or ``Description``) in nats-py's
header dict, never the message's own header lines (``bridge._nats_patches._parse_header_lines``).

nats-py puts ``NATS/1.0 404 No Messages`` under ``Status`` and ``Description``, and the header
lines after it under their own names: a stored event whose own headers said ``Status: 404`` (a
backend publishes into the stream, PROTOCOL.md section 9) looked like the end of a direct-get
batch, and ``Status: 500`` like a failed read, so a room's recovery and history failed. On seeded
header blocks, with and without a status line, the dict holds the status line's code and text
and, of the lines, every name but those two, with its last value."""

from __future__ import annotations

import os
import random

from nats.aio.client import Client

from bridge import _nats_patches

SEED = int(os.environ.get("RTNODE_TEST_STATUS_HEADERS_SEED", "4041"))
BLOCKS = 3000

_NAMES = ["Status", "Description", "Nats-Sequence", "Nats-Num-Pending", "Nats-Last-Sequence",
          "X-Status", "Statuses", "status", "Nats-Pin-Id", "Data"]
_VALUES = ["404", "204", "503", "100", "408", "500", "No Messages", "EOB", "7", "", " x "]
_STATUS_LINES = ["404 No Messages", "204 EOB", "503", "408 Request Timeout", "100 Idle Heartbeat",
                 "409 Consumer Deleted"]


def _block(rng: random.Random) -> tuple[bytes, str | None, dict[str, str]]:
    """A header block, the status code of its status line (None: none), and the lines' own
    headers as the dict must hold them."""
    status = rng.choice(_STATUS_LINES) if rng.random() < 0.4 else None
    lines = [(rng.choice(_NAMES), rng.choice(_VALUES)) for _ in range(rng.randrange(0, 7))]
    first = "NATS/1.0" + (f" {status}" if status else "")
    raw = (first + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in lines) + "\r\n").encode()
    wanted: dict[str, str] = {}
    for k, v in lines:
        if k not in ("Status", "Description"):
            wanted[k] = v.strip()
    return raw, status.split(" ")[0] if status else None, wanted


async def test_only_a_status_line_gives_a_status() -> None:
    _nats_patches.install()
    nc = Client()
    rng = random.Random(SEED)
    own = 0
    for _ in range(BLOCKS):
        raw, status, wanted = _block(rng)
        own += b"\r\nStatus:" in raw
        hdr = await nc._process_headers(raw) or {}
        assert hdr.get("Status") == status, raw
        if status is None:
            assert "Description" not in hdr, raw
        # The lines' own headers, as they are (never Status or Description).
        assert {k: v for k, v in hdr.items() if k not in ("Status", "Description")} == wanted, raw
    assert own >= BLOCKS // 10, own  # the seed wrote the message's own Status line often


async def test_a_stored_event_s_own_status_header_is_its_own() -> None:
    _nats_patches.install()
    nc = Client()
    raw = (b"NATS/1.0\r\nStatus: 404\r\nDescription: No Messages\r\nNats-Stream: RT\r\n"
           b"Nats-Sequence: 3\r\n\r\n")
    assert await nc._process_headers(raw) == {"Nats-Stream": "RT", "Nats-Sequence": "3"}
    eob = b"NATS/1.0 204 EOB\r\nNats-Num-Pending: 0\r\nNats-Last-Sequence: 5\r\n\r\n"
    assert await nc._process_headers(eob) == {
        "Status": "204", "Description": "EOB", "Nats-Num-Pending": "0",
        "Nats-Last-Sequence": "5"}
