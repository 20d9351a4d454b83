"""Request-smuggling probes for an HTTP router: raw bytes in, the verdict on what came back.

    python -m tests.tools.smuggle HOST:PORT [--host NAME] [--timeout S]

sends each probe on a fresh connection to the router at HOST:PORT (`--host`:
a Host the router routes, so that a probe it accepted would reach a task) and
prints, per probe, the status expected and the one received, and whether the
router closed the connection. A probe passes when the router refuses it with
the status expected (400; 501 for a transfer coding it does not implement),
answers it once, and closes. Exit status 1 if any probe did not pass.

Every probe is one framing ambiguity of RFC 9112 §6-§7 (and §3.2 for Host)
that a proxy and the server behind it could read differently: a `Connection`
header naming a framing header, Content-Length with Transfer-Encoding,
duplicate or malformed Content-Length, obs-fold, bare LF or CR, transfer
codings other than `chunked`, bad chunk sizes, Host trouble, an upgrade with
a body. A body that would be a request of its own asks for `/__smuggled__`:
a task behind the router must never see that path (tests/integration/
test_http_smuggling.py checks that with a task that records every byte).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
import sys
import time
from dataclasses import dataclass

TARGET = "/__probe__"
SMUGGLED_TARGET = "/__smuggled__"


@dataclass(frozen=True)
class Probe:
    name: str
    payload: bytes  # `HOST` stands for the routed host name
    expect: int = 400

    def bytes_for(self, host: str) -> bytes:
        return self.payload.replace(b"HOST", host.encode("latin-1"))


def _smuggled() -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: HOST\r\n\r\n" % SMUGGLED_TARGET.encode()


def _post(headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"POST %s HTTP/%s\r\nHost: HOST\r\n%s\r\n%s" % (TARGET.encode(), version, headers, body)


def _get(headers: bytes, target: bytes = TARGET.encode()) -> bytes:
    return b"GET %s HTTP/1.1\r\n%s\r\n" % (target, headers)


_S = _smuggled()
_CHUNKED_S = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_S), _S)

PROBES = [
    # A Connection header naming a framing header: framing is never hop-by-hop.
    Probe(
        "connection: content-length",
        _post(b"Content-Length: %d\r\nConnection: Content-Length\r\n" % len(_S), _S),
    ),
    Probe(
        "connection: transfer-encoding",
        _post(b"Transfer-Encoding: chunked\r\nConnection: Transfer-Encoding\r\n", _CHUNKED_S),
    ),
    Probe("connection: host", _get(b"Host: HOST\r\nConnection: Host\r\n")),
    Probe(
        "connection: list, any position",
        _post(
            b"Content-Length: %d\r\nConnection: keep-alive, X-A ,content-LENGTH\r\n" % len(_S), _S
        ),
    ),
    Probe(
        "connection: repeated headers",
        _post(
            b"Connection: keep-alive\r\nContent-Length: %d\r\nConnection: CONTENT-LENGTH\r\n"
            % len(_S),
            _S,
        ),
    ),
    # Content-Length and Transfer-Encoding.
    Probe(
        "CL.TE",
        _post(
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % (5 + len(_S)),
            b"0\r\n\r\n" + _S,
        ),
    ),
    Probe("TE.CL", _post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", _CHUNKED_S)),
    Probe(
        "duplicate Content-Length, same",
        _post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"),
    ),
    Probe(
        "duplicate Content-Length, differing",
        _post(b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(_S), _S),
    ),
    Probe("Content-Length list", _post(b"Content-Length: 3, 3\r\n", b"abc")),
    Probe("Content-Length sign", _post(b"Content-Length: +3\r\n", b"abc")),
    Probe("Content-Length hex", _post(b"Content-Length: 0x3\r\n", b"abc")),
    # Line folding and line endings.
    Probe("obs-fold", _get(b"Host: HOST\r\nX-A: b\r\n c\r\n")),
    Probe(
        "obs-fold of Transfer-Encoding", _post(b"Transfer-Encoding:\r\n chunked\r\n", _CHUNKED_S)
    ),
    Probe("bare LF", b"GET %s HTTP/1.1\nHost: HOST\n\n" % TARGET.encode()),
    Probe("bare LF after a header", _get(b"Host: HOST\nX-A: b\r\n")),
    Probe("bare CR in a header", _get(b"Host: HOST\r\nX-A: b\rX-B: c\r\n")),
    Probe(
        "bare LF in chunk size", _post(b"Transfer-Encoding: chunked\r\n", b"3\nabc\r\n0\r\n\r\n")
    ),
    # Transfer codings.
    Probe("TE last coding not chunked", _post(b"Transfer-Encoding: chunked, gzip\r\n", b"abc")),
    Probe("TE xchunked", _post(b"Transfer-Encoding: xchunked\r\n", _CHUNKED_S)),
    Probe("TE identity", _post(b"Transfer-Encoding: identity\r\n", b"")),
    Probe(
        "TE chunked twice",
        _post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", _CHUNKED_S),
    ),
    Probe(
        "TE gzip, chunked (not implemented)",
        _post(b"Transfer-Encoding: gzip, chunked\r\n", _CHUNKED_S),
        501,
    ),
    Probe("TE in HTTP/1.0", _post(b"Transfer-Encoding: chunked\r\n", _CHUNKED_S, b"1.0")),
    Probe("space before colon", _post(b"Transfer-Encoding : chunked\r\n", _CHUNKED_S)),
    Probe(
        "chunk size negative", _post(b"Transfer-Encoding: chunked\r\n", b"-5\r\nabcde\r\n0\r\n\r\n")
    ),
    Probe("chunk size 0x", _post(b"Transfer-Encoding: chunked\r\n", b"0x3\r\nabc\r\n0\r\n\r\n")),
    Probe(
        "chunk size overflow",
        _post(b"Transfer-Encoding: chunked\r\n", b"1" + b"0" * 16 + b"3\r\nabc\r\n0\r\n\r\n"),
    ),
    Probe(
        "chunk without its CRLF", _post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabcXX0\r\n\r\n")
    ),
    # Host (RFC 9112 §3.2) and the request-target.
    Probe("two Host headers", _get(b"Host: HOST\r\nHost: other.invalid\r\n")),
    Probe("no Host in HTTP/1.1", _get(b"")),
    Probe("Host with a path", _get(b"Host: HOST/x\r\n")),
    Probe("Host with userinfo", _get(b"Host: user@HOST\r\n")),
    Probe(
        "absolute-form with userinfo",
        _get(b"Host: HOST\r\n", b"http://user@HOST" + TARGET.encode()),
    ),
    Probe(
        "absolute-form of another scheme", _get(b"Host: HOST\r\n", b"ftp://HOST" + TARGET.encode())
    ),
    # An upgrade with a body (RFC 9110 §7.8): the body would become the new protocol's.
    Probe(
        "upgrade with Content-Length",
        _get(
            b"Host: HOST\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: %d\r\n" % len(_S)
        )
        + _S,
    ),
    Probe(
        "upgrade with a chunked body",
        _get(
            b"Host: HOST\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Transfer-Encoding: chunked\r\n"
        )
        + _CHUNKED_S,
    ),
]

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


@dataclass
class Outcome:
    status: int | None  # the first status line's code
    answers: int  # status lines received (more than one: something was smuggled)
    closed: bool  # the router closed the connection after answering
    seconds: float
    received: bytes


def send(address: tuple[str, int], payload: bytes, timeout: float = 5.0) -> Outcome:
    """Send `payload` on a fresh connection; read until the peer closes or `timeout` passes."""
    started = time.monotonic()
    received = b""
    closed = False
    with socket.create_connection(address, timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # closed on the first bytes: read its answer
            sock.sendall(payload)
        deadline = started + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                received += chunk
        except TimeoutError:
            pass
        except OSError:  # a reset after the answer is a close too
            closed = True
    statuses = _STATUS.findall(received)
    return Outcome(
        int(statuses[0]) if statuses else None,
        len(statuses),
        closed,
        time.monotonic() - started,
        received,
    )


def passed(probe: Probe, outcome: Outcome) -> bool:
    return outcome.status == probe.expect and outcome.answers == 1 and outcome.closed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="the router, HOST:PORT")
    parser.add_argument("--host", default="localhost", help="a Host the router routes")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per probe")
    args = parser.parse_args(argv)
    name, _, port = args.address.rpartition(":")
    address = (name.strip("[]") or "127.0.0.1", int(port))
    failures = 0
    for probe in PROBES:
        outcome = send(address, probe.bytes_for(args.host), args.timeout)
        ok = passed(probe, outcome)
        failures += not ok
        first = outcome.received.split(b"\r\n", 1)[0].decode("latin-1")
        print(
            f"{'ok  ' if ok else 'FAIL'} {probe.name:40} expect {probe.expect} "
            f"got {first or '(nothing)'!r} answers={outcome.answers} "
            f"closed={outcome.closed} {outcome.seconds * 1000:.0f} ms"
        )
    print(f"{len(PROBES) - failures}/{len(PROBES)} probes refused as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
