"""Search with hardware constraints: strategies, middleware, one-shot penalties and filters.

Multi-trial (the shape of NNI's hardware-aware NAS):

    strategy = Chain(Random(space, seed=0),
                     Filter(lambda s: flops.profile(s) < 300e6),        # cheap first
                     Filter(lambda s: latency.profile(s) < 20.0))       # device only if needed
    result = run_search(strategy, evaluate, budget=100)

A Chain's middlewares wrap the strategy in the order given, so each candidate meets the
first filter first: a sample that fails the FLOPs filter never reaches the device. A Filter
either discards failing samples (default) or, with `metric_for_invalid`, reports that metric
to the strategy so a learning strategy (RegularizedEvolution) learns to avoid them.

One-shot: `ExpectationProfilerPenalty` adds the expected cost under the architecture
distribution to the loss as a torch expression, so its gradient reaches the architecture
parameters; `SampleProfilerPenalty` does the same for one sampled architecture (no
gradient); `RangeProfilerFilter` tells whether a sample's cost is within bounds. They take
harness spaces and NNI ModelSpaces alike (tables from harness.metrics.counting / harness.search.lut); for
NNI's own one-shot strategies use the subclasses in harness.search.nni_oneshot.
"""
import collections
import logging
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple, Union

import torch

from harness.errors import HarnessError
from harness.metrics.profiler_base import Profiler
from harness.spaces.space import ModelSpace, Sample, checked_search_space, sample_key

log = logging.getLogger(__name__)


class SearchExhausted(HarnessError):
    """A filter rejected `patience` samples in a row: the constraint may be unsatisfiable."""


class Strategy(ABC):
    """Proposes samples and learns from their metrics (higher is better)."""

    @abstractmethod
    def propose(self) -> Optional[Sample]:
        """The next sample to evaluate, or None when there is nothing left to propose."""

    def tell(self, sample: Sample, metric: float) -> None:
        """The metric of a proposed sample."""


class Random(Strategy):
    """Uniform random samples from a seeded generator; with `dedup`, never the same twice."""

    def __init__(self, space: ModelSpace, seed: Optional[int] = None, dedup: bool = True,
                 patience: int = 1000):
        self.choices = checked_search_space(space)
        self.rng = random.Random(seed)
        self.dedup = dedup
        self.patience = patience
        self._seen: set = set()

    def propose(self) -> Optional[Sample]:
        for _ in range(self.patience if self.dedup else 1):
            sample = {label: self.rng.choice(values) for label, values in self.choices.items()}
            key = sample_key(sample)
            if not self.dedup or key not in self._seen:
                self._seen.add(key)
                return sample
        return None  # nothing new in `patience` draws: the space is (nearly) exhausted


class RegularizedEvolution(Strategy):
    """Aging evolution (Real et al., 2019): random samples until the population is full, then
    the best of a random tournament is mutated; the oldest member leaves the population."""

    def __init__(self, space: ModelSpace, population_size: int = 50, sample_size: int = 10,
                 mutation_prob: Optional[float] = None, seed: Optional[int] = None,
                 dedup: bool = True, patience: int = 1000):
        self.choices = checked_search_space(space)
        self.population_size = population_size
        self.sample_size = sample_size
        self.mutation_prob = mutation_prob if mutation_prob is not None else 1 / len(self.choices)
        self.rng = random.Random(seed)
        self.dedup = dedup
        self.patience = patience
        self.population: Deque[Tuple[Sample, float]] = collections.deque()
        self._seen: set = set()

    def _random(self) -> Sample:
        return {label: self.rng.choice(values) for label, values in self.choices.items()}

    def _mutate(self, parent: Sample) -> Sample:
        child = dict(parent)
        mutable = [label for label, values in self.choices.items() if len(values) > 1]
        changed = [label for label in mutable if self.rng.random() < self.mutation_prob]
        for label in changed or [self.rng.choice(mutable)]:
            child[label] = self.rng.choice([v for v in self.choices[label] if v != parent[label]])
        return child

    def propose(self) -> Optional[Sample]:
        for _ in range(self.patience):
            if len(self.population) < self.population_size:
                sample = self._random()
            else:
                contenders = self.rng.sample(list(self.population),
                                             min(self.sample_size, len(self.population)))
                sample = self._mutate(max(contenders, key=lambda pair: pair[1])[0])
            key = sample_key(sample)
            if not self.dedup or key not in self._seen:
                self._seen.add(key)
                return sample
        return None

    def tell(self, sample: Sample, metric: float) -> None:
        self.population.append((sample, metric))
        while len(self.population) > self.population_size:
            self.population.popleft()


