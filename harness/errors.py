"""Errors raised by harness itself (device failures are in devices.errors).

Each names its cause and its fix, so a user reading a traceback knows what to do next.
"""
from typing import Optional


class HarnessError(Exception):
    """Base class: `message` says what went wrong, `fix` what to do about it."""

    def __init__(self, message: str, fix: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message + (f"\n  fix: {self.fix}" if self.fix else "")


class InvalidSample(HarnessError, ValueError):
    """A sample names an unknown label, misses one, or picks a value not among the choices."""


class ExportError(HarnessError):
    """A subnet could not be frozen or exported to ONNX."""


class CacheError(HarnessError):
    """The cache file cannot be used; it is left untouched."""

