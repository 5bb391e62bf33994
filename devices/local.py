"""The `local` transport: this machine as a device, the agent in a subprocess.

Files are "put" into a working folder of their own (as they would be on a board), and every
process starts in a new session so that a timeout kills it together with anything it started.
"""
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from devices.errors import DeviceLost, MeasurementTimeout, TransferError

log = logging.getLogger("harness")

STDERR_TAIL_BYTES = 8192


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group started for `proc` and reap the process."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process SIGKILL cannot stop
        log.warning("process %d did not exit after SIGKILL", proc.pid)


class LocalProcess:
    """A subprocess on this machine with a line channel; see RemoteProcess."""

    def __init__(self, argv: List[str], cwd: str, device: str):
        self.device = device
        self._proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True)
        self.pid: Optional[int] = self._proc.pid
        self._buffer = b""
        self._stderr = bytearray()
        self._stderr_reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_reader.start()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._proc.stdout, selectors.EVENT_READ)

    def _drain_stderr(self) -> None:
        # Read stderr continuously so a chatty runtime cannot block on a full pipe.
        for chunk in iter(lambda: self._proc.stderr.read1(4096), b""):
            self._stderr += chunk
            del self._stderr[:-STDERR_TAIL_BYTES]

    def write_line(self, line: str) -> None:
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            raise DeviceLost(f"agent process {self.pid} is gone (exit code {self.exit_code()})",
                             device=self.device) from None

    def read_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                raise MeasurementTimeout(f"no answer from the agent within {timeout:.1f} s",
                                         device=self.device)
            chunk = os.read(self._proc.stdout.fileno(), 1 << 16)
            if not chunk:
                self._proc.wait()
                self._stderr_reader.join(timeout=2)
                raise DeviceLost(f"agent process {self.pid} exited with code "
                                 f"{self._proc.returncode} before answering",
                                 device=self.device)
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def stderr_tail(self) -> str:
        return bytes(self._stderr).decode(errors="replace")

    def exit_code(self) -> Optional[int]:
        return self._proc.poll()

    def kill(self) -> None:
        if self._proc.poll() is None:
            _kill_group(self._proc)
        self._selector.close()
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._stderr_reader.join(timeout=2)
        self._proc.stderr.close()


class LocalTransport:
    """This machine as a device. `workdir` plays the device's working folder."""

    def __init__(self, workdir: Path, name: str = "local", python: Optional[List[str]] = None,
                 lock_path: Optional[str] = "/tmp/harness-device-local.lock"):
        self.name = name
        self.lock_path = lock_path  # on this machine, seen by every user and every home
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.python = list(python) if python else [sys.executable]
        self._processes: List[LocalProcess] = []

    def put(self, local_path: str, remote_name: str, force: bool = False) -> str:
        target = self.workdir / remote_name
        if target.exists() and not force:
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".{os.getpid()}.part")
        try:
            shutil.copyfile(local_path, partial)
            os.replace(partial, target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise TransferError(f"cannot copy {local_path} to {target}: {exc}",
                                device=self.name) from exc
        return str(target)

    def run(self, argv: List[str], timeout: float) -> Tuple[int, str, str]:
        proc = subprocess.Popen(argv, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=max(timeout, 0.001))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            raise MeasurementTimeout(f"{Path(argv[-1]).name if argv else 'command'} ran longer "
                                     f"than {timeout:.1f} s and was killed",
                                     device=self.name) from None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def spawn(self, argv: List[str]) -> LocalProcess:
        process = LocalProcess(argv, str(self.workdir), self.name)
        self._processes.append(process)
        return process

    def fingerprint(self) -> Dict[str, object]:
        return {}

    def remove(self, remote_names: List[str], timeout: float = 60.0) -> None:
        for name in remote_names:
            target = self.workdir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)

    def close(self) -> None:
        for process in self._processes:
            process.kill()
        self._processes.clear()
