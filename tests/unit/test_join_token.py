"""gossip.join_token: the keyring and cluster label in one copy-pasteable string."""

from __future__ import annotations

import base64
import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossip import join_token
from gossip.join_token import JoinToken, JoinTokenError, decode, encode

K1 = bytes(range(32))
K2 = bytes(range(100, 116))


def test_round_trip_keeps_the_keys_in_order_and_the_label() -> None:
    token = encode([K1, K2], "prod-eu")
    assert decode(token) == JoinToken((K1, K2), "prod-eu")
    assert decode(token).keyring().keys() == [K1, K2]


def test_token_is_versioned_and_copy_pasteable() -> None:
    token = encode([K1], "")
    assert token.startswith("mesh1.")
    # base64url without padding: no character a shell, a YAML file or a URL would mangle
    assert re.fullmatch(r"mesh1\.[A-Za-z0-9_-]+", token)
    assert decode(f"  {token}\n") == JoinToken((K1,), "")  # as read from a file


def test_the_repr_never_shows_a_key() -> None:
    shown = repr(decode(encode([K1], "lbl")))
    assert "lbl" in shown
    assert base64.b64encode(K1).decode() not in shown and str(K1) not in shown


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "starts with 'mesh1.'"),
        ("hello", "starts with 'mesh1.'"),
        ("AAAA.BBBB", "starts with 'mesh1.'"),
        ("mesh2.AAAA", "version '2' is not supported"),
        ("mesh1.", "too short"),
        ("mesh1.AA", "too short"),
        ("mesh1.!!!!", "not valid base64url"),
    ],
)
def test_malformed_tokens_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(JoinTokenError, match=re.escape(says)):
        decode(text)


def test_a_cut_or_mistyped_token_fails_its_checksum() -> None:
    token = encode([K1], "prod")
    flipped = token[:-5] + ("A" if token[-5] != "A" else "B") + token[-4:]
    for bad in (token[:-3], flipped, token[:20]):
        with pytest.raises(JoinTokenError):
            decode(bad)


def test_a_well_formed_body_with_a_bad_key_size_is_refused() -> None:
    import hashlib

    body = bytes([1, 5]) + b"12345" + bytes([0])
    body += hashlib.sha256(body).digest()[: join_token.CHECKSUM_SIZE]
    text = "mesh1." + base64.urlsafe_b64encode(body).decode().rstrip("=")
    with pytest.raises(JoinTokenError, match="unusable key"):
        decode(text)


def test_encode_refuses_what_no_token_can_carry() -> None:
    with pytest.raises(JoinTokenError):
        encode([], "")
    with pytest.raises(JoinTokenError):
        encode([K1], "x" * 256)


@given(st.text(max_size=80))
def test_decode_of_any_text_answers_or_raises_join_token_error(text: str) -> None:
    with contextlib.suppress(JoinTokenError):
        decode(text)


@given(st.binary(max_size=120))
def test_decode_of_any_payload_answers_or_raises_join_token_error(payload: bytes) -> None:
    with contextlib.suppress(JoinTokenError):
        decode("mesh1." + base64.urlsafe_b64encode(payload).decode().rstrip("="))


def test_the_netns_cluster_script_writes_tokens_the_agent_reads() -> None:
    """deploy/netns_cluster.py makes its token with the standard library only."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "deploy" / "netns_cluster.py"
    spec = importlib.util.spec_from_file_location("netns_cluster_for_token", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs: its dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert decode(module.join_token(K1, "lab")) == JoinToken((K1,), "lab")
    assert module.join_token(K1, "lab") == encode([K1], "lab")
