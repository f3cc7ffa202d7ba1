"""rtnode's node program: configuration, tokens, protocol, the embedded nats-server, the CLI."""

from node.protocol.errors import (
    AuthError,
    CodecError,
    ConfigError,
    NatsUnavailable,
    NodeError,
    ProtocolError,
)
from node.protocol.settings import Settings, load_settings

__all__ = [
    "AuthError",
    "CodecError",
    "ConfigError",
    "NatsUnavailable",
    "NodeError",
    "ProtocolError",
    "Settings",
    "load_settings",
]
