"""What a forwarded query and an upstream's reply mean: the relay's message logic (sans-IO).

`parse_query` reads a client's query once (`Query`: what forwarding, caching
and error replies need) or raises `MalformedQuery`; `judge_reply` says what
an upstream's reply means (`Verdict`: accept it, retry over TCP, try the next
upstream, or ignore it as stray or forged); `error_reply` builds the replies
the forwarder makes up (SERVFAIL, REFUSED, NOTIMP). The asyncio shell that
moves the bytes is `dns.forward`.

Forwarding is not a hot path (the mesh's own names are), so messages are
parsed and built with dnslib here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from dnslib import EDNS0, QTYPE, DNSHeader, DNSRecord

from dns.wire import EDNS_PAYLOAD, REFUSED, SERVFAIL

OPCODE_QUERY: Final = 0
_HEADER_LEN: Final = 12
#: A name of 255 octets on the wire is 253 in dnslib's length (dots, no end).
_MAX_NAME_TEXT: Final = 253
#: dnslib reads the reserved label types (length octets 64..191) as long labels.
_MAX_LABEL: Final = 63

#: (lower-cased qname labels, qtype, qclass, DO bit, CD bit)
CacheKey = tuple[tuple[bytes, ...], int, int, bool, bool]


class MalformedQuery(ValueError):
    """The client's message is not a query we can forward (the caller answers FORMERR or drops)."""


def parse_message(wire: bytes) -> Any | None:
    """A dnslib DNSRecord, or None when the bytes are not a DNS message.

    dnslib reports most damage as DNSError, but some malformed rdata surfaces
    as other exceptions (struct, unicode, index errors): all mean "not DNS".
    dnslib also refuses labels that are not UTF-8, which DNS allows (any
    octet): such names are rare, and are treated as malformed here too.
    """
    try:
        return DNSRecord.parse(wire)
    except Exception:
        return None


def opt_record(record: Any) -> Any | None:
    for rr in record.ar:
        if rr.rtype == QTYPE.OPT:
            return rr
    return None


def full_rcode(record: Any) -> int:
    """The 12-bit rcode: the header's 4 bits and EDNS's 8 extension bits (RFC 6891 §6.1.3)."""
    opt = opt_record(record)
    high = int(opt.edns_rcode) if opt is not None else 0
    return (high << 4) | int(record.header.rcode)


@dataclass(frozen=True, slots=True)
class Query:
    """A client's query, parsed once: what forwarding, caching and error replies need."""

    wire: bytes
    id: int
    question: Any  # dnslib DNSQuestion, exactly as the client sent it (case included)
    opcode: int
    rd: bool
    cd: bool
    edns: bool
    do: bool
    #: False for non-recursive queries (their answers may be referrals) and for
    #: queries with records beyond OPT (TSIG: the reply is signed per query).
    cacheable: bool

    @property
    def key(self) -> CacheKey:
        labels = tuple(label.lower() for label in self.question.qname.label)
        return (labels, int(self.question.qtype), int(self.question.qclass), self.do, self.cd)


def parse_query(wire: bytes) -> Query:
    """Parse a client's query; raises `MalformedQuery` for anything that is not one.

    Not a query: unparsable bytes, a response (QR set: never answer those, it
    makes loops), a question count other than one (RFC 9619), a name longer
    than 255 octets or a label longer than 63 (RFC 1035 §2.3.4), two OPT
    records (RFC 6891 §6.1.1).
    """
    record = parse_message(wire)
    if record is None:
        raise MalformedQuery("not a DNS message")
    header = record.header
    if header.qr:
        raise MalformedQuery("a response, not a query")
    if len(record.questions) != 1:
        raise MalformedQuery(f"{len(record.questions)} questions, expected one")
    if len(record.questions[0].qname) > _MAX_NAME_TEXT:
        raise MalformedQuery("name longer than 255 octets")
    if any(len(label) > _MAX_LABEL for label in record.questions[0].qname.label):
        raise MalformedQuery("label longer than 63 octets")
    opts = [rr for rr in record.ar if rr.rtype == QTYPE.OPT]
    if len(opts) > 1:
        raise MalformedQuery("more than one OPT record")
    return Query(
        wire=wire,
        id=int(header.id),
        question=record.questions[0],
        opcode=int(header.opcode),
        rd=bool(header.rd),
        cd=bool(header.cd),
        edns=bool(opts),
        do=bool(opts and opts[0].edns_do),
        cacheable=bool(header.rd) and len(record.ar) == len(opts),
    )


