"""Kernel settings a backend changes, put back as they were when the agent stops.

The IPVS backend sets the sysctls Swarm sets (vs/conntrack, vs/expire_nodest_conn,
...: lb/ipvs/host.py) and strict ARP for its VIPs. Those are the host's, not the
agent's: a host that stops running the agent (or runs it with another backend)
gets its own values back. `SysctlLedger.apply` writes the value each setting had
*before* the agent first changed it into the data dir (`lb-sysctls.json`,
atomically) before changing anything; `restore` puts them back and removes the
file. After a kill -9 the file is still there: the next start keeps those
originals (the kernel holds the agent's values by then) and its clean stop, or
a start on a backend that sets nothing (`restore_leftover`), puts them back.

`net/ipv4/ip_forward` is set but never recorded: other users of the host (the
nftables backend, containers, routing) rely on it once it is on, as Swarm and
kube-proxy leave it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

PROC_SYS = Path("/proc/sys")
LEDGER_NAME = "lb-sysctls.json"
#: set when needed, never put back (see above)
LEFT_ON = frozenset({"net/ipv4/ip_forward"})


class SysctlError(Exception):
    """A setting could not be read or written (the message names it)."""


def _read(root: Path, key: str) -> str:
    try:
        return (root / key).read_text().strip()
    except OSError as error:
        raise SysctlError(f"cannot read sysctl {key.replace('/', '.')}: {error.strerror}") from None


def _write(root: Path, key: str, value: str) -> None:
    try:
        (root / key).write_text(value + "\n")
    except OSError as error:
        raise SysctlError(
            f"cannot set sysctl {key.replace('/', '.')}={value}: {error.strerror}"
        ) from None


class SysctlLedger:
    """Sets sysctls, remembering (in `path`, None: in memory only) what they were."""

    def __init__(self, path: Path | None, root: Path = PROC_SYS) -> None:
        self.path = path
        self.root = root
        self._originals: dict[str, str] = {}

    def originals(self) -> dict[str, str]:
        """The values to put back: those of the ledger a previous run left, then ours."""
        return {**self._load(), **self._originals}

    def _load(self) -> dict[str, str]:
        if self.path is None:
            return {}
        try:
            found = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # unreadable: the values in the kernel stay, nothing is made up
        if not isinstance(found, dict):
            return {}
        return {str(k): str(v) for k, v in found.items() if isinstance(v, str | int)}

    def _save(self, originals: Mapping[str, str]) -> None:
        if self.path is None:
            return
        if not originals:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".lb-sysctls.")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(dict(sorted(originals.items())), out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def apply(self, values: Mapping[str, str]) -> None:
        """Set `values`, recording each original (unless recorded already) first."""
        originals = self.originals()
        for key, value in values.items():
            if key in LEFT_ON or key in originals:
                continue
            current = _read(self.root, key)
            if current != value:
                originals[key] = current
        self._originals = originals
        self._save(originals)
        for key, value in values.items():
            _write(self.root, key, value)

    def restore(self) -> dict[str, str]:
        """Put every recorded value back and forget them; what was put back.

        A setting that cannot be written back stays in the ledger for the next try.
        """
        originals = self.originals()
        failed: dict[str, str] = {}
        errors: list[str] = []
        for key, value in originals.items():
            try:
                _write(self.root, key, value)
            except SysctlError as exc:
                failed[key] = value
                errors.append(str(exc))
        self._originals = failed
        self._save(failed)
        if errors:
            raise SysctlError("; ".join(errors))
        return originals


def restore_leftover(data_dir: Path, root: Path = PROC_SYS) -> dict[str, str]:
    """Put back what a killed run recorded in `data_dir` (a start that sets nothing)."""
    return SysctlLedger(data_dir / LEDGER_NAME, root).restore()
