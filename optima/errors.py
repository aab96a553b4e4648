"""Errors a user can fix. The CLI prints them as one line and exits non-zero.

Every line a user reads about a problem starts with one prefix: `optima: error:`
(the command stops; `optima.cli.main`) or `optima: warning:` (it goes on; `warning`).
"""

WARNING_PREFIX = "optima: warning:"


def warning(text: str) -> str:
    """`text` as a warning line, `optima: warning: <text>`, wherever it is printed."""
    return f"{WARNING_PREFIX} {text}"


class OptimaError(Exception):
    """A problem with the user's input (config, files, plugins): one clear line."""

    exit_code = 2


class ConfigError(OptimaError):
    """A gin file or binding is wrong."""
