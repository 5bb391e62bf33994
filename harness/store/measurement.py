"""`Measurement`: one latency result as data, with every raw per-run time kept.

Statistics are computed on demand from the raw samples (milliseconds), never stored in place
of them. A result always says where it came from (`source`: measured, cached or predicted)
and how it was taken (device, fingerprint, runtime settings, agent version, provenance).
"""
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from agents.ort_agent import median_interval
from devices.agent_result import (AgentResult, MemoryUse, OpProfile, RoundsRecord,
                                  hottest_zone_c, pinned_text)
from harness.store.rounds import ReferenceLevel, RoundsSummary, summarise

SOURCES = ("measured", "cached", "predicted")

# A result timed one model at a time is flagged unstable by robust spread: the middle half of
# its runs spanning 10% of the median (torch.utils.benchmark warns at the same IQR/median), or
# the 95% interval of its median reaching 5% from it. Not by the CV, which a few runs
# preempted by other work blow up while the median holds.
UNSTABLE_IQR_RATIO = 0.10
UNSTABLE_INTERVAL = 0.05
FEW_SAMPLES = 10

# "quiet" and "ratio" need a measurement made in interleaved rounds (harness.store.rounds):
# the quiet-state latency, and the ratio to the reference model timed beside it
STATISTICS = ("median", "mean", "p90", "p99", "min", "max", "quiet", "ratio")


def competition(state: Mapping[str, float]) -> List[str]:
    """Why a window was noisy, as far as the device's kernel tells: CPU pressure, steal."""
    said = []
    if state.get("pressure_share", 0.0) >= 0.05:
        said.append(f"noisy: tasks waited for a CPU {state['pressure_share']:.0%} of the window "
                    "(CPU pressure)")
    if state.get("steal_ticks", 0) > 0:
        said.append(f"noisy: the hypervisor took {state['steal_ticks']:.0f} ticks (steal)")
    return said


def fixed_loop_estimate_s(median_ms: float, device_s: float, loop_ms: float) -> float:
    """About what a run would have cost with the fixed loop (at least 50 runs and 1 s, at
    most 20 s): its device time with its timed loop (`loop_ms`) swapped for that one."""
    fixed_loop_ms = min(max(50 * median_ms, 1000.0), 20000.0)
    return max(device_s - loop_ms / 1e3, 0.0) + fixed_loop_ms / 1e3


