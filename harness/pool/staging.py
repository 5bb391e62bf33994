"""The folder a pool writes the models it is about to send, and the sweep of the folders
that killed processes left behind.

A pool writes each model to a staging file just before its client hands it to the device,
and removes it after. A process killed outright (SIGKILL, an out-of-memory kill, a lost
farm host) cannot remove its folder, and a sweep of a few hundred subnets leaves hundreds of
MB there. So every staging folder lives under `$HARNESS_HOME/staging/` and holds a lock file
its process keeps locked (`flock`: the kernel drops the lock when its holder dies, however it
dies); each new pool removes the folders of its home whose lock it can take. A folder with
no lock file is removed only once it is older than a minute (its process may be between
making the folder and locking it). Nothing in that folder is followed through a link.
"""
import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Optional

from harness.errors import HarnessError

log = logging.getLogger(__name__)

STAGING_FOLDER = "staging"
LOCK_NAME = ".in-use"
UNLOCKED_GRACE_S = 60.0


class StagingFolder:
    """A staging folder of this process under `$HARNESS_HOME/staging/`, locked while it
    lives; `cleanup()` removes it (again: nothing)."""

    def __init__(self, home: Path):
        root = Path(home) / STAGING_FOLDER
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HarnessError(f"cannot make the staging folder {root}: {exc}",
                               fix="check that $HARNESS_HOME is writable") from None
        if root.is_symlink() or not root.is_dir():
            raise HarnessError(f"{root} is not a folder of ours (a link or a file)",
                               fix=f"remove {root}; harness makes it again")
        removed = sweep_stale(root)
        if removed:
            log.info("removed %d staging folder(s) that killed processes left in %s",
                     removed, root)
        self.path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
        # locked under another name, then named: a sweep never finds the lock file unlocked
        self._lock: Optional[IO[str]] = _locked(self.path / (LOCK_NAME + ".new"), create=True)
        os.rename(self.path / (LOCK_NAME + ".new"), self.path / LOCK_NAME)

    def cleanup(self) -> None:
        if self._lock is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()  # closing drops the lock
        self._lock = None


def sweep_stale(root: Path) -> int:
    """Remove the staging folders under `root` whose process is gone: their lock can be
    taken, or they have none and are older than UNLOCKED_GRACE_S. Returns how many."""
    removed = 0
    for folder in root.iterdir():
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            lock = _locked(folder / LOCK_NAME, create=False)
        except FileNotFoundError:
            try:
                if time.time() - folder.stat().st_mtime < UNLOCKED_GRACE_S:
                    continue
            except OSError:
                continue
            lock = None
        except (BlockingIOError, OSError):
            continue  # its process holds it (or it is not a lock file of ours)
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        finally:
            if lock is not None:
                lock.close()
    return removed


def _locked(path: Path, create: bool) -> IO[str]:
    """`path` opened (never through a link) and locked without waiting: BlockingIOError when
    its holder lives, FileNotFoundError when it is missing and not `create`."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
    handle = os.fdopen(os.open(path, flags, 0o600), "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        handle.close()
        raise
    return handle
