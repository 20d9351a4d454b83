"""Every refusal of the HTTP API, against a real agent process.

Each case asserts the status, the error shape of docs/design.md
(`{"error": {"code": <snake_case>, "message": <one line>}}`) and, where a
change was refused, that nothing of it was applied: the lists are unchanged
and no VIP, published port or task slot was consumed.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess
from tests.integration.conftest import StartAgent, stop_and_check

SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
MAX_BODY = 1 << 20
INVALID_NAMES = [
    "-web",
    "web-",
    "web_1",
    "a" * 64,
    "tasks",
    "TASKS",
    "wéb",
    "web\n",
    "we b",
    "web.1",
    "",
]

Json = Any


def assert_error(answer: tuple[int, Json], status: int, code: str | None = None) -> str:
    """Assert an error answer's status and shape; return its code."""
    got, body = answer
    assert got == status, body
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict), body
    assert set(error) == {"code", "message"}, body
    assert isinstance(error["code"], str), body
    assert SNAKE_CASE.fullmatch(error["code"]), body
    assert isinstance(error["message"], str), body
    assert error["message"].strip(), body
    assert "\n" not in error["message"], body
    assert "Traceback" not in error["message"], body
    if code is not None:
        assert error["code"] == code, body
    return str(error["code"])


def ok(answer: tuple[int, Json], status: int = 200) -> Json:
    got, body = answer
    assert got == status, body
    return body


def names(agent: AgentProcess, path: str) -> list[str]:
    return [item["name"] for item in ok(agent.request("GET", path))]


def snapshot(agent: AgentProcess) -> Json:
    """Everything the agent holds, to compare before and after a refused request."""
    return {
        path: ok(agent.request("GET", path))
        for path in ("/v1/networks", "/v1/services", "/v1/tasks")
    }


@pytest.fixture
def shared(module_agent: AgentProcess) -> Iterator[AgentProcess]:
    """The module's agent, holding a service `web`; the test may only make refused requests."""
    if agent_has(module_agent, "/v1/services/web") is False:
        create_service(module_agent, "web")
    before = snapshot(module_agent)
    yield module_agent
    assert snapshot(module_agent) == before, "a refused request changed the state"


def agent_has(agent: AgentProcess, path: str) -> bool:
    return agent.request("GET", path)[0] == 200


