"""The ingress network holds a VIP per service that publishes a port: it must hold many.

A fixed /24 made the 254th published service a 409; the ingress is now a /16
of the address pool (or `--ingress-subnet`), an existing one keeps its
subnet, and a network that does fill up says which and how big it is.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers.agent import AgentProcess
from tests.integration.conftest import stop_and_check
from tests.integration.test_cli_flow import mesh

SERVICES = 1000
FIRST_PORT = 20000  # below the ephemeral range: no test's client socket is in the way
BOUND = 300.0  # seconds, generous: a noisy machine, one fsync per create


def test_a_default_agent_takes_1000_services_with_published_ports(tmp_path: Path) -> None:
    # A 127.x pool, as a plain user's default; published ports on an address of their own.
    agent = AgentProcess(tmp_path / "data", publish_address="127.0.0.77").start()
    try:
        ingress = agent.request("GET", "/v1/networks/ingress")[1]
        assert ingress["subnet"] == "127.64.0.0/16"

        def create(i: int) -> tuple[int, str]:
            status, body = agent.request(
                "POST",
                "/v1/services",
                {
                    "name": f"svc-{i}",
                    "ports": [{"target_port": 80, "published_port": FIRST_PORT + i}],
                },
                timeout=60,
            )
            return status, str(body.get("error") if status != 201 else "")

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:  # concurrent, as clients are: commits group
            answers = list(pool.map(create, range(SERVICES)))
        took = time.monotonic() - started
        print(
            f"\n{SERVICES} services with published ports created in {took:.1f}s "
            f"({SERVICES / took:.0f}/s)"
        )
        refused = [(i, a) for i, a in enumerate(answers) if a[0] != 201]
        assert not refused, f"{len(refused)} refused, the first: {refused[0]}"
        assert took < BOUND

        services = agent.request("GET", "/v1/services", timeout=60)[1]
        vips = [v["address"] for s in services for v in s["vips"] if v["network"] == "ingress"]
        assert len(vips) == len(set(vips)) == SERVICES
        assert {p["published_port"] for s in services for p in s["ports"]} == set(
            range(FIRST_PORT, FIRST_PORT + SERVICES)
        )
    finally:
        stop_and_check(agent)


def test_ingress_subnet_flag_is_kept_across_restarts_and_never_renumbered(tmp_path: Path) -> None:
    data = tmp_path / "data"
    agent = AgentProcess(data, extra=["--ingress-subnet", "127.80.0.0/24"]).start()
    try:
        assert agent.request("GET", "/v1/networks/ingress")[1]["subnet"] == "127.80.0.0/24"
        assert (
            agent.request(
                "POST",
                "/v1/services",
                {"name": "web", "ports": [{"target_port": 80, "published_port": 18080}]},
            )[0]
            == 201
        )
    finally:
        stop_and_check(agent)
    # As a data dir of an older agent, whose ingress was a /24: kept without the flag.
    agent = AgentProcess(data).start()
    try:
        assert agent.request("GET", "/v1/networks/ingress")[1]["subnet"] == "127.80.0.0/24"
        web = agent.request("GET", "/v1/services/web")[1]
        assert [v["address"] for v in web["vips"]] == ["127.80.0.2"]
    finally:
        stop_and_check(agent)
    # Asked for another subnet: refused, in one line, rather than silently ignored.
    refused = AgentProcess(data, extra=["--ingress-subnet", "127.81.0.0/16"])
    try:
        refused.start(timeout=20)
        raise AssertionError("the agent started with a different --ingress-subnet")
    except RuntimeError:
        pass
    assert refused.proc is not None and refused.proc.returncode == 1
    assert "already has subnet 127.80.0.0/24, not 127.81.0.0/16" in refused.log()


def test_a_full_ingress_answers_409_naming_the_network_and_its_subnet(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "data", extra=["--ingress-subnet", "127.80.0.0/29"]).start()
    try:
        for i in range(5):  # a /29 holds 5 VIPs after its gateway
            assert (
                agent.request(
                    "POST",
                    "/v1/services",
                    {"name": f"s{i}", "ports": [{"target_port": 80, "published_port": 18000 + i}]},
                )[0]
                == 201
            )
        status, body = agent.request(
            "POST",
            "/v1/services",
            {"name": "s5", "ports": [{"target_port": 80, "published_port": 18005}]},
        )
        assert status == 409, body
        assert body["error"]["code"] == "no_free_address"
        message = body["error"]["message"]
        print(f"\n409: {message}")
        assert message.startswith("network ingress (127.80.0.0/29) has no free address")
        assert agent.request("GET", "/v1/services/s5")[0] == 404

        doctor = mesh(agent, "doctor", "--json", "--settle", "0", check=False)
        findings = json.loads(doctor.stdout)["findings"]
        full = [f for f in findings if f["check"] == "network" and f["status"] == "fail"]
        assert [f["message"] for f in full] == [
            "network ingress (127.80.0.0/29) is full: all 5 addresses are VIPs of services"
        ]
        assert "--ingress-subnet" in full[0]["hint"] and doctor.returncode == 1
    finally:
        stop_and_check(agent)
