"""systemd's notify protocol (sd_notify(3)) in a few lines, for `Type=notify`.

systemd passes `NOTIFY_SOCKET`: an AF_UNIX datagram socket, a path, or `@name`
for the abstract namespace (a leading NUL byte). Each datagram is newline-
separated `KEY=VALUE` assignments: `READY=1` once the agent serves (its API
answers), `STOPPING=1` when it begins to stop, `STATUS=...` for `systemctl
status`, and `WATCHDOG=1` pings while `WATCHDOG_USEC` is set (at half that
interval, as sd_watchdog_enabled(3) advises; a missed deadline makes systemd
kill and restart the agent).

Without `NOTIFY_SOCKET` (not run by systemd, or `Type=exec`), every call does
nothing. Sending never blocks and never raises: the agent's work does not hang
on its supervisor. Both variables are taken out of the environment when read,
so the processes the agent starts (`nft`, workers) do not talk to systemd in its
name (`sd_notify`'s `unset_environment`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping


def socket_address(value: str) -> str | bytes | None:
    """The address `NOTIFY_SOCKET` names: a path, or the abstract name (`@` -> NUL);
    None for what this module does not speak (e.g. `vsock:`) or an empty value."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(env: MutableMapping[str, str], pid: int) -> float | None:
    """Seconds between two WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when
    the watchdog is off or meant for another process (WATCHDOG_PID)."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2 / 1_000_000 if value > 0 else None


class Notifier:
    """Sends state to systemd's notify socket; nothing at all without one."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        #: datagrams systemd did not take (socket gone, queue full): never retried
        self.failed = 0

    @classmethod
    def from_environment(cls, env: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        value = env.pop("NOTIFY_SOCKET", "")
        return cls(socket_address(value))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines in one datagram; whether it was sent."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError:
            self.failed += 1
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