def raw_request(
    agent: AgentProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Json]:
    """A request that also returns the answer's headers."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(payload) if payload else None
    finally:
        conn.close()


def create_network(agent: AgentProcess, name: str, subnet: str | None = None) -> Json:
    body: dict[str, Any] = {"name": name}
    if subnet is not None:
        body["subnet"] = subnet
    return ok(agent.request("POST", "/v1/networks", body), 201)


def create_service(agent: AgentProcess, name: str, **fields: Any) -> Json:
    return ok(agent.request("POST", "/v1/services", {"name": name, **fields}), 201)


# -- malformed bodies (400) -------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/networks", "/v1/services"])
def test_malformed_json_is_400(agent: AgentProcess, path: str) -> None:
    before = ok(agent.request("GET", path))
    assert_error(agent.request("POST", path, raw=b'{"name": "front",'), 400, "malformed_json")
    assert ok(agent.request("GET", path)) == before


@pytest.mark.parametrize("raw", [b"[]", b'["front"]', b'"front"', b"42", b"null", b"true"])
@pytest.mark.parametrize("path", ["/v1/networks", "/v1/services", "/v1/services/web/tasks"])
def test_body_that_is_not_an_object_is_400(shared: AgentProcess, path: str, raw: bytes) -> None:
    assert_error(shared.request("POST", path, raw=raw), 400, "malformed_json")


def test_empty_body_is_400(agent: AgentProcess) -> None:
    assert_error(agent.request("POST", "/v1/services", raw=b""), 400)
    assert names(agent, "/v1/services") == []


def test_unknown_field_is_400(agent: AgentProcess) -> None:
    assert_error(
        agent.request("POST", "/v1/networks", {"name": "front", "colour": "red"}),
        400,
        "unknown_field",
    )
    assert names(agent, "/v1/networks") == ["ingress"]


def test_unknown_nested_field_is_400(agent: AgentProcess) -> None:
    body = {"name": "web", "ports": [{"target_port": 80, "publish": 8080}]}
    assert_error(agent.request("POST", "/v1/services", body), 400, "unknown_field")
    assert names(agent, "/v1/services") == []


def test_unknown_field_in_patch_is_400(agent: AgentProcess) -> None:
    before = create_service(agent, "web")
    assert_error(
        agent.request("PATCH", "/v1/services/web", {"name": "other"}), 400, "unknown_field"
    )
    assert ok(agent.request("GET", "/v1/services/web")) == before


# -- missing and invalid values (422) ---------------------------------------------


@pytest.mark.parametrize("path", ["/v1/networks", "/v1/services"])
def test_missing_name_is_422(agent: AgentProcess, path: str) -> None:
    before = ok(agent.request("GET", path))
    assert_error(agent.request("POST", path, {"labels": {"a": "b"}}), 422, "missing_field")
    assert ok(agent.request("GET", path)) == before


def test_missing_task_address_is_422(agent: AgentProcess) -> None:
    create_service(agent, "web")
    assert_error(
        agent.request("POST", "/v1/services/web/tasks", {"ports": {"80": 8080}}),
        422,
        "missing_field",
    )
    assert ok(agent.request("GET", "/v1/tasks")) == []


def test_missing_health_status_is_422(agent: AgentProcess) -> None:
    create_service(agent, "web")
    task = ok(agent.request("POST", "/v1/services/web/tasks", {"address": "127.0.0.1"}), 201)
    assert_error(
        agent.request("PUT", f"/v1/tasks/{task['id']}/health", {"output": "x"}),
        422,
        "missing_field",
    )


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_network_name_that_is_not_a_dns_label_is_422(shared: AgentProcess, name: str) -> None:
    assert_error(shared.request("POST", "/v1/networks", {"name": name}), 422)


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_service_name_that_is_not_a_dns_label_is_422(shared: AgentProcess, name: str) -> None:
    assert_error(shared.request("POST", "/v1/services", {"name": name}), 422)
    # In the list of networks a service joins, too.
    assert_error(shared.request("POST", "/v1/services", {"name": "api", "networks": [name]}), 422)


def test_longest_dns_label_is_a_valid_name(agent: AgentProcess) -> None:
    name = "a" + "-" * 61 + "z"
    assert create_network(agent, name)["name"] == name
    assert create_service(agent, name, networks=[name])["name"] == name


@pytest.mark.parametrize("name", ["-x", "web..1", "web.", "a_b.c", "x" * 254, "web.1\n", ""])
def test_task_name_that_is_not_a_dns_name_is_422(shared: AgentProcess, name: str) -> None:
    body = {"address": "127.0.0.1", "name": name}
    assert_error(shared.request("POST", "/v1/services/web/tasks", body), 422)


@pytest.mark.parametrize("port", [0, 65536, -1, "80", True, 80.0, None])
def test_target_port_out_of_range_or_not_an_integer_is_422(shared: AgentProcess, port: Any) -> None:
    body = {"name": "api", "ports": [{"target_port": port}]}
    assert_error(shared.request("POST", "/v1/services", body), 422)


@pytest.mark.parametrize(
    "address",
    ["not-an-ip", "300.1.2.3", "127.0.0.1/32", "::1", "0.0.0.0", "224.0.0.1", "127.0.0.1 ", ""],
)
def test_task_address_that_is_not_a_usable_ip_address_is_422(
    shared: AgentProcess, address: str
) -> None:
    assert_error(shared.request("POST", "/v1/services/web/tasks", {"address": address}), 422)


@pytest.mark.parametrize(
    "ports",
    [{"0": 8080}, {"65536": 8080}, {"http": 8080}, {"80": 0}, {"80": "8080"}, {" 80": 8080}],
)
def test_task_port_map_with_bad_ports_is_422(shared: AgentProcess, ports: Json) -> None:
    body = {"address": "127.0.0.1", "ports": ports}
    assert_error(shared.request("POST", "/v1/services/web/tasks", body), 422)


@pytest.mark.parametrize(
    "subnet", ["front", "127.70.0.1/24", "127.70.0.0/30", "::1/128", "127.70.0.0/33", ""]
)
def test_subnet_that_is_not_a_usable_cidr_is_422(shared: AgentProcess, subnet: str) -> None:
    assert_error(shared.request("POST", "/v1/networks", {"name": "front", "subnet": subnet}), 422)


def test_service_on_unknown_network_is_422(agent: AgentProcess) -> None:
    create_network(agent, "front")
    body = {"name": "web", "networks": ["front", "back"]}
    assert_error(agent.request("POST", "/v1/services", body), 422, "unknown_network")
    assert names(agent, "/v1/services") == []


def test_service_naming_ingress_is_422(agent: AgentProcess) -> None:
    assert_error(
        agent.request("POST", "/v1/services", {"name": "web", "networks": ["ingress"]}), 422
    )
    assert names(agent, "/v1/services") == []


def test_dnsrr_with_an_ingress_published_port_is_422(agent: AgentProcess) -> None:
    body = {
        "name": "db",
        "endpoint_mode": "dnsrr",
        "ports": [{"target_port": 5432, "published_port": 15432}],
    }
    assert_error(agent.request("POST", "/v1/services", body), 422, "invalid_value")
    assert names(agent, "/v1/services") == []
    # As in Swarm, dnsrr may publish in host mode, and gets no VIP.
    body["ports"] = [{"target_port": 5432, "published_port": 15432, "publish_mode": "host"}]
    created = ok(agent.request("POST", "/v1/services", body), 201)
    assert created["vips"] == []


def test_patch_to_dnsrr_with_an_ingress_port_is_422(agent: AgentProcess) -> None:
    before = create_service(agent, "web", ports=[{"target_port": 80, "published_port": 18080}])
    answer = agent.request("PATCH", "/v1/services/web", {"endpoint_mode": "dnsrr"})
    assert_error(answer, 422, "invalid_value")
    assert ok(agent.request("GET", "/v1/services/web")) == before


def test_non_numeric_version_is_422(agent: AgentProcess) -> None:
    before = create_service(agent, "web")
    for version in ["abc", "-1", "1.0", "%C2%B2", "%D9%A3", "1" * 19]:
        answer = agent.request("PATCH", f"/v1/services/web?version={version}", {"labels": {}})
        assert_error(answer, 422)
    assert ok(agent.request("GET", "/v1/services/web")) == before


# -- conflicts (409) ----------------------------------------------------------------


def test_duplicate_service_name_is_409(agent: AgentProcess) -> None:
    first = create_service(agent, "web")
    assert_error(
        agent.request("POST", "/v1/services", {"name": "web", "labels": {"a": "b"}}),
        409,
        "name_in_use",
    )
    assert ok(agent.request("GET", "/v1/services")) == [first]


def test_service_name_differing_only_in_case_is_409(agent: AgentProcess) -> None:
    """DNS compares names in lower case: `WEB` would answer for `web`."""
    first = create_service(agent, "web")
    assert_error(agent.request("POST", "/v1/services", {"name": "WEB"}), 409, "name_in_use")
    assert ok(agent.request("GET", "/v1/services")) == [first]


def test_duplicate_network_name_is_409(agent: AgentProcess) -> None:
    create_network(agent, "front")
    assert_error(agent.request("POST", "/v1/networks", {"name": "front"}), 409, "name_in_use")
    assert_error(agent.request("POST", "/v1/networks", {"name": "Front"}), 409, "name_in_use")
    assert_error(agent.request("POST", "/v1/networks", {"name": "ingress"}), 409, "name_in_use")
    assert names(agent, "/v1/networks") == ["front", "ingress"]


def test_published_port_used_by_another_service_is_409(agent: AgentProcess) -> None:
    web = create_service(agent, "web", ports=[{"target_port": 80, "published_port": 18080}])
    body = {"name": "api", "ports": [{"target_port": 8000, "published_port": 18080}]}
    assert_error(agent.request("POST", "/v1/services", body), 409, "port_in_use")
    assert ok(agent.request("GET", "/v1/services")) == [web]
    # The same number over UDP is another port.
    body["ports"] = [{"target_port": 8000, "published_port": 18080, "protocol": "udp"}]
    ok(agent.request("POST", "/v1/services", body), 201)


def test_patch_taking_a_published_port_of_another_service_is_409(agent: AgentProcess) -> None:
    create_service(agent, "web", ports=[{"target_port": 80, "published_port": 18080}])
    before = create_service(agent, "api", ports=[{"target_port": 80, "published_port": 18081}])
    answer = agent.request(
        "PATCH", "/v1/services/api", {"ports": [{"target_port": 80, "published_port": 18080}]}
    )
    assert_error(answer, 409, "port_in_use")
    assert ok(agent.request("GET", "/v1/services/api")) == before
    # Its own port stays its own: a patch keeping it is fine.
    answer = agent.request(
        "PATCH", "/v1/services/api", {"ports": [{"target_port": 81, "published_port": 18081}]}
    )
    assert ok(answer)["ports"][0]["published_port"] == 18081


def test_overlapping_subnet_is_409(agent: AgentProcess) -> None:
    create_network(agent, "wide", "127.70.0.0/16")
    before = ok(agent.request("GET", "/v1/networks"))
    answer = agent.request("POST", "/v1/networks", {"name": "narrow", "subnet": "127.70.1.0/24"})
    assert_error(answer, 409, "subnet_overlaps")
    answer = agent.request("POST", "/v1/networks", {"name": "wider", "subnet": "127.64.0.0/12"})
    assert_error(answer, 409, "subnet_overlaps")  # holds ingress and wide
    assert ok(agent.request("GET", "/v1/networks")) == before


def test_same_task_endpoint_twice_in_one_service_is_409(agent: AgentProcess) -> None:
    create_service(agent, "web")
    create_service(agent, "api")
    endpoint = {"address": "127.0.0.1", "ports": {"80": 31001}}
    first = ok(agent.request("POST", "/v1/services/web/tasks", endpoint), 201)
    assert_error(agent.request("POST", "/v1/services/web/tasks", endpoint), 409, "endpoint_in_use")
    assert ok(agent.request("GET", "/v1/services/web/tasks")) == [first]
    # The same address with other ports is another endpoint, and gets the next slot.
    other = {"address": "127.0.0.1", "ports": {"80": 31002}}
    second = ok(agent.request("POST", "/v1/services/web/tasks", other), 201)
    assert second["slot"] == 2
    # The same endpoint in another service is fine too.
    ok(agent.request("POST", "/v1/services/api/tasks", endpoint), 201)
    assert len(ok(agent.request("GET", "/v1/tasks"))) == 3


def test_duplicate_task_name_is_409(agent: AgentProcess) -> None:
    create_service(agent, "web")
    ok(
        agent.request(
            "POST",
            "/v1/services/web/tasks",
            {"address": "127.0.0.1", "ports": {"80": 31001}, "name": "web-one"},
        ),
        201,
    )
    answer = agent.request(
        "POST",
        "/v1/services/web/tasks",
        {"address": "127.0.0.1", "ports": {"80": 31002}, "name": "WEB-one"},
    )
    assert_error(answer, 409, "name_in_use")
    assert len(ok(agent.request("GET", "/v1/tasks"))) == 1


def test_patch_with_stale_version_is_409(agent: AgentProcess) -> None:
    created = create_service(agent, "web")
    version = created["version"]
    updated = ok(
        agent.request("PATCH", f"/v1/services/web?version={version}", {"labels": {"tier": "front"}})
    )
    assert updated["version"] > version
    answer = agent.request(
        "PATCH", f"/v1/services/web?version={version}", {"labels": {"tier": "back"}}
    )
    assert_error(answer, 409, "version_conflict")
    assert ok(agent.request("GET", "/v1/services/web")) == updated


def test_removing_a_network_in_use_is_409(agent: AgentProcess) -> None:
    create_network(agent, "front")
    create_service(agent, "web", networks=["front"])
    assert_error(agent.request("DELETE", "/v1/networks/front"), 409, "network_in_use")
    assert names(agent, "/v1/networks") == ["front", "ingress"]
    assert ok(agent.request("DELETE", "/v1/services/web"), 204) is None
    assert ok(agent.request("DELETE", "/v1/networks/front"), 204) is None
    assert names(agent, "/v1/networks") == ["ingress"]


def test_removing_ingress_is_409(agent: AgentProcess) -> None:
    before = ok(agent.request("GET", "/v1/networks/ingress"))
    assert_error(agent.request("DELETE", "/v1/networks/ingress"), 409)
    assert ok(agent.request("GET", "/v1/networks/ingress")) == before


def test_health_report_for_a_task_of_another_node_is_409(start_agent: StartAgent) -> None:
    """Restart the agent under another name: its old tasks now belong to another node."""
    first = start_agent()
    ok(first.request("POST", "/v1/services", {"name": "web"}), 201)
    task = ok(first.request("POST", "/v1/services/web/tasks", {"address": "127.0.0.1"}), 201)
    first.stop()
    second = AgentProcess(first.data_dir, node_name="node-2")
    try:
        second.start()
        answer = second.request("PUT", f"/v1/tasks/{task['id']}/health", {"status": "healthy"})
        assert_error(answer, 409, "not_local")
        # node-1 is no member of node-2's gossip: its status is unknown, not alive
        assert ok(second.request("GET", f"/v1/tasks/{task['id']}")) == {
            **task,
            "node_status": "unknown",
        }
    finally:
        stop_and_check(second)


# -- no half-applied change -----------------------------------------------------------


def test_refused_creates_consume_no_vip_port_or_slot(agent: AgentProcess) -> None:
    create_network(agent, "front", "127.71.0.0/24")
    ingress = ok(agent.request("GET", "/v1/networks/ingress"))["subnet"].removesuffix(".0/16")
    auto_port = [{"target_port": 80}]
    web = create_service(agent, "web", networks=["front"], ports=auto_port)
    assert web["vips"] == [
        {"network": "front", "address": "127.71.0.2"},
        {"network": "ingress", "address": f"{ingress}.2"},
    ]
    assert web["ports"][0]["published_port"] == 30000
    # Refused for a reason found at different points of the create: each leaves no trace.
    refused = [
        ({"name": "web", "networks": ["front"], "ports": auto_port}, 409),
        ({"name": "api", "networks": ["front", "back"], "ports": auto_port}, 422),
        (
            {
                "name": "api",
                "networks": ["front"],
                "ports": [{"target_port": 80}, {"target_port": 81, "published_port": 30000}],
            },
            409,
        ),
        (
            {
                "name": "api",
                "networks": ["front"],
                "ports": auto_port,
                "health_check": {"type": "tcp", "interval": 0},
            },
            422,
        ),
        ({"name": "api", "networks": ["front"], "endpoint_mode": "dnsrr", "ports": auto_port}, 422),
    ]
    for body, status in refused:
        assert_error(agent.request("POST", "/v1/services", body), status)
    assert ok(agent.request("GET", "/v1/services")) == [web]
    # The next service gets exactly what the first refused one would have had.
    api = create_service(agent, "api", networks=["front"], ports=auto_port)
    assert api["vips"] == [
        {"network": "front", "address": "127.71.0.3"},
        {"network": "ingress", "address": f"{ingress}.3"},
    ]
    assert api["ports"][0]["published_port"] == 30001
    # A refused task takes no slot.
    ok(agent.request("POST", "/v1/services/api/tasks", {"address": "127.0.0.1"}), 201)
    assert_error(agent.request("POST", "/v1/services/api/tasks", {"address": "127.0.0.1"}), 409)
    assert_error(agent.request("POST", "/v1/services/api/tasks", {"address": "nope"}), 422)
    task = ok(
        agent.request(
            "POST", "/v1/services/api/tasks", {"address": "127.0.0.1", "ports": {"80": 8080}}
        ),
        201,
    )
    assert task["slot"] == 2


def test_refused_network_create_consumes_no_subnet(agent: AgentProcess) -> None:
    assert_error(agent.request("POST", "/v1/networks", {"name": "front", "nope": 1}), 400)
    assert_error(agent.request("POST", "/v1/networks", {"name": "ingress"}), 409)
    front = create_network(agent, "front")
    assert front["subnet"] == "127.65.0.0/24"  # the first /24 after ingress's /16


def test_refused_patch_keeps_vips_ports_and_version(agent: AgentProcess) -> None:
    create_network(agent, "front")
    create_service(agent, "other", ports=[{"target_port": 80, "published_port": 18081}])
    before = create_service(
        agent, "web", networks=["front"], ports=[{"target_port": 80, "published_port": 18080}]
    )
    refused = [
        ({"networks": ["front", "back"]}, 422),
        ({"ports": [{"target_port": 80, "published_port": 18081}]}, 409),
        ({"networks": [], "ports": [{"target_port": 80, "published_port": 18081}]}, 409),
        ({"endpoint_mode": "dnsrr"}, 422),
    ]
    for body, status in refused:
        assert_error(agent.request("PATCH", "/v1/services/web", body), status)
        assert ok(agent.request("GET", "/v1/services/web")) == before
    # Its VIPs are still its own: a new service gets other ones.
    api = create_service(agent, "api", networks=["front"], ports=[{"target_port": 80}])
    mine = {v["address"] for v in before["vips"]}
    assert mine.isdisjoint(v["address"] for v in api["vips"])


# -- unknown objects, paths and methods ------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/networks/nope", None),
        ("DELETE", "/v1/networks/nope", None),
        ("GET", "/v1/services/nope", None),
        ("PATCH", "/v1/services/nope", {"labels": {}}),
        ("DELETE", "/v1/services/nope", None),
        ("GET", "/v1/services/nope/tasks", None),
        ("POST", "/v1/services/nope/tasks", {"address": "127.0.0.1"}),
        ("GET", "/v1/tasks/nope", None),
        ("DELETE", "/v1/tasks/nope", None),
        ("PUT", "/v1/tasks/nope/health", {"status": "healthy"}),
    ],
)
def test_unknown_object_in_path_is_404(
    shared: AgentProcess, method: str, path: str, body: Json
) -> None:
    assert_error(shared.request(method, path, body), 404, "not_found")


def test_task_for_unknown_service_is_404_and_creates_nothing(agent: AgentProcess) -> None:
    assert_error(
        agent.request("POST", "/v1/services/web/tasks", {"address": "127.0.0.1"}), 404, "not_found"
    )
    # The path is checked before the body: a bad body for an unknown service is still 404.
    assert_error(agent.request("POST", "/v1/services/web/tasks", raw=b"{"), 404, "not_found")
    assert ok(agent.request("GET", "/v1/tasks")) == []
    assert names(agent, "/v1/services") == []


@pytest.mark.parametrize(
    "path", ["/v1/nope", "/v2/health", "/v1/networks/a/b", "/v1/tasks/x/y/z", "/v1"]
)
def test_unknown_path_is_404(shared: AgentProcess, path: str) -> None:
    assert_error(shared.request("GET", path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/networks"),
        ("DELETE", "/v1/networks"),
        ("PATCH", "/v1/networks/ingress"),
        ("POST", "/v1/tasks"),
        ("POST", "/v1/health"),
        ("GET", "/v1/tasks/x/health"),
    ],
)
def test_wrong_method_is_405_with_allow(shared: AgentProcess, method: str, path: str) -> None:
    status, headers, body = raw_request(
        shared, method, path, b"{}", {"Content-Type": "application/json"}
    )
    assert_error((status, body), 405, "method_not_allowed")
    assert headers.get("Allow"), headers
    assert method not in headers["Allow"].split(",")


# -- size limit ---------------------------------------------------------------------


def test_oversized_body_is_413(agent: AgentProcess) -> None:
    body = json.dumps({"name": "big", "labels": {"k": "x" * MAX_BODY}}).encode()
    assert len(body) > MAX_BODY
    assert_error(agent.request("POST", "/v1/networks", raw=body), 413, "payload_too_large")
    assert names(agent, "/v1/networks") == ["ingress"]
    # The agent keeps serving, and a body just under the limit is read (and judged on its value).
    padded = b'{"name": "big"' + b" " * (MAX_BODY - 100) + b"}"
    assert ok(agent.request("POST", "/v1/networks", raw=padded), 201)["name"] == "big"


def test_oversized_chunked_body_is_413(agent: AgentProcess) -> None:
    """Without a Content-Length the limit is enforced while reading."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    chunks = (b'{"name": "big", "labels": {"k": "', b"x" * MAX_BODY, b'"}}')
    try:
        conn.request(
            "POST",
            "/v1/services",
            body=iter(chunks),
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        answer = resp.status, json.loads(resp.read())
    except (BrokenPipeError, ConnectionResetError):
        pytest.fail("the agent closed the connection instead of answering 413")
    finally:
        conn.close()
    assert_error(answer, 413, "payload_too_large")
    assert names(agent, "/v1/services") == []


# -- bearer token (401) -------------------------------------------------------------


def test_bearer_token(start_agent: StartAgent) -> None:
    agent = start_agent(extra=["--api-token", "s3cret"])
    good = {"Authorization": "Bearer s3cret"}
    for headers in [
        None,
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Basic czNjcmV0"},
        {"Authorization": "Bearer s3cret2"},
        {"Authorization": "Bearer "},
    ]:
        status, answer_headers, body = raw_request(agent, "GET", "/v1/networks", headers=headers)
        assert_error((status, body), 401, "unauthorized")
        assert answer_headers.get("WWW-Authenticate", "").startswith("Bearer")
    # A refused write changes nothing.
    assert_error(agent.request("POST", "/v1/networks", {"name": "front"}), 401, "unauthorized")
    assert_error(
        agent.request(
            "POST", "/v1/networks", {"name": "front"}, headers={"Authorization": "Bearer nope"}
        ),
        401,
    )
    assert [n["name"] for n in ok(agent.request("GET", "/v1/networks", headers=good))] == [
        "ingress"
    ]
    ok(agent.request("POST", "/v1/networks", {"name": "front"}, headers=good), 201)
    # Every path is guarded, the unknown ones and the description too (no probing).
    assert_error(agent.request("GET", "/v1/nope"), 401)
    assert_error(agent.request("GET", "/v1/openapi.json"), 401)
    ok(agent.request("GET", "/v1/openapi.json", headers=good))
    # The health probe stays open, for load balancers.
    assert ok(agent.request("GET", "/v1/health"))["status"] == "ok"


# -- odd query and header values --------------------------------------------------------


@pytest.mark.parametrize("last", ["²", "٣", "-1", "1" * 40, "abc", ""])
def test_odd_last_event_id_starts_the_stream_anyway(shared: AgentProcess, last: str) -> None:
    """`Last-Event-ID` that is not a sequence number is ignored, never a 500."""
    conn = http.client.HTTPConnection("127.0.0.1", shared.port, timeout=10)
    try:
        conn.putrequest("GET", "/v1/events")
        conn.putheader("Last-Event-ID", last.encode())
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        assert resp.readline() == b": connected\n"
    finally:
        conn.close()
