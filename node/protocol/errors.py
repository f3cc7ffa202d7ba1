"""Errors of the node, one tree with one root.

node.protocol.errors defines this hierarchy:

* NodeError
    * ConfigError          (a setting is unknown or invalid; the program stops with one line)
    * AuthError            (token refused: 4001, or 4010 when only its expiry is wrong)
    * ProtocolError        (a client did something wrong; carries a PROTOCOL.md code)
        * CodecError       (bytes that are not JSON / CBOR we accept: 4000)
    * NatsUnavailable      (NATS or JetStream does not answer)

The actor runtime has its own root (actors.ActorError): it knows nothing of the node.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "CodecError",
    "ConfigError",
    "NatsUnavailable",
    "NodeError",
    "ProtocolError",
]


class NodeError(Exception):
    """Root of every error raised by the node's own code."""


class ConfigError(NodeError):
    """A setting is unknown or has an invalid value.

    The message is one line naming the setting, fit to print as is.
    """


class ProtocolError(NodeError):
    """A client request failed with a code of PROTOCOL.md section 5.

    Args:
        code: The protocol error code (4000, 4003, ...).
        reason: One line for the client; never internals.
        retry: Whether retrying the same request later may succeed.
    """

    def __init__(self, code: int, reason: str, *, retry: bool = False) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.retry = retry


class AuthError(ProtocolError):
    """A token was refused (4001), or only its expiry is wrong (4010)."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(4010 if expired else 4001, reason)
        self.expired = expired


class CodecError(ProtocolError):
    """Bytes that do not decode to a frame (4000)."""

    def __init__(self, reason: str) -> None:
        super().__init__(4000, reason)


class NatsUnavailable(NodeError):
    """NATS or JetStream did not answer in time."""
