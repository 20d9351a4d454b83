"""Other test sessions on this machine: who else may be making kernel objects now.

The host-namespace guard (tests/conftest.py) compares the machine's links and
nftables tables before and after each test. On a machine where other pytest
sessions run at the same time (a CI run beside a developer's, several work
trees), the objects one of them makes for a moment show up in another's
comparison: that test is blamed for what it never made, and the guard's
clean-up deletes the other session's objects under it. So the guard asks here
first whether any pytest runs that is not this session (nor its parent, such as
`timeout`), reading /proc.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

#: pid -> (parent pid, argv)
ProcessTable = Mapping[int, tuple[int, list[str]]]


def is_pytest(argv: list[str]) -> bool:
    """`pytest ...`, `python -m pytest ...`, `.venv/bin/pytest`, `timeout 300 pytest ...`."""
    return any(os.path.basename(arg) in ("pytest", "py.test") for arg in argv)


def others(table: ProcessTable, me: int) -> list[int]:
    """The pytest processes that are neither `me`, my ancestors, nor my descendants."""
    ancestors = set()
    pid = me
    while pid in table and pid not in ancestors:
        ancestors.add(pid)
        pid = table[pid][0]
    found = []
    for pid, (_, argv) in table.items():
        if pid in ancestors or not is_pytest(argv):
            continue
        line, seen = pid, set()  # mine if one of its ancestors is me
        while line in table and line != me and line not in seen:
            seen.add(line)
            line = table[line][0]
        if line != me:
            found.append(pid)
    return sorted(found)


def process_table() -> dict[int, tuple[int, list[str]]]:
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])  # after "(comm)": state, ppid
        table[int(entry.name)] = (ppid, [arg.decode(errors="replace") for arg in argv if arg])
    return table


def other_sessions() -> list[int]:
    """pids of the pytest sessions running on this machine besides this one."""
    return others(process_table(), os.getpid())


def xdist_worker() -> tuple[int, int]:
    """(this pytest-xdist worker's index, the number of workers); (0, 1) outside xdist.

    `make test` runs the loopback suites on two workers: the port helper gives each
    its own share of ports, and the host-namespace guard cannot blame a test for
    what it sees while another worker runs."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not name.startswith("gw") or not name[2:].isdigit() or count < 1:
        return 0, 1
    return int(name[2:]) % count, count
