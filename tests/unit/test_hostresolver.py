"""--configure-resolver on temp paths: resolv.conf or a systemd-resolved drop-in, put
back byte for byte (a symlink again), after a crash too, only our lines when someone
else rewrote the file meanwhile."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.config import ConfigError, load_config
from mesh.core.net import HostPort
from mesh.hostresolver import (
    BACKUP_NAME,
    DROPIN_NAME,
    MARKER,
    HostResolver,
    ResolverConfigError,
    ResolverPaths,
    dropin_text,
    with_mesh_nameserver,
    without_mesh_lines,
)

ORIGINAL = "# from DHCP\nsearch example.org\nnameserver 192.0.2.53\noptions edns0\n"
DNS = HostPort("127.0.0.11", 53)


def paths(tmp: Path, resolved: bool = False) -> ResolverPaths:
    running = tmp / "run/resolve/io.systemd.Resolve"
    if resolved:
        running.parent.mkdir(parents=True)
        running.touch()
    return ResolverPaths(
        resolv_conf=tmp / "etc/resolv.conf",
        resolved_dropins=tmp / "run/resolved.conf.d",
        resolved_running=running,
        reload_resolved=("sh", "-c", f"echo reload >> {tmp / 'reloads'}"),
    )


@pytest.fixture
def host(tmp_path: Path) -> HostResolver:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/resolv.conf").write_text(ORIGINAL)
    (tmp_path / "data").mkdir()
    return HostResolver(tmp_path / "data", "mesh", DNS, paths(tmp_path))


def test_the_text_functions_add_once_and_take_back_exactly() -> None:
    added = with_mesh_nameserver(ORIGINAL, "127.0.0.11")
    assert added.splitlines()[:2] == [MARKER, "nameserver 127.0.0.11"]
    assert with_mesh_nameserver(added, "127.0.0.11") == added  # never twice
    assert without_mesh_lines(added) == ORIGINAL
    assert without_mesh_lines(ORIGINAL) == ORIGINAL
    assert dropin_text("mesh.", DNS).endswith("[Resolve]\nDNS=127.0.0.11\nDomains=~mesh\n")
    assert "DNS=127.0.0.11:5353\n" in dropin_text("mesh", HostPort("127.0.0.11", 5353))


def test_resolv_conf_gets_the_agent_first_and_gets_its_bytes_back(host: HostResolver) -> None:
    conf = host.paths.resolv_conf
    assert host.apply() == "resolv.conf"
    lines = conf.read_text().splitlines()
    assert lines[1] == "nameserver 127.0.0.11"
    assert "nameserver 192.0.2.53" in lines  # the others stay, after it
    assert (host.data_dir / BACKUP_NAME).exists()
    assert host.undo() == "resolv.conf"
    assert conf.read_text() == ORIGINAL
    assert not (host.data_dir / BACKUP_NAME).exists()
    assert host.undo() is None  # nothing left to do


def test_a_crashed_run_is_undone_by_the_next_from_the_backup(host: HostResolver) -> None:
    host.apply()
    # kill -9: nothing undone; the next start knows only the data dir.
    later = HostResolver(host.data_dir, "", DNS, host.paths)
    assert later.undo() == "resolv.conf"
    assert host.paths.resolv_conf.read_text() == ORIGINAL


def test_a_symlinked_resolv_conf_is_a_symlink_again(host: HostResolver, tmp_path: Path) -> None:
    target = tmp_path / "run/stub-resolv.conf"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(ORIGINAL)
    conf = host.paths.resolv_conf
    conf.unlink()
    conf.symlink_to(target)
    host.apply()
    assert not conf.is_symlink() and "127.0.0.11" in conf.read_text()
    assert target.read_text() == ORIGINAL  # written beside, never through, the link
    host.undo()
    assert conf.is_symlink() and conf.readlink() == target


def test_rewritten_by_someone_else_only_our_lines_go(host: HostResolver) -> None:
    conf = host.paths.resolv_conf
    host.apply()
    conf.write_text(conf.read_text() + "nameserver 198.51.100.1\n")  # a DHCP client, say
    host.undo()
    assert conf.read_text() == ORIGINAL + "nameserver 198.51.100.1\n"
    conf.write_text("nameserver 203.0.113.9\n")  # replaced whole: left alone
    host.apply()
    conf.write_text("nameserver 203.0.113.10\n")
    host.undo()
    assert conf.read_text() == "nameserver 203.0.113.10\n"


def test_without_resolved_the_dns_must_be_on_port_53(host: HostResolver) -> None:
    host.dns = HostPort("127.0.0.11", 5353)
    with pytest.raises(ResolverConfigError, match="port 53"):
        host.apply()
    assert host.paths.resolv_conf.read_text() == ORIGINAL


def test_with_resolved_a_dropin_routes_the_domain_only(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/resolv.conf").write_text(ORIGINAL)
    host = HostResolver(tmp_path, "mesh", DNS, paths(tmp_path, resolved=True))
    assert host.apply() == "resolved"
    dropin = tmp_path / "run/resolved.conf.d" / DROPIN_NAME
    assert "Domains=~mesh\n" in dropin.read_text()
    assert (tmp_path / "etc/resolv.conf").read_text() == ORIGINAL  # untouched
    assert host.undo() == "resolved"
    assert not dropin.exists()
    assert (tmp_path / "reloads").read_text() == "reload\nreload\n"


def test_the_flag_needs_a_dns_domain_and_the_dns_server() -> None:
    with pytest.raises(ConfigError, match="configure-resolver needs"):
        load_config(["--configure-resolver"], env={})
    with pytest.raises(ConfigError, match="configure-resolver needs"):
        load_config(["--configure-resolver", "--dns-domain", "mesh", "--dns", "none"], env={})
    config = load_config(["--configure-resolver", "--dns-domain", "mesh"], env={})
    assert config.configure_resolver


def test_a_leftover_backup_is_restored_before_a_new_one_is_taken(host: HostResolver) -> None:
    host.apply()
    # The restore at start failed (say): the next apply must not save our file as the
    # host's own.
    fresh = HostResolver(host.data_dir, "mesh", DNS, host.paths)
    fresh.apply()
    fresh.undo()
    assert host.paths.resolv_conf.read_text() == ORIGINAL
