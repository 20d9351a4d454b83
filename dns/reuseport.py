"""UDP queries spread evenly over the processes sharing the DNS port (`--dns-workers`).

With SO_REUSEPORT alone the kernel picks a process by a hash of the asker's
address and port, so one busy asker (a node-local cache, a load generator with
a few sockets) lands on one process however many there are: the sharing is
linear only with many askers. A classic BPF program attached to the port's
reuseport group (SO_ATTACH_REUSEPORT_CBPF, Linux 4.5) picks a socket of the
group at random for every datagram instead: each of N processes gets 1/N of
the queries whoever sends them. DNS over UDP keeps no state between queries,
so a flow's queries may go to different processes.

The program is the group's, whichever member attaches it (the agent and each
worker attach the same one). While the group is short of N sockets (a worker
restarting), an index past its end makes the kernel fall back to the hash, so
no query is lost.
"""

from __future__ import annotations

import ctypes
import socket
from typing import Final

#: <asm-generic/socket.h>
SO_ATTACH_REUSEPORT_CBPF: Final = 51
#: <linux/filter.h>: BPF_LD|BPF_W|BPF_ABS, BPF_ALU|BPF_MOD|BPF_K, BPF_RET|BPF_A
_LD_ABS_W: Final = 0x20
_MOD_K: Final = 0x94
_RET_A: Final = 0x16
#: SKF_AD_OFF + SKF_AD_RANDOM: a load of this "offset" reads a random 32-bit number
_RANDOM: Final = (-0x1000 + 56) & 0xFFFFFFFF


class _Instruction(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Instruction))]


def spread_at_random(sock: socket.socket, processes: int) -> None:
    """Attach the program choosing one of `processes` sockets at random for each datagram.

    `sock` is a bound SO_REUSEPORT socket of the group. Raises OSError where the
    kernel refuses (then the group keeps the hash: slower, still correct).
    """
    if processes < 1:
        raise ValueError("a reuseport group has at least one socket")
    instructions = (_Instruction * 3)(
        _Instruction(_LD_ABS_W, 0, 0, _RANDOM),
        _Instruction(_MOD_K, 0, 0, processes),
        _Instruction(_RET_A, 0, 0, 0),
    )
    program = _Program(len(instructions), instructions)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(program))
