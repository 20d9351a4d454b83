"""mesh.core.net: the one parser of addresses and ports."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.core.net import (
    AddressError,
    HostPort,
    parse_host_port,
    parse_int,
    parse_ip_host_port,
    parse_port,
    port_or_none,
    split_host_port,
)

ports = st.integers(1, 65535)
ipv6 = st.ip_addresses(v=6).map(str)
ipv4 = st.ip_addresses(v=4).map(str)
names = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True)


# -- ports --------------------------------------------------------------------------


@given(ports)
def test_every_port_reads_back(port: int) -> None:
    assert parse_port(str(port)) == port
    assert parse_port(f" {port}\t") == port  # flags and labels: white space around is fine
    assert parse_port(f"00{port}") == port
    assert port_or_none(str(port)) == port


@pytest.mark.parametrize("text", ["0", "65536", "99999", "1" + "0" * 5000])
def test_ports_out_of_range(text: str) -> None:
    with pytest.raises(AddressError, match="out of range 1-65535"):
        parse_port(text)
    assert port_or_none(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "http",
        "-1",
        "+80",
        "8_0",
        "80.0",
        "0x50",
        "8 0",
        "\u00b2",  # superscript two: str.isdigit() says yes, int() refuses it
        "\u0663",  # Arabic-Indic three: str.isdigit() says yes, int() reads 3
        "\uff18\uff10",  # fullwidth 80: int() reads 80
        "8\u00b9",
    ],
)
def test_ports_are_ascii_digits_only(text: str) -> None:
    with pytest.raises(AddressError, match="is not a number"):
        parse_port(text, "target port")
    assert port_or_none(text) is None


@given(st.text(max_size=8))
def test_a_port_is_its_ascii_digits_or_refused(text: str) -> None:
    stripped = text.strip()
    ascii_number = bool(stripped) and stripped.isascii() and stripped.isdigit()
    try:
        port = parse_port(text)
    except AddressError:
        assert not ascii_number or not 1 <= int(stripped) <= 65535
    else:
        assert ascii_number and port == int(stripped)


def test_port_or_none_takes_no_white_space() -> None:
    """A lookup (a DNS SRV label, a body's key) takes the text exactly as it is."""
    assert port_or_none(" 80") is None
    assert port_or_none("80\n") is None


def test_parse_int_names_what_and_the_range() -> None:
    assert parse_int("599", "status", 100, 599) == 599
    with pytest.raises(AddressError, match=r"^status 600 is out of range 100-599$"):
        parse_int("600", "status", 100, 599)
    with pytest.raises(AddressError, match=r"^retries 'x' is not a number$"):
        parse_int("x", "retries", 1, 1000)


# -- host and port -----------------------------------------------------------------------


@given(st.one_of(ipv4, names), ports)
def test_host_and_port_read_back(host: str, port: int) -> None:
    address = HostPort(host, port)
    assert parse_host_port(str(address), None, "api") == address
    assert parse_host_port(f"  {address} ", None, "api") == address


@given(ipv6, ports)
def test_ipv6_is_bracketed_with_a_port(host: str, port: int) -> None:
    address = HostPort(host, port)
    assert str(address) == f"[{host}]:{port}"
    assert parse_host_port(str(address), None, "dns") == address
    assert parse_host_port(f"[{host}]", 53, "dns") == HostPort(host, 53)


@given(ipv6)
def test_a_bare_ipv6_address_takes_the_default_port(host: str) -> None:
    if host.count(":") > 1:  # "::" and the like; a one-colon text is ADDR:PORT
        assert parse_host_port(host, 53, "dns") == HostPort(host, 53)


def test_missing_parts() -> None:
    assert parse_host_port("node-2", 7946, "join") == HostPort("node-2", 7946)
    assert parse_host_port("node-2:", 7946, "join") == HostPort("node-2", 7946)
    with pytest.raises(AddressError, match="expected ADDR:PORT"):
        parse_host_port("node-2", None, "api")
    with pytest.raises(AddressError, match="expected ADDR:PORT"):
        parse_host_port("node-2:", None, "api")
    for text in ("", ":53", "[]:53", "  "):
        with pytest.raises(AddressError, match="the address is missing"):
            parse_host_port(text, 53, "dns")


@pytest.mark.parametrize("text", ["[::1", "[::1]53", "[::1]x", "[::1]:53:1"])
def test_broken_brackets(text: str) -> None:
    with pytest.raises(AddressError):
        parse_host_port(text, 53, "dns")


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:\u00b2",
        "127.0.0.1:\u0663",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:http",
        "[::1]:-1",
    ],
)
def test_a_bad_port_names_the_range(text: str) -> None:
    with pytest.raises(AddressError, match="the port must be a number from 1 to 65535"):
        parse_host_port(text, None, "api")


def test_split_host_port_says_whether_bracketed() -> None:
    assert split_host_port("[::1]:53", "x") == ("::1", "53", True)
    assert split_host_port("[::1]", "x") == ("::1", None, True)
    assert split_host_port("10.0.0.1:53", "x") == ("10.0.0.1", "53", False)
    assert split_host_port("fe80::1", "x") == ("fe80::1", None, False)
    assert split_host_port("h", "x") == ("h", None, False)


def test_ip_host_port_wants_an_ip_literal() -> None:
    assert parse_ip_host_port("[fd00::53]", 53, "dns-upstream") == HostPort("fd00::53", 53)
    assert parse_ip_host_port("1.1.1.1:5353", 53, "dns-upstream") == HostPort("1.1.1.1", 5353)
    with pytest.raises(AddressError, match="must be an IP address"):
        parse_ip_host_port("resolver.example", 53, "dns-upstream")


@given(st.one_of(ipv4, ipv6))
def test_loopback(host: str) -> None:
    assert HostPort(host, 1).is_loopback == ipaddress.ip_address(host).is_loopback
    assert HostPort("localhost", 1).is_loopback
    assert not HostPort("node-2", 1).is_loopback
