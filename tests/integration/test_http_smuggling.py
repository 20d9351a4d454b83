"""Request smuggling through the HTTP router, with raw sockets and tasks that record every byte.

A real agent routes `alpha.test` and `beta.test` to one `RecordingUpstream`
each (tests/helpers/recording_upstream.py: a naive origin server that keeps
every byte and every request it parsed). Every probe of tests/tools/smuggle.py
must be refused (400, or 501) with one answer and a close, and no probe, nor
the request hidden in its body, may reach a task; a request after a refused
one reuses the pooled connection to the task and gets its own answer.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess
from tests.helpers.recording_upstream import RecordingUpstream
from tests.tools.smuggle import PROBES, SMUGGLED_TARGET, TARGET, Probe, passed, send


@dataclass
class Rig:
    agent: AgentProcess
    alpha: RecordingUpstream
    beta: RecordingUpstream

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.agent.http_port)


def _service(agent: AgentProcess, name: str, host: str, port: int) -> None:
    status, body = agent.request(
        "POST",
        "/v1/services",
        {"name": name, "labels": {"mesh.http.hosts": host, "mesh.http.port": "80"}},
    )
    assert status == 201, body
    status, body = agent.request(
        "POST", f"/v1/services/{name}/tasks", {"address": "127.0.0.1", "ports": {"80": port}}
    )
    assert status == 201, body


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("smuggle")
    alpha, beta = RecordingUpstream().start(), RecordingUpstream().start()
    # An upstream timeout well past the probes' 5 s: a probe the router forwarded
    # instead of refusing shows as no answer, not as a quick 504.
    agent = AgentProcess(root / "agent", extra=["--http-upstream-timeout", "10"]).start()
    try:
        _service(agent, "alpha", "alpha.test", alpha.port)
        _service(agent, "beta", "beta.test", beta.port)
        rig = Rig(agent, alpha, beta)
        deadline = time.monotonic() + 10
        while ask(rig, b"GET /ready HTTP/1.1\r\nHost: alpha.test\r\n\r\n")[0] != 200:
            assert time.monotonic() < deadline, "the route never became ready"
            time.sleep(0.1)
        yield rig
    finally:
        agent.stop()
        alpha.stop()
        beta.stop()


def ask(rig: Rig, request: bytes, sock: socket.socket | None = None) -> tuple[int, dict[str, Any]]:
    """One request (on `sock`, kept alive, or a fresh connection): its status and JSON answer."""
    own = sock is None
    conn = sock or socket.create_connection(rig.address, timeout=10)
    try:
        conn.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = conn.recv(65536)
            assert chunk, received
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            chunk = conn.recv(65536)
            assert chunk, received
            body += chunk
        assert len(body) == length, (head, body)  # nothing more than the one answer
        status = int(head.split(b" ")[1])
        return status, json.loads(body) if status == 200 else {"text": body.decode()}
    finally:
        if own:
            conn.close()


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_a_probe_is_refused_closed_and_reaches_no_task(rig: Rig, probe: Probe) -> None:
    before = len(rig.alpha.requests)
    outcome = send(rig.address, probe.bytes_for("alpha.test"))
    print(
        f"{probe.name}: {outcome.received[:60]!r} closed={outcome.closed} "
        f"in {outcome.seconds * 1000:.0f} ms"
    )
    assert passed(probe, outcome), outcome.received[:300]
    assert outcome.seconds < 5  # answered at once, not after a task's timeout
    reached = [r.target for r in rig.alpha.requests[before:]]
    assert TARGET not in reached and SMUGGLED_TARGET not in reached, reached


def test_a_victim_on_the_pooled_connection_gets_its_own_answer(rig: Rig) -> None:
    """The issue's attack: `Connection: Content-Length` on a kept-alive task connection."""
    with socket.create_connection(rig.address, timeout=10) as warm:
        status, first = ask(rig, b"GET /warm HTTP/1.1\r\nHost: alpha.test\r\n\r\n", warm)
    assert status == 200
    attack = next(p for p in PROBES if p.name == "connection: content-length")
    assert passed(attack, send(rig.address, attack.bytes_for("alpha.test")))
    for number in range(5):
        status, answer = ask(rig, b"GET /victim/%d HTTP/1.1\r\nHost: alpha.test\r\n\r\n" % number)
        assert status == 200 and answer["target"] == f"/victim/{number}", answer
    # The refused request left the pooled connection as it was: the victims used it.
    assert answer["conn"] == first["conn"], (first, answer)
    assert SMUGGLED_TARGET not in rig.alpha.targets()
    assert SMUGGLED_TARGET.encode() not in b"".join(rig.alpha.raw.values())


