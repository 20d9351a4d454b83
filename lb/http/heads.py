"""Request and response heads: what is checked, what is dropped, what is added (sans-IO).

llhttp (through httptools) already rejects most smuggling vectors in its
strict mode: Content-Length with Transfer-Encoding, duplicate Content-Length,
a Transfer-Encoding other than a final `chunked`, bad chunk sizes, obs-fold,
bare LF, invalid characters in names and values. What it lets through and a
proxy must not, `read_request` refuses: Transfer-Encoding in HTTP/1.0, no or
several Host headers, too many headers.

The router rebuilds both heads instead of copying bytes through: hop-by-hop
headers (RFC 9110 §7.6.1, and whatever `Connection` names) are dropped,
framing is the router's own decision, and the forwarding headers are added.
"""

from __future__ import annotations

from dataclasses import dataclass

#: never forwarded: they describe one connection, not the message (RFC 9110 §7.6.1)
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"proxy-authenticate",
                        b"proxy-authorization"})
#: set by the router itself on the way to the task
_REQUEST_OWN = frozenset({b"expect", b"x-forwarded-proto", b"x-forwarded-host"})
MAX_HEADERS = 100
#: the names `read_request` looks at; every other header passes with one set lookup
_REQUEST_SPECIAL = HOP_BY_HOP | _REQUEST_OWN | {b"host", b"content-length", b"cookie",
                                                 b"x-forwarded-for", b"forwarded"}
_RESPONSE_SPECIAL = HOP_BY_HOP | {b"content-length"}

#: methods a retry on another task may repeat (RFC 9110 §9.2.2)
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class BadRequest(Exception):
    """A request the router refuses; `status` says how (400, 431, 413, 501)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    http11: bool
    headers: list[tuple[bytes, bytes]]  # as received, minus Host, hop-by-hop and our own
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
        """The target's path (an absolute-form target loses its scheme and authority)."""
        target = self.target
        if target[:1] != b"/":
            scheme_end = target.find(b"://")
            if scheme_end > 0:
                slash = target.find(b"/", scheme_end + 3)
                target = target[slash:] if slash > 0 else b"/"
        end = target.find(b"?")
        return (target if end < 0 else target[:end]).decode("latin-1")


_PLAIN_CONNECTION = {b"keep-alive": [b"keep-alive"], b"close": [b"close"],
                     b"upgrade": [b"upgrade"]}
#: Connection tokens that name no header to drop
_NOT_HEADERS = frozenset({b"keep-alive", b"close", b"upgrade"})


