"""The codec: every message round-trips; any hostile input raises DecodeError only."""

from __future__ import annotations

import contextlib

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip import codec
from gossip.errors import DECODE_REASONS, DecodeError, EncodeError
from gossip.messages import (
    TYPE_OF,
    Ack,
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

names = st.text(min_size=1, max_size=40)
ints = st.integers(min_value=0, max_value=2**63)
addrs = st.tuples(st.text(min_size=1, max_size=40), st.integers(0, 65535))
metas = st.binary(max_size=512)
node_states = st.builds(
    NodeState,
    name=names,
    addr=addrs,
    incarnation=ints,
    state=st.sampled_from(MemberState),
    meta=metas,
)
udp_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Ping, seq=ints, target=st.text(max_size=40), source=names, source_addr=st.none() | addrs
    ),
    st.builds(
        IndirectPing, seq=ints, target=names, target_addr=addrs, source=names, nack=st.booleans()
    ),
    st.builds(Ack, seq=ints, payload=st.binary(max_size=64)),
    st.builds(Nack, seq=ints),
    st.builds(
        Alive,
        incarnation=ints,
        node=names,
        addr=addrs,
        meta=metas,
        lateness_ms=st.integers(min_value=0, max_value=codec.MAX_LATENESS_MS),
    ),
    st.builds(Suspect, incarnation=ints, node=names, sender=names),
    st.builds(Dead, incarnation=ints, node=names, sender=names),
    st.builds(User, payload=st.binary(max_size=300)),
)
push_pulls = st.builds(
    PushPull,
    nodes=st.lists(node_states, max_size=8).map(tuple),
    join=st.booleans(),
    user_state=st.binary(max_size=256),
)

SAMPLES: list[Message] = [
    Ping(seq=1, target="b", source="a"),
    Ping(seq=2, target="", source="a", source_addr=("10.0.0.1", 7946)),
    IndirectPing(seq=3, target="c", target_addr=("10.0.0.3", 7946), source="a", nack=False),
    Ack(seq=4, payload=b"rtt"),
    Nack(seq=5),
    Alive(incarnation=6, node="a", addr=("::1", 7946), meta=b"\x00role=web"),
    Alive(incarnation=6, node="a", addr=("::1", 7946), lateness_ms=1850),
    Suspect(incarnation=7, node="b", sender="a"),
    Dead(incarnation=8, node="b", sender="b"),
    User(payload=b"\xffdelta"),
    PushPull(
        nodes=(
            NodeState(name="a", addr=("h", 1), incarnation=9, state=MemberState.LEFT, meta=b"m"),
        ),
        join=True,
        user_state=b"tables",
    ),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(message: Message) -> None:
    data = codec.encode(message)
    assert data[0] == codec.VERSION
    assert data[1] == TYPE_OF[type(message)]
    assert len(data) == codec.encoded_size(message)
    assert codec.decode_packet(codec.encode_packet([message])) == [message]
    assert codec.decode_stream(codec.encode_stream(message)) == message


def test_wire_layout_is_version_type_then_field_array() -> None:
    data = codec.encode(Alive(incarnation=3, node="n1", addr=("10.0.0.1", 7946), meta=b"x"))
    assert data[:2] == bytes([1, MessageType.ALIVE])
    assert msgpack.unpackb(data[2:]) == [3, "n1", ["10.0.0.1", 7946], b"x", 0]


def test_an_alive_without_lateness_decodes_and_a_wild_one_is_refused() -> None:
    # The lateness field came later (gossip/lateness.py): an older peer's four-field
    # Alive means "not late"; an out-of-range value is a malformed packet.
    old = bytes([1, MessageType.ALIVE]) + msgpack.packb([3, "n1", ["10.0.0.1", 7946], b""])
    assert codec.decode_packet(old) == [Alive(incarnation=3, node="n1", addr=("10.0.0.1", 7946))]
    for wild in (-1, codec.MAX_LATENESS_MS + 1, "2s", 1.5):
        data = bytes([1, MessageType.ALIVE]) + msgpack.packb(
            [3, "n1", ["10.0.0.1", 7946], b"", wild]
        )
        with pytest.raises(DecodeError):
            codec.decode_packet(data)


def test_compound_is_an_array_of_bin_without_version() -> None:
    data = codec.encode_packet(SAMPLES[:3])
    assert data[:2] == bytes([1, MessageType.COMPOUND])
    parts = msgpack.unpackb(data[2:])
    assert parts == [codec.encode(m)[1:] for m in SAMPLES[:3]]
    assert codec.decode_packet(data) == SAMPLES[:3]
    assert codec.packet_size(SAMPLES[:3]) == len(data)


@given(st.lists(udp_messages, min_size=1, max_size=20))
def test_packets_round_trip_and_sizes_are_exact(messages: list[Message]) -> None:
    data = codec.encode_packet(messages, budget=codec.MAX_PACKET)
    assert len(data) == codec.packet_size(messages)
    if len(messages) > 1:
        assert len(data) <= codec.COMPOUND_OVERHEAD + sum(codec.part_size(m) for m in messages)
    assert codec.decode_packet(data) == messages


@given(push_pulls)
def test_push_pull_round_trips(message: PushPull) -> None:
    assert codec.decode_stream(codec.encode_stream(message)) == message


def test_encode_packet_limits() -> None:
    with pytest.raises(EncodeError, match="oversized"):
        codec.encode_packet([User(payload=b"x" * 1400)])
    with pytest.raises(EncodeError, match="too_many_parts"):
        codec.encode_packet([Nack(seq=1)] * 256, budget=10_000)
    with pytest.raises(EncodeError, match="empty"):
        codec.encode_packet([])


def _body(kind: int, fields: object) -> bytes:
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return bytes([1, kind]) + packed


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (b"\x01", "truncated"),
        (b"\x01\x00", "truncated"),
        (b"\x02\x00\x90", "bad_version"),
        (b"\x01\x63\x90", "unknown_type"),
        (b"\x01\x09\x90", "unknown_type"),
        (b"\x01\x00\xc1", "bad_msgpack"),
        (b"\x01\x00\x93\x01", "bad_msgpack"),
        (_body(0, [1, "b", "a", None]) + b"\x00", "bad_msgpack"),
        (_body(0, {"seq": 1}), "bad_msgpack"),
        (_body(0, [1.5, "b", "a"]), "bad_fields"),
        (_body(0, [True, "b", "a"]), "bad_fields"),
        (_body(0, [-1, "b", "a"]), "bad_fields"),
        (_body(0, [2**64 - 1, "b", "a"]), "bad_fields"),
        (_body(0, [1, "b"]), "bad_fields"),
        (_body(0, [1, "b", ""]), "bad_fields"),
        (_body(0, [1, "b", "a", ["h", 70000]]), "bad_fields"),
        (_body(0, [1, "b", "a", ["h"]]), "bad_fields"),
        (_body(0, "ping"), "bad_fields"),
        (_body(1, [1, "c", ["h", 1], "a", 1]), "bad_fields"),
        (_body(4, [1, "n", ["h", 1], b"x" * 513]), "bad_fields"),
        (_body(4, [1, "n", ["", 1], b""]), "bad_fields"),
        (_body(4, [1, "n" * 256, ["h", 1], b""]), "bad_msgpack"),
        (_body(4, [1, "n", ["h", 1], "meta"]), "bad_fields"),
        (_body(6, [[["n", ["h", 1], 1, 9, b""]], False, b""]), "bad_fields"),
        (_body(6, [["not a node"], False, b""]), "bad_fields"),
        (_body(7, [codec.encode(Nack(seq=1))[1:]] * 256), "too_many_parts"),
        (_body(7, []), "too_many_parts"),
        (_body(7, [b""]), "bad_fields"),
        (_body(7, ["text"]), "bad_fields"),
        (_body(7, [bytes([7]) + msgpack.packb([])]), "nested_compound"),
        (b"\x01\x00" + b"\x00" * 70000, "oversized"),
    ],
)
def test_garbage_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode_packet(data)
    assert info.value.reason == reason
    assert reason in DECODE_REASONS


