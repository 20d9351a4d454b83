"""The API's bearer token, over real HTTP: the scheme is case-insensitive (RFC 9110
§11.1), the token itself is not, and anything but the exact token is a 401."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess
from tests.integration.conftest import stop_and_check

TOKEN = "s3cret-Token"


def get(agent: AgentProcess, authorization: str | None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.putrequest("GET", "/v1/networks")
        if authorization is not None:
            conn.putheader("Authorization", authorization)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path_factory.mktemp("auth") / "data", extra=["--api-token", TOKEN])
    agent.start()
    yield agent
    stop_and_check(agent)


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TOKEN}",
        f"bearer {TOKEN}",
        f"BEARER {TOKEN}",
        f"bEaReR {TOKEN}",
        f"Bearer  {TOKEN}",  # RFC 9110 §11.4: 1*SP between the scheme and the credentials
    ],
)
def test_the_scheme_is_case_insensitive(guarded: AgentProcess, authorization: str) -> None:
    status, body = get(guarded, authorization)
    assert status == 200, body
    assert [n["name"] for n in body] == ["ingress"]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "bearer",
        "bearer ",
        f"bearer{TOKEN}",
        f"bearer {TOKEN.lower()}",
        f"bearer {TOKEN}x",
        f"bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,
        f"bearerx {TOKEN}",
        f"bearer {TOKEN} {TOKEN}",
    ],
)
def test_anything_else_is_refused(guarded: AgentProcess, authorization: str | None) -> None:
    status, body = get(guarded, authorization)
    assert status == 401, body
    assert body["error"]["code"] == "unauthorized"


def test_metrics_need_the_token_as_consuls_do(guarded: AgentProcess) -> None:
    """`/metrics` names services and nodes: it is behind the token (docs/metrics.md)."""
    conn = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 401 and json.loads(resp.read())["error"]["code"] == "unauthorized"
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert b"meshplane_services 0.0" in resp.read()
    finally:
        conn.close()
