"""Everything that crosses a process boundary: NATS/JetStream, HTTP, WebSocket, SSE, MQTT."""

from node.protocol.subjects import STREAM_NAME, live_subject, room_subject

__all__ = ["STREAM_NAME", "live_subject", "room_subject"]
