"""The HRM's route problems as the control process sees them (sans-IO).

The routers (in the agent's loop or in worker processes) each hold a
`RouteTable`; the control process, which answers the API and `mesh doctor`,
follows the feed with one of its own, built by the same rules, so a problem
shows the same whether or not this node routes HTTP, and however many
workers serve it. `route_problems()` is what the API, `mesh doctor` and the
metrics collector read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lb.http.routes import Problem, RouteTable
from mesh.core.model import Change, Record


class RouteProblems:
    """A feed view: every service's route problems, for this node's certificates."""

    def __init__(self, cert_hosts: Sequence[str] | None = None) -> None:
        #: this node's HTTPS certificates' hosts; None: no HTTPS listener here
        self.cert_hosts = None if cert_hosts is None else tuple(cert_hosts)
        self.table = RouteTable()

    def load(self, records: Iterable[Record]) -> None:
        self.table.load(records)

    def on_change(self, change: Change) -> None:
        self.table.on_change(change)

    def route_problems(self) -> list[Problem]:
        """Every problem, sorted by service, label, reason."""
        return self.table.problems(self.cert_hosts)

    def by_service(self) -> dict[str, list[Problem]]:
        grouped: dict[str, list[Problem]] = {}
        for problem in self.route_problems():
            grouped.setdefault(problem.service, []).append(problem)
        return grouped
