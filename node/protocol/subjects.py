"""NATS subject and stream names (PROTOCOL.md section 9). Pure functions, no I/O."""

from __future__ import annotations

__all__ = [
    "LIVE_PREFIX",
    "ROOM_PREFIX",
    "STREAM_NAME",
    "eph_subject",
    "live_subject",
    "room_from_subject",
    "room_subject",
]

STREAM_NAME = "RTNODE_ROOMS"
ROOM_PREFIX = "rt.room"
LIVE_PREFIX = "rt.live"
EPH_PREFIX = "rt.eph"


def room_subject(tenant: str, room: str) -> str:
    """The stream subject of a room: ``rt.room.<tenant>.<room>``."""
    return f"{ROOM_PREFIX}.{tenant}.{room}"


def live_subject(tenant: str, room: str) -> str:
    """The live fan-out subject of a room (the stream's RePublish destination)."""
    return f"{LIVE_PREFIX}.{tenant}.{room}"


def eph_subject(tenant: str, room: str) -> str:
    """The core NATS subject of a room's volatile events."""
    return f"{EPH_PREFIX}.{tenant}.{room}"


def room_from_subject(subject: str) -> tuple[str, str]:
    """Split ``rt.<kind>.<tenant>.<room>`` into ``(tenant, room)``.

    Raises:
        ValueError: The subject is not a room subject.
    """
    parts = subject.split(".", 3)
    if len(parts) != 4 or parts[0] != "rt" or not parts[2] or not parts[3]:
        raise ValueError(f"not a room subject: {subject!r}")
    return parts[2], parts[3]
