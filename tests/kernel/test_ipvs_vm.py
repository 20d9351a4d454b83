"""The IPVS backend's kernel tests, run inside a VM whose kernel has ip_vs.

`test_ipvs_backend.py` would only skip on this kernel; `tests/kernel/vm.py`
boots the stock-kernel VM once for every guest file, and this test passes only
when every test of that file passed there (docs/lb-ipvs.md).
"""

from __future__ import annotations

import re

import pytest

from tests.kernel.vm import check_guest_file

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_ipvs_backend_on_a_real_ip_vs_kernel() -> None:
    # the L4 counters' figures (the kernel's lag, bytes against the payload) go to the report
    check_guest_file(
        "tests/kernel/test_ipvs_backend.py",
        "ipvs-vm",
        re.compile(
            r"^(IpvsBackend service_counters after|IPVS service_counters after"
            r"|IPVS affinity:|IPVS: 10 reals)"
        ),
    )
