"""Who may do what on the API: bearer tokens with a scope, and the scope a request needs.

Sans-IO: the token file's text in, a `Tokens` out; a request's method and its
credentials in, a decision out. The asyncio shell (the API's auth middleware)
only reads headers and answers.

The token file (`--api-token-file`) holds one `<scope> <token>` per line,
`read` (GET and HEAD only) or `write` (everything); blank lines and lines
starting with `#` are skipped. `--api-token T` is a `write` token.

A token is never kept, shown or compared as given: only its SHA-256 digest is
held, and a presented token's digest is compared with every held one by
`hmac.compare_digest`, all of them every time, so neither which token matched
nor how much of a guess was right (nor its length) shows in the timing. Error
messages name the file and the line, never a token or a field that could be one.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass


class Scope(enum.Enum):
    READ = "read"
    WRITE = "write"


#: the methods a `read` token may use; every other method needs `write`
READ_METHODS = frozenset({"GET", "HEAD"})


class TokenFileError(ValueError):
    """A token file the agent cannot start with (the message never holds a token)."""


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _is_token(text: str) -> bool:
    """Visible ASCII only: what an `Authorization` header can carry unchanged."""
    return text.isascii() and text.isprintable() and " " not in text


@dataclass(frozen=True, slots=True)
class Tokens:
    """The tokens the API accepts, as (digest, scope) pairs: the tokens are not kept."""

    entries: tuple[tuple[bytes, Scope], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.entries)

    def count(self, scope: Scope) -> int:
        return sum(1 for _, held in self.entries if held is scope)

    def scope_of(self, given: bytes) -> Scope | None:
        """The scope of a presented token, None when no held token is it.

        Every held digest is compared, whatever matched before: the time taken
        depends on the number of tokens held, not on the one presented."""
        presented = _digest(given)
        found: Scope | None = None
        for digest, scope in self.entries:
            if hmac.compare_digest(presented, digest):
                found = scope
        return found


def tokens(pairs: Iterable[tuple[Scope, str]]) -> Tokens:
    """Tokens from (scope, token) pairs; a token given twice keeps its widest scope."""
    widest: dict[bytes, Scope] = {}
    for scope, token in pairs:
        digest = _digest(token.encode())
        if widest.get(digest) is not Scope.WRITE:
            widest[digest] = scope
    return Tokens(tuple(widest.items()))


def parse_token_file(text: str, name: str) -> list[tuple[Scope, str]]:
    """The (scope, token) pairs of a token file's text; `name` is how errors call it.

    Raises TokenFileError naming the line of the first malformed line, or when
    the file holds no token at all (an API meant to be guarded would be open)."""
    pairs: list[tuple[Scope, str]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        where = f"{name} line {number}"
        if len(fields) != 2:
            raise TokenFileError(
                f"{where}: expected '<scope> <token>' (scope read or write), "
                f"found {len(fields)} field{'s' if len(fields) != 1 else ''}"
            )
        scope_text, token = fields
        try:
            scope = Scope(scope_text)
        except ValueError:
            # Not echoed: a line written `<token> <scope>` would show its token here.
            raise TokenFileError(
                f"{where}: the first field must be the scope, read or write"
            ) from None
        if not _is_token(token):
            raise TokenFileError(f"{where}: the token must be visible ASCII characters")
        if token in seen:
            raise TokenFileError(f"{where}: the same token is on line {seen[token]}")
        seen[token] = number
        pairs.append((scope, token))
    if not pairs:
        raise TokenFileError(f"{name} holds no token")
    return pairs


class Decision(enum.Enum):
    ALLOW = "allow"
    #: no token, or one the API does not hold: 401
    UNAUTHENTICATED = "unauthenticated"
    #: a token whose scope does not reach this method: 403
    INSUFFICIENT_SCOPE = "insufficient_scope"


def needed_scope(method: str) -> Scope:
    """The scope a request needs: `read` for GET and HEAD (any GET route, those added
    later included), `write` for every other method."""
    return Scope.READ if method.upper() in READ_METHODS else Scope.WRITE


def decide(held: Tokens, method: str, given: bytes | None) -> Decision:
    """Whether a request with this method and presented token (None: none) may go on."""
    scope = None if given is None else held.scope_of(given)
    if scope is None:
        return Decision.UNAUTHENTICATED
    if scope is Scope.READ and needed_scope(method) is Scope.WRITE:
        return Decision.INSUFFICIENT_SCOPE
    return Decision.ALLOW
