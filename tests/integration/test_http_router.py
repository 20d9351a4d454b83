"""The HTTP routing mesh end to end: a real agent, real backends, curl and raw sockets.

One agent (router in its own loop, a 1 s header timeout and a 2 s upstream
timeout so that the timeout cases are quick) and one backend process serving
every task. Services are registered through the API with each label form of
docs/design.md; what the backends saw is read from their `/whoami` answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect as ws_connect

from tests.helpers.agent import AgentProcess, free_port
from tests.helpers.certs import self_signed
from tests.helpers.http_backend import BackendProcess

HUNDRED_MB = 100 << 20
#: what the router may add to its resident memory while 100 MB stream through it
RSS_BOUND = 64 << 20


class Mesh:
    def __init__(
        self, agent: AgentProcess, ports: dict[str, int], certs: dict[str, Path], https_port: int
    ) -> None:
        self.agent = agent
        self.ports = ports
        self.certs = certs
        self.https_port = https_port

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.agent.http_port}"


def _service(agent: AgentProcess, name: str, labels: dict[str, str], tasks: list[int]) -> None:
    status, body = agent.request("POST", "/v1/services", {"name": name, "labels": labels})
    assert status == 201, body
    for port in tasks:
        status, body = agent.request(
            "POST", f"/v1/services/{name}/tasks", {"address": "127.0.0.1", "ports": {"80": port}}
        )
        assert status == 201, body


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("hrm")
    certs: dict[str, Path] = {}
    keys: dict[str, Path] = {}
    for host in ("x.test", "y.test", "pass.test"):
        certs[host], keys[host] = self_signed(root, host)
    names = ["a0", "a1", "b0", "g0", "g1", "p0"]
    ports = {name: free_port() for name in names}
    specs = {name: str(port) for name, port in ports.items()}
    specs["p0"] += f",{certs['pass.test']},{keys['pass.test']}"
    backend = BackendProcess(specs, root / "backend.log").start()
    https_port = free_port()
    agent = AgentProcess(
        root / "agent",
        extra=[
            "--http-header-timeout",
            "1",
            "--http-upstream-timeout",
            "2",
            "--https",
            f"127.0.0.1:{https_port}",
            "--http-access-log",
            "on",
            "--tls-cert",
            f"x.test={certs['x.test']},{keys['x.test']}",
            "--tls-cert",
            f"y.test={certs['y.test']},{keys['y.test']}",
        ],
    )
    agent.start()
    try:
        _service(
            agent,
            "alpha",
            {"mesh.http.hosts": "alpha.test,x.test,y.test", "mesh.http.port": "80"},
            [ports["a0"], ports["a1"]],
        )
        _service(agent, "beta", {"com.docker.ucp.mesh.http": "80=http://beta.test"}, [ports["b0"]])
        _service(
            agent,
            "gamma",
            {
                "com.docker.ucp.mesh.http.1": "external_route=http://gamma.test,internal_port=80,"
                "sticky_sessions=SRVID"
            },
            [ports["g0"], ports["g1"]],
        )
        _service(agent, "empty", {"mesh.http.hosts": "empty.test", "mesh.http.port": "80"}, [])
        _service(
            agent, "dead", {"mesh.http.hosts": "dead.test", "mesh.http.port": "80"}, [free_port()]
        )
        _service(
            agent,
            "secure",
            {"com.docker.ucp.mesh.http.443": "external_route=sni://pass.test,internal_port=80"},
            [ports["p0"]],
        )
        yield Mesh(agent, ports, certs, https_port)
    finally:
        agent.stop()
        backend.stop()


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(timeout), *args],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        check=False,
    )


def get(
    mesh: Mesh, host: str, path: str = "/whoami", *extra: str
) -> tuple[int, str, dict[str, str]]:
    result = curl("-D", "-", "-H", f"Host: {host}", *extra, f"http://{mesh.http}{path}")
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition("\n\n")  # text mode turned CRLF into LF
    lines = head.split("\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), body, headers


def whoami(mesh: Mesh, host: str, *extra: str) -> dict[str, Any]:
    status, body, _ = get(mesh, host, "/whoami", *extra)
    assert status == 200, body
    answer: dict[str, Any] = json.loads(body)
    return answer


def test_routes_by_host_among_three_services(mesh: Mesh) -> None:
    seen = {
        host: {whoami(mesh, host)["name"] for _ in range(4)}
        for host in ("alpha.test", "beta.test", "gamma.test")
    }
    assert seen["alpha.test"] == {"a0", "a1"}  # round robin over both tasks
    assert seen["beta.test"] == {"b0"}
    assert seen["gamma.test"] <= {"g0", "g1"}
    # The Host header matches without case and without its port.
    assert whoami(mesh, "BETA.test:8080")["name"] == "b0"


def test_forwarding_headers_reach_the_task(mesh: Mesh) -> None:
    answer = whoami(
        mesh,
        "alpha.test",
        "-H",
        "X-Forwarded-For: 192.0.2.9",
        "-H",
        "Connection: keep-alive, X-Secret",
        "-H",
        "X-Secret: hop",
    )
    headers = {k.lower(): v for k, v in answer["headers"].items()}
    assert headers["x-forwarded-for"] == "192.0.2.9, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "alpha.test"
    assert headers["forwarded"] == 'for=127.0.0.1;proto=http;host="alpha.test"'
    assert "x-secret" not in headers  # named by Connection: hop-by-hop


def test_status_codes_of_the_router(mesh: Mesh) -> None:
    assert get(mesh, "nobody.test")[0] == 404
    assert get(mesh, "empty.test")[0] == 503
    assert get(mesh, "dead.test")[0] == 502
    status, body, _ = get(mesh, "alpha.test", "/sleep/5")
    assert status == 504, body
    # The router keeps serving after each of them.
    assert get(mesh, "alpha.test")[0] == 200


def test_sticky_cookie_keeps_a_client_on_one_task(mesh: Mesh, tmp_path: Path) -> None:
    jar = tmp_path / "cookies"
    first = whoami(mesh, "gamma.test", "-c", str(jar))
    cookie = [line.split("\t") for line in jar.read_text().splitlines() if "\tSRVID\t" in line]
    assert cookie, jar.read_text()
    assert {whoami(mesh, "gamma.test", "-b", str(jar))["name"] for _ in range(6)} == {first["name"]}
    # Without the cookie the requests are spread again.
    assert {whoami(mesh, "gamma.test")["name"] for _ in range(6)} == {"g0", "g1"}


def test_websocket_echo_through_the_router(mesh: Mesh) -> None:
    sock = socket.create_connection(("127.0.0.1", mesh.agent.http_port))
    with ws_connect("ws://alpha.test/ws", sock=sock, open_timeout=10) as ws:
        for text in ("hello", "x" * 100_000, "last"):
            ws.send(text)
            reply = ws.recv(timeout=10)
            assert isinstance(reply, str)
            name, _, echoed = reply.partition(":")
            assert name in ("a0", "a1") and echoed == text
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=10) == b"\x00\x01binary"


class RssSampler:
    """The largest resident set of a process while it works, read from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.read()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_100mb_chunked_upload_and_download_keep_memory_bounded(mesh: Mesh) -> None:
    assert mesh.agent.proc is not None
    pid = mesh.agent.proc.pid
    with RssSampler(pid) as rss:
        upload = subprocess.run(
            f"head -c {HUNDRED_MB} /dev/zero | curl -sS --max-time 120 -X POST -T - "
            f"-H 'Host: alpha.test' -H 'Transfer-Encoding: chunked' "
            f"http://{mesh.http}/sink",
            shell=True,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    assert upload.returncode == 0, upload.stderr
    answer = json.loads(upload.stdout)
    assert answer["bytes"] == HUNDRED_MB
    assert answer["sha256"] == hashlib.sha256(bytes(HUNDRED_MB)).hexdigest()
    print(f"upload: router RSS {rss.start >> 20} MiB -> peak {rss.peak >> 20} MiB")
    assert rss.peak - rss.start < RSS_BOUND

    with RssSampler(pid) as rss:
        download = curl(
            "-o",
            os.devnull,
            "-w",
            "%{size_download} %{http_code}",
            "-H",
            "Host: alpha.test",
            f"http://{mesh.http}/bytes/{HUNDRED_MB}",
            timeout=120,
        )
    assert download.returncode == 0, download.stderr
    assert download.stdout.split() == [str(HUNDRED_MB), "200"]
    print(f"download: router RSS {rss.start >> 20} MiB -> peak {rss.peak >> 20} MiB")
    assert rss.peak - rss.start < RSS_BOUND


def test_a_slow_peer_holds_the_other_side_back(mesh: Mesh) -> None:
    """Flow control: 100 MB meet a peer that does not read for a second; the router must not
    soak them up meanwhile (without back-pressure it would hold them all)."""
    assert mesh.agent.proc is not None
    with RssSampler(mesh.agent.proc.pid) as rss:
        upload = subprocess.run(
            f"head -c {HUNDRED_MB} /dev/zero | curl -sS --max-time 120 -X POST -T - "
            f"-H 'Host: beta.test' http://{mesh.http}/slowsink?wait=1",
            shell=True,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    assert upload.returncode == 0, upload.stderr
    assert json.loads(upload.stdout)["bytes"] == HUNDRED_MB
    print(f"slow task: router RSS {rss.start >> 20} MiB -> peak {rss.peak >> 20} MiB")
    assert rss.peak - rss.start < RSS_BOUND

    with (
        RssSampler(mesh.agent.proc.pid) as rss,
        socket.create_connection(("127.0.0.1", mesh.agent.http_port), timeout=30) as sock,
    ):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.sendall(
            f"GET /bytes/{HUNDRED_MB} HTTP/1.1\r\nHost: beta.test\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        time.sleep(1)  # a client that does not read yet
        received = 0
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    assert received > HUNDRED_MB  # the body, chunk framing and head
    print(f"slow client: router RSS {rss.start >> 20} MiB -> peak {rss.peak >> 20} MiB")
    assert rss.peak - rss.start < RSS_BOUND


def raw(mesh: Mesh, payload: bytes, *, wait: float = 5.0) -> bytes:
    """Send bytes, read until the router closes the connection (or `wait` passes)."""
    with socket.create_connection(("127.0.0.1", mesh.agent.http_port), timeout=wait) as sock:
        sock.sendall(payload)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return received + b"<still open>"
        return received


SMUGGLING = {
    "CL.TE": b"POST /sink HTTP/1.1\r\nHost: alpha.test\r\nContent-Length: 6\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
    "TE.CL": b"POST /sink HTTP/1.1\r\nHost: alpha.test\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n",
    "duplicate Content-Length": b"POST /sink HTTP/1.1\r\nHost: alpha.test\r\n"
    b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "obfuscated TE": b"POST /sink HTTP/1.1\r\nHost: alpha.test\r\n"
    b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "bad chunk size": b"POST /sink HTTP/1.1\r\nHost: alpha.test\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n-5\r\nabcde\r\n0\r\n\r\n",
    "obs-fold": b"GET /whoami HTTP/1.1\r\nHost: alpha.test\r\nX-A: b\r\n c\r\n\r\n",
    "TE in HTTP/1.0": b"POST /sink HTTP/1.0\r\nHost: alpha.test\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two Host headers": b"GET /whoami HTTP/1.1\r\nHost: alpha.test\r\nHost: beta.test\r\n\r\n",
}


@pytest.mark.parametrize("attempt", list(SMUGGLING))
def test_smuggling_attempts_are_rejected_and_closed(mesh: Mesh, attempt: str) -> None:
    answer = raw(mesh, SMUGGLING[attempt])
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert answer.count(b"HTTP/1.1") == 1  # nothing smuggled got its own answer
    assert b"Connection: close" in answer and not answer.endswith(b"<still open>")


def test_limits_answer_413_and_431(mesh: Mesh) -> None:
    too_big = raw(
        mesh, b"POST /sink HTTP/1.1\r\nHost: alpha.test\r\nContent-Length: 99999999999\r\n\r\n"
    )
    assert too_big.startswith(b"HTTP/1.1 413 ")
    huge_head = raw(
        mesh,
        b"GET /whoami HTTP/1.1\r\nHost: alpha.test\r\n" + b"X-Pad: " + b"a" * 40_000 + b"\r\n\r\n",
    )
    assert huge_head.startswith(b"HTTP/1.1 431 ")


def test_pipelined_requests_are_answered_in_order(mesh: Mesh) -> None:
    answer = raw(
        mesh,
        b"GET /whoami HTTP/1.1\r\nHost: beta.test\r\n\r\n"
        b"GET /whoami HTTP/1.1\r\nHost: nobody.test\r\n\r\n"
        b"GET /whoami HTTP/1.1\r\nHost: alpha.test\r\nConnection: close\r\n\r\n",
    )
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses == [b"200", b"404", b"200"], answer
    assert answer.index(b'"b0"') < answer.index(b"404 Not Found") < answer.rindex(b'"a')


def test_slowloris_is_answered_408_and_closed(mesh: Mesh) -> None:
    with socket.create_connection(("127.0.0.1", mesh.agent.http_port), timeout=10) as sock:
        sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: alpha.test\r\n")
        received = b""
        started = time.monotonic()
        try:
            # One header byte every 0.2 s: it would never finish; the router must not wait.
            while time.monotonic() - started < 10:
                sock.sendall(b"X")
                time.sleep(0.2)
        except OSError:
            pass  # the router closed the connection
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except OSError:
            pass
    assert received.startswith(b"HTTP/1.1 408 "), received


def test_idle_connection_without_a_request_is_closed(mesh: Mesh) -> None:
    assert raw(mesh, b"", wait=8.0) == b""


def test_tls_terminated_with_the_certificate_of_each_sni_name(mesh: Mesh) -> None:
    for host in ("x.test", "y.test"):
        result = curl(
            "--resolve",
            f"{host}:{mesh.https_port}:127.0.0.1",
            "--cacert",
            str(mesh.certs[host]),
            f"https://{host}:{mesh.https_port}/whoami",
        )
        assert result.returncode == 0, result.stderr  # curl checked the name in the cert
        answer = json.loads(result.stdout)
        assert answer["name"] in ("a0", "a1")
        assert answer["headers"]["X-Forwarded-Proto"] == "https"


def test_websocket_over_terminated_tls(mesh: Mesh) -> None:
    context = ssl.create_default_context(cafile=str(mesh.certs["y.test"]))
    sock = socket.create_connection(("127.0.0.1", mesh.https_port))
    with ws_connect(
        "wss://y.test/ws", sock=sock, ssl=context, server_hostname="y.test", open_timeout=10
    ) as ws:
        ws.send("over tls")
        reply = ws.recv(timeout=10)
        assert isinstance(reply, str) and reply.endswith(":over tls")


def test_sni_passthrough_reaches_the_task_that_terminates_tls(mesh: Mesh) -> None:
    host = "pass.test"
    result = curl(
        "--resolve",
        f"{host}:{mesh.https_port}:127.0.0.1",
        "--cacert",
        str(mesh.certs[host]),
        f"https://{host}:{mesh.https_port}/whoami",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["name"] == "p0"  # the router holds no certificate for pass.test
    assert "X-Forwarded-For" not in answer["headers"]  # bytes passed, not proxied


def test_access_log_lines(mesh: Mesh) -> None:
    whoami(mesh, "beta.test")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [
            line
            for line in mesh.agent.log().splitlines()
            if "event=http_request" in line and "host=beta.test" in line
        ]
        if lines:
            break
        time.sleep(0.05)
    assert lines and "status=200" in lines[-1] and "service=beta" in lines[-1]


def test_https_port_closes_on_bytes_that_are_not_tls(mesh: Mesh) -> None:
    with socket.create_connection(("127.0.0.1", mesh.https_port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x.test\r\n\r\n")
        try:
            answer = sock.recv(100)
        except ConnectionResetError:  # closed with the peeked bytes unread: a reset
            answer = b""
        assert answer == b""


def test_an_unknown_server_name_gets_the_default_certificate(mesh: Mesh) -> None:
    context = ssl.create_default_context(cafile=str(mesh.certs["x.test"]))
    context.check_hostname = False  # the name asked for is not the certificate's
    with (
        socket.create_connection(("127.0.0.1", mesh.https_port), timeout=5) as raw_sock,
        context.wrap_socket(raw_sock, server_hostname="other.test") as tls,
    ):
        peer = tls.getpeercert()
        assert peer is not None and ("commonName", "x.test") in [
            item for rdn in peer["subject"] for item in rdn
        ]
        tls.sendall(b"GET /whoami HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404 ")