class Middleware(Strategy):
    """Sits between a strategy and the search loop; by default passes everything through."""

    inner: Strategy

    def bind(self, inner: Strategy) -> None:
        self.inner = inner

    def propose(self) -> Optional[Sample]:
        return self.inner.propose()

    def tell(self, sample: Sample, metric: float) -> None:
        self.inner.tell(sample, metric)


class Filter(Middleware):
    """Lets through only samples for which `fn(sample)` is true.

    metric_for_invalid=None: failing samples are discarded silently.
    metric_for_invalid=x: failing samples are reported to the strategy with metric x.
    After `patience` rejections in a row, SearchExhausted is raised.
    """

    def __init__(self, fn: Callable[[Sample], bool], metric_for_invalid: Optional[float] = None,
                 patience: int = 1000):
        self.fn = fn
        self.metric_for_invalid = metric_for_invalid
        self.patience = patience
        self.passed = 0
        self.rejected = 0

    def propose(self) -> Optional[Sample]:
        in_a_row = 0
        while True:
            sample = self.inner.propose()
            if sample is None:
                return None
            if self.fn(sample):
                self.passed += 1
                return sample
            self.rejected += 1
            in_a_row += 1
            if self.metric_for_invalid is not None:
                self.inner.tell(sample, self.metric_for_invalid)
            if in_a_row >= self.patience:
                raise SearchExhausted(f"the filter rejected {in_a_row} samples in a row",
                                      fix="loosen the constraint, or check it on a few samples "
                                          "by hand (profiler.profile(sample))")


class Chain(Strategy):
    """A strategy wrapped by middlewares, the first given being the innermost."""

    def __init__(self, strategy: Strategy, *middlewares: Middleware):
        self.strategy = strategy
        self.middlewares = list(middlewares)
        outer: Strategy = strategy
        for middleware in middlewares:
            middleware.bind(outer)
            outer = middleware
        self._outer = outer

    def propose(self) -> Optional[Sample]:
        return self._outer.propose()

    def tell(self, sample: Sample, metric: float) -> None:
        self._outer.tell(sample, metric)


@dataclass
class SearchResult:
    history: List[Tuple[Sample, float]] = field(default_factory=list)

    @property
    def best(self) -> Tuple[Sample, float]:
        if not self.history:
            raise HarnessError("the search evaluated no sample",
                               fix="raise the budget or loosen the filters")
        return max(self.history, key=lambda pair: pair[1])

    def top(self, k: int) -> List[Tuple[Sample, float]]:
        return sorted(self.history, key=lambda pair: pair[1], reverse=True)[:k]


def run_search(strategy: Strategy, evaluate: Callable[[Sample], float], budget: int) -> SearchResult:
    """Propose, evaluate and tell, `budget` times or until the strategy runs out."""
    result = SearchResult()
    for _ in range(budget):
        sample = strategy.propose()
        if sample is None:
            break
        metric = float(evaluate(sample))
        strategy.tell(sample, metric)
        result.history.append((sample, metric))
    return result


# ---------------------------------------------------------------- one-shot

_NONLINEAR = {
    "linear": lambda x: x,
    "positive": lambda x: torch.relu(x),
    "negative": lambda x: -torch.relu(-x),
    "absolute": lambda x: torch.abs(x),
}


