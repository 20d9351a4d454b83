"""Message objects <-> bytes (docs/gossip.md, "Codec").

Wire form: byte 0 = protocol VERSION, byte 1 = MessageType, then one msgpack
array of the message's fields in declaration order (bytes as bin, addresses
as [host, port], enums as ints, an absent address as nil). COMPOUND (type 7)
is a msgpack array of bin, each one encoded message without the version
byte. memberlist (net.go) uses a type byte + msgpack too, but Go-struct maps
and its own compound framing; we are not wire-compatible with it.

Fields are append-only: a decoder takes the fields it knows, fills trailing
fields it does not find from their defaults, and ignores extra trailing
fields, so a field can be added later without a version bump.

Decoding is the trust boundary. Every malformed input raises
`DecodeError(reason)` and nothing else: msgpack runs with hard limits and
every field is checked for type and range (names <= 255 chars, ports
0..65535, integers 0..2**63, meta <= 512 B as memberlist).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type hints

from gossip.errors import DecodeError, EncodeError
from gossip.messages import (
    TYPE_OF,
    Ack,
    Addr,
    Alive,
    Dead,
    IndirectPing,
    MemberState,
    Message,
    MessageType,
    Nack,
    NodeState,
    Ping,
    PushPull,
    Suspect,
    User,
)

__all__ = [
    "COMPOUND_OVERHEAD",
    "MAX_PACKET",
    "MAX_PARTS",
    "MAX_STREAM",
    "VERSION",
    "decode_packet",
    "decode_stream",
    "encode",
    "encode_packet",
    "encode_stream",
    "encoded_size",
    "packet_size",
    "part_size",
]

VERSION = 1
MAX_PACKET = 65535  # largest datagram accepted
MAX_STREAM = 20 * 1024 * 1024  # memberlist maxPushStateBytes
MAX_PARTS = 255  # memberlist: compound count is one byte
MAX_NAME = 255
MAX_META = 512  # memberlist MetaMaxSize
MAX_NODES = 1_048_576  # memberlist maxPushPullNodes
MAX_INT = 2**63
MAX_LATENESS_MS = 600_000  # an Alive's announced lateness (gossip/lateness.py)
COMPOUND_OVERHEAD = 5
"""Bytes a COMPOUND adds besides its parts: version + type + a msgpack array header (<= 3)."""

_PACKET_LIMITS: dict[str, int] = dict(
    max_str_len=MAX_NAME, max_bin_len=MAX_PACKET, max_array_len=4096, max_map_len=0, max_ext_len=0
)
_STREAM_LIMITS: dict[str, int] = dict(
    max_str_len=MAX_NAME,
    max_bin_len=MAX_STREAM,
    max_array_len=MAX_NODES,
    max_map_len=0,
    max_ext_len=0,
)


# -- encoding ---------------------------------------------------------------


def encode(message: Message) -> bytes:
    """One message with its version byte (a whole datagram or stream body)."""
    return bytes((VERSION,)) + _body(message)


def encoded_size(message: Message) -> int:
    """len(encode(message)), for filling a packet up to its budget."""
    return 1 + len(_body(message))


def part_size(message: Message) -> int:
    """Bytes `message` takes inside a COMPOUND (bin header + body without version)."""
    length = encoded_size(message) - 1
    return length + (2 if length < 256 else 3 if length < 65536 else 5)


def packet_size(messages: Sequence[Message]) -> int:
    """Exact len(encode_packet(messages)) without building it."""
    if len(messages) == 1:
        return encoded_size(messages[0])
    count = len(messages)
    header = 1 if count <= 15 else 3 if count < 65536 else 5
    return 2 + header + sum(part_size(m) for m in messages)


def encode_packet(messages: Sequence[Message], budget: int = 1400) -> bytes:
    """One datagram: a lone message as is, several as a COMPOUND; EncodeError past budget."""
    if not messages:
        raise EncodeError("empty", "a packet needs at least one message")
    if len(messages) > MAX_PARTS:
        raise EncodeError("too_many_parts", f"{len(messages)} > {MAX_PARTS}")
    if len(messages) == 1:
        data = encode(messages[0])
    else:
        parts = [_body(m) for m in messages]
        data = bytes((VERSION, MessageType.COMPOUND)) + msgpack.packb(parts, use_bin_type=True)
    if len(data) > budget:
        raise EncodeError("oversized", f"{len(data)} B > budget {budget} B")
    return data


def encode_stream(message: Message) -> bytes:
    """One message for a TCP stream (push-pull): no datagram limit, at most MAX_STREAM."""
    data = encode(message)
    if len(data) > MAX_STREAM:
        raise EncodeError("oversized", f"{len(data)} B > {MAX_STREAM} B")
    return data


def _body(message: Message) -> bytes:
    packed: bytes = msgpack.packb(_fields(message), use_bin_type=True)
    return bytes((TYPE_OF[type(message)],)) + packed


def _fields(message: Message) -> list[Any]:
    match message:
        case Ping():
            src = None if message.source_addr is None else list(message.source_addr)
            return [message.seq, message.target, message.source, src]
        case IndirectPing():
            return [
                message.seq,
                message.target,
                list(message.target_addr),
                message.source,
                message.nack,
            ]
        case Ack():
            return [message.seq, message.payload]
        case Nack():
            return [message.seq]
        case Alive():
            return [
                message.incarnation,
                message.node,
                list(message.addr),
                message.meta,
                message.lateness_ms,
            ]
        case Suspect() | Dead():
            return [message.incarnation, message.node, message.sender]
        case User():
            return [message.payload]
        case PushPull():
            nodes = [
                [n.name, list(n.addr), n.incarnation, int(n.state), n.meta] for n in message.nodes
            ]
            return [nodes, message.join, message.user_state]
    raise EncodeError("unknown_type", type(message).__name__)  # pragma: no cover


# -- decoding ---------------------------------------------------------------


def decode_packet(data: bytes) -> list[Message]:
    """A datagram's messages (one, or the parts of a COMPOUND). DecodeError on anything bad."""
    if len(data) > MAX_PACKET:
        raise DecodeError("oversized", f"{len(data)} B")
    body = _strip_version(data)
    if body[0] != MessageType.COMPOUND:
        return [_decode_body(body, _PACKET_LIMITS)]
    parts = _unpack(body[1:], _PACKET_LIMITS)
    if not isinstance(parts, list) or not all(type(p) is bytes and p for p in parts):
        raise DecodeError("bad_fields", "compound parts must be non-empty bin")
    if not parts or len(parts) > MAX_PARTS:
        raise DecodeError("too_many_parts", f"{len(parts)} parts")
    return [_decode_body(p, _PACKET_LIMITS) for p in parts]


