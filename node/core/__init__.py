"""The domain: what a node does with frames, with no I/O library.

The admission pipeline every door calls (``admission``), the sans-I/O connection session and
its commands (``session``, ``session_rooms``, ``session_presence``, ``session_rpc``,
``session_commands``), the connection and room actors (``connection``, ``room``, with what a
room is told in ``room_messages``) and what bridges share with them (``context``), the outbox
fan-out writes into (``outbox``), rate limits (``limits``), event bodies and history answers
(``events``), server rpc methods (``rpc``), and the ports the adapters implement (``ports``).
Imports the actor runtime (``actors``) and the protocol leaves (``node.protocol``) only.
"""

from __future__ import annotations

__all__: list[str] = []
