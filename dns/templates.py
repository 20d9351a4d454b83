"""Replies to plain A queries built from wire templates, without dnslib.

The responder's cache answers repeated queries from stored bytes; this is what
fills it for the common first query of a mesh name (and refills it after a
change dropped the entry): a stub's A query with no EDNS options, for a name
of plain labels. The reply is the fixed header, the asker's question (as the
canonical form holds it), and one pre-encoded record per address: a pointer to
the question's name (0xC00C), type A, class IN, the TTL, and the address.

Anything else (other types, NXDOMAIN and NODATA with their SOA, EDNS options
such as cookies, trailing bytes, labels with unusual octets, a reply that
would not fit) gets None, and the responder takes the full dnslib path; the
bytes built here are the ones that path builds (tests/unit/test_dns_templates.py
compares them).

Sans-IO: bytes in, bytes out.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

from dns.question import HEADER_LEN
from dns.wire import EDNS_PAYLOAD, UDP_MIN

TYPE_A: Final = 1
CLASS_IN: Final = 1
TCP_MAX: Final = 65535
#: QR, AA, RA (RD is the asker's); opcode QUERY, rcode NOERROR
_FLAGS: Final = 0x8000 | 0x0400 | 0x0080
_RD: Final = 0x0100
#: a bare OPT record announcing our UDP payload size (what dnslib's EDNS0(udp_len=...) packs)
_OPT: Final = struct.pack("!BHHIH", 0, 41, EDNS_PAYLOAD, 0, 0)
#: the octets a label may hold here (lower case: the canonical question is lower-cased)
_PLAIN: Final = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
#: the answer record's fixed part before the TTL: name pointer to offset 12, type A, class IN
_A_HEAD: Final = struct.pack("!HHH", 0xC000 | HEADER_LEN, TYPE_A, CLASS_IN)
#: an answer record's length: the fixed part, TTL, RDLENGTH, the address
A_RECORD_LEN: Final = len(_A_HEAD) + 4 + 2 + 4


class PlainQuestion:
    """An A/IN question of plain labels read from a canonical query, and its reply's frame."""

    __slots__ = ("edns", "limit", "name", "question", "rd")

    def __init__(self, name: str, question: bytes, rd: int, edns: bool, limit: int) -> None:
        self.name = name  # with the final dot, as dnslib spells it
        self.question = question  # name, type, class as on the wire (lower case)
        self.rd = rd
        self.edns = edns
        self.limit = limit  # the largest reply the asker takes, ID included


def plain_question(canonical: bytes, data: bytes, end: int, tcp: bool) -> PlainQuestion | None:
    """The question of `data` if a template can answer it, else None.

    `canonical` is `dns.question.canonical_query(data)[0]`, `end` where the
    question ends in `data`. Only an A/IN question of plain labels, with no
    OPT or a bare OPT and nothing after it.
    """
    edns = canonical[9] == 1  # ARCOUNT's low octet in the canonical form (no ID)
    if len(data) != end + (11 if edns else 0):  # EDNS options, trailing bytes: the full path
        return None
    question = canonical[HEADER_LEN - 2 : end - 2]
    qtype, qclass = struct.unpack_from("!HH", question, len(question) - 4)
    if qtype != TYPE_A or qclass != CLASS_IN:
        return None
    labels = []
    offset = 0
    while (length := question[offset]) != 0:
        label = question[offset + 1 : offset + 1 + length]
        if not _PLAIN.issuperset(label):
            return None
        labels.append(label.decode("ascii"))
        offset += 1 + length
    if tcp:
        limit = TCP_MAX
    elif edns:
        asked = struct.unpack_from("!H", data, end + 3)[0]
        limit = max(UDP_MIN, min(asked, EDNS_PAYLOAD))
    else:
        limit = UDP_MIN
    rd = struct.unpack_from("!H", canonical, 0)[0] & _RD
    return PlainQuestion(".".join(labels) + ".", question, rd, edns, limit)


def a_record(address: str, ttl: int) -> bytes:
    """The pre-encoded answer record of one address (its name points at the question)."""
    return _A_HEAD + struct.pack("!IH", ttl, 4) + ipaddress.IPv4Address(address).packed


def fits(question: PlainQuestion, count: int) -> bool:
    """Whether a reply of `count` addresses fits what the asker takes (else the full path
    truncates it)."""
    size = HEADER_LEN + len(question.question) + count * A_RECORD_LEN
    return size + (len(_OPT) if question.edns else 0) <= question.limit


def a_reply(question: PlainQuestion, records: list[bytes]) -> bytes:
    """The reply without its ID."""
    header = struct.pack(
        "!HHHHH", _FLAGS | question.rd, 1, len(records), 0, 1 if question.edns else 0
    )
    return b"".join((header, question.question, *records, _OPT if question.edns else b""))
