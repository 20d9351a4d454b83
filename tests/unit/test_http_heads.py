"""The router's head handling: checks, hop-by-hop removal, forwarding headers, framing."""

from __future__ import annotations

import pytest

from lb.http.heads import (
    REASONS,
    BadRequest,
    RequestHead,
    client_response,
    cookie_value,
    forwarding_headers,
    local_response,
    origin_form,
    read_request,
    read_response,
    strip_prefix,
    upstream_request,
)

H = list[tuple[bytes, bytes]]


def req(
    headers: H,
    *,
    method: bytes = b"GET",
    target: bytes = b"/x?y=1",
    version: str = "1.1",
    keep_alive: bool = True,
) -> RequestHead:
    return read_request(method, target, version, headers, keep_alive)


def up(head: RequestHead, target: bytes = b"/", ip: str = "1.2.3.4", proto: str = "http") -> bytes:
    return upstream_request(head, target, forwarding_headers(head, ip, proto))


def test_a_plain_request_is_read() -> None:
    head = req([(b"Host", b"Web.Example:8080"), (b"Accept", b"*/*")])
    assert head.host == "Web.Example:8080" and head.path == "/x" and not head.has_body
    assert head.headers == [(b"Accept", b"*/*")]  # Host is sent first, on its own


@pytest.mark.parametrize(
    ("headers", "version", "status"),
    [
        ([], "1.1", 400),  # no Host
        ([(b"Host", b"a"), (b"host", b"b")], "1.1", 400),
        ([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")], "1.0", 400),
        ([(b"Host", b"a"), (b"Expect", b"something-else")], "1.1", 417),
        ([(b"Host", b"a")] + [(b"X", b"y")] * 100, "1.1", 431),
        ([(b"Host", b"a")], "2.0", 505),
    ],
)
def test_bad_requests_are_refused(headers: H, version: str, status: int) -> None:
    with pytest.raises(BadRequest) as caught:
        req(headers, version=version)
    assert caught.value.status == status


def test_connect_is_refused() -> None:
    with pytest.raises(BadRequest) as caught:
        req([(b"Host", b"a")], method=b"CONNECT", target=b"a:443")
    assert caught.value.status == 405


def test_an_http10_request_needs_no_host() -> None:
    assert req([], version="1.0").host == ""


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    head = req(
        [
            (b"Host", b"a"),
            (b"Connection", b"keep-alive, X-Private"),
            (b"X-Private", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Proxy-Authorization", b"secret"),
            (b"X-Kept", b"2"),
            (b"X-Forwarded-Proto", b"forged"),
            (b"Upgrade", b"h2c"),
        ]
    )
    assert head.headers == [(b"X-Kept", b"2")]
    assert head.upgrade is None  # Upgrade without Connection: upgrade is not an upgrade


def test_an_upgrade_request_keeps_its_upgrade() -> None:
    head = req([(b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")])
    assert head.upgrade == b"websocket"
    out = upstream_request(head, head.target, forwarding_headers(head, "10.0.0.1", "http"))
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in out


def test_forwarding_headers_are_added_and_appended() -> None:
    head = req(
        [
            (b"Host", b"a.example"),
            (b"X-Forwarded-For", b"192.0.2.1"),
            (b"Forwarded", b"for=192.0.2.1"),
            (b"Content-Length", b"3"),
        ],
        method=b"POST",
    )
    out = upstream_request(head, b"/x", forwarding_headers(head, "2001:db8::1", "https"))
    assert out.startswith(b"POST /x HTTP/1.1\r\nHost: a.example\r\n")
    assert b"X-Forwarded-For: 192.0.2.1, 2001:db8::1\r\n" in out
    assert b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: a.example\r\n" in out
    assert b'Forwarded: for=192.0.2.1, for="[2001:db8::1]";proto=https;host="a.example"' in out
    assert b"Content-Length: 3\r\n" in out and out.endswith(b"\r\n\r\n")


def test_a_chunked_request_goes_chunked() -> None:
    head = req([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")], method=b"POST")
    assert head.chunked and head.has_body
    assert b"Transfer-Encoding: chunked\r\n" in up(head)


def test_expect_continue_is_taken_by_the_router() -> None:
    head = req(
        [(b"Host", b"a"), (b"Expect", b"100-continue"), (b"Content-Length", b"5")], method=b"PUT"
    )
    assert head.expect_continue
    assert b"Expect" not in up(head)


def test_absolute_form_targets_route_by_their_path() -> None:
    assert req([(b"Host", b"a")], target=b"http://a/p/q?r").path == "/p/q"
    assert req([(b"Host", b"a")], target=b"http://a").path == "/"


def test_responses_lose_hop_by_hop_headers_and_learn_their_framing() -> None:
    head = read_response(
        200,
        b"OK",
        [
            (b"Content-Type", b"text/plain"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Connection", b"close, X-Gone"),
            (b"X-Gone", b"1"),
        ],
        True,
    )
    assert head.chunked and head.content_length is None and head.upstream_close
    assert head.headers == [(b"Content-Type", b"text/plain")]
    out = client_response(
        head, chunked=True, keep_alive=True, http11=True, extra=[(b"Set-Cookie", b"s=t1")]
    )
    assert out == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: s=t1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )


def test_an_http10_upstream_closes_unless_kept_alive() -> None:
    assert read_response(200, b"OK", [], False).upstream_close
    assert not read_response(200, b"OK", [(b"Connection", b"keep-alive")], False).upstream_close


def test_client_heads_say_how_the_connection_goes_on() -> None:
    head = read_response(204, b"No Content", [], True)
    assert b"Connection: close" in client_response(
        head, chunked=False, keep_alive=False, http11=True
    )
    assert b"Connection: keep-alive" in client_response(
        head, chunked=False, keep_alive=True, http11=False
    )


def test_local_responses() -> None:
    out = local_response(503, "no task", keep_alive=True)
    assert out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert out.endswith(b"\r\n\r\n503 Service Unavailable: no task\n")
    assert b"Connection: close" in local_response(400, "x", keep_alive=False)
    assert local_response(404, "x", keep_alive=True, head_only=True).endswith(b"\r\n\r\n")


def test_cookie_values() -> None:
    cookies = [b"a=1; SRV=task-2", b'other="q"']
    assert cookie_value(cookies, b"SRV") == "task-2"
    assert cookie_value(cookies, b"other") == "q"
    assert cookie_value(cookies, b"missing") is None
    assert cookie_value([b"SRVX=1"], b"SRV") is None


def test_strip_prefix() -> None:
    assert strip_prefix(b"/app/x?q=1", "/app") == b"/x?q=1"
    assert strip_prefix(b"/app", "/app/") == b"/"
    assert strip_prefix(b"/other", "/app") == b"/other"
    assert strip_prefix(b"/x", "/") == b"/x"


@pytest.mark.parametrize(
    "connection",
    [
        [(b"Connection", b"Content-Length")],
        [(b"Connection", b"keep-alive, X-A ,TRANSFER-ENCODING")],
        [(b"Connection", b"host")],
        [(b"Connection", b"keep-alive"), (b"Connection", b"content-length")],
    ],
)
def test_a_connection_header_naming_a_framing_header_is_refused(connection: H) -> None:
    with pytest.raises(BadRequest) as caught:
        req([(b"Host", b"a"), (b"Content-Length", b"3"), *connection], method=b"POST")
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("codings", "status"),
    [
        (b"gzip, chunked", 501),  # chunked last, but a coding the router does not implement
        (b"chunked, gzip", 400),  # the body's length is unknown (RFC 9112 §6.3)
        (b"identity", 400),
    ],
)
def test_transfer_codings_other_than_chunked_are_refused(codings: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as caught:
        req([(b"Host", b"a"), (b"Transfer-Encoding", codings)], method=b"POST")
    assert caught.value.status == status
    assert req([(b"Host", b"a"), (b"Transfer-Encoding", b" Chunked ")], method=b"POST").chunked


@pytest.mark.parametrize(
    "body", [[(b"Content-Length", b"5")], [(b"Transfer-Encoding", b"chunked")]]
)
def test_an_upgrade_with_a_body_is_refused(body: H) -> None:
    upgrade = [(b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    with pytest.raises(BadRequest) as caught:
        req(upgrade + body)
    assert caught.value.status == 400
    assert req([*upgrade, (b"Content-Length", b"0")]).upgrade == b"websocket"


def test_framing_headers_are_written_by_the_router() -> None:
    head = req([(b"Host", b"a"), (b"content-length", b"3 "), (b"X-A", b"1")], method=b"POST")
    assert head.headers == [(b"X-A", b"1")] and head.content_length == 3
    out = up(head)
    assert out.count(b"ength: ") == 1 and b"\r\nContent-Length: 3\r\n" in out


@pytest.mark.parametrize(
    ("target", "method", "origin", "authority"),
    [
        (b"/p?q", b"GET", b"/p?q", None),
        (b"http://b.test/p?q", b"GET", b"/p?q", b"b.test"),
        (b"HTTPS://b.test:8443", b"GET", b"/", b"b.test:8443"),
        (b"http://b.test?q", b"GET", b"/?q", b"b.test"),
        (b"*", b"OPTIONS", b"*", None),
    ],
)
def test_origin_form(target: bytes, method: bytes, origin: bytes, authority: bytes | None) -> None:
    assert origin_form(target, method) == (origin, authority)


@pytest.mark.parametrize(
    "target", [b"*", b"ftp://b.test/", b"http://u@b.test/", b"http:///p", b"b.test:80", b"p"]
)
def test_targets_neither_origin_nor_http_absolute_form_are_refused(target: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        req([(b"Host", b"a")], target=target)
    assert caught.value.status == 400


def test_the_absolute_form_authority_replaces_host() -> None:
    head = req([(b"Host", b"a.test")], target=b"http://B.test:81/p?q")
    assert head.host == "B.test:81" and head.target == b"/p?q" and head.path == "/p"
    assert up(head, head.target).startswith(b"GET /p?q HTTP/1.1\r\nHost: B.test:81\r\n")


@pytest.mark.parametrize("host", [b"a/b", b"u@a", b"a b", b"a:x", b"[::1"])
def test_an_invalid_host_is_refused(host: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        req([(b"Host", host)])
    assert caught.value.status == 400


def test_valid_hosts_pass() -> None:
    for host in (b"Web.Example:8080", b"[::1]:80", b"10.0.0.1", b"", b"xn--bcher-kva.test"):
        assert req([(b"Host", host)]).host == host.decode()


def test_a_response_keeps_its_framing_whatever_connection_names() -> None:
    head = read_response(
        200,
        b"OK",
        [(b"Connection", b"content-length, transfer-encoding"), (b"Content-Length", b"5")],
        True,
    )
    assert head.content_length == 5 and head.headers == []
    out = client_response(head, chunked=False, keep_alive=True, http11=True)
    assert b"\r\nContent-Length: 5\r\n" in out
    # 204 carries no Content-Length (RFC 9110 §8.6); a HEAD answer keeps the one it had.
    no_content = read_response(204, b"No Content", [(b"Content-Length", b"0")], True)
    assert b"Content-Length" not in client_response(
        no_content, chunked=False, keep_alive=True, http11=True
    )


def test_a_response_transfer_coding_other_than_chunked_is_a_bad_response() -> None:
    for codings in (b"gzip", b"gzip, chunked"):
        with pytest.raises(BadRequest) as caught:
            read_response(200, b"OK", [(b"Transfer-Encoding", codings)], True)
        assert caught.value.status == 502


def test_every_local_status_has_its_standard_reason_phrase() -> None:
    assert local_response(414, "x", keep_alive=False).startswith(b"HTTP/1.1 414 URI Too Long\r\n")
    for status in (400, 404, 405, 408, 413, 417, 431, 500, 501, 502, 503, 504, 505):
        line = local_response(status, "x", keep_alive=False).split(b"\r\n")[0]
        assert line == b"HTTP/1.1 %d %s" % (status, REASONS[status].encode())
        assert REASONS[status] and REASONS[status] != "Error"
