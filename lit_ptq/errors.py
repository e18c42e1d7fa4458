"""Exceptions for mistakes a user can fix (a path, a value, a file); the CLI prints them in one line."""

__all__ = ["UserError", "CheckpointError", "DataError", "ConfigError", "CalibrationError"]


class UserError(Exception):
    """A problem with the user's input, described in one sentence that says what would fix it."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


class DataError(UserError, ValueError):
    """A dataset folder or file is missing, malformed or too small."""


class ConfigError(UserError, ValueError):
    """An option has a value outside what it accepts."""


class CalibrationError(UserError, ValueError):
    """Calibration could not produce quantization parameters (no batches, NaN or Inf, a shape
    that changes between batches)."""
