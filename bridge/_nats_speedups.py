"""A faster header parser for nats-py, installed by the node at start.

nats-py 2.16 parses every message's headers with ``any(c.isspace() for c in key)`` per header
name: a generator step per character. Every live event carries five headers (the stream's
RePublish), so that loop alone cost ~40 us per event in the node's profile (0.85 s of 7 s for
20,000 device uplinks). This replacement returns exactly the same dict (same rules: split on the
first ``:``, skip lines without one, skip non-ASCII names and names containing whitespace,
strip, decode values as UTF-8 with replacement) with one regex search per name.
"""

from __future__ import annotations

import re

from nats.aio.client import Client

__all__ = ["install"]

_SPACE = re.compile(r"\s")  # str patterns: the characters str.isspace() accepts


def _parse_header_lines(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _SPACE.search(key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def install() -> None:
    """Replace nats-py's header parser (idempotent)."""
    Client._parse_header_lines = staticmethod(_parse_header_lines)  # type: ignore[method-assign]
