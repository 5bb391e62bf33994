"""`Measurement`: one latency result as data, with every raw per-run time kept.

Statistics are computed on demand from the raw samples (milliseconds), never stored in place
of them. A result always says where it came from (`source`: measured, cached or predicted)
and how it was taken (device, fingerprint, runtime settings, agent version, provenance).
"""
import dataclasses
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

SOURCES = ("measured", "cached", "predicted")

# A result is flagged unstable when either spread measure reaches 10 % (pyperf and
# torch.utils.benchmark use the same order of threshold).
UNSTABLE_CV = 0.10
UNSTABLE_IQR_RATIO = 0.10
FEW_SAMPLES = 10

STATISTICS = ("median", "mean", "p90", "p99", "min", "max")


@dataclass(frozen=True)
class Measurement:
    """Latency of one model on one device, in milliseconds."""

    samples_ms: Tuple[float, ...]
    source: str
    device: str
    graph_hash: str
    load_ms: Optional[float] = None
    first_run_ms: Optional[float] = None
    input_signature: Tuple[Any, ...] = ()
    settings: Dict[str, Any] = field(default_factory=dict)
    device_fingerprint: Dict[str, Any] = field(default_factory=dict)
    agent_version: Optional[str] = None
    provenance: Dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        samples = tuple(float(s) for s in self.samples_ms)
        if not samples or not all(math.isfinite(s) and s >= 0 for s in samples):
            raise ValueError("a Measurement needs at least one finite, non-negative sample")
        object.__setattr__(self, "samples_ms", samples)
        object.__setattr__(self, "input_signature", tuple(self.input_signature))

    # ------------------------------------------------------------ statistics

    @cached_property
    def _array(self) -> np.ndarray:
        return np.asarray(self.samples_ms, dtype=np.float64)

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    @cached_property
    def median(self) -> float:
        return float(np.median(self._array))

    @cached_property
    def mean(self) -> float:
        return float(self._array.mean())

    @cached_property
    def stdev(self) -> float:
        return float(self._array.std(ddof=1)) if self.n > 1 else 0.0

    @cached_property
    def p90(self) -> float:
        return float(np.percentile(self._array, 90))

    @cached_property
    def p99(self) -> float:
        return float(np.percentile(self._array, 99))

    @cached_property
    def iqr(self) -> float:
        q75, q25 = np.percentile(self._array, [75, 25])
        return float(q75 - q25)

    @property
    def min(self) -> float:
        return float(self._array.min())

    @property
    def max(self) -> float:
        return float(self._array.max())

    @cached_property
    def cv(self) -> float:
        """Coefficient of variation: standard deviation over mean."""
        return self.stdev / self.mean if self.mean > 0 else 0.0

    def statistic(self, name: str) -> float:
        """One of STATISTICS by name (what `LatencyProfiler(statistic=...)` reports)."""
        if name not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {name!r}")
        return getattr(self, name)

    # ------------------------------------------------------------ quality

    @cached_property
    def flags(self) -> Tuple[str, ...]:
        """Why this result should be read with care; empty when it is sound."""
        flags: List[str] = []
        if self.cv >= UNSTABLE_CV:
            flags.append("unstable: cv >= 10%")
        if self.median > 0 and self.iqr / self.median >= UNSTABLE_IQR_RATIO:
            flags.append("unstable: iqr/median >= 0.1")
        if self.n < FEW_SAMPLES and self.source != "predicted":
            flags.append(f"few samples: {self.n}")
        if self.source == "predicted" and not self.provenance.get("calibration"):
            flags.append("uncalibrated prediction")
        if self.provenance.get("capped"):
            flags.append("capped: max_time_ms reached before min_runs/min_time_ms")
        flags.extend(self.provenance.get("extra_flags", ()))
        return tuple(flags)

    @property
    def stable(self) -> bool:
        return not any(flag.startswith("unstable") for flag in self.flags)

    # ------------------------------------------------------------ data in and out

    def with_source(self, source: str) -> "Measurement":
        return dataclasses.replace(self, source=source)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-ready data, raw samples included, with the statistics alongside."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["samples_ms"] = list(self.samples_ms)
        data["input_signature"] = list(self.input_signature)
        data["stats"] = {"n": self.n, "median": self.median, "mean": self.mean,
                         "p90": self.p90, "p99": self.p99, "iqr": self.iqr, "cv": self.cv,
                         "min": self.min, "max": self.max}
        data["flags"] = list(self.flags)
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Measurement":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def __repr__(self) -> str:
        flags = f" [{'; '.join(self.flags)}]" if self.flags else ""
        return (f"Measurement({self.source} on {self.device}: median {self.median:.4g} ms, "
                f"p90 {self.p90:.4g}, p99 {self.p99:.4g}, IQR {self.iqr:.3g}, "
                f"CV {self.cv:.1%}, n={self.n}, graph {self.graph_hash[:12]}){flags}")
