"""Numbers of the DNS wire format that the responder, the forwarder and the server share."""

from __future__ import annotations

from typing import Final

#: RFC 1035 §4.1.1 response codes
NOERROR: Final = 0
FORMERR: Final = 1
SERVFAIL: Final = 2
NXDOMAIN: Final = 3
NOTIMP: Final = 4
REFUSED: Final = 5
#: RFC 6891 §6.1.3: an extended rcode (its high 8 bits go in the OPT record)
BADVERS: Final = 16

#: The UDP payload size we announce in the OPT records we build (the DNS flag
#: day 2020 value, which avoids IP fragmentation on any sane path).
EDNS_PAYLOAD: Final = 1232
#: What any client takes over UDP without EDNS (RFC 1035 §4.2.1).
UDP_MIN: Final = 512
