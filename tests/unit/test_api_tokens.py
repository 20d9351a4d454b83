"""API tokens and scopes (mesh.api_tokens): the token file's lines, and who may do what."""

from __future__ import annotations

import hmac

import pytest

from mesh import api_tokens
from mesh.api_tokens import (
    Decision,
    Scope,
    TokenFileError,
    decide,
    needed_scope,
    parse_token_file,
    tokens,
)

NAME = "api-token-file /etc/meshplane/tokens"


def test_a_token_file_with_comments_and_blank_lines() -> None:
    text = "# who may read\n\nread   r-1\n  write\tw-1  \n# done\nread r-2\n"
    assert parse_token_file(text, NAME) == [
        (Scope.READ, "r-1"),
        (Scope.WRITE, "w-1"),
        (Scope.READ, "r-2"),
    ]


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("read ok\nt0psecret\n", 2, "expected '<scope> <token>'.*found 1 field$"),
        ("read ok\n\n# x\nread t0psecret extra\n", 4, "found 3 fields"),
        ("t0psecret read\n", 1, "the first field must be the scope"),
        ("admin t0psecret\n", 1, "the first field must be the scope"),
        ("READ t0psecret\n", 1, "the first field must be the scope"),
        ("read t0psecr\u00e9t\n", 1, "visible ASCII"),
        ("read t0psecret\nwrite t0psecret\n", 2, "the same token is on line 1"),
    ],
)
def test_a_malformed_line_names_its_number_and_never_the_token(
    text: str, line: int, why: str
) -> None:
    with pytest.raises(TokenFileError, match=f"^{NAME} line {line}: .*{why}") as caught:
        parse_token_file(text, NAME)
    assert "t0psecret" not in str(caught.value)
    assert "t0psecr" not in str(caught.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_a_file_without_a_token_is_refused(text: str) -> None:
    with pytest.raises(TokenFileError, match="holds no token"):
        parse_token_file(text, NAME)


def test_only_get_and_head_are_read() -> None:
    assert needed_scope("GET") is Scope.READ
    assert needed_scope("head") is Scope.READ
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PROPFIND"):
        assert needed_scope(method) is Scope.WRITE


@pytest.mark.parametrize(
    ("method", "given", "decision"),
    [
        ("GET", None, Decision.UNAUTHENTICATED),
        ("POST", None, Decision.UNAUTHENTICATED),
        ("GET", b"unknown", Decision.UNAUTHENTICATED),
        ("GET", b"", Decision.UNAUTHENTICATED),
        ("GET", b"r-1x", Decision.UNAUTHENTICATED),
        ("GET", b"r-", Decision.UNAUTHENTICATED),
        ("GET", b"r-1", Decision.ALLOW),
        ("HEAD", b"r-1", Decision.ALLOW),
        ("POST", b"r-1", Decision.INSUFFICIENT_SCOPE),
        ("DELETE", b"r-1", Decision.INSUFFICIENT_SCOPE),
        ("PATCH", b"r-1", Decision.INSUFFICIENT_SCOPE),
        ("PUT", b"r-1", Decision.INSUFFICIENT_SCOPE),
        ("OPTIONS", b"r-1", Decision.INSUFFICIENT_SCOPE),
        ("GET", b"w-1", Decision.ALLOW),
        ("POST", b"w-1", Decision.ALLOW),
        ("DELETE", b"w-1", Decision.ALLOW),
    ],
)
def test_the_decision(method: str, given: bytes | None, decision: Decision) -> None:
    held = tokens([(Scope.READ, "r-1"), (Scope.WRITE, "w-1")])
    assert decide(held, method, given) is decision


def test_a_token_given_twice_keeps_its_widest_scope() -> None:
    # --api-token T (write) with T also in the file as read: T is a write token.
    held = tokens([(Scope.READ, "t"), (Scope.WRITE, "t"), (Scope.READ, "t")])
    assert held.scope_of(b"t") is Scope.WRITE
    assert held.count(Scope.READ) == 0 and held.count(Scope.WRITE) == 1


def test_tokens_are_held_as_digests_only() -> None:
    held = tokens([(Scope.READ, "plain-r3ad"), (Scope.WRITE, "plain-wr1te")])
    assert "plain" not in repr(held)
    assert all(b"plain" not in digest for digest, _ in held.entries)


def test_every_held_token_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the first token matching, the last, or none, all cost one
    constant-time comparison of equal-length digests per held token."""
    calls: list[tuple[int, int]] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(api_tokens.hmac, "compare_digest", counting)
    held = tokens([(Scope.WRITE, f"token-{i}") for i in range(5)])
    for given in (b"token-0", b"token-4", b"nope", b"a much longer guess than any token"):
        calls.clear()
        held.scope_of(given)
        assert calls == [(32, 32)] * 5, given
