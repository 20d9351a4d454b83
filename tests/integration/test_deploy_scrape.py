"""deploy/prometheus and deploy/grafana against a real agent's scrape: every family the
alert rules and the dashboard read is served (not only documented), and the counters the
SERVFAIL and 5xx alerts divide move as those alerts assume when an upstream resolver or a
task fails."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.agent import AgentProcess, free_port
from tests.helpers.http_backend import BackendProcess
from tests.unit.test_deploy_monitoring import (
    METRIC_NAME,
    dashboard,
    documented_names,
    panel_exprs,
    rules,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(agent: AgentProcess) -> tuple[set[str], Samples]:
    """The family names (as the text format names them: counters with _total, a
    histogram's series with their suffixes) and every sample."""
    with urllib.request.urlopen(f"http://{agent.api}/metrics", timeout=10) as response:
        text = response.read().decode()
    names: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        for sample in family.samples:
            names.add(sample.name)
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return names, samples


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def get(port: int, host: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/whoami", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:  # the router not listening yet
        return 0


def test_the_rules_and_dashboard_read_families_a_real_agent_serves(tmp_path: Path) -> None:
    backend_port = free_port()
    backend = BackendProcess({"w0": str(backend_port)}, tmp_path / "backend.log").start()
    agent = AgentProcess(tmp_path / "agent", extra=["--http-workers", "1", "--dns-workers", "1"])
    agent.start()
    try:
        for name, port in (("web", backend_port), ("down", free_port())):  # down: nothing there
            labels = {"mesh.http.hosts": f"{name}.test", "mesh.http.port": "80"}
            status, body = agent.request("POST", "/v1/services", {"name": name, "labels": labels})
            assert status == 201, body
            task = {"address": "127.0.0.1", "ports": {"80": port}}
            status, body = agent.request("POST", f"/v1/services/{name}/tasks", task)
            assert status == 201, body
        assert wait_for(lambda: get(agent.http_port, "web.test") == 200, 20), agent.log()
        # the 5xx alert's numerator: a task that refuses connections answers 5xx by service
        codes = [get(agent.http_port, "down.test") for _ in range(5)]
        print(f"requests to a task that refuses connections: {codes}")
        assert all(500 <= code < 600 for code in codes), codes

        # the SERVFAIL alert's fallback: the upstream (port 9 of loopback) refuses
        for i in range(5):
            dig = subprocess.run(
                ["dig", "@127.0.0.1", "-p", str(agent.dns_port), f"x{i}.example.org", "+tries=1"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            assert "status: SERVFAIL" in dig.stdout, dig.stdout

        def counted() -> bool:
            _, samples = scrape(agent)
            failed = samples.get(
                ("meshplane_http_requests_total", (("code", "5xx"), ("service", "down"))), 0
            )
            servfail = samples.get(
                ("meshplane_dns_events_total", (("event", "forwarder_servfail"),)), 0
            )
            forwarded = samples.get(
                ("meshplane_dns_events_total", (("event", "forwarder_queries"),)), 0
            )
            return failed >= 5 and servfail >= 5 and forwarded >= servfail

        # workers report once a second
        assert wait_for(counted, 10), scrape(agent)[1]

        served, _ = scrape(agent)
        _, pending = documented_names()
        exprs = [rule["expr"] for rule in rules()] + panel_exprs(dashboard())
        used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
        missing = used - served - pending
        print(f"{len(used)} names used, {len(used & served)} served, pending: {used & pending}")
        assert missing == set(), missing
    finally:
        agent.stop()
        backend.stop()
