"""`Counters`: what a profiler's steps counted (exports, measurements, cache hits, decisions,
predictions, device-seconds spent and what the fixed loop would have spent), shared by the
steps that run in the export thread and the device threads."""
import threading
from collections import Counter
from typing import Any


class Counters(Counter):
    """A Counter whose `add` is safe from several threads; read it like any Counter."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def add(self, **amounts: Any) -> None:
        """Add each amount to its counter, all at once."""
        with self._lock:
            self.update(amounts)

    def count_first(self, name: str, **amounts: Any) -> bool:
        """Add 1 to `name` and each amount, all at once; whether this was `name`'s first."""
        with self._lock:
            first = not self[name]
            self.update(amounts, **{name: 1})
            return first
