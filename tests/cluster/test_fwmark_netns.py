"""`--fwmark`: the nftables backend's mark bit, checked at start against the node's rules.

In a fresh namespace (a node), another tool's table tests the default bit 0x1000:
the agent with `--lb nftables` refuses to start, naming that rule and the flag;
with `--fwmark 0x40` it starts, and its table's masquerade rules use 0x40.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cluster.conftest import NetnsAgent, require_tools
from tests.helpers.netns import Lab

pytestmark = [pytest.mark.root]

OTHER_TOOL = """table ip othertool {
  chain post { type nat hook postrouting priority srcnat; meta mark & 0x1000 == 0x1000 masquerade; }
}"""


def test_a_mark_bit_taken_by_another_rule_refuses_the_start(
    netns_ready: None, tmp_path: Path
) -> None:
    require_tools("nft")
    with Lab("mpfw") as lab:
        node = lab.namespace("node")
        node.up("lo")
        node.run(["nft", "-f", "-"], input=OTHER_TOOL)
        refused = NetnsAgent(node, tmp_path / "a", extra=["--lb", "nftables"])
        with pytest.raises(RuntimeError, match="agent exited") as failure:
            refused.start(timeout=20)
        message = str(failure.value)
        print(f"\nrefused: {message.strip().splitlines()[-1]}")
        assert "--fwmark 0x1000" in message and "othertool" in message
        agent = NetnsAgent(node, tmp_path / "b", extra=["--lb", "nftables", "--fwmark", "0x40"])
        agent.start()
        try:
            listing = json.loads(node.run(["nft", "-j", "list", "table", "ip", "meshplane"]).stdout)
            text = json.dumps(listing)
            assert '"mark"' in text and "64" in text  # 0x40 in the masquerade rules
            assert "4096" not in text  # never the taken bit
        finally:
            agent.shutdown()
