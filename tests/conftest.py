"""A guard on the machine's own network namespace, around every test; the VM run's start.

No test may leave a kernel object of ours in the host's namespace: the agent's
links (bridges, overlay bridges and VXLAN devices, veths, macvlan shims) and
its sandbox nftables tables are made in node namespaces the tests create. A
test that leaves one there fails here, naming what it left, and the objects
are removed so that the tests after it are not blamed. Root only (nobody else
can make them); the check reads netlink in-process, so it costs little.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.helpers.sessions import other_sessions, xdist_worker

#: interface-name prefixes of the agent's links (mesh/sandbox/names.py)
LINK_PREFIXES = ("mpbr-", "mpob-", "mpvx-", "mpms-", "mpv", "mpt")
#: the sandbox drivers' nftables tables (family, name)
TABLES = (("inet", "meshplane_net"), ("inet", "meshplane_esp"))


def _our_links() -> set[str]:
    """The host namespace's links by name, from sysfs (microseconds; a netlink dump
    through pyroute2 cost 3 ms, twice a test)."""
    try:
        found = os.listdir("/sys/class/net")
    except OSError:  # no sysfs mounted: ask the kernel over netlink
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            found = [str(link.get("IFLA_IFNAME") or "") for link in ipr.get_links()]
    return {name for name in found if name.startswith(LINK_PREFIXES)}


#: nftables' family numbers (NFPROTO_*) by the names `nft` gives them
_FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


def _our_tables() -> set[str]:
    """Read over netlink in-process (under 1 ms): `nft list tables` as a subprocess
    cost 5 ms, twice a test, a minute of CI over the suite."""
    from pyroute2.nftables.main import NFTables

    try:
        with NFTables(nfgen_family=0) as nft:  # NFPROTO_UNSPEC: every family
            found = {
                f"{_FAMILIES.get(table['nfgen_family'], '?')} {table.get_attr('NFTA_TABLE_NAME')}"
                for table in nft.get_tables()
            }
    except OSError:  # no nf_tables in this kernel: nothing of ours can be there
        return set()
    return found & {f"{family} {name}" for family, name in TABLES}


def _remove(links: set[str], tables: set[str]) -> None:
    for name in sorted(links):
        subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30, check=False)
    for table in sorted(tables):
        subprocess.run(
            ["nft", "delete", "table", *table.split()], capture_output=True, timeout=30, check=False
        )


@pytest.fixture(autouse=True)
def _host_namespace_left_clean() -> Iterator[None]:
    if os.geteuid() != 0:
        yield
        return
    links_before, tables_before = _our_links(), _our_tables()
    yield
    links, tables = _our_links() - links_before, _our_tables() - tables_before
    if (links or tables) and (xdist_worker()[1] > 1 or other_sessions()):
        # Another pytest session on this machine, or another worker of this one, may
        # have made them (and may be using them now): neither blame this test nor
        # delete them under it.
        return
    if links or tables:
        _remove(links, tables)
        pytest.fail(
            "this test left kernel objects of ours in the host's own network namespace "
            f"(removed now): links {sorted(links)}, nftables tables {sorted(tables)}"
        )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the stock-kernel VM's one run now if a host-side VM test was collected.

    It runs in the background, at nice 19, while the tests before tests/kernel/
    run (tests/kernel/vm.py says why); its tests then find it done.
    """
    if session.config.option.collectonly:
        return
    if any(
        item.nodeid.startswith("tests/kernel/") and "_vm.py::" in item.nodeid
        for item in session.items
    ):
        from tests.kernel import vm

        vm.start_in_background()


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.kernel import vm

    vm.stop()
