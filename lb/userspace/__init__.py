"""The `userspace` L4 backend: an asyncio TCP and UDP proxy (the default without root)."""

from lb.userspace.backend import UserspaceBackend
from lb.userspace.runtime import ProxySettings

__all__ = ["ProxySettings", "UserspaceBackend"]
