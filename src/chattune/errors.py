"""User-facing errors: one clear message, no traceback (the CLI shows one with --debug)."""

from __future__ import annotations


class ChattuneError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible setting.

    The message names what is wrong and, where possible, how to fix it. The CLI prints it as one
    `error: ...` line and exits non-zero; any other exception is a bug in chattune.
    """

    exit_code = 2


class ConfigError(ChattuneError):
    """A config value that fails validation; the message names the field."""


class DataError(ChattuneError):
    """A data set that cannot be used as given."""


class ReportError(ChattuneError):
    """The run finished and its model is saved, but its report could not be written (exit code 3, so a script
    can tell this from bad input, where nothing was trained)."""

    exit_code = 3
