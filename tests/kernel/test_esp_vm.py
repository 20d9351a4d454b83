"""Encrypted overlay IPsec on a kernel that has xfrm ESP and AES-GCM, in the VM.

`test_esp_kernel.py` would only skip on this kernel (no ESP xfrm type, no
`rfc4106(gcm(aes))`); `tests/kernel/vm.py` boots the stock-kernel VM once for
every guest file, and this test passes only when every test of that file passed
there. It prints the figures the guest tests print (lines starting `[esp]`).
"""

from __future__ import annotations

import re

import pytest

from tests.kernel.vm import check_guest_file

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_esp_between_two_nodes_on_a_kernel_with_xfrm_esp() -> None:
    check_guest_file("tests/kernel/test_esp_kernel.py", "esp-vm", re.compile(r"^\[esp\] .*"))