def error_reply(query: Query, rcode: int) -> bytes:
    """A reply with `rcode` and no records, built from the query (ID, opcode, RD, CD, question).

    It carries an OPT record when the query did (RFC 6891 §7), and RA, as
    every reply of a recursive service.
    """
    header = DNSHeader(
        id=query.id,
        qr=1,
        opcode=query.opcode,
        rd=int(query.rd),
        ra=1,
        cd=int(query.cd),
        rcode=rcode,
    )
    record = DNSRecord(header, q=query.question)
    if query.edns:
        record.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
    packed = bytes(record.pack())  # dnslib packs a bytearray; replies are bytes
    return packed


def _question_end(wire: bytes) -> int | None:
    """Where the (single) question of a message ends, or None if it is compressed or cut short."""
    offset = _HEADER_LEN
    while offset < len(wire):
        length = wire[offset]
        if length == 0:
            end = offset + 1 + 4  # the root label, then QTYPE and QCLASS
            return end if end <= len(wire) else None
        if length & 0xC0:  # a pointer or a reserved label type: not a plain name
            return None
        offset += 1 + length
    return None


def _for_client(query: Query, wire: bytes, record: Any) -> bytes:
    """The upstream's reply with the client's ID and the client's question bytes.

    The upstream echoes the question we relayed, usually byte for byte; when
    it changed the case, the client's bytes are spliced back (a name's length
    does not depend on case). Only a question we cannot splice is repacked.
    """
    end = _question_end(query.wire)
    if end is not None and wire[_HEADER_LEN:end].lower() == query.wire[_HEADER_LEN:end].lower():
        return query.wire[:2] + wire[2:_HEADER_LEN] + query.wire[_HEADER_LEN:end] + wire[end:]
    record.header.id = query.id
    record.questions = [query.question]
    packed = bytes(record.pack())  # dnslib packs a bytearray; replies are bytes
    return packed


# --------------------------------------------------------------------------- what a reply means


class Action(enum.Enum):
    ACCEPT = "accept"  # give it to the client (and cache it if it qualifies)
    RETRY_TCP = "retry_tcp"  # truncated over UDP: ask the same upstream over TCP
    NEXT = "next"  # this upstream failed: try the next one
    IGNORE = "ignore"  # not the reply to our query: keep waiting


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    #: why: "ok", "truncated", "servfail", "refused", "malformed", "mismatch",
    #: and, from the shell, "timeout" and "error".
    reason: str
    #: the reply for the client (ACCEPT and RETRY_TCP, where it is the fallback).
    wire: bytes = b""


IGNORED_MISMATCH: Final = Verdict(Action.IGNORE, "mismatch")
NEXT_MALFORMED: Final = Verdict(Action.NEXT, "malformed")
_REJECTING: Final = {SERVFAIL: "servfail", REFUSED: "refused"}


def _same_question(ours: Any, theirs: Any) -> bool:
    # dnslib compares names case-insensitively, as DNS does (RFC 4343).
    return bool(
        ours.qname == theirs.qname and ours.qtype == theirs.qtype and ours.qclass == theirs.qclass
    )


def judge_reply(query: Query, sent_id: int, wire: bytes, *, tcp: bool) -> Verdict:
    """What an upstream's reply to `query`, relayed under `sent_id`, means.

    A reply is ours only if its ID and its question match; anything else is
    IGNOREd (over UDP it may be stray or forged, and a forger who gets the ID
    right still has to echo the question). An error without a question (some
    servers answer FORMERR or REFUSED that way) cannot be matched to the
    question, but with the right ID on a connected socket it is this
    upstream's failure: NEXT. SERVFAIL and REFUSED mean NEXT as well; TC over
    UDP means RETRY_TCP; every other reply is the answer.
    """
    if len(wire) >= 2 and int.from_bytes(wire[:2], "big") != sent_id:
        return IGNORED_MISMATCH
    record = parse_message(wire)
    if record is None:
        return NEXT_MALFORMED
    if not record.header.qr:
        return IGNORED_MISMATCH
    rcode = full_rcode(record)
    if not record.questions:
        return Verdict(Action.NEXT, _REJECTING.get(rcode, "malformed"))
    if len(record.questions) != 1 or not _same_question(query.question, record.questions[0]):
        return IGNORED_MISMATCH
    if rcode in _REJECTING:
        return Verdict(Action.NEXT, _REJECTING[rcode])
    try:
        client_wire = _for_client(query, wire, record)
    except Exception:  # dnslib could not repack what it parsed
        return NEXT_MALFORMED
    if record.header.tc and not tcp:
        return Verdict(Action.RETRY_TCP, "truncated", client_wire)
    return Verdict(Action.ACCEPT, "ok", client_wire)