def test_optional_trailing_fields_default_and_extra_fields_are_ignored() -> None:
    assert codec.decode_packet(_body(1, [1, "c", ["h", 1], "a"])) == [
        IndirectPing(seq=1, target="c", target_addr=("h", 1), source="a", nack=True)
    ]
    assert codec.decode_packet(_body(5, [1, "b", "a", "a field from the future"])) == [
        Dead(incarnation=1, node="b", sender="a")
    ]


def test_streams_refuse_compounds_and_oversize() -> None:
    with pytest.raises(DecodeError, match="nested_compound"):
        codec.decode_stream(codec.encode_packet(SAMPLES[:2]))
    with pytest.raises(DecodeError, match="oversized"):
        codec.decode_stream(b"\x01\x06" + bytes(codec.MAX_STREAM))


def _decode_or_reason(data: bytes) -> object:
    try:
        return codec.decode_packet(data)
    except DecodeError as exc:
        reason = exc.reason
    assert reason in DECODE_REASONS
    return reason


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_random_bytes_raise_decode_error_only(data: bytes) -> None:
    _decode_or_reason(data)
    _decode_or_reason(b"\x01" + data)
    with contextlib.suppress(DecodeError):
        codec.decode_stream(b"\x01\x06" + data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(udp_messages, min_size=1, max_size=5), st.data())
def test_mutated_packets_raise_decode_error_only(
    messages: list[Message], data: st.DataObject
) -> None:
    packet = bytearray(codec.encode_packet(messages, budget=codec.MAX_PACKET))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(packet) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            packet[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del packet[i:]
            if not packet:
                break
        else:
            packet[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    _decode_or_reason(bytes(packet))


@settings(max_examples=200)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=8)
        | st.binary(max_size=8),
        lambda inner: st.lists(inner, max_size=6),
        max_leaves=20,
    ),
    st.sampled_from([t for t in MessageType]),
)
def test_well_formed_msgpack_of_wrong_shape_raises_decode_error_only(
    value: object, kind: MessageType
) -> None:
    _decode_or_reason(_body(kind, value))
    _decode_or_reason(_body(kind, [value, value, value, value, value]))
