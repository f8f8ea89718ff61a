"""Errors the harness raises for bad input.

Every one of them is caught by the CLI and printed as a one-line message
(no traceback), with a non-zero exit status.
"""


class BenchError(Exception):
    """Base class: a problem with the user's input or files, not a bug."""


class ConfigError(BenchError):
    """A config key, value or selector is wrong."""


class DatasetError(BenchError):
    """A dataset file or folder is missing, truncated or corrupt."""


class CheckpointError(BenchError):
    """A checkpoint is unreadable or belongs to another config or method."""


class RegistryError(BenchError, KeyError):
    """An unknown or duplicate name in a registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
