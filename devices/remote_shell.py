"""Shell command lines for devices reached through a remote POSIX shell (SSH, ADB).

Every argument is quoted with shlex.quote, so names from users never reach a shell raw. A
small wrapper prints the command's pid before it starts (exec keeps the pid), so that a
timeout can kill the command's whole process group on the device.
"""
import shlex
from typing import List, Optional

from devices.errors import DeviceLost

PID_MARK = "@@harness-pid"
EXIT_MARK = "@@harness-exit"


def quoted(argv: List[str]) -> str:
    """argv as one shell command line, every argument quoted."""
    return " ".join(shlex.quote(a) for a in argv)


def wrapped(argv: List[str], stderr_file: Optional[str] = None, report_exit: bool = False) -> str:
    """argv under the wrapper: prints '@@harness-pid PID' first; with `report_exit`, prints
    '@@harness-exit CODE' last (for shells that carry no exit status, like ADB's v1 shell);
    with `stderr_file`, sends stderr there (where the channel mixes it into stdout)."""
    script = 'exec 2>"$0"; ' if stderr_file else ""
    script += f'echo "{PID_MARK} $$"; '
    script += f'"$@"; echo "{EXIT_MARK} $?"' if report_exit else 'exec "$@"'
    return quoted(["sh", "-c", script, stderr_file or "harness", *argv])


def pid_from(line: str, device: str) -> int:
    """The pid in the wrapper's first line; DeviceLost when the device printed else."""
    if not line.startswith(PID_MARK):
        raise DeviceLost(f"the device's shell printed {line[:200]!r} instead of our pid",
                         device=device)
    return int(line.split()[1])


def kill_line(pid: int) -> str:
    """Kill `pid` and its process group (unless that group is the killing shell's own)."""
    script = ('pgid=$(cut -d" " -f5 "/proc/$1/stat" 2>/dev/null); '
              'if [ -n "$pgid" ] && [ "$pgid" -gt 1 ] && '
              '[ "$pgid" != "$(cut -d" " -f5 /proc/$$/stat)" ]; '
              'then kill -9 -- "-$pgid" 2>/dev/null; fi; kill -9 "$1" 2>/dev/null; true')
    return quoted(["sh", "-c", script, "harness", str(pid)])