def _tokens(value: bytes) -> list[bytes]:
    plain = _PLAIN_CONNECTION.get(value.lower())
    if plain is not None:  # the common single token, without a split
        return plain
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def _drop_named(kept: list[tuple[bytes, bytes]],
                connection: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Remove the headers a Connection header names (RFC 9110 §7.6.1)."""
    if _NOT_HEADERS.issuperset(connection):  # the common `keep-alive`/`close`: no set made
        return kept
    named = set(connection) - _NOT_HEADERS
    return [(n, v) for n, v in kept if n.lower() not in named]


def read_request(method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]],
                 keep_alive: bool) -> RequestHead:
    """Check a parsed request head and sort its headers; raises BadRequest."""
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
    chunked = False
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
            content_length = int(value)  # llhttp allows one, digits only
            kept.append((name, value))
        elif lower == b"transfer-encoding":
            if not http11:
                raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
            chunked = True  # llhttp allows only a final "chunked", never with Content-Length
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
    if connection:
        kept = _drop_named(kept, connection)
        if b"upgrade" not in connection:
            upgrade = None
    else:
        upgrade = None
    # Positional, in field order: a call with 13 keywords costs ~0.3 us more, per request.
    return RequestHead(method, target, http11, kept, host.decode("latin-1"), content_length,
                       chunked, upgrade, expect_continue, keep_alive, cookies, forwarded_for,
                       forwarded)


def _forwarded_node(ip: str) -> str:
    return f'"[{ip}]"' if ":" in ip else ip


def forwarding_headers(head: RequestHead, client_ip: str, proto: str) -> bytes:
    """X-Forwarded-For/-Proto/-Host and Forwarded for one request, as header lines.

    They depend only on the client, the scheme, the Host and the forwarding
    headers received, so a connection computes them once and reuses them while
    those stay the same (`ForwardingConnection`).
    """
    ip = client_ip.encode()
    host = head.host.encode("latin-1")
    xff = ip if head.forwarded_for is None else head.forwarded_for + b", " + ip
    host_quoted = head.host.replace("\\", "").replace('"', "")
    element = f'for={_forwarded_node(client_ip)};proto={proto};host="{host_quoted}"'.encode(
        "latin-1")
    forwarded = element if head.forwarded is None else head.forwarded + b", " + element
    return b"".join((b"X-Forwarded-For: ", xff, b"\r\nX-Forwarded-Proto: ", proto.encode(),
                     b"\r\nX-Forwarded-Host: ", host, b"\r\nForwarded: ", forwarded,
                     b"\r\n"))


def upstream_request(head: RequestHead, target: bytes, forwarding: bytes) -> bytes:
    """The request head sent to a task: HTTP/1.1, kept alive unless upgrading."""
    parts = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (head.method, target,
                                                     head.host.encode("latin-1"))]
    parts += [b"%s: %s\r\n" % header for header in head.headers]
    if head.chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
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


def read_response(status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                  http11: bool) -> ResponseHead:
    kept: list[tuple[bytes, bytes]] = []
    content_length: int | None = None
    chunked = False
    connection: list[bytes] = []
    upgrade: bytes | None = None
    for name, value in headers:
        lower = name.lower()
        if lower not in _RESPONSE_SPECIAL:
            kept.append((name, value))
        elif lower == b"content-length":
            content_length = int(value)
            kept.append((name, value))
        elif lower == b"transfer-encoding":
            chunked = True
        elif lower == b"connection":
            connection += _tokens(value)
        elif lower == b"upgrade":
            upgrade = value
        # else: hop-by-hop
    if chunked and content_length is not None:  # never both framings to the client
        kept = [(n, v) for n, v in kept if n.lower() != b"content-length"]
    if connection:
        kept = _drop_named(kept, connection)
    close = b"close" in connection or (not http11 and b"keep-alive" not in connection)
    # Positional, in field order (status, reason, headers, content_length, chunked,
    # upstream_close, upgrade): cheaper than keywords, and this runs per response.
    return ResponseHead(status, reason, kept, None if chunked else content_length, chunked,
                        close, upgrade)


def client_response(head: ResponseHead, chunked: bool, keep_alive: bool, http11: bool,
                    extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """The response head sent to the client; `chunked` re-frames the body.

    (Not keyword-only: the relay calls it positionally, once per response.)
    """
    parts = [b"%s %d %s\r\n" % (b"HTTP/1.1" if http11 else b"HTTP/1.0", head.status,
                                  head.reason)]
    parts += [b"%s: %s\r\n" % header for header in head.headers]
    if extra:
        parts += [b"%s: %s\r\n" % header for header in extra]
    if head.status == 101 and head.upgrade is not None:
        parts.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n" % head.upgrade)
    elif chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if head.status != 101:
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        elif not http11:
            parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


REASONS = {301: "Moved Permanently", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
           417: "Expectation Failed", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout",
           505: "HTTP Version Not Supported"}


def local_response(status: int, message: str, *, keep_alive: bool, head_only: bool = False,
                   extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A response the router makes itself: a short plain-text body saying why."""
    body = f"{status} {REASONS.get(status, '')}: {message}\n".encode()
    parts = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
             f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
             .encode()]
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
    rest = target[len(raw):]
    return rest if rest[:1] == b"/" else b"/" + rest
