"""Where harness keeps its files: `$HARNESS_HOME` (default `~/.harness`)."""
import os
from pathlib import Path
from typing import Optional, Union


def harness_home(home: Optional[Union[str, Path]] = None) -> Path:
    """The home folder: `home` if given, else $HARNESS_HOME, else ~/.harness."""
    chosen = home if home is not None else os.environ.get("HARNESS_HOME", "~/.harness")
    return Path(chosen).expanduser()


def default_cache_path(home: Optional[Union[str, Path]] = None) -> Path:
    return harness_home(home) / "cache.sqlite"
