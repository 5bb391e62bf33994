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
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from devices.errors import DeviceLost, MeasurementTimeout, TransferError
from devices.line_channel import LineChannel, upload_then_rename
from devices.transport import DeviceControl

log = logging.getLogger(__name__)


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


class LocalProcess(LineChannel):
    """A subprocess on this machine with a line channel; see RemoteProcess."""

    def __init__(self, argv: List[str], cwd: str, device: str):
        super().__init__(device)
        self._proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True)
        self.pid = self._proc.pid
        stderr: Any = self._proc.stderr
        self._drain_stderr_with(lambda: stderr.read1(4096))
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]

    def _receive(self, wait_s: float) -> Optional[bytes]:
        if not self._selector.select(wait_s):
            return None
        return os.read(self._proc.stdout.fileno(), 1 << 16)  # type: ignore[union-attr]

    def _exit_status(self, wait_s: float) -> Optional[int]:
        try:
            return self._proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return None

    def write_line(self, line: str) -> None:
        try:
            self._proc.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
            self._proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, ValueError, OSError):
            raise DeviceLost(f"agent process {self.pid} is gone (exit code {self.exit_code()})",
                             device=self.device) from None

    def kill(self) -> None:
        if self._proc.poll() is None:
            _kill_group(self._proc)
        self._selector.close()
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass
        self._join_stderr()
        self._proc.stderr.close()  # type: ignore[union-attr]


class LocalTransport:
    """This machine as a device. `workdir` plays the device's working folder."""

    def __init__(self, workdir: Path, name: str = "local", python: Optional[List[str]] = None,
                 lock_path: Optional[str] = "/tmp/harness-device-local.lock"):
        self.name = name
        self.control = DeviceControl(lock_path)  # the lock is seen by every user and home
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.python = list(python) if python else [sys.executable]
        self._processes: List[LocalProcess] = []

    def put(self, local_path: str, remote_name: str, force: bool = False) -> str:
        target = self.workdir / remote_name
        if target.exists() and not force:
            return str(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            return upload_then_rename(str(target), lambda partial: shutil.copyfile(local_path, partial),
                                      os.replace, lambda partial: Path(partial).unlink(missing_ok=True))
        except OSError as exc:
            raise TransferError(f"cannot copy {local_path} to {target}: {exc}",
                                device=self.name) from exc

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
