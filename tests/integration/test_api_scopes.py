"""API token scopes over real HTTP, walked over the whole route table.

The routes come from the router of the real app (`make_app`, as the agent builds
it) and from the description the running agent serves, together: a route added
to either (a GET /metrics, the dashboard's GET /) is walked without a change
here. A read token gets 403 on every route of any other method than GET/HEAD,
and through on every GET; a write token gets through everywhere; no token, or
an unknown one, is a 401 everywhere but /v1/health.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from mesh.api.app import OPEN_PATHS, ApiDeps, make_app
from mesh.control import Control
from tests.helpers.agent import REPO, AgentProcess
from tests.integration.conftest import stop_and_check

READ = "r3ad-0nly-t0ken"
WRITE = "wr1te-t0ken-xyz"
FLAG = "fl4g-wr1te-t0ken"  # --api-token: a write token too
SECRETS = (READ, WRITE, FLAG)
READ_METHODS = {"GET", "HEAD"}
#: aiohttp's routes of no path (none expected) and HEAD (added with each GET)
EVENTS = "/v1/events"  # a stream without end: only its status line is read


def the_real_routes() -> set[tuple[str, str]]:
    """(method, path template) of every route of the app the agent builds."""
    app = make_app(
        ApiDeps(
            control=cast(Control, None),
            node="n",
            members=list,
            heartbeat=lambda *_: None,
            drain_grace=1.0,
        )
    )
    routes = set()
    for resource in app.router.resources():
        path = resource.canonical
        for route in resource:
            routes.add((route.method.upper(), path))
    return routes


def described_routes(agent: AgentProcess) -> set[tuple[str, str]]:
    status, spec = agent.request(
        "GET", "/v1/openapi.json", headers={"Authorization": f"Bearer {READ}"}
    )
    assert status == 200
    return {(method.upper(), path) for path, item in spec["paths"].items() for method in item}


def concrete(path: str) -> str:
    """A path template with each `{param}` filled: names no object, so nothing is found
    or changed by a request that gets through."""
    return re.sub(r"\{[^}]+\}", "no-such-thing", path)


def send(
    agent: AgentProcess, method: str, path: str, token: str | None
) -> tuple[int, dict[str, str], Any]:
    """One request; the event stream's status and headers only (its body has no end)."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        body = None if method in READ_METHODS else b"{}"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        answer_headers = dict(resp.getheaders())
        if path == EVENTS and resp.status == 200:
            return resp.status, answer_headers, None
        raw = resp.read()
        if not answer_headers.get("Content-Type", "").startswith("application/json"):
            return resp.status, answer_headers, raw  # the dashboard's page, /metrics' text
        return resp.status, answer_headers, (json.loads(raw) if raw else None)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def scoped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    root = tmp_path_factory.mktemp("scopes")
    tokens = root / "tokens"
    tokens.write_text(f"# operators\nwrite {WRITE}\n\n# dashboards\nread {READ}\n")
    tokens.chmod(0o644)  # readable by every user: warned about at start
    agent = AgentProcess(
        root / "data", extra=["--api-token-file", str(tokens), "--api-token", FLAG]
    )
    agent.start()
    yield agent
    stop_and_check(agent)


@pytest.fixture(scope="module")
def routes(scoped: AgentProcess) -> list[tuple[str, str]]:
    real, described = the_real_routes(), described_routes(scoped)
    walked = sorted(real | described)
    writes = [r for r in walked if r[0] not in READ_METHODS]
    reads = [r for r in walked if r[0] == "GET"]
    # Not a walk of nothing: the table as it is today, at least.
    assert len(writes) >= 11 and len(reads) >= 18, walked
    for known in [("POST", "/v1/networks"), ("DELETE", "/v1/tasks/{id}"),
                  ("PATCH", "/v1/services/{name}"), ("PUT", "/v1/keyring/primary"),
                  ("GET", EVENTS), ("GET", "/v1/openapi.json")]:  # fmt: skip
        assert known in walked
    print(f"routes walked: {len(walked)} ({len(reads)} GET, {len(writes)} other)")
    return walked


def test_a_read_token_gets_403_on_every_write_route(
    scoped: AgentProcess, routes: list[tuple[str, str]]
) -> None:
    writes = [(m, p) for m, p in routes if m not in READ_METHODS]
    for method, template in writes:
        status, headers, body = send(scoped, method, concrete(template), READ)
        assert status == 403, (method, template, body)
        assert body["error"]["code"] == "insufficient_scope"
        assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    # Nothing a read token asked for was done.
    status, _, networks = send(scoped, "POST", "/v1/networks", READ)
    assert status == 403
    status, _, networks = send(scoped, "GET", "/v1/networks", READ)
    assert [n["name"] for n in networks] == ["ingress"]
    print(f"read token: 403 on all {len(writes)} write routes")


