"""`FlopsProfiler` and `NumParamsProfiler`: static metrics with the Profiler interface.

FLOPs are counted at the level of torch's own operators, with the formulas of
`torch.utils.flop_counter` (the reference `FlopCounterMode` uses), so functional calls
(F.conv2d, F.linear, matmul, attention) count as much as modules do. Two conventions:

- "macs" (default): multiply-accumulates, half of what FlopCounterMode reports (the tests
  check that), for the whole dummy input (batch included); bias additions, normalisation,
  activations, pooling and element-wise operators are not counted. The NAS literature's
  convention.
- "nni": NNI 3.0's FlopsProfiler convention, to compare with its numbers: counts are per
  input sample (the batch dimension is left out, as NNI's formulas do) and add, on top of
  the MACs, one operation per output element of a convolution or linear layer with bias,
  2 * (1 + affine) per element of BatchNorm input, and one per element of ReLU, ReLU6, ELU,
  Sigmoid, Tanh, Hardtanh and LeakyReLU (not Hardswish, SiLU or GELU, which NNI does not
  count). NNI counts modules only: functional matmuls count here and not there.

Counting runs on the meta device (shapes only, no arithmetic) where the model allows and on
the CPU otherwise. A leaf module whose forward adds nothing countable and is not zero by
convention (normalisation, activations, pooling, shape-only) is reported on the `harness`
logger and listed in `profiler.uncounted`, never silently taken as zero; give it a formula
with `register_formula` (its operators are then not counted on their own).

For additive spaces (harness.spaces.additive) every candidate block is counted once at its real
input shape when the profiler is made, and checked against whole-subnet counts, so that
`profile()` of a new sample is a few table look-ups. NNI ModelSpaces are decomposed into
such tables from the space itself (harness.metrics.nni_tables); where that is not possible, new
samples are counted by memoized look-ups per mutable module, and where even that fails, by
freezing and counting the whole subnet.
"""
import logging
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from harness.spaces.additive import AdditiveCost, distinct_blocks
from harness.export.graph import DummyInput, as_input_tuple, freeze
from harness.metrics.flop_count import (CONVENTIONS, FORMULAS, ZERO_MAC_MODULES, count_macs,  # noqa: F401
                                register_formula)
from harness.metrics.nni_tables import NniTables, NotDecomposable, is_nni_space
from harness.metrics.profiler_base import Profiler
from harness.spaces.space import ModelSpace, SampleValidator, checked_search_space, random_samples

log = logging.getLogger(__name__)