def decode_stream(data: bytes) -> Message:
    """The one message of a TCP stream (up to MAX_STREAM bytes)."""
    if len(data) > MAX_STREAM:
        raise DecodeError("oversized", f"{len(data)} B")
    return _decode_body(_strip_version(data), _STREAM_LIMITS)


def _strip_version(data: bytes) -> bytes:
    if len(data) < 2:
        raise DecodeError("truncated", f"{len(data)} B")
    if data[0] != VERSION:
        raise DecodeError("bad_version", str(data[0]))
    return bytes(data[1:])


def _decode_body(body: bytes, limits: dict[str, int]) -> Message:
    try:
        kind = MessageType(body[0])
    except ValueError:
        raise DecodeError("unknown_type", str(body[0])) from None
    if kind is MessageType.COMPOUND:
        raise DecodeError("nested_compound")
    parser = _PARSERS.get(kind)
    if parser is None:  # pragma: no cover - every non-compound type has a parser
        raise DecodeError("unknown_type", kind.name)
    return parser(_Fields(kind.name, _unpack(body[1:], limits)))


def _unpack(data: bytes, limits: dict[str, int]) -> Any:
    if not data:
        raise DecodeError("truncated", "no body")
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True, **limits)
    except Exception as exc:  # the trust boundary: msgpack raises a zoo of types
        raise DecodeError("bad_msgpack", type(exc).__name__) from None


