"""`Profiler`: the interface a hardware-aware search filters on, `profile(sample) -> float`.

Every metric of harness implements it (latency on a device, nn-Meter predictions, FLOPs,
parameters, lookup tables), so a search takes any of them.
"""
from abc import ABC, abstractmethod
from typing import Any, Mapping, TypeVar

P = TypeVar("P", bound="Profiler")


class Profiler(ABC):
    """Computes a metric for samples of one model space: the interface a search filters on."""

    @abstractmethod
    def profile(self, sample: Mapping[str, Any]) -> float:
        """The metric of one sample."""

    def close(self) -> None:
        """Release what the profiler holds (devices, files); nothing by default."""

    def __enter__(self: P) -> P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
