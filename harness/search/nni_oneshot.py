"""harness's penalties and filter inside NNI 3.0's one-shot strategies.

NNI's strategies accept only NNI's own classes (`DARTS(penalty=...)` asserts an
`nni...ExpectationProfilerPenalty`), so the classes here are harness's, subclassing NNI's
as well. And NNI's DARTS calls the penalty with `export_probs()`, which holds Python floats:
no gradient could reach the architecture from there. `bind(strategy)` gives the penalty the
strategy's own architecture parameters (one alpha per label, over the label's choices in
the space's order), and the expected cost is taken under their softmax, so the penalty's
gradient reaches them:

    flops = FlopsProfiler(space, dummy_input)            # an NNI ModelSpace
    penalty = ExpectationProfilerPenalty(flops, baseline=300e6, scale=0.1)
    strategy = nni.nas.strategy.DARTS(penalty=penalty)
    penalty.bind(strategy)

Importing this module needs nni.
"""
import logging
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from nni.nas.oneshot.pytorch import profiler as _nni

from harness.search import strategies as search

log = logging.getLogger(__name__)


class ExpectationProfilerPenalty(search.ExpectationProfilerPenalty,
                                 _nni.ExpectationProfilerPenalty):
    """harness.search.strategies.ExpectationProfilerPenalty, accepted by NNI's differentiable strategies
    (DARTS, GumbelDARTS); see the module doc for `bind`."""

    def __init__(self, profiler: Any, baseline: float, scale: float = 1., *,
                 nonlinear: str = "linear", aggregate: str = "add"):
        search.ExpectationProfilerPenalty.__init__(self, profiler, baseline, scale,
                                                   nonlinear=nonlinear, aggregate=aggregate)
        self._strategy: Optional[Any] = None

    def bind(self, strategy: Any) -> "ExpectationProfilerPenalty":
        """Differentiate through `strategy`'s architecture parameters (an NNI DARTS-family
        strategy) instead of the floats NNI passes to forward()."""
        self._strategy = strategy
        return self

    def forward(self, loss: Union[torch.Tensor, float],
                distribution: Mapping[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        if self._strategy is not None:
            distribution = self.strategy_probabilities()
        return search.ExpectationProfilerPenalty.forward(self, loss, distribution)

    def strategy_probabilities(self) -> Dict[str, torch.Tensor]:
        """softmax(alpha) per label, from the bound strategy, with gradients."""
        alphas = getattr(self._strategy, "_arch_parameters", None)
        if not alphas:
            raise RuntimeError(f"{type(self._strategy).__name__} holds no architecture "
                               f"parameters yet (bind a DARTS-family strategy of NNI 3.0, and "
                               f"call the penalty while it runs)")
        softmax = self._strategy.configure_softmax()  # type: ignore[union-attr]
        return {label: softmax(alpha) for label, alpha in alphas.items()}


class SampleProfilerPenalty(search.SampleProfilerPenalty, _nni.SampleProfilerPenalty):
    """harness.search.strategies.SampleProfilerPenalty, accepted where NNI expects its own."""

    def __init__(self, profiler: Any, baseline: float, scale: float = 1., *,
                 nonlinear: str = "linear", aggregate: str = "add"):
        search.SampleProfilerPenalty.__init__(self, profiler, baseline, scale,
                                              nonlinear=nonlinear, aggregate=aggregate)

    def forward(self, loss: Union[torch.Tensor, float],
                sample: Mapping[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        return search.SampleProfilerPenalty.forward(self, loss, sample)


class RangeProfilerFilter(search.RangeProfilerFilter, _nni.ProfilerFilter):
    """harness.search.strategies.RangeProfilerFilter, accepted where NNI expects a ProfilerFilter
    (the `filter` argument of its sampling strategies)."""

    def filter(self, sample: Mapping[str, Any]) -> bool:
        return search.RangeProfilerFilter.__call__(self, sample)
