"""`deploy/netns-cluster up --user UID[:GID] [--caps ...]`: how the agents are started."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def harness() -> ModuleType:
    if "netns_cluster" in sys.modules:
        return sys.modules["netns_cluster"]
    spec = importlib.util.spec_from_file_location(
        "netns_cluster", REPO / "deploy" / "netns_cluster.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["netns_cluster"] = module
    spec.loader.exec_module(module)
    return module


def test_user_and_caps_are_parsed_with_the_units_capabilities_by_default() -> None:
    run_as = harness().RunAs.parse("999", None)
    assert (run_as.uid, run_as.gid, run_as.caps) == (999, 999, ("net_admin", "net_bind_service"))
    run_as = harness().RunAs.parse("999:998", "net_admin,sys_admin")
    assert (run_as.uid, run_as.gid, run_as.caps) == (999, 998, ("net_admin", "sys_admin"))
    with pytest.raises(harness().ClusterError, match="UID"):
        harness().RunAs.parse("meshplane", None)


def test_setpriv_gives_exactly_those_capabilities_ambient_and_no_new_privileges() -> None:
    prefix = harness().RunAs(999, 998).prefix()
    assert prefix == [
        "setpriv",
        "--reuid=999",
        "--regid=998",
        "--clear-groups",
        "--inh-caps=-all,+net_admin,+net_bind_service",
        "--ambient-caps=-all,+net_admin,+net_bind_service",
        "--bounding-set=-all,+net_admin,+net_bind_service",
        "--no-new-privs",
        "--",
    ]


def test_the_command_line_takes_user_and_caps() -> None:
    args = harness().parser().parse_args(["up", "3", "--user", "65534", "--caps", "net_admin"])
    assert (args.user, args.caps) == ("65534", "net_admin")
    assert harness().parser().parse_args(["up", "3"]).user is None
