"""Errors a user can fix. The CLI prints them as one line and exits non-zero."""


class OptimaError(Exception):
    """A problem with the user's input (config, files, plugins): one clear line."""

    exit_code = 2


class ConfigError(OptimaError):
    """A gin file or binding is wrong."""