class _Fields:
    """Positional field reader that validates as it goes (missing optional -> default)."""

    __slots__ = ("_values", "kind")

    def __init__(self, kind: str, values: Any) -> None:
        if not isinstance(values, list):
            raise DecodeError("bad_fields", f"{kind}: not an array")
        self.kind, self._values = kind, values

    def _get(self, i: int, default: Any = ..., /) -> Any:
        if i < len(self._values):
            return self._values[i]
        if default is ...:
            self.fail(f"field {i} missing")
        return default

    def fail(self, why: str) -> NoReturn:
        raise DecodeError("bad_fields", f"{self.kind}: {why}")

    def uint(self, i: int, hi: int = MAX_INT, *, default: int | None = None) -> int:
        v = self._get(i) if default is None else self._get(i, default)
        if type(v) is not int or not 0 <= v <= hi:
            self.fail(f"field {i} must be an int in 0..{hi}")
        return v

    def name(self, i: int, *, empty: bool = False) -> str:
        v = self._get(i)
        if type(v) is not str or not (0 if empty else 1) <= len(v) <= MAX_NAME:
            self.fail(f"field {i} must be a name of 1..{MAX_NAME} chars")
        return v

    def blob(self, i: int, limit: int, *, optional: bool = True) -> bytes:
        v = self._get(i, b"") if optional else self._get(i)
        if type(v) is not bytes or len(v) > limit:
            self.fail(f"field {i} must be bin of <= {limit} B")
        return v

    def flag(self, i: int, default: bool) -> bool:
        v = self._get(i, default)
        if type(v) is not bool:
            self.fail(f"field {i} must be a bool")
        return v

    def addr(self, i: int) -> Addr:
        v = self._get(i)
        if not (
            isinstance(v, list)
            and len(v) == 2
            and type(v[0]) is str
            and 1 <= len(v[0]) <= MAX_NAME
            and type(v[1]) is int
            and 0 <= v[1] <= 65535
        ):
            self.fail(f"field {i} must be an address [host, port 0..65535]")
        return (v[0], v[1])

    def optional_addr(self, i: int) -> Addr | None:
        return None if self._get(i, None) is None else self.addr(i)

    def array(self, i: int) -> list[Any]:
        v = self._get(i)
        if not isinstance(v, list):
            self.fail(f"field {i} must be an array")
        return v


def _ping(f: _Fields) -> Ping:
    return Ping(
        seq=f.uint(0),
        target=f.name(1, empty=True),
        source=f.name(2),
        source_addr=f.optional_addr(3),
    )


def _indirect(f: _Fields) -> IndirectPing:
    return IndirectPing(
        seq=f.uint(0),
        target=f.name(1),
        target_addr=f.addr(2),
        source=f.name(3),
        nack=f.flag(4, True),
    )


def _ack(f: _Fields) -> Ack:
    return Ack(seq=f.uint(0), payload=f.blob(1, MAX_PACKET))


def _nack(f: _Fields) -> Nack:
    return Nack(seq=f.uint(0))


def _alive(f: _Fields) -> Alive:
    return Alive(
        incarnation=f.uint(0),
        node=f.name(1),
        addr=f.addr(2),
        meta=f.blob(3, MAX_META),
        lateness_ms=f.uint(4, MAX_LATENESS_MS, default=0),
    )


def _suspect(f: _Fields) -> Suspect:
    return Suspect(incarnation=f.uint(0), node=f.name(1), sender=f.name(2))


def _dead(f: _Fields) -> Dead:
    return Dead(incarnation=f.uint(0), node=f.name(1), sender=f.name(2))


def _user(f: _Fields) -> User:
    return User(payload=f.blob(0, MAX_STREAM, optional=False))


def _push_pull(f: _Fields) -> PushPull:
    nodes = tuple(_node_state(_Fields("NodeState", raw)) for raw in f.array(0))
    return PushPull(nodes=nodes, join=f.flag(1, False), user_state=f.blob(2, MAX_STREAM))


def _node_state(f: _Fields) -> NodeState:
    return NodeState(
        name=f.name(0),
        addr=f.addr(1),
        incarnation=f.uint(2),
        state=MemberState(f.uint(3, hi=max(MemberState))),
        meta=f.blob(4, MAX_META),
    )


_PARSERS: dict[MessageType, Callable[[_Fields], Message]] = {
    MessageType.PING: _ping,
    MessageType.INDIRECT_PING: _indirect,
    MessageType.ACK: _ack,
    MessageType.NACK: _nack,
    MessageType.ALIVE: _alive,
    MessageType.SUSPECT: _suspect,
    MessageType.DEAD: _dead,
    MessageType.USER: _user,
    MessageType.PUSH_PULL: _push_pull,
}
