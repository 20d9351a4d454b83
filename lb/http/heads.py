"""Request and response heads: what is checked, what is dropped, what is added (sans-IO).

llhttp (through httptools) already rejects most smuggling vectors in its
strict mode: Content-Length with Transfer-Encoding, duplicate Content-Length,
a Transfer-Encoding other than a final `chunked`, bad chunk sizes, obs-fold,
bare LF, invalid characters in names and values. What it lets through and a
proxy must not, `read_request` refuses: a `Connection` header naming a framing
header (Content-Length, Transfer-Encoding, Host), a transfer coding other than
`chunked` alone (501), Transfer-Encoding in HTTP/1.0, an upgrade with a body,
a request-target that is neither origin-form nor http(s) absolute-form, no or
several Host headers or an invalid one, too many headers.

The router rebuilds both heads instead of copying bytes through: hop-by-hop
headers (RFC 9110 §7.6.1, and whatever `Connection` names) are dropped, the
framing headers (Content-Length, Transfer-Encoding, Host) are never copied but
written by the router from what the parser decided, so nothing a peer sends can
make the head that leaves disagree with the body that follows (RFC 9112 §6),
and the forwarding headers are added.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus

#: never forwarded: they describe one connection, not the message (RFC 9110 §7.6.1)
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
#: set by the router itself on the way to the task
_REQUEST_OWN = frozenset({b"expect", b"x-forwarded-proto", b"x-forwarded-host"})
MAX_HEADERS = 100
#: the names `read_request` looks at; every other header passes with one set lookup
_REQUEST_SPECIAL = (
    HOP_BY_HOP
    | _REQUEST_OWN
    | {b"host", b"content-length", b"cookie", b"x-forwarded-for", b"forwarded"}
)
#: the headers that delimit a message or say which one it is: never hop-by-hop, so a
#: `Connection` header naming one is a request that means two things (RFC 9112 §6, §7.6.1)
FRAMING = frozenset({b"content-length", b"transfer-encoding", b"host"})
#: uri-host [":" port] (RFC 9110 §7.2, RFC 3986 §3.2.2): an IP literal or a reg-name
_VALID_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+;=%-]*)(?::[0-9]*)?")
_RESPONSE_SPECIAL = HOP_BY_HOP | {b"content-length"}

#: methods a retry on another task may repeat (RFC 9110 §9.2.2)
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class BadRequest(Exception):
    """A request (or a task's response) the router refuses; `status` says how (400, 501, ...)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes  # origin-form (an absolute-form target is reduced to it), or `*`
    http11: bool
    headers: list[tuple[bytes, bytes]]  # as received, minus Host, framing, hop-by-hop, our own
    host: str
    content_length: int | None
    chunked: bool
    upgrade: bytes | None  # the Upgrade header of an upgrade request
    expect_continue: bool
    keep_alive: bool
    cookies: list[bytes]
    forwarded_for: bytes | None
    forwarded: bytes | None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def path(self) -> str:
        """The target's path (`target` is origin-form, or `*` for OPTIONS)."""
        target = self.target
        end = target.find(b"?")
        return (target if end < 0 else target[:end]).decode("latin-1")


_PLAIN_CONNECTION = {b"keep-alive": [b"keep-alive"], b"close": [b"close"], b"upgrade": [b"upgrade"]}
#: Connection tokens that name no header to drop
_NOT_HEADERS = frozenset({b"keep-alive", b"close", b"upgrade"})


def _tokens(value: bytes) -> list[bytes]:
    plain = _PLAIN_CONNECTION.get(value.lower())
    if plain is not None:  # the common single token, without a split
        return plain
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def _drop_named(
    kept: list[tuple[bytes, bytes]], connection: list[bytes]
) -> list[tuple[bytes, bytes]]:
    """Remove the headers a Connection header names (RFC 9110 §7.6.1)."""
    if _NOT_HEADERS.issuperset(connection):  # the common `keep-alive`/`close`: no set made
        return kept
    named = set(connection) - _NOT_HEADERS
    return [(n, v) for n, v in kept if n.lower() not in named]


def _transfer_chunked(codings: list[bytes]) -> bool:
    """The request's transfer codings are `chunked` alone; raises BadRequest.

    A last coding other than `chunked` leaves the body's length unknown: 400
    (RFC 9112 §6.3). llhttp refuses that too, but passes `gzip, chunked`: the
    router would take off the chunking and forward the rest as if it had no
    coding at all, so it refuses a coding it does not implement: 501 (§6.1).
    """
    if codings == [b"chunked"]:
        return True
    if codings[-1:] != [b"chunked"]:
        raise BadRequest(400, "the last transfer coding is not chunked")
    raise BadRequest(501, "a transfer coding other than chunked")


def origin_form(target: bytes, method: bytes) -> tuple[bytes, bytes | None]:
    """The origin-form of a request-target and the authority an absolute-form one names.

    RFC 9112 §3.2: origin-form (`/path?query`) as is; absolute-form
    (`http://authority/path?query`) gives its authority, which replaces Host
    (§3.2.2), and its path; `*` only for OPTIONS. Anything else is a 400: a
    target the router forwarded as it came would be read by the task in a way
    the router did not route.
    """
    if target[:1] == b"/":
        return target, None
    if target == b"*" and method == b"OPTIONS":
        return target, None
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise BadRequest(400, "the request-target is neither a path nor an http URI")
    end = len(rest)
    for delimiter in (b"/", b"?"):
        found = rest.find(delimiter)
        if 0 <= found < end:
            end = found
    authority, path = rest[:end], rest[end:]
    if not authority or b"@" in authority:  # RFC 9110 §4.2.1, §4.2.4: no empty host, userinfo
        raise BadRequest(400, "the request-target's authority is empty or has userinfo")
    if path[:1] != b"/":
        path = b"/" + path
    return path, authority


def read_request(
    method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]], keep_alive: bool
) -> RequestHead:
    """Check a parsed request head and sort its headers; raises BadRequest.

    `target` may be absolute-form: the head's `target` is then its origin-form and
    its `host` the target's authority (RFC 9112 §3.2.2), whatever Host said.
    """
    if len(headers) > MAX_HEADERS:
        raise BadRequest(431, "too many header fields")
    http11 = version == "1.1"
    if not http11 and version != "1.0":
        raise BadRequest(505, "HTTP version not supported")
    if method == b"CONNECT":
        raise BadRequest(405, "CONNECT is not proxied")
    kept: list[tuple[bytes, bytes]] = []
    host: bytes | None = None
    content_length: int | None = None
    codings: list[bytes] | None = None
    upgrade: bytes | None = None
    expect_continue = False
    cookies: list[bytes] = []
    forwarded_for: bytes | None = None
    forwarded: bytes | None = None
    connection: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower not in _REQUEST_SPECIAL:
            kept.append((name, value))
        elif lower == b"host":
            if host is not None:
                raise BadRequest(400, "several Host headers")
            host = value  # sent first, on its own
        elif lower == b"content-length":
            # llhttp allows one, digits only; the router writes it again itself
            content_length = int(value)
        elif lower == b"transfer-encoding":
            if not http11:
                raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
            # llhttp allows only a final "chunked", never with Content-Length
            codings = (codings or []) + _tokens(value)
        elif lower == b"connection":
            connection += _tokens(value)
        elif lower == b"upgrade":
            upgrade = value
        elif lower == b"expect":
            if value.strip().lower() != b"100-continue":
                raise BadRequest(417, "only Expect: 100-continue is supported")
            expect_continue = http11
        elif lower == b"cookie":
            cookies.append(value)
            kept.append((name, value))
        elif lower == b"x-forwarded-for":
            forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
        elif lower == b"forwarded":
            forwarded = value if forwarded is None else forwarded + b", " + value
        # else: hop-by-hop, or set by the router itself
    if host is None:
        if http11:
            raise BadRequest(400, "no Host header")
        host = b""
    elif not _VALID_HOST.fullmatch(host):
        raise BadRequest(400, "an invalid Host header")
    if target[:1] != b"/":
        target, authority = origin_form(target, method)
        if authority is not None:
            if not _VALID_HOST.fullmatch(authority):
                raise BadRequest(400, "an invalid authority in the request-target")
            host = authority
    chunked = codings is not None and _transfer_chunked(codings)
    if chunked and content_length is not None:  # llhttp refuses it already: never both
        raise BadRequest(400, "both Content-Length and Transfer-Encoding")
    if connection:
        if not FRAMING.isdisjoint(connection):
            raise BadRequest(400, "Connection names a framing header")
        kept = _drop_named(kept, connection)
        if b"upgrade" not in connection:
            upgrade = None
    else:
        upgrade = None
    if upgrade is not None and (chunked or content_length):
        # httptools hands the bytes after an upgrade's head over as the new protocol's:
        # a body there would go nowhere (the task would wait for it) or, after a 101,
        # into the pipe as if it were the new protocol (RFC 9110 §7.8 lets a server
        # refuse; a client that needs the body sends it before upgrading).
        raise BadRequest(400, "an upgrade request with a body")
    # Positional, in field order: a call with 13 keywords costs ~0.3 us more, per request.
    return RequestHead(
        method,
        target,
        http11,
        kept,
        host.decode("latin-1"),
        content_length,
        chunked,
        upgrade,
        expect_continue,
        keep_alive,
        cookies,
        forwarded_for,
        forwarded,
    )


