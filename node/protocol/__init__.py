"""The protocol leaves: what every side of rtnode agrees on, with no I/O.

Frames and their codecs (``frames``), the value model (``values``), room names and NATS
subjects (``subjects``), tokens and rights (``tokens``), settings (``settings``) and errors with
the protocol's codes (``errors``). These modules import only each other, so the client side
(``devices``) can use them without any server code.
"""

from __future__ import annotations

__all__: list[str] = []
