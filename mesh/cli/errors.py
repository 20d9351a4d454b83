"""What the client reports on one line before exiting non-zero.

Every failure the user should see is a `CliError`; `main` prints it as
`mesh: <message>` and exits with its `exit_code`, never with a traceback.
"""

from __future__ import annotations


class CliError(Exception):
    """A failure to report on one line; exit status 1."""

    exit_code: int = 1


class UsageError(CliError):
    """The command line is wrong (a bad flag value, nothing to do); exit status 2, as argparse."""

    exit_code = 2


class SpecError(UsageError):
    """A flag value does not follow its grammar (`--publish`, `--health-check`, ...)."""


class ApiError(CliError):
    """The agent answered with an error body `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.status = status
        self.code = code
        self.message = message


class Unreachable(CliError):
    """No answer from the agent: refused, timed out, reset."""
