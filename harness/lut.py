"""Per-choice latency lookup tables, measured on the device, for one-shot NAS.

`LatencyLUT.build(space, dummy_input, profiler)` measures every candidate block of an additive
space (harness.additive) alone on the profiler's device, at the input shape it has inside the
subnet, plus the fixed parts (stem, head) once. A sample's latency is then the sum of its
blocks' medians (microseconds to answer), and the expected latency under architecture
probabilities is a differentiable torch expression (`expected`), for
`ExpectationProfilerPenalty`.

Summing blocks ignores what happens between them (memory traffic, fusion across block
borders, per-model runtime overhead), so `additivity_error` measures whole subnets on the
same device and reports how far the table is off.
"""
import json
import logging
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from harness.additive import AdditiveCost, distinct_blocks
from harness.errors import HarnessError
from harness.export import DummyInput, as_input_tuple
from harness.profiler import LatencyProfiler
from harness.profiler_base import Profiler
from harness.space import ModelSpace, SampleValidator, checked_search_space

log = logging.getLogger(__name__)


class LatencyLUT(Profiler):
    """Latency (ms, the profiler's statistic) as a sum of measured per-block latencies."""

    def __init__(self, space: ModelSpace, dummy_input: DummyInput,
                 block_ms: Mapping[str, float], device: str = "unknown"):
        choices = checked_search_space(space)
        self.space = space
        self.device = device
        self.block_ms = dict(block_ms)
        self._validate = SampleValidator(choices)
        self._terms = _terms(space, dummy_input)
        missing = [b.key for b in distinct_blocks(self._terms) if b.key not in self.block_ms]
        if missing:
            raise HarnessError(f"the lookup table has no latency for {len(missing)} blocks, "
                               f"e.g. {missing[0]}", fix="build the table again for this space "
                                                         "and input shape")
        self.additive = AdditiveCost(self._terms, self.block_ms, self._validate.labels, choices)

    @classmethod
    def build(cls, space: ModelSpace, dummy_input: DummyInput, profiler: LatencyProfiler,
              progress: Optional[bool] = None) -> "LatencyLUT":
        """Measure every candidate block on the profiler's device (cached like any model)."""
        from tqdm import tqdm

        blocks = list(distinct_blocks(_terms(space, dummy_input)))
        block_ms = {}
        for block in tqdm(blocks, desc=f"lookup table on {profiler.device}", unit="block",
                          disable=(not progress) if progress is not None else None, leave=False):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                module = block.build()
            measured = profiler.measure_module(module, torch.randn(block.input_shape))
            block_ms[block.key] = measured.statistic(profiler.statistic)
        log.info("lookup table: %d blocks measured on %s", len(blocks), profiler.device)
        return cls(space, dummy_input, block_ms, device=profiler.device)

    def profile(self, sample: Mapping[str, Any]) -> float:
        return self.additive.total(self._validate.values(sample))

    def expected(self, probabilities: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Expected latency (ms) under independent per-label probabilities; differentiable."""
        return self.additive.expected(probabilities)

    def additivity_error(self, samples: Sequence[Mapping[str, Any]],
                         profiler: LatencyProfiler) -> Dict[str, Any]:
        """Compare the table with whole-subnet measurements on the same device."""
        rows = []
        for sample in samples:
            predicted = self.profile(sample)
            measured = profiler.profile(sample)
            rows.append({"predicted_ms": predicted, "measured_ms": measured,
                         "error": (predicted - measured) / measured})
        errors = [abs(r["error"]) for r in rows]
        return {"samples": len(rows), "mean_abs_error": statistics.mean(errors),
                "max_abs_error": max(errors),
                "mean_signed_error": statistics.mean(r["error"] for r in rows), "rows": rows}

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps({"device": self.device, "block_ms": self.block_ms},
                                         indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: Union[str, Path], space: ModelSpace, dummy_input: DummyInput) -> "LatencyLUT":
        try:
            data = json.loads(Path(path).read_text())
            return cls(space, dummy_input, data["block_ms"], device=data.get("device", "unknown"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HarnessError(f"cannot read the lookup table {path}: {exc}",
                               fix="build it again with LatencyLUT.build(...).save(path)") from exc


def _terms(space: ModelSpace, dummy_input: DummyInput) -> List[Any]:
    terms_of = getattr(space, "additive_terms", None)
    inputs = as_input_tuple(dummy_input)
    if not callable(terms_of) or len(inputs) != 1:
        raise HarnessError(f"{type(space).__name__} is not additive (no additive_terms()), so "
                           f"it has no per-block lookup table",
                           fix="use LatencyProfiler for whole subnets, or give the space "
                               "additive_terms(input_shape) (see harness.additive)")
    return terms_of(tuple(inputs[0].shape))
