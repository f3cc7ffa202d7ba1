"""Where a device keeps its per-room cursors {seq, epoch} across process restarts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["STATE_WRITE_INTERVAL_S", "CursorStore"]

STATE_WRITE_INTERVAL_S = 0.1

log = logging.getLogger("rtnode.device")


class CursorStore:
    """The cursor of the last event of each room handed to the application.

    Args:
        device_id: Written in the file, and named in warnings.
        path: A JSON file, replaced atomically, written at most every 100 ms and on
            :meth:`flush`; None keeps the cursors in memory.
    """

    def __init__(self, device_id: str, path: Path | None) -> None:
        self.device_id = device_id
        self.path = path
        self._cursors: dict[str, dict[str, Any]] = self._load()
        self._written = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._dirty = False

    def _load(self) -> dict[str, dict[str, Any]]:
        if self.path is None:
            return {}
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("! %s: unreadable state file %s: %s", self.device_id, self.path, exc)
            return {}
        rooms = raw.get("rooms") if isinstance(raw, dict) else None
        out: dict[str, dict[str, Any]] = {}
        for room, cur in (rooms if isinstance(rooms, dict) else {}).items():
            if (isinstance(cur, dict) and isinstance(cur.get("seq"), int)
                    and isinstance(cur.get("epoch"), str)):
                out[str(room)] = {"seq": cur["seq"], "epoch": cur["epoch"]}
        return out

    def __contains__(self, room: str) -> bool:
        return room in self._cursors

    def get(self, room: str) -> dict[str, Any] | None:
        """A copy of the {seq, epoch} of ``room``, or None."""
        cur = self._cursors.get(room)
        return None if cur is None else dict(cur)

    def set(self, room: str, seq: int, epoch: str | None) -> None:
        """Move the cursor of ``room`` (ignored without an epoch); written soon after."""
        if epoch is None:
            return
        self._cursors[room] = {"seq": seq, "epoch": epoch}
        if self.path is None:
            return
        self._dirty = True
        if self._timer is None:
            delay = max(0.0, self._written + STATE_WRITE_INTERVAL_S - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._write)

    def forget(self, room: str) -> None:
        self._cursors.pop(room, None)

    def flush(self) -> None:
        """Write now what is not written yet."""
        if self._timer is not None:
            self._timer.cancel()
        self._write()

    def _write(self) -> None:
        self._timer = None
        if self.path is None or not self._dirty:
            return
        self._dirty = False
        self._written = time.monotonic()
        data = json.dumps({"device": self.device_id, "rooms": self._cursors}, sort_keys=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("! %s: cannot write %s: %s", self.device_id, self.path, exc)
