"""An encrypted overlay's keys, SPIs and wanted IPsec (mesh/sandbox/esp.py), and the
`ip xfrm` commands that get the kernel there (mesh/sandbox/xfrm.py), without a kernel.

The kernel side runs in tests/kernel/test_esp_kernel.py (in the VM)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossip.security import Keyring
from mesh.sandbox import esp, xfrm
from mesh.sandbox.esp import EspError, Plan, Policy

K1, K2, K3 = b"\x01" * 16, b"\x02" * 32, b"\x03" * 24
A, B, C = "10.0.0.1", "10.0.0.2", "10.0.0.3"


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869, written out here so the derivation is checked against the RFC, not
    against the library call it makes."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def test_derivation_is_hkdf_sha256_of_the_key_and_the_ordered_pair() -> None:
    material = hkdf_sha256(
        K1,
        b"meshplane overlay esp",
        b"meshplane esp v1 " + bytes([10, 0, 0, 1, 10, 0, 0, 2]),
        24,
    )
    aead_key, spi = esp.derive(K1, A, B)
    assert aead_key == material[:20]  # AES-128 key, then rfc4106's 4-byte salt
    expected = (int.from_bytes(material[20:], "big") >> 1) << 1  # A sorts before B: bit 0 is 0
    assert spi == (expected if expected >= esp.MIN_SPI else expected | esp.MIN_SPI)


def test_the_two_directions_have_different_keys_and_spis() -> None:
    key_ab, spi_ab = esp.derive(K1, A, B)
    key_ba, spi_ba = esp.derive(K1, B, A)
    assert key_ab != key_ba
    assert spi_ab != spi_ba
    assert {spi_ab & 1, spi_ba & 1} == {0, 1}


def test_each_key_has_its_own_sa() -> None:
    derived = {esp.derive(key, A, B) for key in (K1, K2, K3)}
    assert len({spi for _, spi in derived}) == 3
    assert len({key for key, _ in derived}) == 3


@given(
    key=st.binary(min_size=16, max_size=32),
    src=st.integers(min_value=1, max_value=2**32 - 2),
    dst=st.integers(min_value=1, max_value=2**32 - 2),
)
def test_spis_are_at_least_0x100_and_keep_the_direction_bit(key: bytes, src: int, dst: int) -> None:
    if src == dst:
        return
    a, b = str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst))
    aead_key, spi = esp.derive(key, a, b)
    assert len(aead_key) == 20
    assert esp.MIN_SPI <= spi < 2**32
    assert spi & 1 == (0 if src < dst else 1)


def test_both_ends_derive_each_others_sas_independently() -> None:
    at_a = esp.plan(A, [B], [K1, K2], K2)
    at_b = esp.plan(B, [A], [K2, K1], K2)  # another order of the same keyring
    out_a = next(sa for sa in at_a.sas if sa.src == A)
    out_b = next(sa for sa in at_b.sas if sa.src == B)
    in_b = [sa for sa in at_b.sas if sa.src == A]
    in_a = [sa for sa in at_a.sas if sa.src == B]
    # A's sending SA is one of B's receiving SAs: same SPI and key.
    assert (out_a.spi, out_a.aead_key) in {(sa.spi, sa.aead_key) for sa in in_b}
    assert (out_b.spi, out_b.aead_key) in {(sa.spi, sa.aead_key) for sa in in_a}
    assert out_a.spi == esp.derive(K2, A, B)[1]


def test_plan_inbound_for_every_key_outbound_and_policies_on_the_primary() -> None:
    wanted = esp.plan(A, [B, C, A, B], [K1, K2, K3], K2, port=4790)
    outbound = [sa for sa in wanted.sas if sa.src == A]
    inbound = [sa for sa in wanted.sas if sa.dst == A]
    assert [sa.dst for sa in outbound] == [B, C]  # the local VTEP and repeats are ignored
    assert len(inbound) == 6  # 2 remotes x 3 keys
    assert {sa.spi for sa in outbound} == {esp.derive(K2, A, B)[1], esp.derive(K2, A, C)[1]}
    assert wanted.sas[:2] == tuple(outbound)  # outbound first
    reqid_b = esp.reqid_of(B)
    assert esp.is_ours(reqid_b) and not esp.is_ours(1)
    spi_b = esp.derive(K2, A, B)[1]
    assert Policy("out", A, B, 4790, reqid_b, spi_b, esp.MARK, esp.MARK_MASK) in wanted.policies
    # No inbound policy: it would refuse the plain networks' VXLAN from B too (the
    # filter drops an encrypted VNI's plain VXLAN instead).
    assert all(p.direction == "out" for p in wanted.policies) and len(wanted.policies) == 2
    assert all(sa.reqid == esp.reqid_of(sa.dst if sa.src == A else sa.src) for sa in wanted.sas)


def test_keys_never_show_in_repr() -> None:
    wanted = esp.plan(A, [B], [K1], K1)
    assert wanted.sas[0].aead_key.hex() not in repr(wanted)


def test_no_remotes_wants_nothing_whatever_the_keys() -> None:
    assert esp.plan(A, [], [], b"") == Plan(sas=(), policies=())
    assert esp.plan(A, [A], [], b"") == Plan(sas=(), policies=())


@pytest.mark.parametrize(
    ("local", "remotes", "keys", "primary", "port", "message"),
    [
        (A, [B], [K1], K2, 4789, "primary key is not one of"),
        (A, [B], [], K1, 4789, "at least one key"),
        ("not-an-ip", [B], [K1], K1, 4789, "cannot be this node's VTEP"),
        ("0.0.0.0", [B], [K1], K1, 4789, "cannot be this node's VTEP"),
        (A, [B], [b"short"], b"short", 4789, "at least 16 bytes"),
        (A, [B], [K1], K1, 0, "port must be 1-65535"),
    ],
)
def test_unusable_arguments_are_refused_clearly(
    local: str, remotes: list[str], keys: list[bytes], primary: bytes, port: int, message: str
) -> None:
    with pytest.raises(EspError, match=message):
        esp.plan(local, remotes, keys, primary, port)


def test_a_colliding_spi_is_left_out_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    real = esp.derive

    def colliding(key: bytes, src: str, dst: str) -> tuple[bytes, int]:
        aead_key, spi = real(key, src, dst)
        return aead_key, 0x1234 if dst == A else spi

    monkeypatch.setattr(esp, "derive", colliding)
    wanted = esp.plan(A, [B, C], [K1, K2], K1)
    assert wanted.collisions == 3  # 4 inbound SAs on one (A, 0x1234): one kept
    assert len([sa for sa in wanted.sas if sa.dst == A]) == 1
    assert len([sa for sa in wanted.sas if sa.src == A]) == 2  # outbound untouched


def test_keyring_arguments_take_the_primary_first() -> None:
    ring = Keyring([K1, K2])
    ring.use(K2)
    assert esp.keyring_arguments(ring) == ([K2, K1], K2)
    with pytest.raises(EspError):
        esp.keyring_arguments([])


# -- xfrm: the commands, from a state to another ----------------------------------------


def installed_from(wanted: Plan) -> tuple[list[xfrm.InstalledSA], list[Policy]]:
    """What the kernel lists after `wanted` was programmed."""
    return [xfrm.InstalledSA(sa.src, sa.dst, sa.spi, sa.reqid) for sa in wanted.sas], list(
        wanted.policies
    )


def test_from_nothing_every_sa_then_every_policy() -> None:
    wanted = esp.plan(A, [B], [K1, K2], K1)
    lines, report = xfrm.commands(wanted, [], [], 4789)
    assert [line.split()[:3] for line in lines] == [["xfrm", "state", "add"]] * 3 + [
        ["xfrm", "policy", "update"]
    ]
    out = wanted.sas[0]
    assert lines[0] == (
        f"xfrm state add src {A} dst {B} proto esp spi 0x{out.spi:08x} reqid {out.reqid} "
        f'mode transport replay-window 0 aead "rfc4106(gcm(aes))" 0x{out.aead_key.hex()} 128 '
        f"sel src {A}/32 dst {B}/32 proto udp dport 4789"
    )
    assert lines[3] == (
        f"xfrm policy update src {A}/32 dst {B}/32 proto udp dport 4789 dir out "
        "mark 0x0e500000 mask 0x0ff00000 "
        f"tmpl src {A} dst {B} proto esp spi 0x{out.spi:08x} reqid {out.reqid} "
        "mode transport level required"
    )
    assert report == xfrm.SyncReport(sas_added=3, policies_set=1)


def test_the_same_wanted_state_again_changes_nothing() -> None:
    wanted = esp.plan(A, [B, C], [K1, K2], K2)
    lines, report = xfrm.commands(wanted, *installed_from(wanted), 4789)
    assert lines == []
    assert not report.changed


def test_rotation_adds_before_it_switches_and_switches_before_it_removes() -> None:
    steady = esp.plan(A, [B], [K1], K1)
    installed = esp.plan(A, [B], [K1, K2], K1)  # 1. a new key: inbound only
    lines, _ = xfrm.commands(installed, *installed_from(steady), 4789)
    assert len(lines) == 1 and lines[0].startswith(f"xfrm state add src {B} dst {A}")

    switched = esp.plan(A, [B], [K2, K1], K2)  # 2. it becomes primary
    lines, _ = xfrm.commands(switched, *installed_from(installed), 4789)
    new_out, old_out = esp.derive(K2, A, B)[1], esp.derive(K1, A, B)[1]
    verbs = [" ".join(line.split()[:3]) for line in lines]
    assert verbs == ["xfrm state add", "xfrm policy update", "xfrm state delete"]
    assert f"spi 0x{new_out:08x}" in lines[0] and f"spi 0x{new_out:08x}" in lines[1]
    assert lines[2] == f"xfrm state delete src {A} dst {B} proto esp spi 0x{old_out:08x}"

    removed = esp.plan(A, [B], [K2], K2)  # 3. the old key goes: its inbound SA
    lines, _ = xfrm.commands(removed, *installed_from(switched), 4789)
    old_in = esp.derive(K1, B, A)[1]
    assert lines == [f"xfrm state delete src {B} dst {A} proto esp spi 0x{old_in:08x}"]


def test_a_remote_that_goes_loses_its_policies_before_its_sas() -> None:
    before = esp.plan(A, [B, C], [K1], K1)
    after = esp.plan(A, [B], [K1], K1)
    lines, report = xfrm.commands(after, *installed_from(before), 4789)
    assert [" ".join(line.split()[:3]) for line in lines] == [
        "xfrm policy delete",
        "xfrm state delete",
        "xfrm state delete",
    ]
    assert all(C in line for line in lines)
    assert lines[0].endswith("dir out mark 0x0e500000 mask 0x0ff00000")  # its identity
    assert report == xfrm.SyncReport(sas_removed=2, policies_removed=1)


def test_an_older_agents_inbound_policy_goes() -> None:
    """An agent before per-network encryption had a `dir in` policy per peer that
    refuses all plain VXLAN from it: a sync removes it (it is ours by its reqid)."""
    wanted = esp.plan(A, [B], [K1], K1)
    old_in = Policy("in", B, A, 4789, esp.reqid_of(B), 0)
    lines, report = xfrm.commands(wanted, installed_from(wanted)[0], [old_in], 4789)
    assert f"xfrm policy delete src {B}/32 dst {A}/32 proto udp dport 4789 dir in" in lines
    assert report.policies_removed == 1


def test_what_is_not_ours_is_never_touched() -> None:
    foreign_sa = xfrm.InstalledSA(A, B, 0x5000, 7)
    foreign_policy = Policy("out", A, B, 4789, 7, 0x5000)
    lines, report = xfrm.commands(esp.plan(A, [], [], b""), [foreign_sa], [foreign_policy], 4789)
    assert lines == [] and not report.changed


def test_an_sa_in_the_way_of_a_wanted_one_goes_first() -> None:
    wanted = esp.plan(A, [B], [K1], K1)
    out = wanted.sas[0]
    squatter = xfrm.InstalledSA(C, out.dst, out.spi, esp.reqid_of(C))  # same (dst, spi)
    lines, _ = xfrm.commands(wanted, [squatter], [], 4789)
    assert lines[0] == f"xfrm state delete src {C} dst {B} proto esp spi 0x{out.spi:08x}"
    assert lines[1].startswith("xfrm state add")


def test_a_changed_port_replaces_the_policies() -> None:
    old = esp.plan(A, [B], [K1], K1, port=4789)
    new = esp.plan(A, [B], [K1], K1, port=4790)
    lines, report = xfrm.commands(new, *installed_from(old), 4790)
    assert report.policies_set == 1 and report.policies_removed == 1
    assert all("dport 4789" in line for line in lines if "delete" in line)


# -- reading `ip xfrm ... list` (iproute2 6.1's text, as the VM test's kernel prints it) ---

STATES = """\
src 10.231.0.2 dst 10.231.0.1
\tproto esp spi 0x859cc173 reqid 1836753819 mode transport
\treplay-window 0
\taead rfc4106(gcm(aes)) 0x3d6122077a32c3dafb4d4cfcc122c75f93cc72af 128
\tanti-replay context: seq 0x0, oseq 0x0, bitmap 0x00000000
\tsel src 10.231.0.2/32 dst 10.231.0.1/32 proto udp dport 4789
src 192.0.2.1 dst 192.0.2.2
\tproto ah spi 0x00000200 reqid 9 mode tunnel
\treplay-window 32
\tauth-trunc hmac(sha256) 0x00 96
"""

POLICIES = """\
src 10.0.0.2/32 dst 10.0.0.1/32 proto udp dport 4789
\tdir in priority 0 ptype main
\ttmpl src 10.0.0.2 dst 10.0.0.1
\t\tproto esp reqid 1836753819 mode transport
src 10.0.0.1/32 dst 10.0.0.2/32 proto udp dport 4789
\tdir out priority 0 ptype main
\tmark 0xe500000/0xff00000
\ttmpl src 10.0.0.1 dst 10.0.0.2
\t\tproto esp spi 0x70b17dcc reqid 1836753819 mode transport
src 10.9.0.0/24 dst 10.8.0.0/24
\tdir out priority 0 ptype main
\ttmpl src 1.1.1.1 dst 2.2.2.2
\t\tproto esp reqid 7 mode tunnel
src ::/0 dst ::/0
\tsocket in priority 0 ptype main
"""


def test_states_are_read_without_their_keys() -> None:
    assert xfrm.parse_states(STATES) == [
        xfrm.InstalledSA("10.231.0.2", "10.231.0.1", 0x859CC173, 1836753819)
    ]


def test_policies_are_read_and_others_skipped() -> None:
    assert xfrm.parse_policies(POLICIES) == [
        Policy("in", "10.0.0.2", "10.0.0.1", 4789, 1836753819, 0),
        Policy(
            "out", "10.0.0.1", "10.0.0.2", 4789, 1836753819, 0x70B17DCC, esp.MARK, esp.MARK_MASK
        ),
    ]


def test_sync_from_keyring_passes_the_keyring_primary_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(xfrm, "sync_pairs", lambda *args: calls.append(args))
    ring = Keyring([K1, K2])
    ring.use(K2)
    xfrm.sync_from_keyring(A, [B], ring, 4790, "/run/netns/x")
    xfrm.sync_from_keyring(A, [], Keyring([K1]))  # no peers: nothing wanted, keys unused
    assert calls == [(A, [B], [K2, K1], K2, 4790, "/run/netns/x"), (A, [], [], b"", 4789, None)]


def test_remotes_that_cannot_be_a_vtep_are_left_out_and_counted() -> None:
    bad = ["not-an-ip", "fd00::2", "0.0.0.0", "224.0.0.1"]
    wanted = esp.plan(A, [B, *bad], [K1], K1)
    assert wanted.rejected == 4
    assert {sa.dst for sa in wanted.sas if sa.src == A} == {B}
    lines, report = xfrm.commands(wanted, [], [], 4789)
    assert report.rejected_remotes == 4 and len(lines) == 3


def test_mixed_families_are_refused_where_a_pair_is_derived() -> None:
    with pytest.raises(EspError, match="one address family"):
        esp.derive(K1, A, "fd00::1")


def test_ipv6_vteps_get_host_selectors() -> None:
    wanted = esp.plan("fd00::1", ["fd00::2"], [K1], K1)
    lines, _ = xfrm.commands(wanted, [], [], 4789)
    assert "sel src fd00::1/128 dst fd00::2/128 proto udp dport 4789" in lines[0]
    assert lines[2].startswith("xfrm policy update src fd00::1/128 dst fd00::2/128")
