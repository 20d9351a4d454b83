"""Issue 15 "Done when", end to end: sandboxed tasks on bridge networks, real clients.

One node namespace with a real agent (`--lb nftables`, started with nsenter),
an outside namespace beyond the node's default route; four bridge networks:

- neta: s1 (alias `front` on neta, published 8080:80, HRM host s1.test) and
  s2, two tasks each; ab (on neta and netb), one task;
- netb: sb (one task) and ab;
- neti (`--internal`): si;   netq (`--opt icc=false`): sq, two tasks.

Every task is started with `mesh task run --detach` and serves HTTP (its name)
on port 80 of its sandbox. Clients are ad-hoc sandboxes (`mesh run --network`)
using curl and getent: the glibc resolver, through the sandbox's resolv.conf
(127.0.0.11). Every loop is bounded in count and time; every figure printed.
"""

from __future__ import annotations

import collections
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.dns_upstream import FakeUpstream
from tests.helpers.netns import unavailable
from tests.helpers.sandbox_lab import IDENT_SERVER, NODE_UPLINK, OUTSIDE, SandboxNode, wait_for

NETWORKS = {
    "neta": ["--subnet", "10.89.1.0/24"],
    "netb": ["--subnet", "10.89.2.0/24"],
    "neti": ["--subnet", "10.89.3.0/24", "--internal"],
    "netq": ["--subnet", "10.89.4.0/24", "--opt", "icc=false"],
}
SERVICES = {
    "s1": [
        "--network",
        "name=neta,alias=front",
        "--publish",
        "8080:80",
        "--label",
        "mesh.http.hosts=s1.test",
        "--label",
        "mesh.http.port=80",
    ],
    # A VIP forwards the ports a service declares: each publishes its 80.
    "s2": ["--network", "neta", "--publish", "8082:80"],
    "sb": ["--network", "netb", "--publish", "8083:80"],
    "ab": ["--network", "neta", "--network", "netb", "--publish", "8084:80"],
    "si": ["--network", "neti", "--publish", "8085:80"],
    "sq": ["--network", "netq", "--publish", "8086:80"],
}
TASKS = {
    "s1": ["s1-a", "s1-b"],
    "s2": ["s2-a", "s2-b"],
    "sb": ["sb-a"],
    "ab": ["ab-a"],
    "si": ["si-a"],
    "sq": ["sq-a", "sq-b"],
}
CURL = ["curl", "-sS", "--max-time", "3"]