def test_a_read_token_gets_through_on_every_get_route(
    scoped: AgentProcess, routes: list[tuple[str, str]]
) -> None:
    seen: dict[int, int] = {}
    for method, template in routes:
        if method != "GET":
            continue
        for verb in ("GET", "HEAD") if template != EVENTS else ("GET",):
            status, _, body = send(scoped, verb, concrete(template), READ)
            assert status not in (401, 403), (verb, template, body)
            assert status < 500, (verb, template, body)
            seen[status] = seen.get(status, 0) + 1
    print(f"read token on GET routes: statuses {dict(sorted(seen.items()))}")


def test_a_write_token_gets_through_everywhere(
    scoped: AgentProcess, routes: list[tuple[str, str]]
) -> None:
    for token in (WRITE, FLAG):
        for method, template in routes:
            status, _, body = send(scoped, method, concrete(template), token)
            assert status not in (401, 403), (method, template, body)
            assert status < 500, (method, template, body)


@pytest.mark.parametrize("token", [None, "unknown", READ + "x", READ[:-1], WRITE.upper()])
def test_no_token_or_an_unknown_one_is_401_everywhere_but_health(
    scoped: AgentProcess, routes: list[tuple[str, str]], token: str | None
) -> None:
    for method, template in routes:
        status, headers, body = send(scoped, method, concrete(template), token)
        # Open: the health check, and the dashboard's page and assets (mesh.api.app).
        if concrete(template) in OPEN_PATHS:
            assert status != 401
            continue
        assert status == 401, (method, template, body)
        if method != "HEAD":  # a HEAD answer has no body
            assert body["error"]["code"] == "unauthorized"
        assert headers["WWW-Authenticate"].startswith("Bearer")
    # A path no route has is refused the same way: no probing the table without a token.
    assert send(scoped, "GET", "/v1/nope", token)[0] == 401
    assert send(scoped, "DELETE", "/v1/nope", READ)[0] == 403


def test_no_token_reaches_the_log(scoped: AgentProcess) -> None:
    send(scoped, "GET", "/v1/agent", "a-wr0ng-guess")
    status, _, info = send(scoped, "GET", "/v1/agent", READ)
    assert status == 200
    assert info["config"]["api_tokens"] == "read=1,write=2"
    assert info["config"]["api_token"] == "set"
    log = scoped.log()
    assert 'api_tokens="read=1,write=2"' in log
    assert re.search(r"level=warning \S+ event=api_token_file_readable .*mode=0o644", log), log
    for secret in (*SECRETS, "a-wr0ng-guess"):
        assert secret not in log
        assert secret not in json.dumps(info)


def test_sighup_reads_the_token_file_again(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("write first-t0ken\n")
    tokens.chmod(0o600)
    agent = AgentProcess(tmp_path / "data", extra=["--api-token-file", str(tokens)])
    agent.start()
    try:
        assert send(agent, "POST", "/v1/networks", "first-t0ken")[0] == 422
        tokens.write_text("read second-t0ken\n")
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while send(agent, "GET", "/v1/networks", "second-t0ken")[0] != 200:
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.05)
        assert send(agent, "GET", "/v1/networks", "first-t0ken")[0] == 401
        assert send(agent, "POST", "/v1/networks", "second-t0ken")[0] == 403
        # A file that does not parse keeps the tokens in use, and says which line.
        tokens.write_text("read second-t0ken\nsuper bad-t0ken\n")
        agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "api_tokens_reload_failed" not in agent.log():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.05)
        assert send(agent, "GET", "/v1/networks", "second-t0ken")[0] == 200
        assert agent.proc.poll() is None
        log = agent.log()
        assert "line 2" in log
        assert "api_token_file_readable" not in log  # 0600: nobody else reads it
        for secret in ("first-t0ken", "second-t0ken", "bad-t0ken"):
            assert secret not in log
    finally:
        stop_and_check(agent)


def test_a_malformed_token_file_stops_the_start_naming_the_line(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("read fine-t0ken\n\nt0psecret-t0ken\n")
    argv = [sys.executable, "-m", "mesh", "agent", "--data-dir", str(tmp_path / "data")]
    done = subprocess.run(
        [*argv, "--api-token-file", str(tokens)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 2, done
    assert done.stderr.strip() == (
        f"mesh agent: api-token-file {tokens} line 3: expected '<scope> <token>' "
        "(scope read or write), found 1 field"
    )
    assert "t0psecret" not in done.stdout + done.stderr
