"""`GET /metrics` from a real agent: the HTTP workers' counters add up, across a restart too."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.agent import AgentProcess, free_port
from tests.helpers.http_backend import BackendProcess

CONNECTIONS = 20
PER_CONNECTION = 25
SENT = CONNECTIONS * PER_CONNECTION


def scrape(agent: AgentProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{agent.api}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def web_2xx(agent: AgentProcess) -> float:
    samples = scrape(agent)
    return samples.get(("meshplane_http_requests_total", (("code", "2xx"), ("service", "web"))), 0)


def listeners(port: int) -> set[int]:
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def send_load(port: int) -> None:
    """SENT requests on CONNECTIONS keep-alive connections (the kernel spreads the
    connections, not the requests, over the workers)."""
    for _ in range(CONNECTIONS):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(PER_CONNECTION):
                conn.request("GET", "/whoami", headers={"Host": "web.test"})
                response = conn.getresponse()
                response.read()
                assert response.status == 200
        finally:
            conn.close()


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_two_workers_counters_match_the_load_and_survive_a_restart(tmp_path: Path) -> None:
    backend_port = free_port()
    backend = BackendProcess({"w0": str(backend_port)}, tmp_path / "backend.log").start()
    agent = AgentProcess(tmp_path / "agent", extra=["--http-workers", "2"])
    agent.start()
    try:
        assert agent.proc is not None
        assert wait_for(lambda: len(listeners(agent.http_port)) == 2, 20), agent.log()
        status, body = agent.request(
            "POST",
            "/v1/services",
            {"name": "web", "labels": {"mesh.http.hosts": "web.test", "mesh.http.port": "80"}},
        )
        assert status == 201, body
        status, body = agent.request(
            "POST",
            "/v1/services/web/tasks",
            {"address": "127.0.0.1", "ports": {"80": backend_port}},
        )
        assert status == 201, body
        # until both workers route the new host (the feed reaches them in a moment)
        warm_up: list[int] = []  # the 200s of the warm-up count too
        assert wait_for(lambda: _routes(agent.http_port, warm_up), 10), agent.log()
        before = sum(warm_up)
        started = time.monotonic()
        send_load(agent.http_port)
        took = time.monotonic() - started
        wanted = before + SENT
        # Workers report every second: wait for the reports, then compare.
        wait_for(lambda: web_2xx(agent) >= wanted, 10)
        counted = web_2xx(agent)
        print(f"sent {SENT} requests in {took:.2f}s; /metrics counts {counted - before:.0f}")
        assert abs(counted - wanted) <= 0.01 * SENT, (counted, wanted)
        scrape_started = time.monotonic()
        samples = scrape(agent)
        print(f"one scrape took {(time.monotonic() - scrape_started) * 1000:.1f} ms")
        web = (("service", "web"),)
        # every request is in the latency histogram too (counted in the exchange's hot path)
        assert samples[("meshplane_http_upstream_duration_seconds_count", web)] == counted
        status, http_stats = agent.request("GET", "/v1/http")
        assert status == 200, http_stats
        [route] = http_stats["routes"]
        assert sum(route["latency_buckets"]) == route["latency_count"] == counted
        assert samples[("meshplane_http_workers", ())] == 2
        assert samples[("meshplane_services", ())] == 1
        assert samples[("process_open_fds", ())] > 0
        for worker in ("0", "1"):  # each worker's own process figures
            labels = (("pool", "http"), ("worker", worker))
            assert samples[("meshplane_worker_resident_memory_bytes", labels)] > 0
            assert samples[("meshplane_worker_feed_lag", labels)] == 0  # all applied
        node_table = (("backend", "userspace"), ("table", "node"))
        assert samples[("meshplane_lb_backend_errors_total", node_table)] == 0
        # A worker killed outright: its replacement starts from zero, the sum does not.
        victim = min(listeners(agent.http_port))
        assert victim != agent.proc.pid
        os.kill(victim, signal.SIGKILL)
        assert wait_for(
            lambda: (
                len(listeners(agent.http_port)) == 2 and victim not in listeners(agent.http_port)
            ),
            20,
        ), agent.log()
        for _ in range(10):  # scrapes across the restart never go backwards
            assert web_2xx(agent) >= counted
            time.sleep(0.2)
        # A removed service's series go away.
        status, body = agent.request("DELETE", "/v1/services/web?force=true")
        assert status in (200, 204), body
        assert wait_for(lambda: 'service="web"' not in _text(agent), 10)
    finally:
        agent.stop()
        backend.stop()


def _routes(port: int, ok: list[int]) -> bool:
    """Several fresh connections (so both workers are asked) all answer 200 (each
    200 is appended to `ok`)."""
    for _ in range(6):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/whoami", headers={"Host": "web.test"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                return False
            ok.append(1)
        finally:
            conn.close()
    return True


def _text(agent: AgentProcess) -> str:
    with urllib.request.urlopen(f"http://{agent.api}/metrics", timeout=10) as response:
        return response.read().decode()


DNS_QUERIES = 300  # each from a fresh source port: the kernel spreads them over every process


def dns_answered(agent: AgentProcess) -> float:
    """Queries answered with records: looked up, or from the reply cache."""
    samples = scrape(agent)
    return sum(
        samples.get(("meshplane_dns_events_total", (("event", f"responder_{event}"),)), 0)
        for event in ("answered", "cache_hits")
    )


def test_dns_workers_counters_are_summed_with_the_agents(tmp_path: Path) -> None:
    from tests.integration.test_dns_agent import addresses, ask, setup_web

    agent = AgentProcess(tmp_path / "agent", extra=["--dns-workers", "2"])
    agent.start()
    try:
        assert wait_for(lambda: agent.log().count("dns_worker_ready") == 2, 20), agent.log()
        setup_web(agent)
        assert dns_answered(agent) == 0
        started = time.monotonic()
        for _ in range(DNS_QUERIES):
            assert addresses(ask(agent, "tasks.web"))
        took = time.monotonic() - started
        wait_for(lambda: dns_answered(agent) >= DNS_QUERIES, 10)
        counted = dns_answered(agent)
        print(f"sent {DNS_QUERIES} DNS queries in {took:.2f}s; /metrics counts {counted:.0f}")
        assert abs(counted - DNS_QUERIES) <= 0.01 * DNS_QUERIES, counted
        # Every process answered some (the agent's own listener and both workers'),
        # so the sum above is across processes: the agent alone counts fewer.
        status, own = agent.request("GET", "/v1/dns")
        assert status == 200
        own_answers = own["stats"]["responder_answered"] + own["stats"]["responder_cache_hits"]
        print(f"the agent's own listener answered {own_answers}")
        assert 0 < own_answers < DNS_QUERIES
        samples = scrape(agent)
        for worker in ("0", "1"):  # each worker's own process figures
            labels = (("pool", "dns"), ("worker", worker))
            assert samples[("meshplane_worker_open_fds", labels)] > 0
        pid = int(re.findall(r"event=worker_started pool=dns index=0 pid=(\d+)", agent.log())[0])
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: agent.log().count("dns_worker_ready") == 3, 20), agent.log()
        for _ in range(10):  # scrapes across the restart never go backwards
            assert dns_answered(agent) >= counted
            time.sleep(0.2)
    finally:
        agent.stop()


def test_gossip_members_and_messages_of_a_two_node_cluster(tmp_path: Path) -> None:
    from tests.helpers.agent import gossip_cluster

    with gossip_cluster(tmp_path, 2) as (first, _second):
        alive = ("meshplane_gossip_members", (("status", "alive"),))
        assert wait_for(lambda: scrape(first).get(alive) == 2, 20), first.log()
        pings_out = ("meshplane_gossip_messages_total", (("direction", "out"), ("type", "ping")))
        acks_in = ("meshplane_gossip_messages_total", (("direction", "in"), ("type", "ack")))
        assert wait_for(lambda: scrape(first).get(acks_in, 0) > 0, 20), first.log()
        samples = scrape(first)
        print(f"n0 sent {samples[pings_out]:.0f} pings, got {samples[acks_in]:.0f} acks")
        assert samples[pings_out] > 0 and samples[acks_in] > 0
        assert samples[("meshplane_gossip_bytes_total", (("direction", "in"),))] > 0
        assert samples[("meshplane_gossip_bytes_total", (("direction", "out"),))] > 0
        assert samples[("meshplane_gossip_members", (("status", "dead"),))] == 0
        # Probe round trips (direct: both nodes answer), push-pull syncs and their TCP bytes.
        direct = (("path", "direct"),)
        rtt = "meshplane_gossip_probe_rtt_seconds"
        assert wait_for(lambda: scrape(first).get((f"{rtt}_count", direct), 0) > 0, 20)
        samples = scrape(first)
        count, total = samples[(f"{rtt}_count", direct)], samples[(f"{rtt}_sum", direct)]
        print(
            f"n0: {count:.0f} direct probes answered, mean round trip {total / count * 1e3:.2f} ms"
        )
        assert samples[(f"{rtt}_bucket", (("le", "+Inf"), ("path", "direct")))] == count
        # on loopback: well under the probe timeout (the agent's clock, uvloop's, ticks in
        # whole milliseconds, so a loopback round trip reads 0 or 1 ms)
        assert 0 <= total / count < 5
        pushed = [
            scrape(node).get(("meshplane_gossip_push_pulls_total", (("outcome", kind),)), 0)
            for node in (first, _second)
            for kind in ("initiated", "served")
        ]
        print(f"push-pulls (n0 initiated, served; n1 initiated, served): {pushed}")
        assert pushed[0] + pushed[2] >= 1 and pushed[1] + pushed[3] >= 1  # the join, at least
        for node in (first, _second):
            for direction in ("in", "out"):
                stream = ("meshplane_gossip_stream_bytes_total", (("direction", direction),))
                assert scrape(node)[stream] > 0
        status, gossip = first.request("GET", "/v1/gossip")  # the same figures in the API
        assert status == 200, gossip
        assert sum(gossip["probe_rtt"]["direct"]["buckets"]) >= count
        assert gossip["stream_bytes"]["in"] > 0 and gossip["counts"]["push_pulls_initiated"] >= 0
        outcomes = {
            kind: samples[("meshplane_gossip_suspicions_total", (("outcome", kind),))]
            for kind in ("raised", "refuted", "confirmed")
        }
        print(f"n0's suspicions: {outcomes}")  # 0 unless a probe ran late on a busy machine


def route_problems(agent: AgentProcess) -> dict[tuple[str, str], float]:
    """meshplane_http_route_problems as (service, kind) -> count."""
    return {
        (dict(labels)["service"], dict(labels)["kind"]): value
        for (name, labels), value in scrape(agent).items()
        if name == "meshplane_http_route_problems"
    }


def test_a_bad_hrm_label_is_a_route_problem_series_until_fixed(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent")
    agent.start()
    try:
        assert route_problems(agent) == {}
        status, body = agent.request(
            "POST",
            "/v1/services",
            {"name": "web", "labels": {"mesh.http.hosts": "web.test", "mesh.http.port": "x"}},
        )
        assert status == 201, body
        assert [p["kind"] for p in body["problems"]] == ["label"]
        assert wait_for(lambda: route_problems(agent) == {("web", "label"): 1}, 5)
        print(f"route problems series: {route_problems(agent)}")
        # the label fixed: the series goes (no zero left behind)
        status, body = agent.request(
            "PATCH",
            "/v1/services/web",
            {"labels": {"mesh.http.hosts": "web.test", "mesh.http.port": "80"}},
        )
        assert status == 200, body
        assert route_problems(agent) == {}
        assert "meshplane_http_route_problems{" not in _text(agent)
        # broken again, then the service removed: its series go with it
        status, body = agent.request(
            "PATCH",
            "/v1/services/web",
            {"labels": {"mesh.http.hosts": "web.test", "mesh.http.port": "0"}},
        )
        assert status == 200, body
        assert wait_for(lambda: route_problems(agent) == {("web", "label"): 1}, 5)
        status, body = agent.request("DELETE", "/v1/services/web")
        assert status in (200, 204), body
        assert wait_for(lambda: route_problems(agent) == {}, 5), route_problems(agent)
    finally:
        agent.stop()


TLS_SENT = {
    "certificate": 6,  # 4 Python clients asking x.test, 2 curl asking y.test
    "default_certificate": 3,  # a name no certificate has
    "no_sni": 2,  # no server name at all
    "passthrough": 2,  # curl to the sni:// route's task, which terminates TLS itself
    "failed": 3,  # clients that reject the certificate (unknown CA): the handshake fails
    "refused": 2,  # plain HTTP on the HTTPS port: no ClientHello
}


def tls_outcomes(agent: AgentProcess) -> dict[str, float]:
    return {
        dict(labels)["outcome"]: value
        for (name, labels), value in scrape(agent).items()
        if name == "meshplane_http_tls_handshakes_total"
    }


def tls_get(port: int, name: str | None, cafile: Path | None) -> bytes:
    """One HTTPS request with Python's ssl; `name` None sends no SNI."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=None if cafile is None else str(cafile))
    if name is None or (cafile is not None and name != cafile.stem):
        context.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        tls.sendall(b"GET /whoami HTTP/1.1\r\nHost: x.test\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    return answer


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_tls_handshakes_by_sni_outcome_summed_over_two_workers(tmp_path: Path) -> None:
    import socket
    import ssl

    from tests.helpers.certs import self_signed

    certs = {host: self_signed(tmp_path, host) for host in ("x.test", "y.test", "pass.test")}
    ports = {"a0": free_port(), "p0": free_port()}
    backend = BackendProcess(
        {"a0": str(ports["a0"]), "p0": f"{ports['p0']},{','.join(map(str, certs['pass.test']))}"},
        tmp_path / "backend.log",
    ).start()
    https_port = free_port()
    agent = AgentProcess(
        tmp_path / "agent",
        extra=[
            "--http-workers", "2", "--https", f"127.0.0.1:{https_port}",
            "--tls-cert", "x.test={},{}".format(*certs["x.test"]),
            "--tls-cert", "y.test={},{}".format(*certs["y.test"]),
        ],
    )  # fmt: skip
    agent.start()
    try:
        assert wait_for(lambda: len(listeners(https_port)) == 2, 20), agent.log()
        assert set(tls_outcomes(agent)) == set(TLS_SENT)  # every outcome has its series
        assert sum(tls_outcomes(agent).values()) == 0
        for name, labels, port in (
            ("alpha", {"mesh.http.hosts": "x.test,y.test", "mesh.http.port": "80"}, ports["a0"]),
            (
                "secure",
                {"com.docker.ucp.mesh.http.443": "external_route=sni://pass.test,internal_port=80"},
                ports["p0"],
            ),
        ):
            status, body = agent.request("POST", "/v1/services", {"name": name, "labels": labels})
            assert status == 201, body
            status, body = agent.request(
                "POST",
                f"/v1/services/{name}/tasks",
                {"address": "127.0.0.1", "ports": {"80": port}},
            )
            assert status == 201, body
        time.sleep(1.0)  # both workers follow the feed to the new routes
        x_ca, y_ca = certs["x.test"][0], certs["y.test"][0]
        for _ in range(4):
            assert tls_get(https_port, "x.test", x_ca).startswith(b"HTTP/1.1 200 ")
        for host, ca in (("y.test", y_ca), ("y.test", y_ca), *(2 * [("pass.test", None)])):
            ca_file = certs[host][0] if ca is None else ca
            result = subprocess.run(
                [
                    "curl", "-s", "--max-time", "10", "--resolve", f"{host}:{https_port}:127.0.0.1",
                    "--cacert", str(ca_file), f"https://{host}:{https_port}/whoami",
                ],
                capture_output=True, text=True, timeout=20, check=False,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
        for _ in range(3):  # the default certificate (x.test's, the first given)
            assert tls_get(https_port, "other.test", x_ca).startswith(b"HTTP/1.1 ")
        for _ in range(2):
            assert tls_get(https_port, None, x_ca).startswith(b"HTTP/1.1 200 ")
        for _ in range(3):  # the system's CAs do not know this certificate
            with pytest.raises(ssl.SSLCertVerificationError):
                tls_get(https_port, "x.test", None)
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", https_port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x.test\r\n\r\n")
                with contextlib.suppress(ConnectionResetError):  # closed unread: a reset
                    assert sock.recv(100) == b""
        want = {outcome: float(n) for outcome, n in TLS_SENT.items()}
        wait_for(lambda: tls_outcomes(agent) == want, 10)  # workers report once a second
        counted = tls_outcomes(agent)
        print(f"sent {TLS_SENT}; /metrics counts {counted}")
        assert counted == want
        samples = scrape(agent)
        terminated = sum(TLS_SENT[k] for k in ("certificate", "default_certificate", "no_sni"))
        assert samples[("meshplane_http_tls_passthrough_total", ())] == TLS_SENT["passthrough"]
        status, http_stats = agent.request("GET", "/v1/http")
        assert status == 200, http_stats
        assert http_stats["tls_outcomes"] == TLS_SENT and http_stats["tls_handshakes"] == terminated
        # A worker killed outright: the counts it reported stay in the sum.
        victim = min(listeners(https_port))
        os.kill(victim, signal.SIGKILL)
        for _ in range(10):
            now = tls_outcomes(agent)
            assert all(now[k] >= counted[k] for k in counted), (now, counted)
            time.sleep(0.2)
    finally:
        agent.stop()
        backend.stop()
