"""Where a request goes: a pure function of its head and the route table (sans-IO).

`decide` answers one of two things: a `Forward` tuple (the route matched, the
target the task gets, the sticky cookie's value if the route has one) or `Answer`
(the router answers itself: 404 when no route serves the host and path, saying
which service's label names the host but does not parse if one does; 301
for a redirect route). Which task of a `Forward` gets the request is the
balancer's, afterwards: it keeps state (round robin, ejections), this does not.
"""

from __future__ import annotations

from lb.http.heads import RequestHead, cookie_value, strip_prefix
from lb.http.routes import Match, RouteTable

#: to one of the route's tasks: (match, the request target the task gets, the task id
#: the route's sticky cookie names if any). A plain tuple: made per request, and a
#: class's __init__ would cost one more Python call each time.
Forward = tuple[Match, bytes, str | None]


class Answer:
    """The router answers itself, with this status and message (and extra headers)."""

    __slots__ = ("extra", "match", "reason", "status")

    def __init__(
        self,
        status: int,
        reason: str,
        match: Match | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.match = match
        self.extra = extra


NO_ROUTE = Answer(404, "no service is routed for this host")


def decide(head: RequestHead, table: RouteTable) -> Forward | Answer:
    match = table.match(head.host, head.path)
    if match is None:
        problem = table.problem_for(head.host)
        if problem is None:
            return NO_ROUTE
        # A misconfiguration is loud: the answer says which label is wrong, and why.
        return Answer(
            404,
            f"{NO_ROUTE.reason}: service {problem.service} names it, but its label "
            f"{problem.label} is not used: {problem.reason}",
        )
    route = match.route
    if route.redirect:
        location = route.redirect.rstrip("/").encode("latin-1") + head.target
        return Answer(301, f"moved to {route.redirect}", match, [(b"Location", location)])
    sticky = None
    if route.sticky_cookie:
        sticky = cookie_value(head.cookies, route.sticky_cookie.encode("latin-1"))
    target = strip_prefix(head.target, route.path_prefix) if route.strip_prefix else head.target
    return match, target, sticky
