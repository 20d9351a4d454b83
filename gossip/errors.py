"""Errors of the gossip package, split by who is at fault (h11's Local/Remote split).

`RemoteProtocolError`s come from bytes a peer sent: the shell catches them at
its edge, counts the drop by `reason` and carries on. `LocalProtocolError`s
mean this process misused the API (a broadcast too large for a datagram). A
bad `GossipConfig` raises `ConfigError`, which is also a `ValueError`.
"""

from __future__ import annotations

__all__ = [
    "DECODE_REASONS",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "GossipError",
    "LocalProtocolError",
    "RemoteProtocolError",
]

DECODE_REASONS = (
    "truncated",  # empty, or no type byte after the version
    "bad_version",  # byte 0 is not a protocol version we speak
    "unknown_type",  # byte 1 is not a MessageType we decode
    "bad_msgpack",  # the body is not one well-formed msgpack value within limits
    "bad_fields",  # a field is missing or has the wrong type or range
    "oversized",  # more bytes than a datagram / MAX_STREAM allows
    "too_many_parts",  # a COMPOUND of more than MAX_PARTS messages
    "nested_compound",  # a COMPOUND inside a COMPOUND, or a COMPOUND on a stream
)
"""Every `DecodeError.reason` the codec raises (the shell's drop counters)."""


class GossipError(Exception):
    """Root of every error the gossip package raises on purpose."""


class LocalProtocolError(GossipError):
    """This process asked for something the protocol cannot do."""


class RemoteProtocolError(GossipError):
    """A peer sent something we cannot accept; drop it and count `reason`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class DecodeError(RemoteProtocolError):
    """Bytes that are not a valid message; `reason` is one of DECODE_REASONS."""


class EncodeError(LocalProtocolError):
    """A message or packet that cannot be encoded within its limits (`reason`)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ConfigError(GossipError, ValueError):
    """An invalid GossipConfig or constructor argument."""
