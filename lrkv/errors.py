"""Errors with a one-line message that names the problem and the fix.

Entry points catch `LrkvError` and print its message instead of a stack trace.
"""


class LrkvError(Exception):
    """Base class for errors with a one-line message that names the problem and the fix."""


class ConfigError(LrkvError, ValueError):
    """A bad configuration value."""


class DataError(LrkvError):
    """Missing or unusable data."""


class CheckpointError(LrkvError):
    """A missing, corrupt or incompatible checkpoint."""


class OutputError(LrkvError, OSError):
    """An output that cannot be written: full disk, no permission, read-only folder, folder in use."""


class TrainingInterrupted(LrkvError):
    """SIGTERM or Ctrl-C stopped training after saving a checkpoint."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name