class _ProfilerPenalty(torch.nn.Module):
    """loss' = loss + scale * n (add) or loss * (1 + n) ** scale (mul), where
    n = nonlinear(cost / baseline - 1) and nonlinear is linear, positive (max(0, .)),
    negative (min(0, .)) or absolute (|.|), as in NNI's hardware-aware NAS."""

    def __init__(self, profiler: Profiler, baseline: float, scale: float = 1., *,
                 nonlinear: str = "linear", aggregate: str = "add"):
        torch.nn.Module.__init__(self)  # not super(): NNI's penalty may follow in the MRO
        if nonlinear not in _NONLINEAR:
            raise ValueError(f"nonlinear must be one of {list(_NONLINEAR)}, got {nonlinear!r}")
        if aggregate not in ("add", "mul"):
            raise ValueError(f"aggregate must be 'add' or 'mul', got {aggregate!r}")
        if baseline <= 0:
            raise ValueError(f"baseline must be positive, got {baseline}")
        self.profiler = profiler
        self.baseline = baseline
        self.scale = scale
        self.nonlinear = nonlinear
        self.aggregate = aggregate

    def _combine(self, loss: Union[torch.Tensor, float],
                 cost: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        normalized = _NONLINEAR[self.nonlinear](cost / self.baseline - 1)
        if self.aggregate == "add":
            final = loss + self.scale * normalized
        else:
            final = loss * torch.pow(1 + normalized, self.scale)
        return final, {"loss_original": loss, "penalty": float(cost.detach()),
                       "normalized_penalty": float(normalized.detach()), "loss_final": final}


class ExpectationProfilerPenalty(_ProfilerPenalty):
    """Penalty on the expected cost under the architecture distribution, differentiably.

    `forward(loss, distribution)` takes, per label, either a probability vector over the
    label's choices (in the space's order; for example `softmax(alpha)`) or NNI's form
    {value: probability}. The profiler must be additive (FlopsProfiler, NumParamsProfiler
    or LatencyLUT on an additive space): the expectation is then exact and its gradient
    reaches every architecture parameter."""

    def forward(self, loss: Union[torch.Tensor, float],
                distribution: Mapping[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        expected = getattr(self.profiler, "expected", None)
        if expected is None:
            raise TypeError(f"{type(self.profiler).__name__} cannot give an expected cost; use "
                            f"FlopsProfiler, NumParamsProfiler or LatencyLUT on an additive space")
        return self._combine(loss, expected(self._vectors(distribution)))

    def _vectors(self, distribution: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        additive = getattr(self.profiler, "additive", None)
        if additive is None:
            space = type(getattr(self.profiler, "space", None)).__name__
            raise TypeError(f"{type(self.profiler).__name__} over {space} has no per-choice table "
                            f"(the space could not be decomposed into per-choice terms), so "
                            f"there is no expected cost to differentiate; use "
                            f"SampleProfilerPenalty, or a space whose blocks see fixed shapes")
        choices = additive.choices
        vectors = {}
        for label, value in distribution.items():
            if isinstance(value, Mapping):
                unknown = [v for v in value if v not in choices.get(label, [])]
                if unknown:
                    raise ValueError(f"label {label!r} has no choice {unknown[0]!r}")
                probs = [value.get(v, 0.0) for v in choices[label]]
                vectors[label] = torch.stack([torch.as_tensor(p, dtype=torch.float64)
                                              for p in probs])
            else:
                vectors[label] = value
        return vectors


class SampleProfilerPenalty(_ProfilerPenalty):
    """Penalty on the cost of one sampled architecture (for sampling-based one-shot
    algorithms such as ENAS or SPOS): `forward(loss_or_reward, sample)`."""

    def forward(self, loss: Union[torch.Tensor, float],
                sample: Mapping[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        cost = torch.tensor(float(self.profiler.profile(sample)), dtype=torch.float64)
        return self._combine(loss, cost)


class RangeProfilerFilter:
    """True when `min <= profiler.profile(sample) <= max` (either bound may be None)."""

    def __init__(self, profiler: Profiler, min: Optional[float] = None,
                 max: Optional[float] = None):
        self.profiler = profiler
        self.min = min
        self.max = max

    def __call__(self, sample: Mapping[str, Any]) -> bool:
        value = self.profiler.profile(sample)
        return ((self.min is None or value >= self.min)
                and (self.max is None or value <= self.max))


class LatencyLimit:
    """A ready predicate for searches: True when a sample's latency is below `max_ms` on the
    profiler's device (up to +-indifference x max_ms), decided with `confidence` for as little
    device time as that needs (LatencyProfiler.decide; an undecided one by its estimate). Use
    it in our Filter, or in NNI's: `Filter(lambda model: limit(model.sample))`. Every decision
    is kept in `decisions`, so a search can report device time spent and the answers' sources."""

    def __init__(self, profiler: Any, max_ms: float, confidence: float = 0.99,
                 indifference: float = 0.02):
        self.profiler = profiler
        self.max_ms = max_ms
        self.confidence = confidence
        self.indifference = indifference
        self.decisions: List[Any] = []

    def __call__(self, sample: Mapping[str, Any]) -> bool:
        decision = self.profiler.decide(sample, self.max_ms, self.confidence, self.indifference)
        self.decisions.append(decision)
        return decision.below

    @property
    def device_s(self) -> float:
        """Device time the decisions so far cost."""
        return sum(d.device_s for d in self.decisions)