def _forwarded_node(ip: str) -> str:
    return f'"[{ip}]"' if ":" in ip else ip


def forwarding_headers(head: RequestHead, client_ip: str, proto: str) -> bytes:
    """X-Forwarded-For/-Proto/-Host and Forwarded for one request, as header lines.

    They depend only on the client, the scheme, the Host and the forwarding
    headers received, so a connection computes them once and reuses them while
    those stay the same (`exchange.Exchange`).
    """
    ip = client_ip.encode()
    host = head.host.encode("latin-1")
    xff = ip if head.forwarded_for is None else head.forwarded_for + b", " + ip
    host_quoted = head.host.replace("\\", "").replace('"', "")
    element = f'for={_forwarded_node(client_ip)};proto={proto};host="{host_quoted}"'.encode(
        "latin-1"
    )
    forwarded = element if head.forwarded is None else head.forwarded + b", " + element
    return b"".join(
        (
            b"X-Forwarded-For: ",
            xff,
            b"\r\nX-Forwarded-Proto: ",
            proto.encode(),
            b"\r\nX-Forwarded-Host: ",
            host,
            b"\r\nForwarded: ",
            forwarded,
            b"\r\n",
        )
    )


def upstream_request(head: RequestHead, target: bytes, forwarding: bytes) -> bytes:
    """The request head sent to a task: HTTP/1.1, kept alive unless upgrading.

    Host and the framing are written from the parsed head, never copied.
    """
    parts = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (head.method, target, head.host.encode("latin-1"))]
    parts += [b"%s: %s\r\n" % header for header in head.headers]
    if head.chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif head.content_length is not None:
        parts.append(b"Content-Length: %d\r\n" % head.content_length)
    if head.upgrade is not None:
        parts.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n" % head.upgrade)
    parts.append(forwarding)
    parts.append(b"\r\n")
    return b"".join(parts)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # minus hop-by-hop
    content_length: int | None
    chunked: bool
    upstream_close: bool  # the task will close this connection after the response
    upgrade: bytes | None


