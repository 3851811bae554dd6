"""Errors meant for people: each names the file, key, row or plugin and the fix.

The CLI turns any ``UserError`` into a message on stderr and its ``exit_code``: 2, or 3 for a run
that diverged.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; shown without a traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A config file, key or value is wrong."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.message, self.file, self.key = message, file, key
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class DataError(UserError):
    """A dataset file or row is wrong."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None):
        self.file, self.row = file, row
        where = file or ""
        if row is not None:
            where = f"{where}, row {row}" if where else f"row {row}"
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(UserError):
    """A plugin is missing, broken, or conflicts with another."""

    def __init__(self, message: str, *, plugin: str | None = None):
        self.plugin = plugin
        super().__init__(f"plugin {plugin!r}: {message}" if plugin else message)


class TrainingDiverged(UserError):
    """The loss or the gradients became non-finite; nothing after the last good checkpoint was saved."""

    exit_code = 3


def did_you_mean(name: str, choices) -> str:
    """' (did you mean "x"?)' for the closest choice, or ''."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
