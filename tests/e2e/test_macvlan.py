"""A macvlan network end to end: the CLI, a real agent in a node namespace, real clients.

The node (tests/helpers/sandbox_lab.py: an agent started with nsenter in its own
namespace) gets a second interface, `lan0`, on a "LAN" 10.214.0.0/24 whose
other end is the lab's outside namespace: it is the LAN's router
(10.214.0.1) and a host on it. docs/networking.md's macvlan example
("### Example: a web task on the LAN") is run verbatim there, then the test
looks from the LAN and from the node at what it made, removes it, and checks
that nothing is left. Every loop is bounded; every figure printed.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from typing import Any

import pytest

from mesh.sandbox.names import SHIM_PREFIX, VETH_PREFIX, mac_of, veth_name
from tests.helpers.netns import unavailable
from tests.helpers.sandbox_lab import REPO, SandboxNode, wait_for

DOC = REPO / "docs" / "networking.md"
ROUTER, SHIM = "10.214.0.1", "10.214.0.254"
CURL = ["curl", "-sS", "--max-time", "3"]


def macvlan_example() -> str:
    section = DOC.read_text().split("## The macvlan driver", 1)[1]
    section = section.split("### Example: a web task on the LAN", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match is not None, "no ```sh block under the macvlan example"
    return match.group(1)


def test_the_doc_has_a_macvlan_example() -> None:
    script = macvlan_example()
    assert "--driver macvlan" in script and "--opt parent=lan0" in script


def test_a_macvlan_network_with_a_sandboxed_task_end_to_end() -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    node = SandboxNode()
    try:
        node.lab.veth(node.node, "lan0", node.outside, "lan1")
        node.outside.add_address("lan1", f"{ROUTER}/24")
        node.start_agent()

        # the API refuses a macvlan network without a parent, saying how to give one
        refused = node.mesh("network", "create", "nolan", "--driver", "macvlan",
                            "--subnet", "10.215.0.0/24")  # fmt: skip
        assert refused.returncode != 0 and "--opt parent=IFACE" in refused.stderr, refused

        started = time.monotonic()
        done = node.run(["sh", "-ec", macvlan_example()], timeout=180)
        print(f"the macvlan example ran in {time.monotonic() - started:.1f} s:\n{done.stdout}")
        assert done.returncode == 0, f"{done.stderr}\n{node.log()}"
        assert "Directory listing for /" in done.stdout  # by name and VIP, sandbox to sandbox

        network: dict[str, Any] = node.mesh_json("network", "inspect", "lan")
        assert (network["driver"], network["scope"]) == ("macvlan", "swarm")
        tasks: list[dict[str, Any]] = node.mesh_json("task", "ls", "web")
        assert len(tasks) == 1
        address = tasks[0]["addresses"]["lan"]
        assert address.startswith("10.214.0.") and 64 <= int(address.rsplit(".", 1)[1]) < 128
        assert address != "10.214.0.70"  # the aux address (the printer) is never handed out

        # the LAN reaches the task at its own address, no port published, no NAT
        took = wait_for(
            lambda: "Directory listing" in node.outside.run([*CURL, f"http://{address}/"]).stdout,
            30,
        )
        assert took is not None, node.log()
        print(f"the LAN's host reached the task at {address} after {took:.1f} s")
        neighbours = node.outside.run(["ip", "neigh", "show", address]).stdout
        assert mac_of(address) in neighbours  # its own MAC on the LAN
        # the node reaches its own endpoint through the shim (never by lan0 alone)
        assert node.run([*CURL, f"http://{address}/"]).returncode == 0
        assert node.run([*CURL, "http://127.0.0.1:8080/"]).returncode == 0  # the routing mesh
        assert SHIM_PREFIX in " ".join(node.links(SHIM_PREFIX))
        # a macvlan endpoint has no host side (the task, publishing a port, also has an
        # ingress endpoint on the overlay: that one is a veth of its own index)
        assert veth_name(tasks[0]["id"], 0) not in node.links(VETH_PREFIX)

        # kill -9 and restart: the endpoint and the shim are found and kept, nothing redone
        # (the log holds the first start's line too: wait for the restart's own)
        earlier = node.log().count("sandboxes_reconciled")
        node.kill_agent()
        node.start_agent()
        shim = node.links(SHIM_PREFIX)
        restarted = wait_for(lambda: node.log().count("sandboxes_reconciled") > earlier, 30)
        assert restarted is not None
        reconciled = [line for line in node.log().splitlines() if "sandboxes_reconciled" in line]
        print(f"after kill -9: {reconciled[-1]}")
        assert "removed=[]" in reconciled[-1] and "repaired=[]" in reconciled[-1]
        assert "created_networks=[]" in reconciled[-1]  # its shim told the driver it was there
        assert node.links(SHIM_PREFIX) == shim
        assert "Directory listing" in node.outside.run([*CURL, f"http://{address}/"]).stdout

        node.mesh_ok("task", "rm", tasks[0]["id"])
        node.mesh_ok("service", "rm", "web")
        node.mesh_ok("network", "rm", "lan")
        assert wait_for(lambda: node.links(SHIM_PREFIX) == set(), 10) is not None, node.log()
        assert wait_for(lambda: node.sandboxes() == set(), 10) is not None
        links = json.loads(node.node.run(["ip", "-j", "link", "show", "lan0"], check=True).stdout)
        assert links and links[0]["ifname"] == "lan0"  # the parent is not ours: it stays
    except subprocess.TimeoutExpired:
        print(node.log())
        raise
    finally:
        node.close()
