"""Programming an encrypted overlay's IPsec into the kernel: `sync_pairs`.

`mesh.sandbox.esp.plan` says which SAs and policies are wanted between this
node's VTEP and its peers; `sync_pairs` reads what the node's namespace holds,
and adds, replaces and deletes until it holds exactly that, touching only SAs
and policies whose reqid is in our range (`esp.is_ours`). It is idempotent: a
second call with the same arguments changes nothing.

Why `ip xfrm` and not pyroute2: pyroute2 0.9.7 (our pinned version) has no API
for XFRM SAs and policies (only the `xfrm` interface kind), so the commands go
to iproute2's `ip -batch -` on its standard input, one process per sync. The
keys travel on a pipe, never in a command line (`/proc/PID/cmdline` is readable
by every user).

Order of one sync, so that a rotation loses no packet:

1. delete an SA of ours that holds a (destination, SPI) wanted for another SA;
2. add the missing SAs (inbound for a new key, outbound for a new primary);
3. set every policy (`policy update`: add or replace), so an outbound policy
   switches to the new primary's SPI only once that SA exists;
4. delete our policies that are no longer wanted, then our SAs that are no
   longer wanted (the old primary's outbound SA, a removed key's inbound SAs).

The receiving side has an inbound SA for every key of its keyring, so a peer
that switched its primary earlier or later is understood all along, as long as
the keyring is rotated the way gossip's own is: install everywhere, use, remove.

Inbound SAs have no anti-replay window (`replay-window 0`, as Docker's): the
SPIs and keys are derived, so a peer that restarts or that we forgot and
re-learn sends again from sequence number 1 under the same SA, which a window
would reject until the old count was passed. The price: ESP packets captured on
the underlay can be replayed (once decrypted they are UDP datagrams of the
overlay, which the endpoints' TCP discards and UDP applications must tolerate).
A sender's SA carries at most 2^32 packets (32-bit sequence numbers; the kernel
drops beyond): rotate the keyring before (Swarm rotates every 12 h).
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

from mesh.core.netns import entered
from mesh.sandbox import esp
from mesh.sandbox.esp import Plan, Policy, SecurityAssociation

IP_TIMEOUT = 30.0


class XfrmError(RuntimeError):
    """The kernel refused (or `ip` could not run); the message has iproute2's words."""


