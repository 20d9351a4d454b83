"""The L4 table's diff and in-memory apply: what every backend is driven by."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.table import (
    ANY_ADDRESS,
    DeleteReal,
    DeleteService,
    PutReal,
    PutService,
    Real,
    Scheduler,
    ServiceOptions,
    Table,
    VirtualKey,
    VirtualService,
    apply_ops,
    describe,
    diff,
)

KEY = VirtualKey("tcp", "10.0.1.2", 80)
A, B = Real("10.0.1.5", 8080), Real("10.0.1.6", 8080)


def test_diff_of_equal_tables_is_empty() -> None:
    table = {KEY: VirtualService(KEY, ServiceOptions(), {A: 1})}
    assert diff(table, dict(table)) == []


def test_diff_touches_only_what_changed() -> None:
    found = {KEY: VirtualService(KEY, ServiceOptions(), {A: 1, B: 1})}
    desired = {KEY: VirtualService(KEY, ServiceOptions(), {A: 0})}
    assert diff(found, desired) == [DeleteReal(KEY, B), PutReal(KEY, A, 0)]


def test_diff_removes_stale_services_first_and_orders_service_before_reals() -> None:
    stale = VirtualKey("udp", ANY_ADDRESS, 53)
    found = {stale: VirtualService(stale, ServiceOptions(), {A: 1})}
    options = ServiceOptions(Scheduler.LEAST_CONNECTIONS)
    desired = {KEY: VirtualService(KEY, options, {A: 1})}
    assert diff(found, desired) == [
        DeleteService(stale),
        PutService(KEY, options),
        PutReal(KEY, A, 1),
    ]


def test_apply_refuses_a_real_without_its_service() -> None:
    with pytest.raises(KeyError):
        apply_ops({}, [PutReal(KEY, A, 1)])


def test_describe_reads_like_ipvsadm() -> None:
    table = {KEY: VirtualService(KEY, ServiceOptions(), {A: 1})}
    assert list(describe(table)) == ["TCP  10.0.1.2:80 rr", "  -> 10.0.1.5:8080  weight 1"]


keys = st.builds(
    VirtualKey,
    st.sampled_from(["tcp", "udp"]),
    st.sampled_from(["10.0.1.2", "10.0.1.3", ANY_ADDRESS]),
    st.sampled_from([80, 443]),
)
reals = st.builds(
    Real, st.sampled_from(["10.0.1.5", "10.0.1.6", "10.0.1.7"]), st.sampled_from([80, 8080])
)
services = st.builds(
    lambda key, sched, rs: VirtualService(key, ServiceOptions(sched), rs),
    keys,
    st.sampled_from(list(Scheduler)),
    st.dictionaries(reals, st.integers(0, 3), max_size=3),
)
tables = st.lists(services, max_size=4).map(lambda ss: {s.key: s for s in ss})


@given(tables, tables)
def test_diff_then_apply_reaches_the_desired_table(found: Table, desired: Table) -> None:
    assert apply_ops(dict(found), diff(found, desired)) == desired
