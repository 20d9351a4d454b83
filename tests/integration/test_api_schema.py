"""The agent against its own description: schemathesis on /v1/openapi.json.

A real agent process, seeded with networks, services and tasks, answers
generated requests (valid and invalid) for every operation but the endless
/v1/events stream. Every answer must be documented for its operation (status,
content type, body schema and headers), and none may be a server error.

The tests are collected from `mesh.api.openapi.build_openapi()`, which needs no
running agent; `test_agent_serves_the_description_under_test` proves that the
agent's /v1/openapi.json is exactly that document, so what is fuzzed is what
the agent serves. (`schemathesis.pytest.from_fixture`, which would load it
from the agent instead, does not work with pytest 9: it writes
`request.node._nodeid`, which pytest 9 no longer has.)

Half of the generated path parameters are replaced by the names and ids of
seeded objects, so that the answers about existing objects are checked too,
not only the 404s; removals get objects of their own.

Bounded and reproducible: a fixed seed, derandomized generation, a fixed
number of examples per operation, no example database.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mesh.api.openapi import build_openapi
from tests.helpers.agent import AgentProcess
from tests.integration.conftest import stop_and_check

MAX_EXAMPLES = 100
SEED = 20_260_101
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
#: operations whose described answers include a 503 with a body of their own
ANSWERS_503 = {"/v1/lb/healthz/{service}"}
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    }
)

#: Seeded objects by use and collection (`networks`, ...): filled in by `seeded_agent`.
KNOWN: dict[str, dict[str, str]] = {}
#: Cases run per operation.
CALLS: Counter[str] = Counter()

DESCRIPTION = build_openapi()
schema = schemathesis.openapi.from_dict(json.loads(json.dumps(DESCRIPTION)), config=CONFIG)


def _created(agent: AgentProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = agent.request("POST", path, body)
    assert status == 201, answer
    assert isinstance(answer, dict)
    return answer


def _seed(agent: AgentProcess) -> dict[str, dict[str, str]]:
    _created(
        agent,
        "/v1/networks",
        {"name": "front", "subnet": "127.72.0.0/24", "labels": {"tier": "front"}},
    )
    _created(agent, "/v1/networks", {"name": "doomed"})
    _created(
        agent,
        "/v1/services",
        {
            "name": "web",
            "networks": ["front"],
            "ports": [
                {"target_port": 80, "published_port": 18080},
                {"target_port": 53, "protocol": "udp", "publish_mode": "host"},
            ],
            "labels": {"mesh.http.hosts": "web.example", "mesh.http.port": "80"},
            "health_check": {"type": "ttl", "ttl": 3600},
        },
    )
    _created(agent, "/v1/services", {"name": "doomed", "endpoint_mode": "dnsrr"})
    task = _created(
        agent,
        "/v1/services/web/tasks",
        {"address": "127.0.0.1", "ports": {"80": 31080}, "name": "web-one"},
    )
    doomed = _created(agent, "/v1/services/web/tasks", {"address": "127.0.0.1"})
    _created(agent, "/v1/services/doomed/tasks", {"address": "127.0.0.2"})
    return {
        "keep": {"networks": "front", "services": "web", "tasks": task["id"], "lb": "web"},
        "remove": {"networks": "doomed", "services": "doomed", "tasks": doomed["id"]},
    }


@pytest.fixture(scope="module")
def seeded_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path_factory.mktemp("schema") / "data")
    try:
        agent.start()
        KNOWN.update(_seed(agent))
        yield agent
    finally:
        KNOWN.clear()
        stop_and_check(agent)


def test_agent_serves_the_description_under_test(seeded_agent: AgentProcess) -> None:
    status, served = seeded_agent.request("GET", "/v1/openapi.json")
    assert status == 200
    assert served == json.loads(json.dumps(DESCRIPTION))


def test_description_covers_the_contract() -> None:
    """Every route of the HTTP API table of docs/design.md is described."""
    operations = {
        (method.upper(), path) for path, item in DESCRIPTION["paths"].items() for method in item
    }
    expected = {
        ("GET", "/v1/health"),
        ("GET", "/v1/members"),
        ("POST", "/v1/networks"),
        ("GET", "/v1/networks"),
        ("GET", "/v1/networks/{name}"),
        ("DELETE", "/v1/networks/{name}"),
        ("POST", "/v1/services"),
        ("GET", "/v1/services"),
        ("GET", "/v1/services/{name}"),
        ("PATCH", "/v1/services/{name}"),
        ("DELETE", "/v1/services/{name}"),
        ("POST", "/v1/services/{name}/tasks"),
        ("GET", "/v1/services/{name}/tasks"),
        ("GET", "/v1/tasks"),
        ("GET", "/v1/tasks/{id}"),
        ("DELETE", "/v1/tasks/{id}"),
        ("PUT", "/v1/tasks/{id}/health"),
        ("GET", "/v1/events"),
        ("GET", "/v1/openapi.json"),
    }
    assert expected <= operations, sorted(expected - operations)


# The change feed never ends: it is described, but not fuzzed.
@schema.exclude(path="/v1/events").parametrize()
def test_api_conforms_to_its_description(
    case: schemathesis.Case[Any], seeded_agent: AgentProcess
) -> None:
    _name_a_seeded_object_every_other_time(case)
    checks = CHECKS
    if case.operation.path in ANSWERS_503:
        # a health check's 503 is its answer (described, with its body), not a failure
        checks = [c for c in CHECKS if c is not not_a_server_error]
    case.call_and_validate(base_url=f"http://{seeded_agent.api}", checks=checks, timeout=10)


def _name_a_seeded_object_every_other_time(case: schemathesis.Case[Any]) -> None:
    """Generated names and ids are almost never those of existing objects: so that the
    answers about existing ones are checked too, every other case of an operation with
    a path parameter names a seeded object (removals name objects of their own)."""
    if not isinstance(case.path_parameters, dict) or len(case.path_parameters) != 1:
        return
    label = case.operation.label
    CALLS[label] += 1
    if CALLS[label] % 2:
        return
    if case.operation.path == "/dashboard/{name}":  # the dashboard's assets
        case.path_parameters = {"name": "app.js"}
        return
    collection = case.operation.path.split("/")[2]  # /v1/<collection>/{...}
    known = KNOWN["remove" if case.method.upper() == "DELETE" else "keep"][collection]
    case.path_parameters = dict.fromkeys(case.path_parameters, known)
