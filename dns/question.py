"""The canonical form of a DNS query: the bytes its reply depends on, and nothing else.

The responder caches replies under this form, so that what a client may vary
freely cannot make new cache entries (issue 13, defect 4): bytes after the
question and its OPT record (trailing garbage), the name's case (replies echo
the asker's case, spliced in when served), header bits other than RD, the
EDNS options (cookies), and the EDNS UDP size beyond what the responder
heeds. What is left: RD, the lower-cased question (name, type, class), and
whether there is an OPT record, with its DO bit and effective UDP size.

A query that is already canonical (the usual stub query: RD, lower case, no
EDNS or a bare OPT, nothing after it) is byte for byte its own key, so the
UDP server's hot path finds it by its raw bytes without parsing anything.

Sans-IO and dnslib-free: a few slices of bytes, so that cost stays close to
the hot path's. Anything unusual (a compressed or over-long name, an EDNS
version other than 0, records beyond one OPT) gets None, for the full parse.
"""

from __future__ import annotations

import struct
from typing import Final

from dns.wire import EDNS_PAYLOAD, UDP_MIN

HEADER_LEN: Final = 12
MAX_NAME_OCTETS: Final = 255  # RFC 1035 §2.3.4, on the wire (length octets and root included)
MAX_LABEL: Final = 63
RD: Final = 0x0100
_QR_OPCODE: Final = 0xF800
OPT_TYPE: Final = 41
DO_BIT: Final = 0x8000


def question_end(data: bytes) -> int | None:
    """Where a plain question (uncompressed name, labels <= 63, name <= 255 octets) ends."""
    offset = HEADER_LEN
    size = len(data)
    while offset < size:
        length = data[offset]
        if length == 0:
            end = offset + 5  # the root label, QTYPE and QCLASS
            if end > size or end - 4 - HEADER_LEN > MAX_NAME_OCTETS:
                return None
            return end
        if length > MAX_LABEL:  # a pointer or a reserved label type: not plain
            return None
        offset += 1 + length
    return None


def canonical_query(data: bytes) -> tuple[bytes, int] | None:
    """(The canonical form of `data` without its ID, where its question ends), or None.

    None: not a plain standard query; the caller parses it in full (and
    answers FORMERR, NOTIMP, BADVERS, ... or resolves it without caching).
    """
    if len(data) < HEADER_LEN:
        return None
    flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!HHHHH", data, 2)
    if flags & _QR_OPCODE or qdcount != 1 or ancount or nscount or arcount > 1:
        return None
    end = question_end(data)
    if end is None:
        return None
    question = data[HEADER_LEN:end].lower()  # length octets are <= 63: .lower() leaves them be
    if not arcount:
        return struct.pack("!HH", flags & RD, 1) + bytes(6) + question, end
    # The one additional record must be an OPT (root name, type 41) with EDNS version 0.
    if len(data) < end + 11 or data[end] != 0:
        return None
    rtype, udp_size, _ext_rcode, version, edns_flags, rdlength = struct.unpack_from(
        "!HHBBHH", data, end + 1
    )
    if rtype != OPT_TYPE or version != 0 or end + 11 + rdlength > len(data):
        return None
    limit = max(UDP_MIN, min(udp_size, EDNS_PAYLOAD))
    opt = struct.pack("!BHHBBHH", 0, OPT_TYPE, limit, 0, 0, edns_flags & DO_BIT, 0)
    return struct.pack("!HH", flags & RD, 1) + struct.pack("!HHH", 0, 0, 1) + question + opt, end


def splice_question(reply: bytes, data: bytes, end: int) -> bytes:
    """A cached reply (without ID) given the asker's question bytes (its case), and ID.

    The cached reply holds the canonical (lower-case) question at the same
    offset and of the same length, and its answer names point there.
    """
    return data[:2] + reply[: HEADER_LEN - 2] + data[HEADER_LEN:end] + reply[end - 2 :]
