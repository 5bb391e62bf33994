"""Per-choice latency lookup tables, measured on the device, for one-shot NAS.

`LatencyLUT.build(space, dummy_input, profiler)` measures every candidate block of an additive
space (harness.spaces.additive) on the profiler's device as a model of its own, at the input
shape it has inside the subnet, plus the fixed parts (stem, head) once; under the rounds
protocol blocks, fixed costs and the whole subnets the table is fitted and checked on run in
the same windows of interleaved rounds beside the reference. A sample's latency is then the
sum of its blocks' values (microseconds to answer), and the expected latency under
architecture probabilities is a differentiable torch expression (`expected`), for
`ExpectationProfilerPenalty`.

Every measured run also pays a fixed cost that does not depend on the block (the runtime's
call overhead, copying the input in and the output out). Summed over a subnet's blocks it
would be counted once per block instead of once per run, so the table measures an identity
model at each block's input shape and subtracts it from that block (never below zero), and
adds the identity model at the subnet's input once (`fixed_ms`).

An identity model is not quite what a block's run pays on top of its work (the runtime's
per-node dispatch and what it keeps in cache between blocks differ), so the correction can
be scaled: given a few whole subnets measured on the device (`fit_samples`), build() fits
the one factor applied to every identity cost (least squares on relative errors; 1 is the
plain identity correction, 0 none) and keeps it in the table.

Summing blocks still ignores what happens between them (memory traffic, fusion across block
borders), so `additivity_error` measures whole subnets on the same device and reports how
far the table is off: uncorrected, with the identity correction and with the fitted one.
"""
import json
import logging
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from devices.safe_files import replace_text
from harness.spaces.additive import AdditiveCost, AdditiveTerm, Shape, distinct_blocks
from harness.errors import HarnessError
from harness.export.graph import DummyInput, as_input_tuple
from harness.metrics.nni_tables import NniTables, NotDecomposable, is_nni_space
from harness.profiler import LatencyProfiler
from harness.metrics.profiler_base import Profiler
from harness.spaces.space import ModelSpace, SampleValidator, checked_search_space

log = logging.getLogger(__name__)


