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
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.helpers.sessions import other_sessions

#: interface-name prefixes of the agent's links (mesh/sandbox/names.py)
LINK_PREFIXES = ("mpbr-", "mpob-", "mpvx-", "mpms-", "mpv", "mpt")
#: the sandbox drivers' nftables tables (family, name)
TABLES = (("inet", "meshplane_net"), ("inet", "meshplane_esp"))


def _our_links() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = {str(link.get("IFLA_IFNAME") or "") for link in ipr.get_links()}
    return {name for name in found if name.startswith(LINK_PREFIXES)}


def _our_tables() -> set[str]:
    if shutil.which("nft") is None:
        return set()
    done = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, timeout=30, check=False
    )
    listed = {line.strip() for line in done.stdout.splitlines()}
    return {f"{family} {name}" for family, name in TABLES if f"table {family} {name}" in listed}


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
    if (links or tables) and other_sessions():
        # Another pytest session on this machine may have made them (and may be using
        # them now): neither blame this test nor delete them under it.
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