def count_params(module: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Tuple[int, Set[str]]:
    """Number of parameters (inputs unused: same signature as count_macs)."""
    return sum(p.numel() for p in module.parameters()), set()


class _StaticProfiler(Profiler):
    """A metric computed from the module alone, per block where the space is additive."""

    metric_name = ""

    def __init__(self, space: ModelSpace, dummy_input: DummyInput, convention: str = "macs"):
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.space = space
        self.convention = convention
        self._inputs = as_input_tuple(dummy_input)
        choices = checked_search_space(space)
        self._validate = SampleValidator(choices)
        self._memo: Dict[Tuple[Any, ...], float] = {}
        self._whole: Dict[Tuple[Any, ...], float] = {}
        self.uncounted: Set[str] = set()
        self.nni_tables: Any = None  # harness.metrics.nni_tables.NniTables for an NNI ModelSpace
        self.why_not_additive = ""
        self.additive: Optional[AdditiveCost] = self._precompute(choices)

    def _count(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Tuple[float, Set[str]]:
        raise NotImplementedError

    def _measure_module(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> float:
        value, uncounted = self._count(module, inputs)
        self._report_uncounted(uncounted)
        return float(value)

    def _report_uncounted(self, uncounted: Set[str]) -> None:
        new = uncounted - self.uncounted
        if new:
            log.warning("%s: no MAC formula for %s; counted as 0 (register one with "
                        "harness.metrics.counting.register_formula)", type(self).__name__,
                        ", ".join(sorted(new)))
            self.uncounted |= new

    def _terms(self, choices: Mapping[str, List[Any]]) -> Optional[List[Any]]:
        terms_of = getattr(self.space, "additive_terms", None)
        if callable(terms_of) and len(self._inputs) == 1:
            return terms_of(tuple(self._inputs[0].shape))
        if not is_nni_space(self.space):
            self.why_not_additive = "the space has no additive_terms()"
            return None
        try:
            tables = NniTables(self.space, self._inputs, self.convention)  # type: ignore[arg-type]
        except NotDecomposable as exc:
            self.why_not_additive = str(exc)
            log.warning("%s: %s cannot be decomposed (%s); counting whole frozen subnets",
                        type(self).__name__, type(self.space).__name__, exc)
            return None
        if not self._tables_agree(tables):
            return None
        self.nni_tables = tables
        terms = tables.additive_terms(choices)
        if terms is None:
            self.why_not_additive = (f"{tables.why_not_additive}; new samples are counted by "
                                     "memoized look-ups per module")
        return terms

    def _tables_agree(self, tables: Any) -> bool:
        """The memoized per-module count equals the whole frozen subnet's on two samples."""
        for sample in random_samples(self.space, 2, seed=12345):
            by_tables = self._tables_value(tables, sample)
            whole = self._full(sample)
            if abs(by_tables - whole) > 1e-6 * max(whole, 1):
                self.why_not_additive = (f"per-module counting gives {by_tables:g} where the "
                                         f"frozen subnet gives {whole:g}")
                log.warning("%s: %s: %s; counting whole frozen subnets", type(self).__name__,
                            type(self.space).__name__, self.why_not_additive)
                return False
        return True

    def _tables_value(self, tables: Any, sample: Mapping[str, Any]) -> float:
        return float(tables.cost(sample))

    def _precompute(self, choices: Mapping[str, List[Any]]) -> Optional[AdditiveCost]:
        terms = self._terms(choices)
        if terms is None:
            return None
        costs = {}
        for block in distinct_blocks(terms):
            known = self._known_block_cost(block.key)
            if known is not None:
                costs[block.key] = known
                continue
            with torch.device("meta"):  # counting needs shapes only: no initialisation
                module = block.build()
            costs[block.key] = self._measure_module(module, (torch.zeros(block.input_shape),))
        additive = AdditiveCost(terms, costs, self._validate.labels, choices)
        for sample in random_samples(self.space, 2, seed=12345):
            whole = self._full(sample)
            if abs(additive.total(self._validate.values(sample)) - whole) > 1e-6 * max(whole, 1):
                self.why_not_additive = "the block sum differs from the whole subnet"
                log.warning("%s: %s is not additive as it claims (block sum differs from the "
                            "whole subnet); counting whole subnets instead",
                            type(self).__name__, type(self.space).__name__)
                return None
        return additive

    def _known_block_cost(self, key: str) -> Optional[float]:
        """A block's count already made (by the NNI tables, while tracing), if any."""
        return None

    def _full(self, sample: Mapping[str, Any]) -> float:
        """The whole frozen subnet counted (memoized: the checks reuse their samples)."""
        values = self._validate.values(sample)
        if values not in self._whole:
            self._whole[values] = self._measure_module(freeze(self.space, dict(sample)),
                                                       self._inputs)
        return self._whole[values]

    def profile(self, sample: Mapping[str, Any]) -> float:
        values = self._validate.values(sample)
        if self.additive is not None:
            return self.additive.total(values)
        value = self._memo.get(values)
        if value is None:
            sample = dict(zip(self._validate.labels, values))
            if self.nni_tables is not None and self.metric_name == "flops":
                value = self._tables_value(self.nni_tables, sample)
            else:
                value = self._full(sample)
            self._memo[values] = value
        return value

    def expected(self, probabilities: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Expected metric under architecture probabilities, differentiably (additive spaces)."""
        if self.additive is None:
            raise TypeError(f"{type(self).__name__} over {type(self.space).__name__} has no "
                            f"per-choice table ({self.why_not_additive}), so it has no "
                            f"expected cost")
        return self.additive.expected(probabilities)


class FlopsProfiler(_StaticProfiler):
    """Multiply-accumulates of a sample's forward pass on `dummy_input` (or FLOPs in NNI's
    convention with convention="nni"; see the module doc)."""

    metric_name = "flops"

    def _count(self, module, inputs):
        return count_macs(module, inputs, self.convention)

    def _known_block_cost(self, key: str) -> Optional[float]:
        return self.nni_tables.block_costs.get(key) if self.nni_tables is not None else None

    def _tables_value(self, tables: Any, sample: Mapping[str, Any]) -> float:
        value = float(tables.cost(sample))
        self._report_uncounted(tables.uncounted)
        return value


class NumParamsProfiler(_StaticProfiler):
    """Number of parameters of a sample's subnet."""

    metric_name = "params"

    def _count(self, module, inputs):
        return count_params(module, inputs)

    def _tables_agree(self, tables: Any) -> bool:
        return True  # the tables count MACs; the parameter terms are checked in _precompute
