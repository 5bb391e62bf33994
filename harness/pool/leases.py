"""Device leases and pool health: exactly one measurement runs on a device at a time.

(Leases guard devices on this host and its home; a device shared by several hosts is also
locked on the device itself, by the agent: see DeviceControl.lock_path.)

A lease is an exclusive `flock` on `$HARNESS_HOME/leases/NAME.lock`, so two profilers, two
processes or two users of one home never share a device. The kernel drops the lock when its
holder dies, so a lease held by a dead process expires by itself. The time a measurement may
take counts from the moment the lease is granted (`acquired_at`), never from the queue.
"""
import fcntl
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import IO, Dict, List, Optional

from harness.errors import HarnessError

log = logging.getLogger(__name__)

LEASE_WAIT_S = 3600.0  # how long a job waits for a device leased by someone else

# What may name a device in a lease file name: the registry's names, and "local".
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DeviceBusy(HarnessError):
    """The device stayed leased by someone else for longer than we were willing to wait."""


class DeviceLease:
    """The exclusive lease of one device, held inside `with lease:` (entering a lease that
    `try_lease` already holds keeps it; leaving releases it)."""

    def __init__(self, home: Path, device: str, wait_s: float = LEASE_WAIT_S):
        if not DEVICE_NAME.match(device) or device in (".", ".."):
            raise HarnessError(f"{device!r} cannot name a device (no lease file is made for it)",
                               fix="use a registered device name: letters, digits, '.', '_' or "
                                   "'-' ('harness devices list')")
        self.path = Path(home) / "leases" / f"{device}.lock"
        self.device = device
        self.wait_s = wait_s
        self.acquired_at: Optional[float] = None  # time.monotonic() when granted
        self._handle: Optional[IO[str]] = None

    def __enter__(self) -> "DeviceLease":
        if self._handle is None:
            self.acquire()
        return self

    def acquire(self) -> None:
        """Wait for the lease (up to wait_s; then DeviceBusy) and hold it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # our own file under $HARNESS_HOME; never through a link someone planted there
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600)
        except OSError as exc:
            raise HarnessError(f"cannot open the lease file {self.path}: {exc}",
                               fix=f"remove {self.path} if it is a link or not a file, and check "
                                   "that $HARNESS_HOME is writable") from None
        handle = os.fdopen(descriptor, "r+")
        started = time.monotonic()
        delay = 0.005
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited >= self.wait_s:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    handle.close()
                    raise DeviceBusy(f"device {self.device!r} stayed leased for {waited:.0f} s "
                                     f"(holder: {holder})",
                                     fix="wait for the other profiling run to finish, or stop it")
                if delay >= 0.1:
                    log.debug("waiting for the lease on %s", self.device)
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle
        self.acquired_at = time.monotonic()

    def deadline(self, timeout_s: float) -> float:
        """The time.monotonic() by which work under this lease must end: timeouts count
        from the moment the lease was granted, never from the queue."""
        if self.acquired_at is None:
            raise RuntimeError("the lease is not held")
        return self.acquired_at + timeout_s

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Let the lease go (again: nothing)."""
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class DeviceHealth:
    """Strikes and quarantine for the devices of a pool.

    A device that fails (lost, timed out, too hot, garbled) gets a strike; after
    `max_strikes` in a row it is quarantined for `quarantine_s` seconds, then probed again by
    being offered the next job. A success clears its strikes."""

    def __init__(self, devices: List[str], max_strikes: int = 3, quarantine_s: float = 60.0):
        self.devices = list(devices)
        self.max_strikes = max_strikes
        self.quarantine_s = quarantine_s
        self.strikes: Dict[str, int] = {d: 0 for d in devices}
        self.until: Dict[str, float] = {d: 0.0 for d in devices}
        self._lock = threading.Lock()

    def available(self) -> List[str]:
        now = time.monotonic()
        with self._lock:
            return [d for d in self.devices if self.until[d] <= now]

    def strike(self, device: str, error: Exception) -> None:
        with self._lock:
            self.strikes[device] += 1
            if self.strikes[device] >= self.max_strikes:
                self.until[device] = time.monotonic() + self.quarantine_s
                self.strikes[device] = 0
                log.warning("%s quarantined for %.0f s after %d failures in a row (last: %s)",
                            device, self.quarantine_s, self.max_strikes, error)

    def ok(self, device: str) -> None:
        with self._lock:
            self.strikes[device] = 0
            self.until[device] = 0.0


def try_lease(home: Path, device: str) -> Optional[DeviceLease]:
    """The device's lease if it is free right now, else None."""
    lease = DeviceLease(home, device, wait_s=0.0)
    try:
        lease.acquire()
    except DeviceBusy:
        return None
    return lease
