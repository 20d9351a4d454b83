"""The ClientHello reader, on hellos made by Python's own TLS client and on bad input."""

from __future__ import annotations

import contextlib
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.http.sni import NeedMore, NotClientHello, server_name


def client_hello(name: str | None) -> bytes:
    """The first flight of a real TLS client (OpenSSL through the ssl module)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_server_name_is_read() -> None:
    assert server_name(client_hello("Pass.Example.com")) == "pass.example.com"


def test_a_hello_without_a_name() -> None:
    assert server_name(client_hello(None)) is None


def test_every_truncation_asks_for_more_or_is_refused() -> None:
    hello = client_hello("a.example")
    for cut in range(len(hello)):
        with pytest.raises((NeedMore, NotClientHello)):
            server_name(hello[:cut])


def test_a_hello_split_over_two_records() -> None:
    hello = client_hello("split.example")
    body = hello[5:]
    first, second = body[:40], body[40:]
    records = (
        b"\x16\x03\x01"
        + len(first).to_bytes(2, "big")
        + first
        + b"\x16\x03\x01"
        + len(second).to_bytes(2, "big")
        + second
    )
    assert server_name(records) == "split.example"


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x00\x00",
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
    ],
)
def test_other_bytes_are_not_a_hello(data: bytes) -> None:
    with pytest.raises(NotClientHello):
        server_name(data)


_FUZZ_HELLO = client_hello("fuzz.example")


@settings(deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=599))
def test_garbage_never_breaks_the_reader(noise: bytes, at: int) -> None:
    hello = bytearray(_FUZZ_HELLO)
    hello[at % len(hello) : at % len(hello) + len(noise)] = noise
    with contextlib.suppress(NeedMore, NotClientHello):
        server_name(bytes(hello))
