"""Files we replace and files we read, done safely in one place.

Writing: `replace_file` is the one way harness writes a file that may already exist.

`replace_file` writes a fresh temporary file beside the destination (created exclusively,
so never through a link), flushes it to the disk (fsync), and renames it over the
destination, so a reader sees the old file or the new one, whole: never a truncated or
empty one, whatever happens meanwhile (kill -9, a full disk, a power cut). A destination
that exists and is not a regular file (a device node such as /dev/null or /dev/full, a
folder, a FIFO, a symbolic link) is refused before anything is written, since renaming over
it would replace a device node by a regular file or silently cut a link. `create_file`
is its twin for a file made once (a secret token): written the same way, then linked to its
name only if nothing is there yet.

Reading: `read_regular` reads a whole regular file up to a size (never through a link, never
hanging on a FIFO), and `read_lines` is the one bounded line reader every import uses: a
line longer than its limit (a file of NUL bytes, /dev/zero) is refused instead of filling
the memory.

Lives in devices/ (which never imports harness/) so that both halves use it.
"""
import errno
import logging
import os
import socket
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Tuple, Union

log = logging.getLogger(__name__)


class NotARegularFile(OSError):
    """The destination exists and is not a regular file; nothing was written."""


def check_replaceable(path: Union[str, Path], links: bool = False
                      ) -> Optional[os.stat_result]:
    """The destination's stat (None when it does not exist yet, or with `links` when it
    is a symbolic link, which a rename then replaces without following); NotARegularFile
    when it exists and is not a regular file (never followed if it is a link)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISREG(info.st_mode):
        return info
    if links and stat.S_ISLNK(info.st_mode):
        return None
    what = ("a symbolic link" if stat.S_ISLNK(info.st_mode) else
            "a folder" if stat.S_ISDIR(info.st_mode) else
            "a device node" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else
            "a FIFO" if stat.S_ISFIFO(info.st_mode) else
            "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file")
    raise NotARegularFile(errno.EEXIST, f"it exists and is {what}; harness replaces only "
                                        f"regular files", str(path))


def replace_file(path: Union[str, Path], write: Callable[[BinaryIO], object],
                 mode: Optional[int] = None, links: bool = False) -> None:
    """Write `path` whole or not at all: `write(handle)` fills a temporary file beside it,
    which is fsynced and renamed over `path`; on any failure (an OSError such as ENOSPC, or
    an interruption) the temporary file is removed and `path` is left as it was.

    The new file keeps the mode of the file it replaces, else takes `mode` (default 0o666
    less the umask, as open() would). NotARegularFile (an OSError) when `path` exists and
    is not a regular file; with `links`, a symbolic link there (planted in a folder of
    ours) is replaced by the file, never followed."""
    target = Path(path)
    existing = check_replaceable(target, links)
    with _written_beside(target, write, stat.S_IMODE(existing.st_mode) if existing is not None
                         else mode) as temporary:
        check_replaceable(target, links)  # it may have become something else meanwhile
        os.replace(temporary, target)
    _sync_folder(target.parent)


def create_file(path: Union[str, Path], write: Callable[[BinaryIO], object],
                mode: Optional[int] = None) -> bool:
    """Create `path` whole, only if nothing is there: written and fsynced beside it, then
    linked to its name (which fails when a file, link or anything else is there). False,
    and nothing changed, when something already was; never a half-written `path`."""
    target = Path(path)
    with _written_beside(target, write, mode) as temporary:
        try:
            os.link(temporary, target)
        except FileExistsError:
            return False
    _sync_folder(target.parent)
    return True


@contextmanager
def _written_beside(target: Path, write: Callable[[BinaryIO], object],
                    mode: Optional[int]) -> Iterator[str]:
    """A temporary file beside `target`, filled by `write`, fsynced, of `mode`; removed when
    the block ends, whatever happens (after a rename it no longer exists)."""
    _sweep_abandoned(target)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=_partial_prefix(target)
                                     + f"{os.getpid()}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), mode if mode is not None else 0o666 & ~_umask())
            os.fsync(handle.fileno())
        yield temporary
    finally:
        Path(temporary).unlink(missing_ok=True)


def _partial_prefix(target: Path) -> str:
    """How the temporary files of `target` written on this host begin (the writer's pid
    follows, so that one killed before its rename can be told from one still writing)."""
    return f".{target.name}.{socket.gethostname()}."


def _sweep_abandoned(target: Path) -> None:
    """Remove the temporary files beside `target` left by writers of this host that were
    killed (kill -9, a power cut) before their rename; those of live writers stay."""
    prefix = _partial_prefix(target)
    try:
        names = [n for n in os.listdir(target.parent)
                 if n.startswith(prefix) and n.endswith(".part")]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            os.unlink(target.parent / name)
            log.info("removed %s, left by writer %s that was killed before its rename",
                     target.parent / name, pid)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def replace_text(path: Union[str, Path], text: str, mode: Optional[int] = None,
                 links: bool = False) -> None:
    """`replace_file` for a text (UTF-8)."""
    data = text.encode("utf-8")
    replace_file(path, lambda handle: handle.write(data), mode, links)


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _sync_folder(folder: Path) -> None:
    """Flush the rename itself to the disk (best effort: some filesystems refuse)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as exc:
        log.debug("cannot fsync folder %s: %s", folder, exc)
    finally:
        os.close(descriptor)


class LineTooLong(ValueError):
    """A line of a file we read is longer than its reader allows; `line` is its number."""

    def __init__(self, line: int, limit: int):
        super().__init__(f"line {line} is longer than {limit} bytes")
        self.line = line
        self.limit = limit


def read_lines(handle: BinaryIO, limit: int) -> Iterator[Tuple[int, bytes]]:
    """(number from 1, line) for each line of a binary handle, reading at most `limit` + 1
    bytes at a time: LineTooLong as soon as a line is longer than `limit` bytes, so a
    reader's memory stays bounded whatever the file holds."""
    number = 0
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) > limit:
            raise LineTooLong(number, limit)
        yield number, line


def read_regular(path: Union[str, Path], limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, never through a symbolic link
    (nor hanging on a FIFO); OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return data
    finally:
        os.close(fd)
