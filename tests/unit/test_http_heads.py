"""The router's head handling: checks, hop-by-hop removal, forwarding headers, framing."""

from __future__ import annotations

import pytest

from lb.http.heads import (
    BadRequest,
    RequestHead,
    client_response,
    cookie_value,
    forwarding_headers,
    local_response,
    read_request,
    read_response,
    strip_prefix,
    upstream_request,
)

H = list[tuple[bytes, bytes]]


def req(headers: H, *, method: bytes = b"GET", target: bytes = b"/x?y=1",
        version: str = "1.1", keep_alive: bool = True) -> RequestHead:
    return read_request(method, target, version, headers, keep_alive)


def up(head: RequestHead, target: bytes = b"/", ip: str = "1.2.3.4",
       proto: str = "http") -> bytes:
    return upstream_request(head, target, forwarding_headers(head, ip, proto))


def test_a_plain_request_is_read() -> None:
    head = req([(b"Host", b"Web.Example:8080"), (b"Accept", b"*/*")])
    assert head.host == "Web.Example:8080" and head.path == "/x" and not head.has_body
    assert head.headers == [(b"Accept", b"*/*")]  # Host is sent first, on its own


@pytest.mark.parametrize(("headers", "version", "status"), [
    ([], "1.1", 400),  # no Host
    ([(b"Host", b"a"), (b"host", b"b")], "1.1", 400),
    ([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")], "1.0", 400),
    ([(b"Host", b"a"), (b"Expect", b"something-else")], "1.1", 417),
    ([(b"Host", b"a")] + [(b"X", b"y")] * 100, "1.1", 431),
    ([(b"Host", b"a")], "2.0", 505),
])
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
    head = req([(b"Host", b"a"), (b"Connection", b"keep-alive, X-Private"),
                (b"X-Private", b"1"), (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"),
                (b"Proxy-Authorization", b"secret"), (b"X-Kept", b"2"),
                (b"X-Forwarded-Proto", b"forged"), (b"Upgrade", b"h2c")])
    assert head.headers == [(b"X-Kept", b"2")]
    assert head.upgrade is None  # Upgrade without Connection: upgrade is not an upgrade


def test_an_upgrade_request_keeps_its_upgrade() -> None:
    head = req([(b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")])
    assert head.upgrade == b"websocket"
    out = upstream_request(head, head.target, forwarding_headers(head, "10.0.0.1", "http"))
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in out


def test_forwarding_headers_are_added_and_appended() -> None:
    head = req([(b"Host", b"a.example"), (b"X-Forwarded-For", b"192.0.2.1"),
                (b"Forwarded", b"for=192.0.2.1"), (b"Content-Length", b"3")],
               method=b"POST")
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
    head = req([(b"Host", b"a"), (b"Expect", b"100-continue"), (b"Content-Length", b"5")],
               method=b"PUT")
    assert head.expect_continue
    assert b"Expect" not in up(head)


def test_absolute_form_targets_route_by_their_path() -> None:
    assert req([(b"Host", b"a")], target=b"http://a/p/q?r").path == "/p/q"
    assert req([(b"Host", b"a")], target=b"http://a").path == "/"


def test_responses_lose_hop_by_hop_headers_and_learn_their_framing() -> None:
    head = read_response(200, b"OK", [(b"Content-Type", b"text/plain"),
                                      (b"Transfer-Encoding", b"chunked"),
                                      (b"Connection", b"close, X-Gone"), (b"X-Gone", b"1")],
                         True)
    assert head.chunked and head.content_length is None and head.upstream_close
    assert head.headers == [(b"Content-Type", b"text/plain")]
    out = client_response(head, chunked=True, keep_alive=True, http11=True,
                          extra=[(b"Set-Cookie", b"s=t1")])
    assert out == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: s=t1\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n")


def test_an_http10_upstream_closes_unless_kept_alive() -> None:
    assert read_response(200, b"OK", [], False).upstream_close
    assert not read_response(200, b"OK", [(b"Connection", b"keep-alive")], False).upstream_close


def test_client_heads_say_how_the_connection_goes_on() -> None:
    head = read_response(204, b"No Content", [], True)
    assert b"Connection: close" in client_response(head, chunked=False, keep_alive=False,
                                                   http11=True)
    assert b"Connection: keep-alive" in client_response(head, chunked=False, keep_alive=True,
                                                        http11=False)


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
