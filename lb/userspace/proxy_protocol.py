"""The PROXY protocol, version 2 (haproxy's proxy-protocol.txt §2.2): the binary
header the userspace proxy sends to a real server ahead of the client's bytes,
so that the server sees the client's address through the proxy.

Only what the proxy needs: PROXY command, IPv4 (or IPv6), TCP or UDP, no TLVs.
`parse` is the receiving side, for servers and tests.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_PROXY = 0x21  # version 2, command PROXY
VERSION_LOCAL = 0x20  # version 2, command LOCAL (a health check: no addresses)
_FAMILY = {(4, "tcp"): 0x11, (4, "udp"): 0x12, (6, "tcp"): 0x21, (6, "udp"): 0x22}
_HEAD = struct.Struct("!12sBBH")
HEADER_MIN = _HEAD.size  # 16


class ProxyHeaderError(ValueError):
    """Bytes that are not a PROXY v2 header (the message says what is wrong)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    protocol: str  # "tcp" or "udp"; "" for LOCAL
    source: tuple[str, int]
    destination: tuple[str, int]
    length: int  # bytes the header took, TLVs included


def build(protocol: str, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """The header for a connection from `source` to `destination` (both IPv4 or both IPv6)."""
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        # A v4 client reaching a v6 listener shows as ::ffff:a.b.c.d: map both to v6.
        src, dst = (
            ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst)
        )
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return _HEAD.pack(SIGNATURE, VERSION_PROXY, _FAMILY[(src.version, protocol)], len(body)) + body


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`; None while more bytes are needed."""
    if len(data) < HEADER_MIN:
        if not SIGNATURE.startswith(bytes(data[:12])):
            raise ProxyHeaderError("no PROXY v2 signature")
        return None
    signature, version, family, length = _HEAD.unpack_from(data)
    if signature != SIGNATURE:
        raise ProxyHeaderError("no PROXY v2 signature")
    if version not in (VERSION_PROXY, VERSION_LOCAL):
        raise ProxyHeaderError(f"version/command byte 0x{version:02x} is not v2 PROXY/LOCAL")
    if len(data) < HEADER_MIN + length:
        return None
    total = HEADER_MIN + length
    if version == VERSION_LOCAL:
        return ProxyHeader("", ("", 0), ("", 0), total)
    sizes = {0x11: 4, 0x12: 4, 0x21: 16, 0x22: 16}
    size = sizes.get(family)
    if size is None:
        raise ProxyHeaderError(f"address family 0x{family:02x} is not supported")
    if length < 2 * size + 4:
        raise ProxyHeaderError(f"address block of {length} bytes is too short")
    body = bytes(data[HEADER_MIN : HEADER_MIN + 2 * size + 4])
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size : 2 * size])
    sport, dport = struct.unpack_from("!HH", body, 2 * size)
    return ProxyHeader(
        "tcp" if family & 0x0F == 1 else "udp", (str(src), sport), (str(dst), dport), total
    )
