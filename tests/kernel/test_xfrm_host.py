"""`sync_pairs` on a kernel without ESP (this machine's, CI's): a clear error, and
no policy of ours left behind (a policy without its SA would drop every VXLAN
datagram between the two nodes: the SAs go in first, and `ip -batch` stops at
the first refusal). Where the kernel has ESP, test_esp_kernel.py covers it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from mesh.sandbox import esp, xfrm
from tests.kernel.test_esp_kernel import _why_no_esp

pytestmark = pytest.mark.root


def _ip(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def node() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    name = f"t16xfrm-{os.getpid()}"
    assert _ip("netns", "add", name).returncode == 0
    try:
        yield name
    finally:
        _ip("netns", "del", name)


def test_a_kernel_without_esp_gets_a_clear_error_and_no_policy(node: str) -> None:
    if _why_no_esp() is None:
        pytest.skip("this kernel has ESP with AES-GCM: test_esp_kernel.py covers it")
    path = f"/run/netns/{node}"
    with pytest.raises(xfrm.XfrmError, match=r"ip -batch -: .*not found") as refused:
        xfrm.sync_pairs("10.0.0.1", ["10.0.0.2"], [b"k" * 16], b"k" * 16, 4789, path)
    print(f"\n[xfrm] refused: {refused.value}")
    sas, policies = xfrm.installed(path)
    assert [sa for sa in sas if esp.is_ours(sa.reqid)] == []
    assert [p for p in policies if esp.is_ours(p.reqid)] == []
