"""`FlopsProfiler` and `NumParamsProfiler`: static metrics with the Profiler interface.

FLOPs are counted as multiply-accumulates (MACs) of convolutions and linear layers, by
module hooks during one forward pass: the convention of the NAS literature, and half of what
`torch.utils.flop_counter.FlopCounterMode` reports for the same layers (the tests check
that). Modules without a formula are reported on the `harness` logger and listed in
`profiler.uncounted`, never silently taken as zero; normalisation, activation, pooling and
shape-only modules are zero MACs by convention. Register a formula with `register_formula`.

For additive spaces (harness.additive) every candidate block is counted once at its real
input shape when the profiler is made, and checked against whole-subnet counts, so that
`profile()` of a new sample is a few table look-ups.
"""
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from harness.additive import AdditiveCost, distinct_blocks
from harness.export import DummyInput, as_input_tuple, freeze
from harness.profiler_base import Profiler
from harness.space import ModelSpace, SampleValidator, checked_search_space, random_samples

log = logging.getLogger(__name__)

MacFormula = Callable[[nn.Module, Tuple[torch.Tensor, ...], torch.Tensor], int]


def _conv_macs(module: Any, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    per_output = (module.in_channels // module.groups) * int(torch.tensor(module.kernel_size).prod())
    return int(output.numel() * per_output)


def _conv_transpose_macs(module: Any, inputs: Tuple[torch.Tensor, ...],
                         output: torch.Tensor) -> int:
    per_input = (module.out_channels // module.groups) * int(torch.tensor(module.kernel_size).prod())
    return int(inputs[0].numel() * per_input)


def _linear_macs(module: Any, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    return int(output.numel() * module.in_features)


FORMULAS: Dict[type, MacFormula] = {
    nn.Conv1d: _conv_macs, nn.Conv2d: _conv_macs, nn.Conv3d: _conv_macs,
    nn.ConvTranspose1d: _conv_transpose_macs, nn.ConvTranspose2d: _conv_transpose_macs,
    nn.ConvTranspose3d: _conv_transpose_macs, nn.Linear: _linear_macs,
}

# Zero multiply-accumulates by convention (their cost is memory, not MACs).
ZERO_MAC_MODULES: Tuple[type, ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softmax, nn.Identity, nn.Dropout,
    nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d,
)


def register_formula(module_type: type, formula: MacFormula) -> None:
    """Count `module_type` with `formula(module, inputs, output) -> MACs`."""
    FORMULAS[module_type] = formula


def count_macs(module: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Tuple[int, Set[str]]:
    """MACs of one forward pass, and the names of leaf module types without a formula."""
    total = [0]
    uncounted: Set[str] = set()
    handles = []

    def hook(leaf: nn.Module, args: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        formula = next((f for t, f in FORMULAS.items() if type(leaf) is t), None)
        if formula is not None:
            total[0] += int(formula(leaf, args, output))
        elif not isinstance(leaf, ZERO_MAC_MODULES):
            uncounted.add(type(leaf).__qualname__)

    for leaf in module.modules():
        if not list(leaf.children()):
            handles.append(leaf.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module.eval()(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total[0], uncounted


def count_params(module: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Tuple[int, Set[str]]:
    """Number of parameters (inputs unused: same signature as count_macs)."""
    return sum(p.numel() for p in module.parameters()), set()


class _StaticProfiler(Profiler):
    """A metric computed from the module alone, per block where the space is additive."""

    metric_name = ""

    def __init__(self, space: ModelSpace, dummy_input: DummyInput):
        self.space = space
        self._inputs = as_input_tuple(dummy_input)
        choices = checked_search_space(space)
        self._validate = SampleValidator(choices)
        self._memo: Dict[Tuple[Any, ...], float] = {}
        self.uncounted: Set[str] = set()
        self.additive: Optional[AdditiveCost] = self._precompute(choices)

    def _count(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Tuple[int, Set[str]]:
        raise NotImplementedError

    def _measure_module(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> float:
        value, uncounted = self._count(module, inputs)
        new = uncounted - self.uncounted
        if new:
            log.warning("%s: no MAC formula for %s; counted as 0 (register one with "
                        "harness.counting.register_formula)", type(self).__name__,
                        ", ".join(sorted(new)))
            self.uncounted |= new
        return float(value)

    def _precompute(self, choices: Mapping[str, List[Any]]) -> Optional[AdditiveCost]:
        terms_of = getattr(self.space, "additive_terms", None)
        if not callable(terms_of) or len(self._inputs) != 1:
            return None
        terms = terms_of(tuple(self._inputs[0].shape))
        costs = {}
        for block in distinct_blocks(terms):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                module = block.build()
            costs[block.key] = self._measure_module(module, (torch.zeros(block.input_shape),))
        additive = AdditiveCost(terms, costs, self._validate.labels, choices)
        for sample in random_samples(self.space, 2, seed=12345):
            whole = self._full(sample)
            if abs(additive.total(self._validate.values(sample)) - whole) > 1e-6 * max(whole, 1):
                log.warning("%s: %s is not additive as it claims (block sum differs from the "
                            "whole subnet); counting whole subnets instead",
                            type(self).__name__, type(self.space).__name__)
                return None
        return additive

    def _full(self, sample: Mapping[str, Any]) -> float:
        return self._measure_module(freeze(self.space, dict(sample)), self._inputs)

    def profile(self, sample: Mapping[str, Any]) -> float:
        values = self._validate.values(sample)
        if self.additive is not None:
            return self.additive.total(values)
        value = self._memo.get(values)
        if value is None:
            value = self._memo[values] = self._full(dict(zip(self._validate.labels, values)))
        return value

    def expected(self, probabilities: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Expected metric under architecture probabilities, differentiably (additive spaces)."""
        if self.additive is None:
            raise TypeError(f"{type(self).__name__} over {type(self.space).__name__} has no "
                            f"per-block table (the space is not additive)")
        return self.additive.expected(probabilities)


class FlopsProfiler(_StaticProfiler):
    """Multiply-accumulates of a sample's forward pass on `dummy_input`."""

    def _count(self, module, inputs):
        return count_macs(module, inputs)


class NumParamsProfiler(_StaticProfiler):
    """Number of parameters of a sample's subnet."""

    def _count(self, module, inputs):
        return count_params(module, inputs)
