"""Name rules shared by the API models and the store.

Service, network and task names become DNS names (`web`, `tasks.web`,
`web.backend`), so they follow RFC 1123 host-name labels: 1 to 63 characters
of letters, digits and hyphens, not starting or ending with a hyphen. Names
are kept as given but compared in lower case by DNS. Task names are dotted
(`web.1.<id>`), so each of their labels follows the same rule.
"""

from __future__ import annotations

import re

#: One DNS label; the API's OpenAPI description states the same patterns.
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
LABEL_PATTERN = rf"^{LABEL}$"
DOTTED_PATTERN = rf"^{LABEL}(?:\.{LABEL})*$"
_LABEL = re.compile(LABEL)
MAX_DNS_NAME = 253
#: Names the resolver keeps for itself: `tasks.<service>` would be ambiguous.
RESERVED = frozenset({"tasks"})


def is_dns_label(name: str) -> bool:
    # fullmatch: `$` would also match before a trailing newline ("web\n").
    return _LABEL.fullmatch(name) is not None


def check_label(name: str, what: str) -> str:
    """Return `name` if it is a DNS label that is not reserved, else raise ValueError."""
    if not is_dns_label(name):
        raise ValueError(
            f"{what} {name!r} is not a DNS label (1-63 letters, digits or hyphens, "
            "not starting or ending with a hyphen)"
        )
    if name.lower() in RESERVED:
        raise ValueError(f"{what} {name!r} is reserved")
    return name


def check_dotted(name: str, what: str) -> str:
    """A dotted DNS name whose every label is a DNS label."""
    if len(name) > MAX_DNS_NAME or not all(is_dns_label(part) for part in name.split(".")):
        raise ValueError(f"{what} {name!r} is not a DNS name of dot-separated labels")
    return name
