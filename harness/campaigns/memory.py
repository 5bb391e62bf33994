"""`MemoryProfiler`: peak resident memory (MB) of samples on a device, for a search to
filter on as it filters on latency.

The figures come from the agent (agents/ort_agent.py): the high-water mark of its process's
resident memory (VmHWM in /proc/self/status) while the model loads and over its runs, reset
between the phases where the kernel allows it, beside the resident memory before the load.
A persistent agent worker keeps what earlier models left in its heap, so the figures a
search filters on are taken in a fresh agent process per measurement (isolation "process");
a cached result measured by a worker is measured again.
"""
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from harness.store.cache import Cache
from harness.errors import HarnessError, InvalidArgument
from harness.export.graph import DummyInput
from harness.store.measurement import Measurement
from harness.profiler import LatencyProfiler
from harness.metrics.profiler_base import Profiler
from harness.spaces.space import ModelSpace

log = logging.getLogger(__name__)

METRICS = ("peak", "added", "load_peak", "run_peak")


class MemoryProfiler(Profiler):
    """Memory in MB of samples of `space` on a device, measured with the latency (one
    measurement gives both, through the same cache).

    metric: "peak" (default: the agent process's highest resident memory while loading and
        running the model: what the device must have free), "added" (that peak above the
        process's memory before the load: what the model itself costs), "load_peak" or
        "run_peak" (one phase's peak).
    Other keyword arguments go to the LatencyProfiler it measures with (settings, cache,
    precision, timeout_s, ...).
    """

    def __init__(self, space: ModelSpace, dummy_input: DummyInput, device: str = "local",
                 metric: str = "peak", *, cache: Union[Cache, str, Path, None] = None,
                 settings: Optional[Mapping[str, Any]] = None, **options: Any):
        if metric not in METRICS:
            raise InvalidArgument(f"metric {metric!r} is not one of {', '.join(METRICS)}",
                             fix="pass metric='peak'")
        if options.pop("isolation", "process") != "process":
            raise InvalidArgument("memory is measured in a fresh agent process (a worker keeps "
                             "what earlier models left in its heap)",
                             fix="leave isolation at 'process'")
        self.metric = metric
        self.latency = LatencyProfiler(space, dummy_input, device, cache=cache,
                                       settings=settings, isolation="process", **options)

    def profile(self, sample: Mapping[str, Any]) -> float:
        """The metric (MB) of one sample."""
        return self.of(self.measure(sample))

    def measure(self, sample: Mapping[str, Any]) -> Measurement:
        """The sample's Measurement, with memory figures taken in a fresh agent process
        (measured again when the cached one has none, or came from a worker)."""
        measured = self.latency.measure(sample)
        if not _usable(measured):
            refresh, self.latency.refresh = self.latency.refresh, True
            try:
                measured = self.latency.measure(sample)
            finally:
                self.latency.refresh = refresh
        return measured

    def of(self, measured: Measurement) -> float:
        """The metric (MB) of a measurement; HarnessError when the device reports none."""
        memory = measured.memory
        if memory is None or memory.baseline_rss_mb is None:
            raise HarnessError(f"{measured.device} reports no memory figures (its agent cannot "
                               f"read /proc/self/status)",
                               fix="measure memory on a Linux or Android device")
        value = {"peak": memory.peak_mb, "added": memory.added_mb,
                 "load_peak": memory.load_peak_mb, "run_peak": memory.run_peak_mb}[self.metric]
        if value is None:
            raise HarnessError(f"{measured.device} reported no {self.metric} memory figure",
                               fix="measure again with refresh=True")
        return float(value)

    def close(self) -> None:
        self.latency.close()

    def __enter__(self) -> "MemoryProfiler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _usable(measured: Measurement) -> bool:
    """Memory figures a search may filter on: present, and from a fresh agent process."""
    return measured.source == "predicted" or (
        measured.memory is not None and measured.memory.baseline_rss_mb is not None
        and measured.provenance.isolation == "process")