def _answers(sock: socket.socket, count: int) -> list[tuple[int, dict[str, Any]]]:
    """`count` responses read in order from one kept-alive connection; a pipelined
    request's answer may come in the same read as the one before it."""
    stream, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in stream:
            chunk = sock.recv(65536)
            assert chunk, (answers, stream)
            stream += chunk
        head, _, rest = stream.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, (answers, stream)
            rest += chunk
        body, stream = rest[:length], rest[length:]
        status = int(head.split(b" ")[1])
        answers.append((status, json.loads(body) if status == 200 else {"text": body.decode()}))
    sock.settimeout(0.5)  # nothing may follow the answers that were asked for
    with contextlib.suppress(TimeoutError):
        stream += sock.recv(65536)
    assert stream == b"", (answers, stream)
    return answers


def test_a_response_the_task_was_not_asked_for_is_never_an_answer(rig: Rig) -> None:
    """The task answers `/trail` twice in one send: the second is no answer to `/next`."""
    with socket.create_connection(rig.address, timeout=10) as sock:
        sock.sendall(
            b"GET /trail HTTP/1.1\r\nHost: alpha.test\r\n\r\n"
            b"GET /next HTTP/1.1\r\nHost: alpha.test\r\n\r\n"
        )
        (status, answer), (next_status, next_answer) = _answers(sock, 2)
    assert status == 200 and answer["target"] == "/trail", answer
    assert next_status == 200 and next_answer["target"] == "/next", next_answer
    # The connection that carried the extra bytes is closed: no request follows /trail on it.
    status, later = ask(rig, b"GET /later HTTP/1.1\r\nHost: alpha.test\r\n\r\n")
    assert status == 200 and later["target"] == "/later", later
    trail_conn = next(r.conn for r in rig.alpha.requests if r.target == "/trail")
    assert [r.target for r in rig.alpha.requests if r.conn == trail_conn][-1] == "/trail"


def test_an_upgrade_with_a_body_is_answered_at_once(rig: Rig) -> None:
    started = time.monotonic()
    outcome = send(
        rig.address,
        b"GET /ws HTTP/1.1\r\nHost: alpha.test\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
        15,
    )
    seconds = time.monotonic() - started
    print(f"upgrade with a body answered {outcome.status} in {seconds * 1000:.0f} ms")
    assert outcome.received.startswith(b"HTTP/1.1 400 Bad Request\r\n"), outcome.received[:200]
    assert outcome.closed and seconds < 5
    assert "/ws" not in rig.alpha.targets()


def test_the_absolute_form_authority_wins_over_host(rig: Rig) -> None:
    status, answer = ask(rig, b"GET http://beta.test/abs?q=1 HTTP/1.1\r\nHost: alpha.test\r\n\r\n")
    assert status == 200, answer
    recorded = next(
        r for r in rig.beta.requests if r.seq == answer["seq"] and r.conn == answer["conn"]
    )
    assert recorded.target == "/abs?q=1"  # origin-form to the task
    assert recorded.header("host") == "beta.test"
    assert recorded.header("x-forwarded-host") == "beta.test"
    assert "/abs?q=1" not in rig.alpha.targets()


def test_every_status_of_the_router_has_its_reason_phrase(rig: Rig) -> None:
    long_target = b"/" + b"a" * 40_000
    outcome = send(rig.address, b"GET %s HTTP/1.1\r\nHost: alpha.test\r\n\r\n" % long_target)
    assert outcome.received.startswith(b"HTTP/1.1 414 URI Too Long\r\n"), outcome.received[:80]
    outcome = send(rig.address, b"GET / HTTP/1.1\r\nHost: nobody.test\r\n\r\n", 2)
    assert outcome.received.startswith(b"HTTP/1.1 404 Not Found\r\n")