@dataclass(frozen=True, slots=True)
class InstalledSA:
    src: str
    dst: str
    spi: int
    reqid: int

    @property
    def identity(self) -> tuple[str, str, int, int]:
        return (self.src, self.dst, self.spi, self.reqid)


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What one `sync_pairs` changed (all zero when the kernel already matched)."""

    sas_added: int = 0
    sas_removed: int = 0
    policies_set: int = 0
    policies_removed: int = 0
    collisions: int = 0  # SAs the plan left out (see `esp.Plan`)
    rejected_remotes: int = 0  # remotes that cannot be a VTEP, left out (see `esp.plan`)

    @property
    def changed(self) -> bool:
        return any((self.sas_added, self.sas_removed, self.policies_set, self.policies_removed))


# -- commands (text for `ip -batch -`) ------------------------------------------------


def _host(address: str) -> str:
    parsed = ipaddress.ip_address(address)
    return f"{parsed}/{parsed.max_prefixlen}"


def _selector(policy: Policy) -> str:
    return f"src {_host(policy.src)} dst {_host(policy.dst)} proto udp dport {policy.port}"


def add_sa(sa: SecurityAssociation, port: int) -> str:
    # The SA's own selector limits it to the overlay's UDP: the kernel checks a
    # decrypted packet against it, so keys of this pair carry VXLAN and nothing else.
    return (
        f"xfrm state add src {sa.src} dst {sa.dst} proto esp spi 0x{sa.spi:08x} "
        f"reqid {sa.reqid} mode transport replay-window 0 "
        f'aead "{esp.AEAD}" 0x{sa.aead_key.hex()} {esp.ICV_BITS} '
        f"sel src {_host(sa.src)} dst {_host(sa.dst)} proto udp dport {port}"
    )


def delete_sa(sa: InstalledSA | SecurityAssociation) -> str:
    return f"xfrm state delete src {sa.src} dst {sa.dst} proto esp spi 0x{sa.spi:08x}"


def _mark(policy: Policy) -> str:
    return f" mark 0x{policy.mark:08x} mask 0x{policy.mask:08x}" if policy.mask else ""


def set_policy(policy: Policy) -> str:
    spi = f" spi 0x{policy.spi:08x}" if policy.spi else ""
    return (
        f"xfrm policy update {_selector(policy)} dir {policy.direction}{_mark(policy)} "
        f"tmpl src {policy.src} dst {policy.dst} proto esp{spi} reqid {policy.reqid} "
        "mode transport level required"
    )


def delete_policy(policy: Policy) -> str:
    # The kernel tells policies apart by selector, direction and mark.
    return f"xfrm policy delete {_selector(policy)} dir {policy.direction}{_mark(policy)}"


def commands(
    wanted: Plan, sas: Collection[InstalledSA], policies: Collection[Policy], port: int
) -> tuple[list[str], SyncReport]:
    """The `ip -batch` lines that turn the installed state (ours only) into `wanted`.

    Pure: unit-tested without a kernel."""
    have_sas = {sa.identity: sa for sa in sas if esp.is_ours(sa.reqid)}
    want_sas = {sa.identity: sa for sa in wanted.sas}
    wanted_slots = {(sa.dst, sa.spi) for sa in wanted.sas}
    stale = [sa for identity, sa in sorted(have_sas.items()) if identity not in want_sas]
    in_the_way = [sa for sa in stale if (sa.dst, sa.spi) in wanted_slots]
    later = [sa for sa in stale if (sa.dst, sa.spi) not in wanted_slots]
    missing = [sa for identity, sa in want_sas.items() if identity not in have_sas]

    def key(policy: Policy) -> tuple[str, str, str, int, int, int]:
        return (policy.direction, policy.src, policy.dst, policy.port, policy.mark, policy.mask)

    have_policies = {key(p): p for p in policies if esp.is_ours(p.reqid)}
    want_policies = {key(p): p for p in wanted.policies}
    to_set = [p for k, p in want_policies.items() if have_policies.get(k) != p]
    to_drop = [p for k, p in sorted(have_policies.items()) if k not in want_policies]

    lines = [delete_sa(sa) for sa in in_the_way]
    lines += [add_sa(sa, port) for sa in missing]
    lines += [set_policy(p) for p in to_set]
    lines += [delete_policy(p) for p in to_drop]
    lines += [delete_sa(sa) for sa in later]
    report = SyncReport(
        sas_added=len(missing),
        sas_removed=len(stale),
        policies_set=len(to_set),
        policies_removed=len(to_drop),
        collisions=wanted.collisions,
        rejected_remotes=wanted.rejected,
    )
    return lines, report


# -- reading `ip xfrm state|policy list` ----------------------------------------------


def _blocks(text: str) -> Iterator[list[str]]:
    """The entries of `ip xfrm ... list`: each starts on an unindented line."""
    block: list[str] = []
    for line in text.splitlines():
        if line and not line[0].isspace() and block:
            yield block
            block = []
        if line.strip():
            block.extend(line.split())
    if block:
        yield block


def _after(words: list[str], word: str, start: int = 0) -> str | None:
    try:
        return words[words.index(word, start) + 1]
    except (ValueError, IndexError):
        return None


def parse_states(text: str) -> list[InstalledSA]:
    """The ESP SAs of `ip xfrm state list` (keys are read past, never kept)."""
    found = []
    for words in _blocks(text):
        src, dst = _after(words, "src"), _after(words, "dst")
        spi, reqid = _after(words, "spi"), _after(words, "reqid")
        if _after(words, "proto") != "esp" or None in (src, dst, spi, reqid):
            continue
        assert src and dst and spi and reqid
        found.append(InstalledSA(src, dst, int(spi, 16), int(reqid, 0)))
    return found


def parse_policies(text: str) -> list[Policy]:
    """The policies of `ip xfrm policy list` that have a UDP port selector and an ESP
    template (the shape of ours); others are skipped, not misread."""
    found: list[Policy] = []
    for words in _blocks(text):
        direction = _after(words, "dir")
        if direction not in ("in", "out") or "tmpl" not in words:
            continue
        head = words[: words.index("dir")]
        src, dst = _after(head, "src"), _after(head, "dst")
        port = _after(head, "dport")
        if _after(head, "proto") != "udp" or None in (src, dst, port):
            continue
        assert src and dst and port
        tmpl = words.index("tmpl")
        spi, reqid = _after(words, "spi", tmpl), _after(words, "reqid", tmpl)
        if reqid is None:
            continue
        mark_text = _after(words[:tmpl], "mark")  # `mark 0xe500000/0xff00000`
        mark, _, mask = (mark_text or "0/0").partition("/")
        found.append(
            Policy(
                "in" if direction == "in" else "out",
                str(ipaddress.ip_interface(src).ip),
                str(ipaddress.ip_interface(dst).ip),
                int(port),
                int(reqid, 0),
                int(spi, 16) if spi else 0,  # `ip` leaves out a zero SPI
                int(mark, 0),
                int(mask or "0xffffffff", 0),
            )
        )
    return found


# -- the kernel ----------------------------------------------------------------------


def _ip(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            ["ip", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise XfrmError(f"ip {' '.join(argv)}: {error}") from error
    if done.returncode != 0:
        raise XfrmError(f"ip {' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def installed(node_netns: str | None = None) -> tuple[list[InstalledSA], list[Policy]]:
    """Every ESP SA and UDP/ESP policy in the namespace (ours or not: filter with
    `esp.is_ours`)."""
    with _in(node_netns):
        return parse_states(_ip(["xfrm", "state", "list"])), parse_policies(
            _ip(["xfrm", "policy", "list"])
        )


def sync_pairs(
    local_vtep: str,
    remotes: Collection[str],
    keys: Sequence[bytes],
    primary: bytes,
    port: int = esp.DEFAULT_PORT,
    node_netns: str | None = None,
) -> SyncReport:
    """Make the namespace's IPsec of ours exactly `esp.plan(...)` (see the module).

    `node_netns`: the node's namespace (a path); None: the calling thread's own.
    Raises `esp.EspError` for unusable arguments (nothing changed) and `XfrmError`
    when the kernel refuses (a later call resumes from what is there)."""
    wanted = esp.plan(local_vtep, remotes, keys, primary, port)
    with _in(node_netns):
        sas = parse_states(_ip(["xfrm", "state", "list"]))
        policies = parse_policies(_ip(["xfrm", "policy", "list"]))
        lines, report = commands(wanted, sas, policies, port)
        if lines:
            _ip(["-batch", "-"], stdin="\n".join(lines) + "\n")
    return report


def sync_from_keyring(
    local_vtep: str,
    remotes: Collection[str],
    keyring: Iterable[bytes],
    port: int = esp.DEFAULT_PORT,
    node_netns: str | None = None,
) -> SyncReport:
    """`sync_pairs` with the keys and primary of the cluster keyring (a
    `gossip.security.Keyring`, which iterates primary first): the control plane's
    entry point. Call it again whenever the keyring or the peers change (compare
    `esp.keyring_arguments(keyring)` with the last synced value: keyring changes
    arrive by gossip and have no callback of their own); it is idempotent."""
    keys, primary = esp.keyring_arguments(keyring) if remotes else ([], b"")
    return sync_pairs(local_vtep, remotes, keys, primary, port, node_netns)


def clear(node_netns: str | None = None) -> SyncReport:
    """Remove every SA and policy of ours (no encrypted peer left)."""
    return sync_pairs("192.0.2.1", (), (), b"", node_netns=node_netns)  # any unicast: unused


def _in(node_netns: str | None) -> contextlib.AbstractContextManager[None]:
    return entered(node_netns) if node_netns else contextlib.nullcontext()
