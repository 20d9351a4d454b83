"""The macvlan driver's 802.1q parent, run inside the stock-kernel VM (it has 8021q).

`test_macvlan_vlan.py` would only skip on this kernel; `tests/kernel/vm.py`
boots the stock-kernel VM once for every guest file (8021q preloaded), and this
test passes only when every test of that file passed there.
"""

from __future__ import annotations

import pytest

from tests.kernel.vm import check_guest_file

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_macvlan_802_1q_parent_on_a_kernel_with_8021q() -> None:
    check_guest_file("tests/kernel/test_macvlan_vlan.py", "macvlan-vm")
