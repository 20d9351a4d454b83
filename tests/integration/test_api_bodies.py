"""Bodies the agent cannot decode, against a real agent: a 400 in shape, never a 500.

A body sent with `Content-Encoding: gzip` (or deflate) is decompressed by
aiohttp while the handler reads it; a corrupt one made `request.read()` raise
aiohttp's RequestPayloadError, which fell through to the internal-error path
(500, `api_internal_error` in the log). `stop_and_check` fails the test on any
such log line.
"""

from __future__ import annotations

import gzip
import http.client
import json
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess
from tests.integration.conftest import stop_and_check


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path_factory.mktemp("bodies") / "data")
    try:
        agent.start()
        status, _ = agent.request("POST", "/v1/services", {"name": "web"})
        assert status == 201
        yield agent
    finally:
        stop_and_check(agent)


def _send(
    agent: AgentProcess, method: str, path: str, body: bytes, encoding: str
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request(
            method,
            path,
            body=body,
            headers={"Content-Encoding": encoding, "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


WRITES = [
    ("POST", "/v1/networks"),
    ("POST", "/v1/services"),
    ("PATCH", "/v1/services/web"),
    ("POST", "/v1/services/web/tasks"),
    ("POST", "/v1/keyring"),
]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize(("method", "path"), WRITES)
def test_corrupt_compressed_body_is_400(
    agent: AgentProcess, method: str, path: str, encoding: str
) -> None:
    status, body = _send(agent, method, path, b"not compressed at all", encoding)
    assert status == 400, body
    assert body["error"]["code"] == "malformed_json"
    assert "content-encoding" in body["error"]["message"]
    assert "\n" not in body["error"]["message"]


def test_a_good_compressed_body_is_read(agent: AgentProcess) -> None:
    status, body = _send(
        agent, "POST", "/v1/networks", gzip.compress(b'{"name": "zipped"}'), "gzip"
    )
    assert status == 201, body
    status, body = _send(
        agent, "POST", "/v1/networks", zlib.compress(b'{"name": "deflated"}'), "deflate"
    )
    assert status == 201, body
    names = {n["name"] for n in agent.request("GET", "/v1/networks")[1]}
    assert {"zipped", "deflated"} <= names
