"""The mesh CLI against a canned HTTP agent on a loopback socket.

A stdlib `http.server` answers each (method, path) with a canned status and
JSON body and records every request, so these tests check what the CLI sends
(paths, query, bodies, the bearer token) and what it prints and returns
(tables, `--json`, one-line errors, exit codes) without a real agent.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mesh.cli.main import main

Reply = tuple[int, Any]  # status, JSON body (None: empty; bytes: sent as they are)


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeAgent:
    address: str
    routes: dict[tuple[str, str], Reply] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def answer(self, method: str, path: str, status: int, body: Any = None) -> None:
        self.routes[(method, path)] = (status, body)

    def requests(self) -> list[tuple[str, str]]:
        return [(s.method, s.path) for s in self.seen]


def _handler(agent: FakeAgent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            agent.seen.append(
                Seen(
                    self.command,
                    url.path,
                    dict(urllib.parse.parse_qsl(url.query)),
                    dict(self.headers.items()),
                    json.loads(raw) if raw else None,
                )
            )
            status, body = agent.routes.get(
                (self.command, url.path),
                (404, {"error": {"code": "not_found", "message": f"no route {url.path}"}}),
            )
            data = (
                body
                if isinstance(body, bytes)
                else b""
                if body is None
                else json.dumps(body).encode()
            )
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAgent]:
    fake = FakeAgent(address="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.address = f"127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MESH_API", fake.address)
    monkeypatch.delenv("MESH_API_TOKEN", raising=False)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


NETWORK: dict[str, Any] = {
    "name": "front",
    "id": "0123456789abcdefghijklmno",
    "driver": "overlay",
    "subnet": "10.0.1.0/24",
    "gateway": "10.0.1.1",
    "labels": {},
    "version": [3, "n1"],
}
SERVICE: dict[str, Any] = {
    "name": "web",
    "id": "s" * 25,
    "networks": ["front"],
    "endpoint_mode": "vip",
    "ports": [
        {"protocol": "tcp", "target_port": 80, "published_port": 8080, "publish_mode": "ingress"}
    ],
    "labels": {"tier": "web"},
    "vips": [{"network": "front", "address": "10.0.1.2"}],
    "health_check": None,
    "version": [7, "n1"],
}
TASK: dict[str, Any] = {
    "id": "abcdefghijklmnopqrstuvwxy",
    "name": "web.1.abcdefghijklmnopqrstuvwxy",
    "service": "web",
    "slot": 1,
    "node": "n1",
    "address": "192.0.2.7",
    "ports": {"80": 31001},
    "state": "running",
    "health": "healthy",
}


def test_network_ls_table(agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.answer("GET", "/v1/networks", 200, [NETWORK])
    code, out, err = run(capsys, "network", "ls")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "ID             NAME    DRIVER    SCOPE   SUBNET        GATEWAY    INTERNAL",
        "0123456789ab   front   overlay   swarm   10.0.1.0/24   10.0.1.1   no",
    ]


def test_json_on_a_list_is_the_bare_array(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answer("GET", "/v1/networks", 200, [NETWORK])
    code, out, _ = run(capsys, "network", "ls", "--json")
    assert (code, json.loads(out)) == (0, [NETWORK])


def test_inspect_prints_the_object_indented(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answer("GET", "/v1/services/web", 200, SERVICE)
    code, out, _ = run(capsys, "service", "inspect", "web")
    assert (code, json.loads(out)) == (0, SERVICE)
    assert out.startswith('{\n  "name": "web"')


def test_create_prints_the_id_or_the_object(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answer("POST", "/v1/networks", 201, NETWORK)
    assert run(
        capsys, "network", "create", "front", "--subnet", "10.0.1.0/24", "--label", "a=b"
    ) == (0, NETWORK["id"] + "\n", "")
    code, out, _ = run(capsys, "--json", "network", "create", "front")
    assert (code, json.loads(out)) == (0, NETWORK)
    first, second = agent.seen
    assert first.body == {"name": "front", "subnet": "10.0.1.0/24", "labels": {"a": "b"}}
    assert first.headers["Content-Type"] == "application/json"
    assert second.body == {"name": "front"}


def test_service_create_sends_the_parsed_specs(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answer("POST", "/v1/services", 201, SERVICE)
    code, out, _ = run(
        capsys,
        "service",
        "create",
        "web",
        "--network",
        "front",
        "--publish",
        "8080:80",
        "-p",
        "53/udp",
        "--endpoint-mode",
        "vip",
        "--label",
        "tier=web",
        "--health-check",
        "http:/healthz,interval=500ms",
    )
    assert (code, out) == (0, SERVICE["id"] + "\n")
    assert agent.seen[0].body == {
        "name": "web",
        "networks": ["front"],
        "ports": [
            {"target_port": 80, "published_port": 8080, "protocol": "tcp"},
            {"target_port": 53, "protocol": "udp"},
        ],
        "endpoint_mode": "vip",
        "labels": {"tier": "web"},
        "health_check": {"type": "http", "path": "/healthz", "interval": 0.5},
    }


def test_service_ls_fetches_tasks_once(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answer("GET", "/v1/services", 200, [SERVICE])
    agent.answer("GET", "/v1/tasks", 200, [TASK, TASK | {"id": "x", "health": "starting"}])
    code, out, _ = run(capsys, "service", "ls")
    assert code == 0
    assert out.splitlines()[1].split() == [
        "ssssssssssss",
        "web",
        "vip",
        "front",
        "10.0.1.2",
        "*:8080->80/tcp",
        "1/2",
    ]
    assert agent.requests() == [("GET", "/v1/services"), ("GET", "/v1/tasks")]


def test_update_is_a_read_modify_write_with_the_version(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answer("GET", "/v1/services/web", 200, SERVICE)
    agent.answer("PATCH", "/v1/services/web", 200, SERVICE | {"version": [8, "n1"]})
    code, out, _ = run(
        capsys,
        "service",
        "update",
        "web",
        "--publish-rm",
        "8080",
        "--publish-add",
        "9090:80",
        "--label-add",
        "x=y",
        "--no-health-check",
    )
    assert (code, out) == (0, "web\n")
    assert agent.requests() == [("GET", "/v1/services/web"), ("PATCH", "/v1/services/web")]
    patch = agent.seen[1]
    assert patch.query == {"version": "7"}
    assert patch.body == {
        "ports": [{"target_port": 80, "published_port": 9090, "protocol": "tcp"}],
        "labels": {"tier": "web", "x": "y"},
        "health_check": None,
    }


def test_a_stale_update_reports_the_conflict(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answer("GET", "/v1/services/web", 200, SERVICE)
    agent.answer(
        "PATCH",
        "/v1/services/web",
        409,
        {"error": {"code": "conflict", "message": "service 'web' changed since version 7"}},
    )
    assert run(capsys, "service", "update", "web", "--endpoint-mode", "dnsrr") == (
        1,
        "",
        "mesh: service 'web' changed since version 7 (conflict)\n",
    )


def test_an_update_whose_removal_misses_sends_nothing(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answer("GET", "/v1/services/web", 200, SERVICE)
    assert run(capsys, "service", "update", "web", "--network-rm", "back") == (
        1,
        "",
        "mesh: service 'web' is not attached to network 'back'\n",
    )
    assert agent.requests() == [("GET", "/v1/services/web")]


def test_an_api_error_is_one_line_and_exit_1(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answer(
        "GET",
        "/v1/networks/nope",
        404,
        {"error": {"code": "not_found", "message": "network 'nope' not found"}},
    )
    assert run(capsys, "network", "inspect", "nope") == (
        1,
        "",
        "mesh: network 'nope' not found (not_found)\n",
    )


def test_an_error_without_an_error_body(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answer("GET", "/v1/members", 502, b"<html>bad gateway</html>")
    assert run(capsys, "members") == (1, "", "mesh: Bad Gateway (http_502)\n")


def test_an_answer_that_is_not_json(agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.answer("GET", "/v1/members", 200, b"<html>")
    assert run(capsys, "members") == (
        1,
        "",
        "mesh: the agent answered with something that is not JSON\n",
    )


def test_the_token_is_sent_as_a_bearer(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent.answer("GET", "/v1/members", 200, [])
    run(capsys, "members")
    run(capsys, "members", "--token", "s3cret")
    monkeypatch.setenv("MESH_API_TOKEN", "from-env")
    run(capsys, "members")
    run(capsys, "--token", "flag-wins", "members")
    tokens = [s.headers.get("Authorization") for s in agent.seen]
    assert tokens == [None, "Bearer s3cret", "Bearer from-env", "Bearer flag-wins"]


@pytest.mark.parametrize("form", ["{}", "http://{}", "http://{}/"])
def test_api_address_forms(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    monkeypatch.delenv("MESH_API")
    agent.answer("GET", "/v1/members", 200, [])
    assert run(capsys, "--api", form.format(agent.address), "members") == (
        0,
        "NAME   ADDRESS   STATUS   INCARNATION\n",
        "",
    )


def test_mesh_api_from_the_environment(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_API", f"http://{agent.address}")
    agent.answer(
        "GET",
        "/v1/members",
        200,
        [
            {
                "name": "n2",
                "address": "192.0.2.2",
                "port": 7946,
                "status": "suspect",
                "incarnation": 4,
            },
            {
                "name": "n1",
                "address": "192.0.2.1",
                "port": 7946,
                "status": "alive",
                "incarnation": 1,
            },
        ],
    )
    code, out, _ = run(capsys, "members")
    assert (code, out.splitlines()) == (
        0,
        [
            "NAME   ADDRESS          STATUS    INCARNATION",
            "n1     192.0.2.1:7946   alive     1",
            "n2     192.0.2.2:7946   suspect   4",
        ],
    )


def test_connection_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = run(capsys, "--api", f"127.0.0.1:{port}", "network", "ls")
    assert (code, out) == (1, "")
    assert err == f"mesh: cannot reach the agent at 127.0.0.1:{port}: Connection refused\n"


def test_rm_prints_the_name(agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.answer("DELETE", "/v1/services/web", 204)
    agent.answer("DELETE", "/v1/networks/front", 204)
    assert run(capsys, "service", "rm", "web") == (0, "web\n", "")
    assert run(capsys, "network", "rm", "front", "--json") == (0, "", "")


def test_names_are_escaped_in_paths(agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "network", "inspect", "../health")
    assert agent.seen[0].path == "/v1/networks/..%2Fhealth"


def test_task_add_and_ls(agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.answer("POST", "/v1/services/web/tasks", 201, TASK)
    agent.answer("GET", "/v1/tasks", 200, [TASK])
    assert run(capsys, "task", "add", "web", "--address", "192.0.2.7", "--port", "80=31001") == (
        0,
        TASK["id"] + "\n",
        "",
    )
    assert agent.seen[0].body == {"address": "192.0.2.7", "ports": {"80": 31001}}
    code, out, _ = run(capsys, "task", "ls", "web", "--node", "n1")
    assert code == 0
    assert agent.seen[1].query == {"service": "web", "node": "n1", "limit": "500"}  # a page
    assert out.splitlines()[1].split() == [
        "abcdefghijkl",
        TASK["name"],
        "web",
        "n1",
        "192.0.2.7",
        "80->31001",
        "running",
        "healthy",
    ]


def test_task_rm_by_the_short_id(agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.answer("GET", "/v1/tasks", 200, [TASK])
    agent.answer("DELETE", f"/v1/tasks/{TASK['id']}", 202, TASK | {"state": "draining"})
    assert run(capsys, "task", "rm", "abcdefghijkl") == (0, TASK["id"] + "\n", "")
    assert agent.requests() == [
        ("GET", "/v1/tasks/abcdefghijkl"),
        ("GET", "/v1/tasks"),
        ("DELETE", f"/v1/tasks/{TASK['id']}"),
    ]


def test_task_inspect_by_name_and_unknown(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answer("GET", "/v1/tasks", 200, [TASK])
    code, out, _ = run(capsys, "task", "inspect", TASK["name"])
    assert (code, json.loads(out)) == (0, TASK)
    code, out, err = run(capsys, "task", "inspect", "zzz")
    assert (code, out, err) == (1, "", "mesh: no route /v1/tasks/zzz (not_found)\n")


def test_an_ambiguous_task_prefix(agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.answer("GET", "/v1/tasks", 200, [TASK, TASK | {"id": "abcz", "name": "web.2.abcz"}])
    assert run(capsys, "task", "rm", "abc") == (
        1,
        "",
        "mesh: task 'abc' is ambiguous: 2 task ids start with it\n",
    )
    assert ("DELETE", "/v1/tasks/abc") not in agent.requests()