def _positive_ms(value: Any) -> bool:
    """A positive, finite time in ms (a stored field read back)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        0 < value <= 1e8  # NaN and a huge integer compare False (isfinite would overflow)


@dataclass(frozen=True)
class Provenance:
    """How a result was taken, beyond the device and settings every Measurement names.

    Measured results fill the timing and control fields (from the agent's answer, the lease
    and the export); predicted ones name their predictor and calibration instead. Every field
    is optional, so that results stored by earlier versions still load."""

    # the timing loop, as the agent ran it
    capped: bool = False
    loop_ms: Optional[float] = None
    warmup_runs: Optional[int] = None
    warmup_ms: Optional[float] = None
    runtime: Dict[str, Any] = field(default_factory=dict)
    controlled: Dict[str, Any] = field(default_factory=dict)
    inputs: List[Any] = field(default_factory=list)
    # the device around the run
    thermal_before: List[Any] = field(default_factory=list)
    thermal_after: List[Any] = field(default_factory=list)
    device_state: Dict[str, Any] = field(default_factory=dict)
    device_control: Optional[Dict[str, Any]] = None
    extra_flags: List[str] = field(default_factory=list)
    stop: Optional[Dict[str, Any]] = None  # the stop rule, why it stopped, looks, drift
    # the host's side: lease window (wall-clock seconds), export, model, process
    wall_ms: Optional[float] = None
    lease: Optional[List[float]] = None
    export_ms: Optional[float] = None
    convert_ms: Optional[float] = None  # converting it for its runtime (None: kept, or none)
    # ExecuTorch: the ops XNNPACK left to the portable kernels when the host lowered it
    outside_backend: Optional[List[str]] = None
    model_sha256: Optional[str] = None
    model_bytes: Optional[int] = None
    isolation: Optional[str] = None
    host_pid: Optional[int] = None
    farm_host: Optional[str] = None
    # predictions
    predictor: Optional[Dict[str, Any]] = None
    calibration: Optional[Dict[str, Any]] = None
    uncalibrated_ms: Optional[float] = None
    # interleaved rounds: the reference's quiet level from the device's history, its 95%
    # interval and the blocks it stands on (harness.store.rounds.ReferenceLevel; a level
    # stored before levels had intervals, 2026-12-07, has none and is read as exact)
    reference_level_ms: Optional[float] = None
    reference_level_interval_ms: Optional[List[float]] = None
    reference_level_blocks: Optional[int] = None

    def reference_level(self) -> Optional[ReferenceLevel]:
        """The stored level as a typed value, checked (ValueError names the bad field)."""
        level, interval = self.reference_level_ms, self.reference_level_interval_ms
        if level is None:
            if interval is not None or self.reference_level_blocks is not None:
                raise ValueError("provenance.reference_level_interval_ms and _blocks need "
                                 "provenance.reference_level_ms beside them")
            return None
        if not _positive_ms(level):
            raise ValueError(f"provenance.reference_level_ms must be a positive time in ms, "
                             f"got {level!r}")
        if interval is None:
            return ReferenceLevel.exact(level)
        blocks = self.reference_level_blocks
        if not (isinstance(interval, (list, tuple)) and len(interval) == 2
                and all(_positive_ms(v) or (type(v) in (int, float) and v == 0)
                        for v in interval)
                and interval[0] <= level <= interval[1]):
            raise ValueError(f"provenance.reference_level_interval_ms must be [low, high] in "
                             f"ms around the level {level!r}, got {str(interval)[:80]}")
        if not (isinstance(blocks, int) and not isinstance(blocks, bool)
                and 0 < blocks <= 10 ** 9):
            raise ValueError(f"provenance.reference_level_blocks must be a positive count, "
                             f"got {str(blocks)[:40]}")
        return ReferenceLevel.stored(level, (float(interval[0]), float(interval[1])), blocks)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Provenance":
        """From stored data; keys this version does not know are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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
    provenance: Provenance = field(default_factory=Provenance)
    created_at: float = field(default_factory=time.time)
    memory: Optional[MemoryUse] = None  # the agent's resident memory around the runs
    ops: Optional[OpProfile] = None     # per-operator profile (measured with per_op)
    rounds: Optional[RoundsRecord] = None  # its window of interleaved rounds, if timed so

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        samples = tuple(float(s) for s in self.samples_ms)
        if not samples or not all(math.isfinite(s) and s >= 0 for s in samples):
            raise ValueError("a Measurement needs at least one finite, non-negative sample")
        object.__setattr__(self, "samples_ms", samples)
        object.__setattr__(self, "input_signature", tuple(self.input_signature))
        if isinstance(self.provenance, Mapping):
            object.__setattr__(self, "provenance", Provenance.from_dict(self.provenance))
        if isinstance(self.memory, Mapping):  # stored data: checked as an agent's answer is
            object.__setattr__(self, "memory", MemoryUse.from_dict(self.memory))
        if isinstance(self.ops, Mapping):
            object.__setattr__(self, "ops", OpProfile.from_dict(self.ops))
        if isinstance(self.rounds, Mapping):
            object.__setattr__(self, "rounds", RoundsRecord.from_dict(dict(self.rounds)))
        self.provenance.reference_level()  # a stored level is checked as it loads

    @classmethod
    def from_result(cls, result: AgentResult, graph_hash: str,
                    input_signature: Sequence[Any], *, export_ms: Optional[float],
                    convert_ms: Optional[float] = None,
                    outside_backend: Optional[Sequence[str]] = None,
                    model_sha256: str, model_bytes: int, isolation: str,
                    reference_level: Optional[ReferenceLevel] = None) -> "Measurement":
        """A measured result from the device's checked answer (with the lease window its
        pool added) and what the host knows: the export and the model it sent."""
        lease = result.lease
        control = result.control
        # Each fact is kept once: the thermal zones of the host's device control (a phone's,
        # read over adb around the run) or else the agent's, not the session's stale ones
        # in the device state; the control's flags only among the flags.
        thermal_before, thermal_after = result.thermal_before, result.thermal_after
        # a level read from blocks keeps its interval; an exact one (none) is stored bare
        estimated = reference_level if reference_level is not None and reference_level.blocks \
            else None
        if control is not None and control.thermal_before:
            thermal_before, thermal_after = control.thermal_before, control.thermal_after
        provenance = Provenance(
            capped=result.capped, loop_ms=result.loop_ms, warmup_runs=result.warmup_runs,
            warmup_ms=result.warmup_ms, runtime=dict(result.runtime),
            controlled=dict(result.controlled), inputs=list(result.inputs),
            thermal_before=list(thermal_before), thermal_after=list(thermal_after),
            device_state={k: v for k, v in result.facts.state.items() if k != "thermal"},
            device_control=None if control is None else {
                "waited_s": control.waited_s, "max_temp_c": control.max_temp_c,
                "pinned_mask": list(control.pinned_mask)},
            extra_flags=list(control.flags) if control is not None else [],
            wall_ms=(lease[1] - lease[0]) * 1e3 if lease else None,
            lease=list(lease) if lease else None, export_ms=export_ms, convert_ms=convert_ms,
            outside_backend=None if outside_backend is None else list(outside_backend),
            model_sha256=model_sha256, model_bytes=model_bytes, isolation=isolation,
            host_pid=os.getpid(), farm_host=result.host, stop=dict(result.stop) or None,
            reference_level_ms=None if reference_level is None else reference_level.level_ms,
            reference_level_interval_ms=list(estimated.interval_ms) if estimated else None,
            reference_level_blocks=estimated.blocks if estimated else None)
        return cls(samples_ms=result.samples_ms, source="measured", device=result.device,
                   graph_hash=graph_hash, load_ms=result.load_ms,
                   first_run_ms=result.first_run_ms, input_signature=tuple(input_signature),
                   settings=dict(result.settings),
                   device_fingerprint=dict(result.facts.identity),
                   agent_version=result.agent_version, provenance=provenance,
                   memory=result.memory, ops=result.ops, rounds=result.rounds)

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

    def median_interval(self, confidence: float = 0.95) -> Tuple[float, float]:
        """The distribution-free interval of the median (order statistics of the runs) at
        `confidence`; the whole range of the runs when there are too few for it."""
        interval = median_interval(sorted(self.samples_ms), confidence)
        return interval if interval is not None else (self.min, self.max)

    @cached_property
    def relative_half_width(self) -> float:
        """How far the 95% interval of the median reaches from it, as a share of it (the
        precision `stop="ci"` asks of `rel_ci`); inf for a prediction or a single run."""
        if self.source == "predicted" or self.n < 2 or self.median <= 0:
            return math.inf
        low, high = self.median_interval(0.95)
        return max(self.median - low, high - self.median) / self.median

    def prediction_interval(self) -> Optional[Tuple[float, float]]:
        """A prediction's interval (ms), where its predictor gives one: the latency model's
        jackknife+ interval, or a calibrated nn-Meter prediction +-2 held-out RMSPE
        (about 95%). None for a measurement and for an uncalibrated prediction."""
        if self.source != "predicted":
            return None
        interval = (self.provenance.predictor or {}).get("interval_ms")
        if interval:
            return float(interval[0]), float(interval[1])
        rmspe = (self.provenance.calibration or {}).get("rmspe")
        if isinstance(rmspe, (int, float)) and math.isfinite(rmspe):
            share = 2 * rmspe / 100
            return max(self.median * (1 - share), 0.0), self.median * (1 + share)
        return None

    def hottest_c(self) -> Optional[float]:
        """The hottest thermal zone before the run (degrees C), where the device reports any."""
        return hottest_zone_c(self.provenance.thermal_before)

    def pinned_to(self) -> Optional[str]:
        """The CPUs the run was pinned to (the agent's affinity, or a phone's big-core mask),
        or None where nothing was pinned."""
        mask = (self.provenance.device_control or {}).get("pinned_mask")
        if mask:
            return pinned_text(mask)
        cpus = self.settings.get("cpu_affinity")
        if cpus:
            return "cpus " + ",".join(map(str, cpus))
        return None

    @property
    def fixed_loop_device_s(self) -> float:
        """About what this measurement would have cost with the fixed loop (at least 50 runs
        and 1 s, at most 20 s): its device time with the timed loop swapped for that one."""
        return fixed_loop_estimate_s(self.median, self.device_s,
                                     (self.provenance.loop_ms or 0.0) * self._window_share())

    @property
    def device_s(self) -> float:
        """Device time this measurement took: the time its device was leased (in a window of
        interleaved rounds, its share of the window; 0 for a prediction)."""
        lease = self.provenance.lease
        return float(lease[1] - lease[0]) * self._window_share() if lease else 0.0

    def _window_share(self) -> float:
        """Its share of its window of rounds (RoundsRecord.share_of: by its timed runs), or
        1 when it was timed alone."""
        return self.rounds.share_of(self.samples_ms) if self.rounds is not None else 1.0

    @cached_property
    def interleaved(self) -> Optional[RoundsSummary]:
        """Its figures from interleaved rounds (ratio to the reference, quiet-state latency;
        harness.store.rounds), or None when it was timed one model at a time."""
        if self.rounds is None:
            return None
        return summarise(self.rounds, level=self.provenance.reference_level(),
                         confidence=float(self.settings.get("confidence", 0.95)))

    @property
    def protocol(self) -> str:
        """How it was timed: "rounds" (interleaved, beside a reference) or "loop" (one
        model after another: a number that may move with the device's load)."""
        return "rounds" if self.rounds is not None else "loop"

    def statistic(self, name: str) -> float:
        """One of STATISTICS by name (what `LatencyProfiler(statistic=...)` reports)."""
        if name not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {name!r}")
        if name == "quiet" and (self.source == "predicted" or self.rounds is None):
            # a prediction stands for the latency of an undisturbed device; a result timed
            # one model at a time (`protocol` "loop": made the old way, answering a profiler
            # of rounds from the cache) has no reference to read a quiet state by, and says
            # so in its protocol
            return self.median
        if name in ("quiet", "ratio"):
            summary = self.interleaved
            if summary is None:
                raise ValueError(f"the {name} statistic needs a measurement in interleaved "
                                 f"rounds; this one "
                                 + ("had no block with a reference block on both sides"
                                    if self.rounds is not None else
                                    "was timed one model at a time"))
            return summary.quiet_ms if name == "quiet" else summary.ratio
        return getattr(self, name)

    # ------------------------------------------------------------ quality

    @cached_property
    def flags(self) -> Tuple[str, ...]:
        """Why this result should be read with care; empty when it is sound."""
        flags: List[str] = []
        if self.interleaved is not None:  # the ratio's interval says it, not the raw spread
            flags.extend(self.interleaved.noisy_reasons)
            if flags:  # and what the device said competed for its CPU, where it says
                flags.extend(competition(self.rounds.state if self.rounds else {}))
        elif self.rounds is not None:
            flags.append("noisy: no block had a reference block on both sides")
        else:  # robust spread only: a few preempted runs inflate the CV, not these
            reasons = []
            if self.median > 0 and self.iqr / self.median >= UNSTABLE_IQR_RATIO:
                reasons.append(f"the middle half of its runs spans {self.iqr / self.median:.0%} "
                               "of the median")
            reach = self.relative_half_width
            if self.source != "predicted" and math.isfinite(reach) and reach >= UNSTABLE_INTERVAL:
                reasons.append(f"its median is known to +-{reach:.1%} only")
            if reasons:
                flags.append("unstable: " + "; ".join(reasons))
        if self.n < FEW_SAMPLES and self.source != "predicted":
            flags.append(f"few samples: {self.n}")
        if self.source == "predicted" and not self.provenance.calibration:
            flags.append("uncalibrated prediction")
        if self.provenance.capped:
            flags.append("capped: max_time_ms reached before the stop rule held")
        if (self.provenance.stop or {}).get("drift"):
            flags.append("drifting: the first and second half of the runs disagree")
        flags.extend(self.provenance.extra_flags)
        return tuple(flags)

    @property
    def stable(self) -> bool:
        return not any(flag.startswith("unstable") for flag in self.flags)

    # ------------------------------------------------------------ data in and out

    def with_source(self, source: str) -> "Measurement":
        return dataclasses.replace(self, source=source)

    def with_flag(self, flag: Optional[str]) -> "Measurement":
        """The same measurement with one more flag in its provenance (None: unchanged)."""
        if flag is None:
            return self
        return dataclasses.replace(self, provenance=dataclasses.replace(
            self.provenance, extra_flags=[*self.provenance.extra_flags, flag]))

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-ready data, raw samples included, with the statistics alongside."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["provenance"] = self.provenance.to_dict()
        data["memory"] = None if self.memory is None else dataclasses.asdict(self.memory)
        data["ops"] = None if self.ops is None else dataclasses.asdict(self.ops)
        data["rounds"] = None if self.rounds is None else self.rounds.to_dict()
        data["samples_ms"] = list(self.samples_ms)
        data["input_signature"] = list(self.input_signature)
        data["stats"] = {"n": self.n, "median": self.median, "mean": self.mean,
                         "p90": self.p90, "p99": self.p99, "iqr": self.iqr, "cv": self.cv,
                         "min": self.min, "max": self.max}
        data["flags"] = list(self.flags)
        if self.interleaved is not None:
            data["stats"].update(quiet=self.interleaved.quiet_ms, ratio=self.interleaved.ratio)
            data["interleaved"] = self.interleaved.to_dict()
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
