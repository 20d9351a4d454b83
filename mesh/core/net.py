"""Addresses and ports as text: the one parser every flag, label, config key,
API field and CLI option that names them goes through.

Sans-IO: it only reads text (no name is resolved, no socket opened). A port
is ASCII digits only: `str.isdigit()` alone accepts "²" (which `int()`
refuses) and "٣" (which `int()` reads as 3), and `int()` alone accepts "+80",
"8_0" and " 80". An IPv6 address with a port is bracketed, `[::1]:53`, as in
URLs (RFC 3986 §3.2.2); without a port a bare `::1` is read as an address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

MIN_PORT, MAX_PORT = 1, 65535


class AddressError(ValueError):
    """Text that is not the address, port or number it should be; says which and why."""


def parse_int(text: str, what: str, low: int, high: int) -> int:
    """A decimal integer from ASCII digits (surrounding whitespace ignored) in [low, high]."""
    digits = text.strip()
    if not (digits and digits.isascii() and digits.isdigit()):
        raise AddressError(f"{what} {text!r} is not a number")
    # Bound the length before int(): a megabyte of digits is out of range, not work.
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(high)):
        raise AddressError(f"{what} {significant[:20]}... is out of range {low}-{high}")
    value = int(significant)
    if not low <= value <= high:
        raise AddressError(f"{what} {value} is out of range {low}-{high}")
    return value


def parse_port(text: str, what: str = "port") -> int:
    """A port number, 1-65535, from ASCII digits."""
    return parse_int(text, what, MIN_PORT, MAX_PORT)


def port_or_none(text: str) -> int | None:
    """The port `text` names (ASCII digits, no white space), or None when it names none:
    for lookups that just miss, and callers with an error of their own to raise."""
    if text != text.strip():
        return None
    try:
        return parse_port(text)
    except AddressError:
        return None


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host (a name or an IP literal, unbracketed) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def split_host_port(text: str, what: str) -> tuple[str, str | None, bool]:
    """`ADDR:PORT`, `[V6]:PORT`, `[V6]`, `ADDR` or a bare IPv6 `V6` to (host, port text or
    None, bracketed), surrounding whitespace ignored; nothing is checked but the brackets."""
    text = text.strip()
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise AddressError(f"{what} {text!r}: expected [IPv6]:PORT")
        return host, (rest[1:] if rest else None), True
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, port, False
    return text, None, False  # no colon, or several: a bare IPv6 address


def parse_host_port(text: str, default_port: int | None, what: str) -> HostPort:
    """`ADDR:PORT`, `[V6]:PORT`, or a bare `ADDR`, `[V6]` or `V6` when a default port exists.

    The host is not checked beyond being there (a name is the caller's to resolve);
    the port is 1-65535 in ASCII digits."""
    host, port_text, _ = split_host_port(text, what)
    if not host:
        raise AddressError(f"{what} {text.strip()!r}: the address is missing")
    if not port_text:
        if default_port is None:
            raise AddressError(f"{what} {text.strip()!r}: expected ADDR:PORT")
        return HostPort(host, default_port)
    try:
        port = parse_port(port_text)
    except AddressError:
        raise AddressError(
            f"{what} {text.strip()!r}: the port must be a number from {MIN_PORT} to {MAX_PORT}"
        ) from None
    return HostPort(host, port)


def parse_ip_host_port(text: str, default_port: int | None, what: str) -> HostPort:
    """Like `parse_host_port`, but the host must be an IP literal (nothing to resolve)."""
    parsed = parse_host_port(text, default_port, what)
    try:
        ipaddress.ip_address(parsed.host)
    except ValueError:
        raise AddressError(f"{what} {text.strip()!r}: the address must be an IP address") from None
    return parsed
