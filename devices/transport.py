"""The Transport protocol: the few things the host needs from any device.

A transport moves files to the device (`put`), runs a command there to completion (`run`) or
as a long-lived process we talk to line by line (`spawn`), says what it knows of the device
beyond the agent's view (`fingerprint`), deletes what we left there (`remove`) and releases
its resources (`close`). `spawn` and `remove` extend DESIGN.md's four calls: the persistent
agent worker and `harness devices clean` need them on every transport. Everything
device-specific (SSH, ADB, getprop, thermal files) sits behind it.

What a device may need around a measurement (a device-wide lock, pinning to cores, waiting
to cool) is its `control`, a `DeviceControl`: the base class does nothing, and a phone's
control (devices.adb.PhoneControl) overrides what it needs.
"""
from typing import Dict, List, Optional, Protocol, Tuple

from devices.agent_result import DeviceControlReport


class DeviceControl:
    """What the host controls around a measurement on one device; the defaults do nothing.

    lock_path: a file on the device every host and user of it locks while measuring (one
        measurement per device at a time, whoever starts it), or None for no device-wide lock.
    command_prefix: put before the agent's command line (phones: `taskset MASK`).
    missing_runtime_fix: what to tell the user when the device's Python cannot run the agent.
    """

    lock_path: Optional[str] = None
    missing_runtime_fix: Optional[str] = None

    def __init__(self, lock_path: Optional[str] = None):
        self.lock_path = lock_path

    @property
    def command_prefix(self) -> List[str]:
        return []

    def prepare(self, deadline: float) -> Optional[DeviceControlReport]:
        """Bring the device into measuring condition before a run (bounded by `deadline`,
        a time.monotonic() value); what it did, or None when it does nothing."""
        return None

    def finish(self, prepared: Optional[DeviceControlReport]) -> Optional[DeviceControlReport]:
        """`prepared` completed with the device's state after the run, and its flags."""
        return prepared


class RemoteProcess(Protocol):
    """A process on the device with a line-based stdin/stdout channel."""

    pid: Optional[int]

    def write_line(self, line: str) -> None:
        """Send one line (a newline is added). Raises DeviceLost if the process is gone."""

    def read_line(self, timeout: float) -> str:
        """The next stdout line without its newline. Raises MeasurementTimeout when no line
        comes within `timeout` seconds, DeviceLost when the process closed its stdout."""

    def stderr_tail(self) -> str:
        """The last few KiB the process wrote to stderr (for error messages)."""

    def exit_code(self) -> Optional[int]:
        """The exit status once the process has ended, else None."""

    def kill(self) -> None:
        """Kill the process and everything it started on the device; idempotent."""


class Transport(Protocol):
    """How the host reaches one device."""

    name: str
    python: List[str]  # the command that runs a Python 3.8+ with numpy and onnxruntime there

    @property
    def control(self) -> DeviceControl:
        """What to do around a measurement there (no-ops by default)."""

    def put(self, local_path: str, remote_name: str, force: bool = False) -> str:
        """Copy a file to the device's working folder under `remote_name` unless a file of
        that name is already there (names are content hashes); returns its path there."""

    def run(self, argv: List[str], timeout: float) -> Tuple[int, str, str]:
        """Run argv on the device; (exit code, stdout, stderr). Kills it after `timeout` s
        and raises MeasurementTimeout."""

    def spawn(self, argv: List[str]) -> RemoteProcess:
        """Start argv on the device with a line channel on its stdin/stdout."""

    def fingerprint(self) -> Dict[str, object]:
        """What the transport knows of the device beyond the agent's view (may be empty)."""

    def remove(self, remote_names: List[str], timeout: float = 60.0) -> None:
        """Delete files or folders in the device's working folder (`harness devices clean`)."""

    def close(self) -> None:
        """Release connections; processes we started on the device are killed."""
