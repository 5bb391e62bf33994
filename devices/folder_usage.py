"""What a device's model folder held when its agent last said so, remembered on the host.

Every measurement's answer carries the size of the device's model folder (the agent keeps it
within the device's limit, least recently used models out), and so does `harness cache
prune`. The host keeps the newest of those per device, so that `harness devices list` and
`harness cache stats` show a remote device's folder without connecting to it. The file is
a cache of what the device said: a missing or unreadable one is "not known yet", never an
error, and it is written by replacing it whole.
"""
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from devices.safe_files import read_regular, replace_text

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 4096


@dataclass(frozen=True)
class FolderUsage:
    """A device's model folder as its agent last reported it."""

    bytes: int
    models: int
    at: float  # when the host heard it (seconds since the epoch)


def usage_path(home: Path, name: str) -> Path:
    """Where the host remembers device `name`'s folder (names are checked when registered:
    letters, digits, '_', '.', '-')."""
    return Path(home) / "model-folders" / f"{name}.json"


def _count(value: Any) -> Optional[int]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value < 0 or value != int(value):
        return None
    return int(value)


def remember(path: Path, answer: Mapping[str, Any]) -> Optional[FolderUsage]:
    """Keep the folder size an agent's answer carries ({"bytes", "models"}); an answer without
    one, or with garbage in it, changes nothing. A file that cannot be written is logged:
    the measurement it came with matters more."""
    size, models = _count(answer.get("bytes")), _count(answer.get("models"))
    if size is None or models is None:
        return None
    usage = FolderUsage(bytes=size, models=models, at=time.time())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, json.dumps({"bytes": size, "models": models, "at": usage.at}))
    except OSError as exc:
        log.warning("could not remember the model folder's size in %s: %s", path, exc)
    return usage


def remembered(path: Path) -> Optional[FolderUsage]:
    """The newest folder size heard from the device, or None (never heard, or unreadable)."""
    try:
        data = json.loads(read_regular(path, MAX_FILE_BYTES))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    size, models, at = _count(data.get("bytes")), _count(data.get("models")), data.get("at")
    if size is None or models is None or not isinstance(at, (int, float)) or \
            isinstance(at, bool) or not math.isfinite(at):
        return None
    return FolderUsage(bytes=size, models=models, at=float(at))
