"""The IPsec of an encrypted overlay, computed: keys, SPIs and the wanted SAs and policies.

Sans-IO: this module decides what the kernel should hold between this node's VTEP
and each remote VTEP; `mesh.sandbox.xfrm` makes the kernel hold exactly that.
Both ends of a pair compute the same values on their own, from the keyring that
gossip keeps identical on every node, so nothing is negotiated (no IKE).

Per *direction* (ordered pair of VTEP addresses `src -> dst`) and keyring key K:

* `HKDF-SHA256(ikm=K, salt=HKDF_SALT, info=HKDF_INFO + src + dst, length=24)` (addresses as
  their 4 or 16 packed bytes). Bytes 0-15 are the AES-128-GCM key and bytes 16-19
  the 4-byte salt of `rfc4106(gcm(aes))`; bytes 20-23 give the SPI. Each
  direction has its own key, so the two ends never encrypt under one key (two
  senders counting sequence numbers, hence nonces, independently under one key
  would repeat nonces).
* SPI: 31 bits of the HKDF output, shifted left, with the low bit saying the
  direction (0 when src sorts before dst, 1 otherwise), then forced to >= 0x100
  (1-255 are reserved by RFC 4303): the two directions of a pair never share an
  SPI; two keys of one direction collide with odds 2^-31, which `plan` detects.

What is wanted, seen from the local VTEP L, for each remote R:

* inbound SAs `R -> L`, one per keyring key, so a peer still sending with an
  older primary, or already with a newer one, is understood (the overlap that
  makes a rotation lose nothing);
* one outbound SA `L -> R`, on the primary key only;
* policy `dir out`: UDP from L to R with destination port = the data-path port
  *and the firewall mark `MARK/MARK_MASK`* must go through ESP (template:
  transport mode, the primary's SPI). Encryption is per network, as Swarm's:
  `mesh.sandbox.espfilter` marks only the VXLAN packets whose VNI is an
  encrypted network's, so a plain network's VXLAN to R matches no policy and
  leaves as VXLAN, an encrypted one's cannot leave unencrypted (no SA, no
  packet; and the filter drops a marked packet that no policy transformed).

There is no `dir in` policy (a `level required` one would refuse the plain
networks' VXLAN from R too): inbound, the filter drops VXLAN of an encrypted
VNI that did not come out of an ESP SA (`meta ipsec missing`), and the kernel
checks a decrypted packet against its SA's selector (UDP from R to L to the
port), so R's keys carry R's VXLAN and nothing else.

Every SA and policy carries a reqid of ours, `REQID_BASE | 20 bits of
sha256(R)`: what `xfrm.sync_pairs` removes is only what carries a reqid in that
range, never anyone else's IPsec (an inbound policy of an older agent too).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

AEAD = "rfc4106(gcm(aes))"
ICV_BITS = 128
KEY_BYTES = 16  # AES-128
SALT_BYTES = 4  # rfc4106's nonce salt, after the key
MIN_SPI = 0x100  # 1-255: reserved (RFC 4303)
REQID_BASE = 0x6D700000  # 0x6D7 ("mp"-ish) then 20 bits: 0x6D700000-0x6D7FFFFF are ours
REQID_MASK = 0xFFF00000
MIN_KEY_BYTES = 16
DEFAULT_PORT = 4789
#: Bytes ESP adds to a VXLAN datagram: header 8, IV 8, padding 0-3, pad length and
#: next header 2, ICV 16 (37 at most), rounded up to 4. An encrypted overlay's MTU
#: is the unencrypted one minus this.
ESP_OVERHEAD = 40
#: The firewall mark (value/mask) of VXLAN packets of an encrypted network: the
#: outbound policies select it (`mesh.sandbox.espfilter` sets it per VNI).
MARK = 0x0E500000
MARK_MASK = 0x0FF00000

HKDF_SALT = b"meshplane overlay esp"
HKDF_INFO = b"meshplane esp v1 "

Direction = Literal["in", "out"]


class EspError(ValueError):
    """Arguments that cannot describe an encrypted overlay; the message says which."""


@dataclass(frozen=True, slots=True)
class SecurityAssociation:
    """One direction's ESP state under one key. Its identity is (dst, spi): a key
    never shows in repr, and two SAs with the same identity carry the same key."""

    src: str
    dst: str
    spi: int
    reqid: int
    aead_key: bytes = field(repr=False, compare=False)  # AES key + salt, 20 bytes

    @property
    def identity(self) -> tuple[str, str, int, int]:
        return (self.src, self.dst, self.spi, self.reqid)


@dataclass(frozen=True, slots=True)
class Policy:
    """UDP `src -> dst` to `port` (with the firewall mark `mark/mask`, when not 0)
    must be ESP (transport) with `reqid`; `spi` 0 in a template means any SA of that
    reqid (an inbound policy of an older agent, which a sync removes)."""

    direction: Direction
    src: str
    dst: str
    port: int
    reqid: int
    spi: int
    mark: int = 0
    mask: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    """What the kernel should hold: SAs (outbound first), policies, and how many SAs
    were left out because their (dst, SPI) collided with another's (odds ~2^-31 per
    pair of SAs on one destination; counted, never silent)."""

    sas: tuple[SecurityAssociation, ...]
    policies: tuple[Policy, ...]
    collisions: int = 0
    rejected: int = 0  # remotes that cannot be a peer's VTEP (see `plan`), left out


def _packed(address: str) -> bytes:
    try:
        return ipaddress.ip_address(address).packed
    except ValueError:
        raise EspError(f"{address!r} is not an IP address (a VTEP)") from None


def _vtep(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`text` as a VTEP address; None when it cannot be one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.is_unspecified or address.is_multicast:
        return None
    return address


def derive(key: bytes, src: str, dst: str) -> tuple[bytes, int]:
    """(AES-128 key + 4-byte salt, SPI) of the direction `src -> dst` under `key`."""
    if len(key) < MIN_KEY_BYTES:
        raise EspError(f"a keyring key has at least {MIN_KEY_BYTES} bytes, not {len(key)}")
    src_packed, dst_packed = _packed(src), _packed(dst)
    if len(src_packed) != len(dst_packed):
        raise EspError(f"VTEPs {src} and {dst} are not of one address family")
    if src_packed == dst_packed:
        raise EspError(f"a pair needs two VTEPs, not {src} twice")
    # Imported here: the store and the CLI read `is_encrypted` and the constants, and a
    # short-lived CLI command imports no third-party package (tests/unit/test_cli_main).
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    material = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES + SALT_BYTES + 4,
        salt=HKDF_SALT,
        info=HKDF_INFO + src_packed + dst_packed,
    ).derive(key)
    aead_key = material[: KEY_BYTES + SALT_BYTES]
    bits = int.from_bytes(material[KEY_BYTES + SALT_BYTES :], "big") >> 1
    spi = (bits << 1) | (0 if src_packed < dst_packed else 1)
    if spi < MIN_SPI:
        spi |= MIN_SPI  # keeps the direction bit
    return aead_key, spi


def reqid_of(remote: str) -> int:
    """The reqid of every SA and policy between this node and `remote` (local only:
    the two ends need not agree on it)."""
    digest = hashlib.sha256(_packed(remote)).digest()
    return REQID_BASE | (int.from_bytes(digest[:4], "big") & (~REQID_MASK & 0xFFFFFFFF))


def is_ours(reqid: int) -> bool:
    return reqid & REQID_MASK == REQID_BASE


def plan(
    local_vtep: str,
    remotes: Collection[str],
    keys: Sequence[bytes],
    primary: bytes,
    port: int = DEFAULT_PORT,
) -> Plan:
    """The SAs and policies between `local_vtep` and each of `remotes`.

    `keys`: every key of the keyring (inbound SAs for each); `primary`: the one
    that sends (it must be one of `keys`). The local VTEP among `remotes` and
    repeats are ignored. A remote that cannot be a peer's VTEP (not an address,
    another family than the local VTEP's, unspecified, multicast: it
    comes from what other members advertise) is left out and counted in
    `Plan.rejected`, so one bad peer does not stop the others' encryption. No
    remotes: nothing is wanted (whatever the keys).
    """
    local_address = _vtep(local_vtep)
    if local_address is None:
        raise EspError(f"{local_vtep!r} cannot be this node's VTEP (a unicast address)")
    local = str(local_address)
    if not 0 < port < 65536:
        raise EspError(f"the data-path port must be 1-65535, not {port}")
    accepted: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    rejected = 0
    for remote in set(remotes):
        address = _vtep(remote)
        if address is None or address.version != local_address.version:
            rejected += 1
        elif address != local_address:
            accepted.add(address)
    peers = [str(address) for address in sorted(accepted)]
    if not peers:
        return Plan(sas=(), policies=(), rejected=rejected)
    ring = list(dict.fromkeys(bytes(key) for key in keys))
    if not ring:
        raise EspError("an encrypted overlay needs a keyring with at least one key")
    if bytes(primary) not in ring:
        raise EspError("the primary key is not one of the keyring's keys")
    outbound: list[SecurityAssociation] = []
    inbound: list[SecurityAssociation] = []
    policies: list[Policy] = []
    for remote in peers:
        reqid = reqid_of(remote)
        out_key, out_spi = derive(primary, local, remote)
        outbound.append(SecurityAssociation(local, remote, out_spi, reqid, out_key))
        for key in ring:
            in_key, in_spi = derive(key, remote, local)
            inbound.append(SecurityAssociation(remote, local, in_spi, reqid, in_key))
        policies.append(Policy("out", local, remote, port, reqid, out_spi, MARK, MARK_MASK))
    kept: list[SecurityAssociation] = []
    taken: set[tuple[str, int]] = set()
    collisions = 0
    # The kernel finds an SA by (destination, SPI): two with the same pair cannot
    # both exist. Outbound SAs go first, so a collision never costs the sending side.
    for sa in [*outbound, *inbound]:
        if (sa.dst, sa.spi) in taken:
            collisions += 1
            continue
        taken.add((sa.dst, sa.spi))
        kept.append(sa)
    return Plan(sas=tuple(kept), policies=tuple(policies), collisions=collisions, rejected=rejected)


def keyring_arguments(keyring: Iterable[bytes]) -> tuple[list[bytes], bytes]:
    """`(keys, primary)` for `plan`/`sync_pairs` from a `gossip.security.Keyring`
    (or any sequence of keys, primary first: the order a Keyring iterates in)."""
    keys = [bytes(key) for key in keyring]
    if not keys:
        raise EspError("an encrypted overlay needs a keyring with at least one key")
    return keys, keys[0]


ON = ("", "true", "yes", "1", "on")
OFF = ("false", "no", "0", "off")


def is_encrypted(options: Mapping[str, str]) -> bool:
    """Whether a network's options ask for encryption: `--opt encrypted` (Docker's
    form, an empty value) or `encrypted=true|yes|1|on`; absent or
    `false|no|0|off`: not. Any other value raises `EspError`."""
    if "encrypted" not in options:
        return False
    value = options["encrypted"].strip().lower()
    if value in ON:
        return True
    if value in OFF:
        return False
    raise EspError(f"--opt encrypted={options['encrypted']}: expected true or false")