class LatencyLUT(Profiler):
    """Latency (ms, the profiler's statistic) as a sum of measured per-block latencies."""

    def __init__(self, space: ModelSpace, dummy_input: DummyInput,
                 block_ms: Mapping[str, float], device: str = "unknown",
                 overhead_ms: Optional[Mapping[Shape, float]] = None,
                 overhead_scale: float = 1.0, terms: Optional[List[AdditiveTerm]] = None):
        """`block_ms`: each block's measured latency, fixed cost included; `overhead_ms`:
        the identity model's latency per input shape (None or empty: no correction);
        `overhead_scale`: the factor applied to it (see build's fit_samples); `terms`: the
        space's additive terms at this input when already derived (an NNI space's take
        seconds)."""
        choices = checked_search_space(space)
        self.space = space
        self.device = device
        self.block_ms = dict(block_ms)
        self.overhead_ms: Dict[Shape, float] = {tuple(k): float(v)
                                                for k, v in (overhead_ms or {}).items()}
        self._validate = SampleValidator(choices)
        self._terms = terms if terms is not None else _terms(space, dummy_input)
        blocks = list(distinct_blocks(self._terms))
        missing = [b.key for b in blocks if b.key not in self.block_ms]
        if missing:
            raise HarnessError(f"the lookup table has no latency for {len(missing)} blocks, "
                               f"e.g. {missing[0]}", fix="build the table again for this space "
                                                         "and input shape")
        self._input_shape = tuple(as_input_tuple(dummy_input)[0].shape)
        shapes = {b.input_shape for b in blocks} | {self._input_shape}
        if self.overhead_ms and not shapes <= set(self.overhead_ms):
            raise HarnessError(f"the lookup table has no fixed cost for input shapes "
                               f"{sorted(shapes - set(self.overhead_ms))}",
                               fix="build the table again for this space and input shape")
        self._blocks = blocks
        self._choices = choices
        self._raw = AdditiveCost(self._terms, self.block_ms, self._validate.labels, choices)
        self._use_scale(overhead_scale)

    def _use_scale(self, overhead_scale: float) -> None:
        """Correct the table with the identity costs times this factor."""
        scale = float(overhead_scale)
        if not 0.0 <= scale <= 100.0:  # also refuses NaN
            raise HarnessError(f"the lookup table's overhead scale {overhead_scale!r} is not a "
                               f"factor between 0 and 100",
                               fix="build the table again (LatencyLUT.build)")
        self.overhead_scale = scale
        self.fixed_ms, self.net_ms = self._corrected(scale)
        clamped = [key for key, ms in self.net_ms.items() if ms == 0.0 and self.block_ms[key] > 0]
        if clamped:
            log.info("lookup table: %d blocks measured faster than their fixed cost (noise); "
                     "taken as 0 ms", len(clamped))
        self.additive = AdditiveCost(self._terms, self.net_ms, self._validate.labels,
                                     self._choices)

    def _corrected(self, scale: float) -> Tuple[float, Dict[str, float]]:
        """(fixed cost of a run, each block's latency less its own) at this scale of the
        identity costs; a block is never less than 0 ms."""
        fixed = scale * self._identity_fixed_ms()
        return fixed, {b.key: max(self.block_ms[b.key]
                                  - scale * self.overhead_ms.get(b.input_shape, 0.0), 0.0)
                       for b in self._blocks}

    @classmethod
    def build(cls, space: ModelSpace, dummy_input: DummyInput, profiler: LatencyProfiler,
              progress: Optional[bool] = None,
              fit_samples: Sequence[Mapping[str, Any]] = (),
              check_samples: Sequence[Mapping[str, Any]] = ()) -> "LatencyLUT":
        """Measure every candidate block on the profiler's device (cached like any model),
        the identity model at each input shape (the fixed cost of a run), and the whole
        subnets of `fit_samples` (to fit the scale of the fixed-cost correction: a few are
        enough, it is one number) and `check_samples` (for additivity_error, which then
        reads them from the cache): all together, so under the rounds protocol they run in
        the same windows of interleaved rounds and see the device at the same speed."""
        terms = _terms(space, dummy_input)
        blocks = list(distinct_blocks(terms))
        shapes = sorted({b.input_shape for b in blocks}
                        | {tuple(as_input_tuple(dummy_input)[0].shape)})
        modules: List[Tuple[torch.nn.Module, torch.Tensor]] = [
            (_Identity(), torch.randn(shape)) for shape in shapes]
        for block in blocks:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                modules.append((block.build(), torch.randn(block.input_shape)))
        if progress:
            log.info("lookup table on %s: %d blocks, %d fixed costs, %d whole subnets",
                     profiler.device, len(blocks), len(shapes),
                     len(fit_samples) + len(check_samples))
        measured = profiler.measure_modules(modules, [*fit_samples, *check_samples])
        values = [m.statistic(profiler.statistic) for m in measured]
        overhead_ms = dict(zip(shapes, values[:len(shapes)]))
        block_ms = {block.key: value for block, value in
                    zip(blocks, values[len(shapes):len(shapes) + len(blocks)])}
        log.info("lookup table: %d blocks and %d fixed costs measured on %s", len(blocks),
                 len(overhead_ms), profiler.device)
        table = cls(space, dummy_input, block_ms, device=profiler.device, overhead_ms=overhead_ms,
                    terms=terms)
        if fit_samples:
            table._use_scale(table.fit_overhead_scale(fit_samples, profiler))
        return table

    def fit_overhead_scale(self, samples: Sequence[Mapping[str, Any]],
                           profiler: LatencyProfiler, largest: float = 4.0) -> float:
        """The factor s on the identity costs that best predicts these whole subnets
        measured on the device: the table predicts raw - s * o (raw: its blocks summed as
        measured, o: their identity costs less the subnet's own), so s minimizes the squared
        relative errors in closed form; kept within [0, `largest`]."""
        numerator = denominator = 0.0
        identity = self._identity_net()
        for sample in samples:
            measured = profiler.profile(sample)
            values = self._validate.values(sample)
            raw = self._raw.total(values)
            overhead = raw - identity.total(values) - self._identity_fixed_ms()
            numerator += (raw - measured) * overhead / measured ** 2
            denominator += overhead ** 2 / measured ** 2
        if denominator <= 0:
            return 1.0
        scale = min(max(numerator / denominator, 0.0), largest)
        log.info("lookup table: identity costs scaled by %.3f (fitted on %d subnets)", scale,
                 len(samples))
        return scale

    def _identity_fixed_ms(self) -> float:
        """The identity model's cost at the subnet's input: the fixed cost at scale 1."""
        return self.overhead_ms.get(self._input_shape, 0.0)

    def _identity_net(self) -> AdditiveCost:
        """The table at scale 1 (the plain identity correction), without the fixed cost."""
        if self.overhead_scale == 1.0:
            return self.additive
        return AdditiveCost(self._terms, self._corrected(1.0)[1], self._validate.labels,
                            self._choices)

    def profile(self, sample: Mapping[str, Any]) -> float:
        return self.additive.total(self._validate.values(sample)) + self.fixed_ms

    def profile_uncorrected(self, sample: Mapping[str, Any]) -> float:
        """The plain sum of measured blocks, the fixed cost counted once per block."""
        return self._raw.total(self._validate.values(sample))

    def expected(self, probabilities: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Expected latency (ms) under independent per-label probabilities; differentiable."""
        return self.additive.expected(probabilities) + self.fixed_ms

    def additivity_error(self, samples: Sequence[Mapping[str, Any]],
                         profiler: LatencyProfiler) -> Dict[str, Any]:
        """Compare the table with whole-subnet measurements on the same device."""
        rows = []
        identity = self._identity_net()
        identity_fixed = self._identity_fixed_ms()
        for sample in samples:
            predicted, uncorrected = self.profile(sample), self.profile_uncorrected(sample)
            by_identity = identity.total(self._validate.values(sample)) + identity_fixed
            measured = profiler.profile(sample)
            rows.append({"predicted_ms": predicted, "uncorrected_ms": uncorrected,
                         "identity_ms": by_identity, "measured_ms": measured,
                         "error": (predicted - measured) / measured,
                         "uncorrected_error": (uncorrected - measured) / measured,
                         "identity_error": (by_identity - measured) / measured})
        errors = [abs(r["error"]) for r in rows]
        return {"samples": len(rows), "mean_abs_error": statistics.mean(errors),
                "max_abs_error": max(errors),
                "mean_signed_error": statistics.mean(r["error"] for r in rows),
                "mean_abs_error_uncorrected": statistics.mean(
                    abs(r["uncorrected_error"]) for r in rows),
                "mean_abs_error_identity": statistics.mean(
                    abs(r["identity_error"]) for r in rows),
                "overhead_scale": self.overhead_scale, "fixed_ms": self.fixed_ms, "rows": rows}

    def save(self, path: Union[str, Path]) -> None:
        """Write the table whole or not at all (devices.safe_files)."""
        replace_text(path, json.dumps(
            {"device": self.device, "block_ms": self.block_ms,
             "overhead_ms": [[list(shape), ms] for shape, ms in sorted(self.overhead_ms.items())],
             "overhead_scale": self.overhead_scale},
            indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: Union[str, Path], space: ModelSpace, dummy_input: DummyInput) -> "LatencyLUT":
        try:
            data = json.loads(Path(path).read_text())
            overhead = {tuple(int(d) for d in shape): float(ms)
                        for shape, ms in data.get("overhead_ms", [])}
            return cls(space, dummy_input, data["block_ms"], device=data.get("device", "unknown"),
                       overhead_ms=overhead,
                       overhead_scale=float(data.get("overhead_scale", 1.0)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HarnessError(f"cannot read the lookup table {path}: {exc}",
                               fix="build it again with LatencyLUT.build(...).save(path)") from exc


class _Identity(torch.nn.Module):
    """A model that returns its input: what a run costs when the model does nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _terms(space: ModelSpace, dummy_input: DummyInput) -> List[Any]:
    terms_of = getattr(space, "additive_terms", None)
    inputs = as_input_tuple(dummy_input)
    if callable(terms_of) and len(inputs) == 1:
        return terms_of(tuple(inputs[0].shape))
    terms, why = None, "it has no additive_terms()"
    if is_nni_space(space) and len(inputs) == 1:  # tables derived from the NNI space itself
        try:
            tables = NniTables(space, inputs)  # type: ignore[arg-type]
            terms = tables.additive_terms(checked_search_space(space))
            why = tables.why_not_additive
        except NotDecomposable as exc:
            log.warning("%s cannot be decomposed: %s", type(space).__name__, exc)
            why = str(exc)
    if terms is None:
        raise HarnessError(f"{type(space).__name__} is not additive ({why}), so it has no "
                           f"per-block lookup table",
                           fix="use LatencyProfiler for whole subnets, or give the space "
                               "additive_terms(input_shape) (see harness.spaces.additive)")
    return terms