def read_response(
    status: int, reason: bytes, headers: list[tuple[bytes, bytes]], http11: bool
) -> ResponseHead:
    """Sort a task's response head; raises BadRequest(502) for a coding not relayed.

    Content-Length is kept aside (`client_response` writes it again), so a
    `Connection` header naming it cannot unframe the body towards the client.
    """
    kept: list[tuple[bytes, bytes]] = []
    content_length: int | None = None
    codings: list[bytes] | None = None
    connection: list[bytes] = []
    upgrade: bytes | None = None
    for name, value in headers:
        lower = name.lower()
        if lower not in _RESPONSE_SPECIAL:
            kept.append((name, value))
        elif lower == b"content-length":
            content_length = int(value)  # llhttp allows one, digits only, never with TE
        elif lower == b"transfer-encoding":
            codings = (codings or []) + _tokens(value)
        elif lower == b"connection":
            connection += _tokens(value)
        elif lower == b"upgrade":
            upgrade = value
        # else: hop-by-hop
    chunked = codings is not None
    if chunked and codings != [b"chunked"]:
        # llhttp reads `gzip` alone as close-delimited and takes `chunked` off
        # `gzip, chunked`; relayed re-chunked, the gzip coding would be lost
        raise BadRequest(502, "the task used a transfer coding other than chunked")
    if connection:
        kept = _drop_named(kept, connection)
    close = b"close" in connection or (not http11 and b"keep-alive" not in connection)
    # Positional, in field order (status, reason, headers, content_length, chunked,
    # upstream_close, upgrade): cheaper than keywords, and this runs per response.
    return ResponseHead(
        status, reason, kept, None if chunked else content_length, chunked, close, upgrade
    )


def client_response(
    head: ResponseHead,
    chunked: bool,
    keep_alive: bool,
    http11: bool,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """The response head sent to the client; `chunked` re-frames the body.

    (Not keyword-only: the relay calls it positionally, once per response.)
    """
    parts = [b"%s %d %s\r\n" % (b"HTTP/1.1" if http11 else b"HTTP/1.0", head.status, head.reason)]
    parts += [b"%s: %s\r\n" % header for header in head.headers]
    if extra:
        parts += [b"%s: %s\r\n" % header for header in extra]
    status = head.status
    if status == 101 and head.upgrade is not None:
        parts.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n" % head.upgrade)
    elif chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif head.content_length is not None and status >= 200 and status != 204:
        # (a HEAD or 304 response states the length of the body it does not carry)
        parts.append(b"Content-Length: %d\r\n" % head.content_length)
    if status != 101:
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        elif not http11:
            parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


#: the standard reason phrase of every status, with RFC 9110's names where Python's are older
REASONS = {status.value: status.phrase for status in HTTPStatus} | {
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}


def local_response(
    status: int,
    message: str,
    *,
    keep_alive: bool,
    head_only: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """A response the router makes itself: a short plain-text body saying why."""
    reason = REASONS.get(status, "")  # (the router answers only standard statuses)
    body = f"{status} {reason}: {message}\n".encode()
    parts = [
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n".encode()
    ]
    if extra:
        for name, value in extra:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n" if keep_alive else b"Connection: close\r\n\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def cookie_value(cookies: list[bytes], name: bytes) -> str | None:
    """The value of cookie `name` in the request's Cookie headers, if any."""
    for header in cookies:
        for pair in header.split(b";"):
            key, sep, value = pair.strip().partition(b"=")
            if sep and key == name:
                return value.strip(b'"').decode("latin-1")
    return None


def strip_prefix(target: bytes, prefix: str) -> bytes:
    """Interlock's context_root_rewrite: `/app/x?q` with prefix `/app` goes as `/x?q`."""
    raw = prefix.rstrip("/").encode("latin-1")
    if not raw or not target.startswith(raw):
        return target
    rest = target[len(raw) :]
    return rest if rest[:1] == b"/" else b"/" + rest
