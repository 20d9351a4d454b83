"""The server name of a TLS ClientHello, read without terminating TLS (sans-IO).

`server_name(data)` takes the first bytes a client sent and returns the SNI
host name (lower-case), None when the hello names none, raises `NeedMore`
while the hello is incomplete and `NotClientHello` for anything else. The
hello may span several TLS records (RFC 8446 §5.1 allows fragmenting
handshake messages); it is reassembled up to `MAX_HELLO` bytes. Every length
is checked against what is there, so truncated or hostile input is an
exception, never an index error.
"""

from __future__ import annotations

#: a ClientHello larger than this is refused (post-quantum key shares make ~2 KB common)
MAX_HELLO = 16 << 10

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
_HOST_NAME = 0x00


class NeedMore(Exception):
    """The ClientHello is not complete yet: read more and call again."""


class NotClientHello(ValueError):
    """The bytes are not a TLS ClientHello (or a malformed one)."""


def _handshake_bytes(data: bytes) -> bytes:
    """Concatenate the payloads of the leading handshake records until the hello is whole."""
    payload = bytearray()
    offset = 0
    while True:
        if len(data) - offset < 5:
            raise NeedMore
        if data[offset] != _HANDSHAKE or data[offset + 1] != 0x03:
            raise NotClientHello("not a TLS handshake record")
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if length == 0 or length > 1 << 14:
            raise NotClientHello("bad TLS record length")
        if len(data) - offset - 5 < length:
            raise NeedMore
        payload += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(payload) >= 4:
            if payload[0] != _CLIENT_HELLO:
                raise NotClientHello("the first handshake message is not a ClientHello")
            needed = 4 + int.from_bytes(payload[1:4], "big")
            if needed > MAX_HELLO:
                raise NotClientHello("ClientHello too large")
            if len(payload) >= needed:
                return bytes(payload[4:needed])


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise NotClientHello("ClientHello truncated")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, size: int) -> bytes:
        return self.take(self.number(size))


def server_name(data: bytes) -> str | None:
    hello = _Reader(_handshake_bytes(data))
    hello.take(2 + 32)  # legacy_version, random
    hello.vector(1)  # legacy_session_id
    hello.vector(2)  # cipher_suites
    hello.vector(1)  # legacy_compression_methods
    if hello.pos == len(hello.data):
        return None  # no extensions at all (an old client)
    extensions = _Reader(hello.vector(2))
    while extensions.pos < len(extensions.data):
        kind = extensions.number(2)
        body = extensions.vector(2)
        if kind != _EXT_SERVER_NAME:
            continue
        names = _Reader(_Reader(body).vector(2))
        while names.pos < len(names.data):
            name_type = names.number(1)
            name = names.vector(2)
            if name_type == _HOST_NAME:
                try:
                    text = name.decode("ascii")
                except UnicodeDecodeError:
                    raise NotClientHello("server name is not ASCII") from None
                if not text or len(text) > 253:
                    raise NotClientHello("bad server name length")
                return text.lower().rstrip(".")
        return None
    return None
