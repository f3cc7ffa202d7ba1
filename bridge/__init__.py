"""Everything that crosses a process boundary: NATS/JetStream, HTTP, WebSocket, SSE, MQTT."""

from bridge.subjects import STREAM_NAME, live_subject, room_subject

__all__ = ["STREAM_NAME", "live_subject", "room_subject"]
