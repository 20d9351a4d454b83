"""`mesh agent --configure-resolver`: the host's resolver asks the agent for mesh names.

Where systemd-resolved runs, a drop-in `meshplane.conf` in its runtime config dir
routes the cluster domain only (`Domains=~<dns-domain>`) to the agent's DNS
address; resolved is reloaded. Elsewhere, /etc/resolv.conf gets a `nameserver`
line for the agent first: resolv.conf cannot route one domain, so every query
then reaches the agent, which answers its own names and forwards the rest to the
upstreams it read before (it never forwards to itself). resolv.conf has no port,
so this mode needs the agent's DNS on port 53.

Undone when the agent stops: the drop-in removed, or resolv.conf put back as it
was (the same bytes; a symlink again if it was one). What was there before is
saved in `<data-dir>/resolver-backup.json` before anything is changed, so an agent
that was killed restores it at its next start, with or without the flag. When
something else (a DHCP client, an operator) rewrote resolv.conf meanwhile, only our
own lines are taken out of it.

The text is made by pure functions (`dropin_text`, `with_mesh_nameserver`,
`without_mesh_lines`); `HostResolver` does the files, written whole (temp file,
fsync, rename; in place when the file is a mount point, as a container's
resolv.conf is, which cannot be renamed over).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from mesh.core.net import HostPort

MARKER = "# meshplane: added by `mesh agent --configure-resolver`; removed when it stops"
DROPIN_NAME = "meshplane.conf"
BACKUP_NAME = "resolver-backup.json"


class ResolverConfigError(Exception):
    """The host's resolver cannot be pointed at the agent as asked."""


def dropin_text(domain: str, dns: HostPort) -> str:
    server = dns.host if dns.port == 53 else str(dns)
    return f"{MARKER}\n[Resolve]\nDNS={server}\nDomains=~{domain.strip('.')}\n"


def with_mesh_nameserver(original: str, dns_ip: str) -> str:
    """resolv.conf with the agent's nameserver first (and only once)."""
    kept = without_mesh_lines(original)
    return f"{MARKER}\nnameserver {dns_ip}\n{kept}"


def without_mesh_lines(text: str) -> str:
    """`text` without the lines `with_mesh_nameserver` added."""
    lines = text.splitlines(keepends=True)
    out = []
    skip_next_nameserver = False
    for line in lines:
        if line.rstrip("\n") == MARKER:
            skip_next_nameserver = True
            continue
        if skip_next_nameserver and line.startswith("nameserver "):
            skip_next_nameserver = False
            continue
        skip_next_nameserver = False
        out.append(line)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class ResolverPaths:
    """Every path the integration touches (tests give their own)."""

    resolv_conf: Path = Path("/etc/resolv.conf")
    #: runtime drop-ins: gone at reboot, like the agent's other runtime state
    resolved_dropins: Path = Path("/run/systemd/resolved.conf.d")
    #: exists while systemd-resolved runs (its varlink socket)
    resolved_running: Path = Path("/run/systemd/resolve/io.systemd.Resolve")
    reload_resolved: tuple[str, ...] = ("systemctl", "try-reload-or-restart", "systemd-resolved")


def _write_whole(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.meshplane-tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.chmod(0o644)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno not in (errno.EBUSY, errno.EXDEV):
            raise
        # A bind-mounted file (a container's resolv.conf): rewritten in place.
        with path.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        return
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@dataclass(slots=True)
class HostResolver:
    data_dir: Path
    domain: str
    dns: HostPort
    paths: ResolverPaths = field(default_factory=ResolverPaths)
    #: what was done: "resolved", "resolv.conf", or None
    mode: str | None = None

    @property
    def backup(self) -> Path:
        return self.data_dir / BACKUP_NAME

    def apply(self) -> str:
        """Point the host at the agent; returns the mode. The backup is written first."""
        # A backup left over (a restore that failed at start): put that back first, so
        # the one written now holds the host's own configuration, never ours.
        self.undo()
        if self.paths.resolved_running.exists():
            dropin = self.paths.resolved_dropins / DROPIN_NAME
            _write_whole(self.backup, json.dumps({"mode": "resolved", "dropin": str(dropin)}))
            self.paths.resolved_dropins.mkdir(parents=True, exist_ok=True)
            _write_whole(dropin, dropin_text(self.domain, self.dns))
            self._reload()
            self.mode = "resolved"
            return self.mode
        if self.dns.port != 53:
            raise ResolverConfigError(
                f"--configure-resolver: without systemd-resolved the resolver is "
                f"{self.paths.resolv_conf}, which has no port; the DNS address {self.dns} "
                "must be on port 53"
            )
        conf = self.paths.resolv_conf
        link = os.readlink(conf) if conf.is_symlink() else None
        try:
            original = conf.read_text()
        except FileNotFoundError:
            original = ""
        written = with_mesh_nameserver(original, self.dns.host)
        _write_whole(
            self.backup,
            json.dumps(
                {
                    "mode": "resolv.conf",
                    "path": str(conf),
                    "original": original,
                    "symlink": link,
                    "written": written,
                }
            ),
        )
        _write_whole(conf, written)
        self.mode = "resolv.conf"
        return self.mode

    def undo(self) -> str | None:
        """Put back what `apply` changed (from the backup, so it works after a crash too);
        returns what was restored, or None when there was nothing to."""
        try:
            saved = json.loads(self.backup.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            # Written whole, so only a damaged disk gets here: drop our lines anyway.
            saved = {"mode": "resolv.conf", "path": str(self.paths.resolv_conf)}
        mode = str(saved.get("mode"))
        if mode == "resolved":
            Path(saved["dropin"]).unlink(missing_ok=True)
            self._reload()
        else:
            self._restore_resolv_conf(saved)
        self.backup.unlink(missing_ok=True)
        self.mode = None
        return mode

    def _restore_resolv_conf(self, saved: dict[str, str | None]) -> None:
        conf = Path(str(saved.get("path") or self.paths.resolv_conf))
        try:
            now = conf.read_text()
        except FileNotFoundError:
            now = None
        if now is not None and now == saved.get("written") and "original" in saved:
            link = saved.get("symlink")
            if link:
                tmp = conf.with_name(f".{conf.name}.meshplane-link")
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(link)
                os.replace(tmp, conf)
            else:
                _write_whole(conf, str(saved["original"]))
        elif now is not None and MARKER in now:
            # Rewritten by someone else since, our lines kept: take out only those.
            _write_whole(conf, without_mesh_lines(now))

    def _reload(self) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(list(self.paths.reload_resolved), capture_output=True, timeout=10)