class Mesh:
    """The node, its tasks' records and the services' VIPs per network."""

    def __init__(self, node: SandboxNode) -> None:
        self.node = node
        self.tasks: dict[str, dict[str, Any]] = {}
        self.vips: dict[str, dict[str, str]] = {}

    def run_on(
        self, network: str, script: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`mesh run --network NETWORK -- sh -c SCRIPT` (an ad-hoc sandbox)."""
        return self.node.mesh(
            "run", "--network", network, "--", "sh", "-c", script, timeout=timeout
        )

    def address(self, task: str, network: str) -> str:
        return str(self.tasks[task]["addresses"][network])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    for tool in ("curl", "dig", "getent", "nft", "nsenter"):
        if subprocess.run(["which", tool], capture_output=True, check=False).returncode:
            pytest.skip(f"{tool} is not installed")
    node = SandboxNode()
    upstream: FakeUpstream | None = None
    try:
        # A resolver beyond the node for names the mesh does not own: NXDOMAIN for all.
        upstream = node.outside.call(lambda: FakeUpstream({}, host=OUTSIDE, port=53).start())
        node.dns_upstream = f"{OUTSIDE}:53"
        node.start_agent()
        outside = node.outside.popen(
            [sys.executable, str(IDENT_SERVER), "8000", "outside"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        node.started.append(outside)
        made = Mesh(node)
        for name, flags in NETWORKS.items():
            node.mesh_ok("network", "create", name, "--driver", "bridge", *flags)
        for name, flags in SERVICES.items():
            node.mesh_ok("service", "create", name, *flags)
        started = time.monotonic()
        for service, names in TASKS.items():
            for name in names:
                made.tasks[name] = node.serve(service, name)
        print(f"{len(made.tasks)} tasks run --detach in {time.monotonic() - started:.1f} s")
        for service in SERVICES:
            record = node.mesh_json("service", "inspect", service)
            made.vips[service] = {v["network"]: v["address"] for v in record["vips"]}
        for name, task in made.tasks.items():
            address = task["address"]

            def answers(address: str = address, name: str = name) -> bool:
                done = node.run([*CURL, f"http://{address}/"], timeout=10)
                return done.stdout.strip() == name

            assert wait_for(answers, 30) is not None, f"task {name} never served:\n{node.log()}"
        yield made
    finally:
        if node.agent is not None and node.agent.poll() is not None:
            print(f"the agent had exited ({node.agent.returncode}):\n{node.log()}")
        if upstream is not None:
            upstream.stop()
        node.close()


def warm(service: str) -> str:
    """A shell line that waits (bounded) until `service` answers by name from here.

    The first connection from a fresh sandbox is tested on its own
    (test_the_first_connection_from_a_fresh_sandbox_succeeds); the other tests
    look at what follows it.
    """
    return (
        "curl -s -o /dev/null --max-time 3 --retry 10 --retry-all-errors --retry-delay 1 "
        f"http://{service}/; "
    )


def idents(out: str) -> collections.Counter[str]:
    return collections.Counter(line.strip() for line in out.splitlines() if line.strip())


def getent(mesh: Mesh, network: str, name: str) -> tuple[int, list[str]]:
    done = mesh.run_on(network, f"getent hosts {shlex.quote(name)}; echo rc=$?")
    lines = done.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("rc="), done.stderr
    return int(lines[-1][3:]), [line.split()[0] for line in lines[:-1]]


def test_a_sandbox_resolves_with_glibc_at_127_0_0_11(mesh: Mesh) -> None:
    done = mesh.run_on("neta", "cat /etc/resolv.conf; getent hosts s1")
    assert done.returncode == 0, done.stderr
    assert "nameserver 127.0.0.11" in done.stdout
    assert mesh.vips["s1"]["neta"] in done.stdout.split()


def test_the_first_connection_from_a_fresh_sandbox_succeeds(mesh: Mesh) -> None:
    """`mesh run -- curl http://s1/`: the sandbox's LB is programmed before CMD starts."""
    failures = 0
    for _ in range(5):
        done = mesh.run_on("neta", "curl -sS --max-time 3 http://s1/")
        failures += done.stdout.strip() not in TASKS["s1"]
    print(f"first connections from 5 fresh sandboxes: {5 - failures} answered")
    assert failures == 0


def test_curl_by_name_spreads_over_the_services_tasks(mesh: Mesh) -> None:
    for service in ("s1", "s2"):
        script = warm(service) + (
            f"for i in $(seq 1 20); do curl -sS --max-time 3 http://{service}/; done"
        )
        started = time.monotonic()
        done = mesh.run_on("neta", script)
        seen = idents(done.stdout)
        print(
            f"{service}: 20 curls from a sandbox on neta in {time.monotonic() - started:.1f} s: "
            f"{dict(seen)}"
        )
        assert set(seen) == set(TASKS[service]), (done.stdout, done.stderr)
        assert sum(seen.values()) == 20


def test_a_service_of_another_network_is_nxdomain_and_unreachable(mesh: Mesh) -> None:
    rc, addresses = getent(mesh, "neta", "sb")
    assert (rc, addresses) == (2, [])  # getent: 2 = not found
    # `sb` is not the mesh's on neta: forwarded, and the resolver beyond says NXDOMAIN;
    # `tasks.sb` is mesh-space, answered NXDOMAIN by the agent itself.
    for name in ("sb", "tasks.sb"):
        done = mesh.run_on("neta", f"dig +time=2 +tries=1 @127.0.0.11 {name} A")
        assert "status: NXDOMAIN" in done.stdout, done.stdout
    target = mesh.address("sb-a", "netb")
    unreachable = mesh.run_on("neta", f"curl -sS --max-time 1 http://{target}/; echo rc=$?")
    assert "sb-a" not in unreachable.stdout
    assert "rc=0" not in unreachable.stdout
    # The same from netb works: what failed was the isolation, not the task.
    out = mesh.run_on("netb", warm("sb") + "curl -sS --max-time 3 http://sb/").stdout
    assert idents(out) == {"sb-a": 1}
    assert "sb-a" in mesh.run_on("netb", f"curl -sS --max-time 3 http://{target}/").stdout


def test_a_service_on_two_networks_answers_each_side_with_its_own_vip(mesh: Mesh) -> None:
    vips = mesh.vips["ab"]
    assert vips["neta"] != vips["netb"]
    assert getent(mesh, "neta", "ab") == (0, [vips["neta"]])
    assert getent(mesh, "netb", "ab") == (0, [vips["netb"]])
    for network in ("neta", "netb"):
        out = mesh.run_on(network, warm("ab") + "curl -sS --max-time 3 http://ab/").stdout
        assert idents(out) == {"ab-a": 1}, (network, out)


def test_an_internal_network_has_no_route_out(mesh: Mesh) -> None:
    probe = f"ip -4 route show default; curl -sS --max-time 3 http://{OUTSIDE}:8000/; echo rc=$?"
    outward = mesh.run_on("neta", probe).stdout
    assert "outside" in outward and "default via" in outward  # the way out exists...
    inside = mesh.run_on("neti", probe).stdout
    print(f"from neta: {outward!r}; from neti: {inside!r}")
    assert "default" not in inside  # ...but not from an internal network
    assert "outside" not in inside and "rc=0" not in inside
    # Inside the internal network names and VIPs still work.
    out = mesh.run_on("neti", warm("si") + "curl -sS --max-time 3 http://si/").stdout
    assert idents(out) == {"si-a": 1}


def test_icc_false_keeps_endpoints_of_one_network_apart(mesh: Mesh) -> None:
    other = mesh.address("sq-b", "netq")
    blocked = mesh.node.mesh(
        "task", "exec", "sq-a", "--", "curl", "-sS", "--max-time", "3", f"http://{other}/"
    )
    assert blocked.returncode != 0 and "sq-b" not in blocked.stdout
    # The same on a network with icc (the default) works: what failed was icc=false.
    sibling = mesh.address("s1-b", "neta")
    allowed = mesh.node.mesh(
        "task", "exec", "s1-a", "--", "curl", "-sS", "--max-time", "3", f"http://{sibling}/"
    )
    assert allowed.stdout.strip() == "s1-b", allowed.stderr
    # From outside the network (the node: the routing mesh's side) both tasks answer.
    for name in ("sq-a", "sq-b"):
        done = mesh.node.run([*CURL, f"http://{mesh.address(name, 'netq')}/"])
        assert done.stdout.strip() == name
    # The routing mesh path stays (docs/networking.md): the published port reaches both.
    seen = idents(
        "\n".join(
            mesh.node.outside.run([*CURL, f"http://{NODE_UPLINK}:8086/"], check=False).stdout
            for _ in range(6)
        )
    )
    print(f"icc=false: published 8086 from outside: {dict(seen)}")
    assert set(seen) == {"sq-a", "sq-b"}


def test_an_alias_resolves_on_its_network_only(mesh: Mesh) -> None:
    assert getent(mesh, "neta", "front") == (0, [mesh.vips["s1"]["neta"]])
    assert getent(mesh, "netb", "front")[0] == 2
    out = mesh.run_on(
        "neta", warm("front") + "for i in 1 2 3 4; do curl -sS --max-time 3 http://front/; done"
    ).stdout
    assert set(idents(out)) <= {"s1-a", "s1-b"} and sum(idents(out).values()) == 4


def test_a_published_port_and_the_hrm_reach_the_sandboxed_tasks(mesh: Mesh) -> None:
    outside = mesh.node.outside
    published = idents(
        "\n".join(
            outside.run([*CURL, f"http://{NODE_UPLINK}:8080/"], check=False).stdout
            for _ in range(10)
        )
    )
    routed = idents(
        "\n".join(
            outside.run(
                [*CURL, "-H", "Host: s1.test", f"http://{NODE_UPLINK}/"], check=False
            ).stdout
            for _ in range(10)
        )
    )
    print(f"published 8080 from outside: {dict(published)}; HRM Host s1.test: {dict(routed)}")
    assert set(published) == {"s1-a", "s1-b"}
    assert set(routed) == {"s1-a", "s1-b"}


def test_task_ls_shows_the_addresses_and_doctor_checks_the_sandboxes(mesh: Mesh) -> None:
    table = mesh.node.mesh_ok("task", "ls", "ab")
    ab = mesh.tasks["ab-a"]
    assert f"neta:{ab['addresses']['neta']},netb:{ab['addresses']['netb']}" in table
    done = mesh.node.mesh("doctor", "--settle", "0", "--json", timeout=120)
    report = json.loads(done.stdout)
    sandbox = [f for f in report["findings"] if f["check"] == "sandbox"]
    failed = [f["message"] for f in sandbox if f["status"] == "fail"]
    print(f"doctor: {len(sandbox)} sandbox findings, failed: {failed}")
    assert not failed
    for name in mesh.tasks:
        assert any(f"sandbox of {name}:" in f["message"] for f in sandbox), name
    assert any("VIP of s1" in f["message"] and f["status"] == "ok" for f in sandbox)


def test_doctor_names_a_broken_sandbox(mesh: Mesh) -> None:
    """An endpoint set down behind the agent's back is reported, then put back."""
    netns = mesh.tasks["s2-b"]["sandbox"]["netns"]
    name = Path(netns).name
    subprocess.run(["ip", "-n", name, "link", "set", "eth0", "down"], check=True, timeout=10)
    try:
        done = mesh.node.mesh("doctor", "--settle", "0", "--json", timeout=120)
        failed = [
            f["message"]
            for f in json.loads(done.stdout)["findings"]
            if f["status"] == "fail" and f["check"] == "sandbox"
        ]
        print(f"doctor with eth0 of s2-b down: {failed}")
        assert done.returncode == 1
        assert "sandbox of s2-b: eth0 is down" in failed
    finally:
        subprocess.run(["ip", "-n", name, "link", "set", "eth0", "up"], check=True, timeout=10)
        subprocess.run(
            ["ip", "-n", name, "route", "replace", "default", "via", "10.89.1.1"],
            check=False,
            timeout=10,
        )


def test_task_run_in_the_foreground_passes_the_exit_status_and_removes_the_task(
    mesh: Mesh,
) -> None:
    before = mesh.node.sandboxes()
    done = mesh.node.mesh("task", "run", "s2", "--name", "fg", "--", "sh", "-c", "exit 5")
    assert done.returncode == 5, done.stderr

    def gone() -> bool:  # removing a task drains it first (--drain-grace)
        return "fg" not in [t["name"] for t in mesh.node.mesh_json("task", "ls", "s2")]

    assert wait_for(gone, 10) is not None
    assert wait_for(lambda: mesh.node.sandboxes() == before, 10) is not None


def test_task_run_is_removed_on_sigterm_of_mesh(mesh: Mesh) -> None:
    before = mesh.node.sandboxes()
    proc = mesh.node.popen_mesh(
        "task",
        "run",
        "s2",
        "--name",
        "sig",
        "--",
        "sleep",
        "60",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def listed() -> bool:
        return "sig" in [t["name"] for t in mesh.node.mesh_json("task", "ls", "s2")]

    assert wait_for(listed, 30) is not None
    started = time.monotonic()
    proc.terminate()
    status = proc.wait(20)
    print(f"mesh task run ended {time.monotonic() - started:.2f} s after SIGTERM, status {status}")
    assert status == 128 + 15
    assert wait_for(lambda: not listed(), 10) is not None
    assert wait_for(lambda: mesh.node.sandboxes() == before, 10) is not None


def test_task_add_sandbox_prints_a_namespace_that_ip_netns_exec_can_use(mesh: Mesh) -> None:
    path = mesh.node.mesh_ok("task", "add", "s2", "--sandbox", "--name", "bare").strip()
    try:
        assert path.startswith(f"/run/netns/{mesh.node.prefix}")
        done = subprocess.run(
            ["ip", "netns", "exec", Path(path).name, "getent", "hosts", "s1"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert mesh.vips["s1"]["neta"] in done.stdout, done.stderr
    finally:
        mesh.node.mesh_ok("task", "rm", "bare")


def test_mesh_run_refuses_a_network_that_is_not_attachable(mesh: Mesh) -> None:
    mesh.node.mesh_ok("network", "create", "shut", "--driver", "bridge", "--attachable=false")
    try:
        done = mesh.node.mesh("run", "--network", "shut", "--", "true")
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and "not attachable" in done.stderr
    finally:
        mesh.node.mesh_ok("network", "rm", "shut")


def test_task_add_adopts_a_namespace_and_removes_only_what_it_added(mesh: Mesh) -> None:
    """`--netns NAME`: endpoints added to a namespace that is not the agent's; on
    `task rm` they go and the namespace (with its own loopback address) stays."""
    name = f"{mesh.node.lab.prefix}-adopt"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(
            ["ip", "-n", name, "address", "add", "127.0.0.7/8", "dev", "lo"], check=True, timeout=10
        )
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        path = mesh.node.mesh_ok("task", "add", "s2", "--sandbox", "--netns", name, "--name", "ad")
        assert path.strip() == f"/run/netns/{name}"
        task = next(t for t in mesh.node.mesh_json("task", "ls", "s2") if t["name"] == "ad")
        assert task["sandbox"]["adopted"] is True
        inside = subprocess.run(
            ["ip", "-n", name, "-4", "-o", "address", "show", "dev", "eth0"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert task["address"] in inside.stdout
        # DNS at 127.0.0.11 inside the adopted namespace too (dig: no resolv.conf is ours)
        answer = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                name,
                "dig",
                "+short",
                "+time=2",
                "+tries=1",
                "@127.0.0.11",
                "s1",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert answer.stdout.split() == [mesh.vips["s1"]["neta"]], answer
        mesh.node.mesh_ok("task", "rm", "ad")

        def endpoint_gone() -> bool:
            links = subprocess.run(
                ["ip", "-n", name, "-o", "link", "show"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
            return "eth0" not in links

        assert wait_for(endpoint_gone, 15) is not None
        assert Path(f"/run/netns/{name}").exists()
        kept = subprocess.run(
            ["ip", "-n", name, "-4", "-o", "address", "show", "dev", "lo"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert "127.0.0.7" in kept.stdout
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=10)


def test_task_run_port_maps_the_services_port_to_the_tasks(mesh: Mesh) -> None:
    """`--port 80=8081`: the VIP's port 80 reaches the task on its 8081."""
    mesh.node.mesh_ok("service", "create", "sp", "--network", "neta", "--publish", "8087:80")
    try:
        mesh.node.mesh_ok(
            "task",
            "run",
            "sp",
            "--detach",
            "--port",
            "80=8081",
            "--name",
            "sp-a",
            "--",
            sys.executable,
            str(IDENT_SERVER),
            "8081",
            "sp-a",
        )
        out = mesh.run_on("neta", warm("sp") + "curl -sS --max-time 3 http://sp/").stdout
        assert idents(out) == {"sp-a": 1}, out
    finally:
        mesh.node.mesh_ok("service", "rm", "sp")


def test_mesh_run_alias_names_the_ad_hoc_sandbox_on_its_network(mesh: Mesh) -> None:
    proc = mesh.node.popen_mesh(
        "run",
        "--network",
        "neta",
        "--alias",
        "probe",
        "--",
        "sleep",
        "30",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def resolves() -> bool:
            return getent(mesh, "neta", "probe")[0] == 0

        assert wait_for(resolves, 20) is not None
        assert getent(mesh, "netb", "probe")[0] == 2
    finally:
        proc.terminate()
        assert proc.wait(30) == 128 + 15

    def gone() -> bool:
        names = [s["name"] for s in mesh.node.mesh_json("service", "ls")]
        return not any(n.startswith("run-") for n in names)

    assert wait_for(gone, 15) is not None
