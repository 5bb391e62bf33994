"""One line channel for every transport: the agent's stdout read line by line, with deadlines.

A process on a device (a local subprocess, an SSH channel, an ADB shell stream) gives bytes;
`LineChannel` turns them into lines, reads the pid the wrapper of devices.remote_shell
prints first and the exit mark it may print last, and turns silence into MeasurementTimeout
and a closed stream into DeviceLost. A transport's process class only says how to receive a
chunk (`_receive`), how to learn the exit status, how to write and how to kill.

`run_to_end` is the `Transport.run` every remote transport shares, and `upload_then_rename`
the way every transport places a file: a partial file first, renamed into place, so a cut
transfer never leaves a file under the final name.
"""
import hashlib
import threading
import time
from typing import Callable, List, Optional, Tuple

from devices.errors import DeviceLost, MeasurementTimeout
from devices.remote_shell import EXIT_MARK, pid_from

STDERR_TAIL_BYTES = 8192


class LineChannel:
    """Lines from a process on a device; see devices.transport.RemoteProcess.

    Subclasses implement `_receive(wait_s)` (a chunk of stdout; None when nothing came within
    wait_s; b"" at its end), `_exit_status(wait_s)`, `write_line` and `kill`."""

    what = "the agent"  # how messages name the far end
    stderr_is_costly = False  # True where reading stderr is a round trip (ADB): read on failure

    def __init__(self, device: str):
        self.device = device
        self.pid: Optional[int] = None
        self._buffer = b""
        self._eof = False
        self._exit_mark: Optional[int] = None  # from EXIT_MARK, for shells that carry no status
        self._stderr = bytearray()
        self._stderr_reader: Optional[threading.Thread] = None

    # ------------------------------------------------------------ what a subclass provides

    def _receive(self, wait_s: float) -> Optional[bytes]:
        raise NotImplementedError

    def _exit_status(self, wait_s: float) -> Optional[int]:
        raise NotImplementedError

    # ------------------------------------------------------------ reading

    def read_pid(self, timeout: float) -> None:
        """The pid the remote wrapper prints before the command starts."""
        self.pid = pid_from(self.read_line(timeout), self.device)

    def read_line(self, timeout: float) -> str:
        """The next line without its newline; MeasurementTimeout when none comes within
        `timeout` s, DeviceLost when the stream ended."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                text = line.decode(errors="replace").rstrip("\r")
                if text.startswith(EXIT_MARK):
                    self._exit_mark = int(text.split()[1])
                    continue
                return text
            if self._eof:
                raise DeviceLost(f"{self.what} closed its output (exit code "
                                 f"{self.exit_code_within(2.0)})", device=self.device)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MeasurementTimeout(f"no answer from {self.what} within {timeout:.1f} s",
                                         device=self.device)
            chunk = self._receive(min(remaining, 1.0))
            if chunk is None:
                continue
            if not chunk:
                self._eof = True
                if self._buffer:
                    self._buffer += b"\n"  # the last line had no newline: still a line
            self._buffer += chunk

    def read_to_end(self, deadline: float) -> str:
        """Every remaining line, until the process closes its output."""
        lines: List[str] = []
        while True:
            try:
                lines.append(self.read_line(max(deadline - time.monotonic(), 0.001)))
            except DeviceLost:
                if self._eof:
                    return "\n".join(lines)
                raise

    def exit_code_within(self, wait_s: float) -> Optional[int]:
        """The exit status, waiting up to `wait_s` for it (None if it has not come)."""
        if self._exit_mark is not None:
            return self._exit_mark
        return self._exit_status(wait_s)

    def exit_code(self) -> Optional[int]:
        return self.exit_code_within(0.0)

    # ------------------------------------------------------------ stderr

    def _drain_stderr_with(self, read_chunk: Callable[[], bytes]) -> None:
        """Keep the last STDERR_TAIL_BYTES of stderr, read in a thread so a chatty runtime
        never blocks on a full pipe."""
        def drain() -> None:
            try:
                for chunk in iter(read_chunk, b""):
                    self._stderr += chunk
                    del self._stderr[:-STDERR_TAIL_BYTES]
            except (OSError, EOFError, ValueError):
                return
        self._stderr_reader = threading.Thread(target=drain, daemon=True)
        self._stderr_reader.start()

    def _join_stderr(self) -> None:
        if self._stderr_reader is not None:
            self._stderr_reader.join(timeout=2)

    def stderr_tail(self) -> str:
        return bytes(self._stderr).decode(errors="replace")


def run_to_end(process: LineChannel, argv: List[str], timeout: float,
               where: str) -> Tuple[int, str, str]:
    """Run a started, wrapped command to its end: (exit code, stdout, stderr). After `timeout`
    s it is killed with its process group and MeasurementTimeout raised."""
    deadline = time.monotonic() + timeout
    try:
        process.read_pid(max(deadline - time.monotonic(), 0.001))
        out = process.read_to_end(deadline)
        code = process.exit_code_within(max(deadline - time.monotonic(), 0.0))
        if code is None:
            raise MeasurementTimeout("no exit status", device=process.device)
        err = process.stderr_tail() if code != 0 or not process.stderr_is_costly else ""
    except MeasurementTimeout:
        process.kill()  # type: ignore[attr-defined]
        raise MeasurementTimeout(f"{' '.join(argv[:3])}... ran longer than {timeout:.1f} s "
                                 f"and was killed on {where}", device=process.device) from None
    process.kill()  # type: ignore[attr-defined]
    return code, out, err


def file_sha256(path: str) -> str:
    """Hex sha256 of a local file's content (names files on devices, checks uploads)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def partial_name(target: str) -> str:
    """A name beside `target` for the file while it is being written."""
    return f"{target}.{time.time_ns()}.part"


def upload_then_rename(target: str, send: Callable[[str], object],
                       rename: Callable[[str, str], object],
                       discard: Callable[[str], object]) -> str:
    """Place a file at `target`: `send` it to a partial name, then `rename` it into place;
    on failure the partial file is `discard`ed (best effort) and the error re-raised."""
    partial = partial_name(target)
    try:
        send(partial)
        rename(partial, target)
    except BaseException:
        try:
            discard(partial)
        except Exception:  # cleaning up must not hide the error being reported
            pass
        raise
    return target
