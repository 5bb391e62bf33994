"""Errors raised by harness itself (device failures are in devices.errors).

Each names its cause and its fix, so a user reading a traceback knows what to do next.
"""
from typing import Optional

from devices.errors import FixableError


class HarnessError(FixableError):
    """An error of harness itself (not of a device): `message` says what went wrong, `fix`
    what to do about it. Shares its base, FixableError, with devices.errors.DeviceError."""


class InvalidSample(HarnessError, ValueError):
    """A sample names an unknown label, misses one, or picks a value not among the choices."""


class InvalidArgument(HarnessError, ValueError):
    """An argument of a call or a flag of a command is out of range or malformed (a limit, a
    confidence, a precision, a setting): nothing was measured. Its line starts USER, the kind
    the agent gives a bad request, so the user's own mistakes read alike wherever caught."""

    def __init__(self, message: str, fix: Optional[str] = None):
        super().__init__(message, fix or "give the value in the range the message names")

    def cause(self) -> str:
        return f"USER: {self.message}"


class ExportError(HarnessError):
    """A subnet could not be frozen or exported to ONNX."""


class CacheError(HarnessError):
    """The cache file cannot be used; it is left untouched."""



class HomeError(HarnessError):
    """$HARNESS_HOME cannot be harness's home folder (it is a file, or under one)."""
