"""Where harness keeps its files: `$HARNESS_HOME` (default `~/.harness`)."""
import os
from pathlib import Path
from typing import Optional, Union

from harness.errors import HomeError


def harness_home(home: Optional[Union[str, Path]] = None) -> Path:
    """The home folder: `home` if given, else $HARNESS_HOME, else ~/.harness. HomeError when
    that path is a file or lies under one (nothing could ever be stored there)."""
    chosen = home if home is not None else os.environ.get("HARNESS_HOME", "~/.harness")
    path = Path(chosen).expanduser()
    check_home(path, "$HARNESS_HOME" if home is None and "HARNESS_HOME" in os.environ
               else "harness's home folder")
    return path


def check_home(path: Path, what: str = "harness's home folder") -> None:
    """HomeError if `path`, or the nearest part of it that exists, is not a folder. A missing
    folder is fine (it is created when something is stored)."""
    probe = path
    while True:
        try:
            is_folder = probe.is_dir()
            exists = is_folder or probe.exists()
        except OSError:  # not allowed to look: whoever writes there reports it
            return
        if exists:
            break
        if probe.parent == probe:
            return
        probe = probe.parent
    if is_folder:
        return
    where = "is a file" if probe == path else f"lies under {probe}, which is a file"
    raise HomeError(f"{what} {path} {where}, so harness cannot keep its files (devices, "
                    f"cache, leases) there",
                    fix=f"point HARNESS_HOME at a folder (it is created if missing), or move "
                        f"{probe} aside")


def default_cache_path(home: Optional[Union[str, Path]] = None) -> Path:
    return harness_home(home) / "cache.sqlite"
