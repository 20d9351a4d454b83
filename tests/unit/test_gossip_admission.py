"""The inbound-stream tables: strangers apart from members, per source, by bytes."""

from __future__ import annotations

from collections import Counter

from gossip.admission import Admission, Stage, Ticket


def _admission(**caps: int) -> tuple[Admission, Counter[str], list[str]]:
    drops: Counter[str] = Counter()
    return Admission(drops, **caps), drops, []


def _admit(admission: Admission, source: str, cut: list[str], name: str = "") -> Ticket | None:
    return admission.admit(source, lambda: cut.append(name or source))


def test_per_source_cap_refuses_and_frees_on_release() -> None:
    admission, drops, cut = _admission(per_source=2)
    first = _admit(admission, "10.0.0.1", cut)
    second = _admit(admission, "10.0.0.1", cut)
    assert first and second
    assert _admit(admission, "10.0.0.1", cut) is None
    assert drops["too_many_from_source"] == 1
    assert _admit(admission, "10.0.0.2", cut) is not None  # another source is not affected
    admission.release(first)
    admission.release(first)  # twice is harmless
    assert _admit(admission, "10.0.0.1", cut) is not None


def test_a_new_stranger_evicts_the_oldest_when_full() -> None:
    admission, drops, cut = _admission(unauthenticated=2)
    oldest = _admit(admission, "a", cut, "oldest")
    _admit(admission, "b", cut, "middle")
    newest = _admit(admission, "c", cut, "newest")
    assert cut == ["oldest"] and drops["unauthenticated_evicted"] == 1
    assert oldest is not None and oldest.evicted and oldest.stage is Stage.GONE
    assert newest is not None and admission.unauthenticated == 2
    admission.release(oldest)  # the shell's finally after the cut: nothing released twice
    assert admission.unauthenticated == 2


def test_strangers_do_not_take_member_slots() -> None:
    admission, drops, cut = _admission(authenticated=1, unauthenticated=100)
    strangers = [_admit(admission, f"s{i}", cut) for i in range(50)]
    assert all(strangers) and admission.authenticated == 0
    member = _admit(admission, "member", cut)
    assert member is not None and admission.authenticate(member)
    assert admission.authenticated == 1 and admission.unauthenticated == 50
    late = _admit(admission, "late", cut)
    assert late is not None and not admission.authenticate(late)
    assert drops["too_many_streams"] == 1
    admission.release(member)
    assert admission.authenticated == 0


def test_first_frame_bytes_are_budgeted_before_reading() -> None:
    admission, drops, cut = _admission(unauthenticated_bytes=100)
    a = _admit(admission, "a", cut, "a")
    b = _admit(admission, "b", cut, "b")
    c = _admit(admission, "c", cut, "c")
    assert a and b and c
    assert admission.reserve(a, 60) and admission.reserve(b, 30)
    assert admission.unauthenticated_reserved == 90
    assert not admission.reserve(c, 101) and drops["oversized"] == 1
    assert admission.reserve(c, 50)  # evicts the oldest reservation, a
    assert cut == ["a"] and admission.unauthenticated_reserved == 80
    assert not admission.reserve(b, 10)  # one reservation per stranger
    assert admission.authenticate(b)
    assert admission.unauthenticated_reserved == 50
