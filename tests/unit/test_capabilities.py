"""Capabilities at start (mesh/core/capabilities.py): read from CapEff, one line per lack."""

from __future__ import annotations

from pathlib import Path

from mesh.core.capabilities import (
    ALL,
    CAP_NET_ADMIN,
    CAP_NET_BIND_SERVICE,
    CAP_SYS_ADMIN,
    Capabilities,
    effective,
    missing,
    parse_cap_eff,
    unprivileged_port_start,
)

#: what `setpriv --ambient-caps=+net_admin,+net_bind_service` leaves a service user
UNIT = Capabilities(1 << CAP_NET_ADMIN | 1 << CAP_NET_BIND_SERVICE)


def test_cap_eff_is_parsed_from_proc_status(tmp_path: Path) -> None:
    status = "Name:\tmesh\nCapInh:\t0000000000000000\nCapPrm:\t0000000000001400\n"
    status += "CapEff:\t0000000000001400\nCapBnd:\t000001ffffffffff\n"
    assert parse_cap_eff(status) == 0x1400
    assert parse_cap_eff("Name:\tx\n") is None
    assert parse_cap_eff("CapEff:\tzz\n") is None
    path = tmp_path / "status"
    path.write_text(status)
    caps = effective(str(path))
    assert caps.net_admin and caps.net_bind_service and not caps.sys_admin
    # Unreadable: no capability at all, never a crash.
    assert effective(str(tmp_path / "absent")) == Capabilities(0)


def test_root_and_the_full_set_lack_nothing() -> None:
    assert missing(ALL, low_ports=["dns 127.0.0.11:53"], kernel_lb="auto", sandboxes=True) == []


def test_the_service_user_lacks_only_sys_admin_which_turns_sandboxes_off() -> None:
    lacking = missing(UNIT, low_ports=["dns 127.0.0.11:53"], kernel_lb="auto", sandboxes=True)
    assert [m.line() for m in lacking] == [
        "no CAP_SYS_ADMIN: sandboxes (network namespaces) are disabled: bridge networks "
        "and sandboxed tasks are refused with 422 needs_privileges"
    ]
    assert missing(UNIT, low_ports=[], kernel_lb=None, sandboxes=False) == []


def test_one_line_per_missing_capability_naming_what_it_disables() -> None:
    lacking = missing(
        Capabilities(0),
        low_ports=["dns 127.0.0.11:53", "http 0.0.0.0:80"],
        kernel_lb="auto",
        sandboxes=True,
    )
    assert [m.capability for m in lacking] == [
        "CAP_NET_ADMIN",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_ADMIN",
    ]
    lines = [m.line() for m in lacking]
    for line in lines:
        print(line)
        assert "\n" not in line
    assert "the kernel load balancers (--lb auto takes userspace)" in lines[0]
    assert "dns 127.0.0.11:53, http 0.0.0.0:80" in lines[1]
    assert "refuses to start" in lines[1]
    assert "sandboxes (network namespaces) are disabled" in lines[2]
    # Asked for by name, the kernel LB refuses the start.
    named = missing(Capabilities(0), low_ports=[], kernel_lb="nftables", sandboxes=False)
    assert next(m.line() for m in named).startswith(
        "no CAP_NET_ADMIN: --lb nftables (the agent refuses to start)"
    )
    # Nothing on a low port: no CAP_NET_BIND_SERVICE line.
    assert all(
        m.capability != "CAP_NET_BIND_SERVICE"
        for m in missing(Capabilities(0), low_ports=[], kernel_lb=None, sandboxes=True)
    )


def test_capability_bits_are_the_kernels() -> None:
    # include/uapi/linux/capability.h
    assert (CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_SYS_ADMIN) == (10, 12, 21)


def test_the_unprivileged_port_start_is_read_or_defaults_to_1024(tmp_path: Path) -> None:
    knob = tmp_path / "ip_unprivileged_port_start"
    knob.write_text("0\n")
    assert unprivileged_port_start(knob) == 0
    assert unprivileged_port_start(tmp_path / "absent") == 1024
