"""Typed failures of a measurement on a device, one class per kind.

The agent reports {"error": {"kind", "message"}}; the host turns each kind into one of these
classes so that callers can tell a model the runtime cannot load from a board that went away.
Kinds: TRANSFER, LOAD, RUNTIME, TIMEOUT, DEVICE_LOST, THERMAL, USER, and PROTOCOL for an agent
that answered something other than our JSON.
"""
from typing import Dict, Optional, Type


class FixableError(Exception):
    """Base of every error harness raises on purpose (HarnessError and DeviceError alike):
    `message` names the cause, `fix` what to do about it. A command line catches this one class
    and prints one line with the fix; anything else is a bug and keeps its traceback."""

    def __init__(self, message: str, fix: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def cause(self) -> str:
        """The first line of the error: what went wrong (the fix follows it)."""
        return self.message

    def __str__(self) -> str:
        return self.cause() + (f"\n  fix: {self.fix}" if self.fix else "")


class DeviceError(FixableError):
    """A measurement failed on a device; `kind` says how, `fix` what to do about it."""

    kind = "RUNTIME"
    default_fix = "see the message; rerun with logging at DEBUG for the agent's stderr"

    def __init__(self, message: str, fix: Optional[str] = None, device: Optional[str] = None):
        super().__init__(message, fix or self.default_fix)
        self.device = device

    def cause(self) -> str:
        where = f" on device {self.device!r}" if self.device else ""
        return f"{self.kind}{where}: {self.message}"


class TransferError(DeviceError):
    kind = "TRANSFER"
    default_fix = "check free space and permissions in the device's working folder, then retry"


class LoadError(DeviceError):
    kind = "LOAD"
    default_fix = ("check that the model is valid ONNX for the device's onnxruntime version "
                   "(see the message), or install/upgrade onnxruntime on the device")


class InferenceError(DeviceError):
    kind = "RUNTIME"
    default_fix = "the model loaded but failed to run; check its inputs and ops on this runtime"


class MeasurementTimeout(DeviceError):
    kind = "TIMEOUT"
    default_fix = "raise the profiler's timeout_s or lower max_time_ms / min_runs"


class DeviceLost(DeviceError):
    kind = "DEVICE_LOST"
    default_fix = "check that the device is up and reachable, then retry"


class ThermalError(DeviceError):
    kind = "THERMAL"
    default_fix = "let the device cool down, or raise the temperature limit"


class BadRequest(DeviceError):
    kind = "USER"
    default_fix = "correct the settings named in the message"


class AgentProtocolError(DeviceError):
    kind = "PROTOCOL"
    default_fix = ("the agent printed something other than its JSON; run it by hand on the "
                   "device ('python3 ort_agent.py fingerprint') to see what it prints")


ERROR_CLASSES: Dict[str, Type[DeviceError]] = {
    cls.kind: cls for cls in (TransferError, LoadError, InferenceError, MeasurementTimeout,
                              DeviceLost, ThermalError, BadRequest, AgentProtocolError)}


def error_from_agent(payload: object, device: Optional[str] = None) -> DeviceError:
    """The typed exception for an agent's {"kind", "message"} error object."""
    if not isinstance(payload, dict) or not isinstance(payload.get("message"), str):
        return AgentProtocolError(f"agent sent a malformed error object: {str(payload)[:300]}",
                                  device=device)
    cls: Type[DeviceError] = ERROR_CLASSES.get(str(payload.get("kind")), DeviceError)
    return cls(payload["message"], device=device)
