"""rtnode's node program: configuration, tokens, protocol, the embedded nats-server, the CLI."""

from node.config import Settings, load_settings
from node.errors import (
    AuthError,
    CodecError,
    ConfigError,
    NatsUnavailable,
    NodeError,
    ProtocolError,
)

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
