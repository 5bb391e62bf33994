"""A per-device latency model, learned from the device's own measurements, with honest
(jackknife+) prediction intervals.

Features cost microseconds. For a space with per-block terms (harness.spaces.additive): the
blocks' physical costs summed over the subnet (multiply-accumulates, parameters, input and
output activation sizes, how many blocks: counted once per candidate block on the meta
device), fitted freely, plus which candidate blocks it builds, fitted with a ridge penalty (a
learned lookup table of each block's departure from what its physical costs say). For any
other space: which choice each label takes, with the ridge penalty. The physical terms carry
a space's latency from a few dozen measurements (on ProxylessSpace at 64 px, 60 subnets:
leave-one-out errors of 0.5% median, 1.8% at the 98th percentile, against 5.5% and 18% for
the blocks alone); the blocks refine it as measurements accumulate.

The interval is jackknife+ (Barber, Candes, Ramdas, Tibshirani, Ann. Statist. 2021): every
measurement is left out once (in closed form for a ridge regression), its relative error
against the model fitted without it is one residual, and a new subnet's interval spans the
leave-one-out models' predictions widened by those residuals, at the asked coverage. All
measurements both fit and calibrate (split-conformal held half of them out, and needed 98 to
give a 98% interval; this needs 49). Jackknife+ guarantees at least 1 - 2(1 - coverage) in
the worst case and holds the nominal coverage in practice (tests/test_decisions.py); the
closed form keeps the full fit's feature scale, penalty and clamp range for every left-out
fit (a leak of order 1/n), and the decider's audit measures the coverage on the device.
With fewer measurements than the coverage needs, there is no interval (None), and a decision
measures instead of trusting the model.
"""
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from harness.spaces.additive import Block, chosen_blocks, distinct_blocks
from harness.export.graph import DummyInput, as_input_tuple
from harness.errors import InvalidSample
from harness.spaces.space import ModelSpace, Sample, SampleValidator, checked_search_space

log = logging.getLogger(__name__)

MIN_MEASUREMENTS = 20   # fewer than this: the model does not fit, and says so
# Ridge penalty on the penalized features (which blocks, which choices), as a share of their
# mean square: with fewer subnets than blocks, their costs shrink towards what the free
# features (physical costs, the fixed cost of a run) say instead of swinging wildly;
# predictions also stay within a factor 2 of the latencies it was fitted on.
RIDGE = 0.05
RANGE_FACTOR = 2.0
PHYSICAL = ("mmacs", "kparams", "kin", "kout", "blocks")  # per block: millions, thousands


class Featurizer:
    """A sample's features as a vector, and which of them the ridge penalizes. The last
    feature is the fixed cost of a run (1.0). A sample that is not one of the space's (an
    imported sample-index row naming a choice the space lacks) raises InvalidSample."""

    def __init__(self, space: ModelSpace, dummy_input: DummyInput, labels: Sequence[str]):
        self.validate = SampleValidator(checked_search_space(space))
        self.labels = list(labels)
        terms_of = getattr(space, "additive_terms", None)
        inputs = as_input_tuple(dummy_input)
        self.terms = (terms_of(tuple(inputs[0].shape))
                      if callable(terms_of) and len(inputs) == 1 else None)
        if self.terms is not None:
            blocks = list(distinct_blocks(self.terms))
            self.index = {block.key: i for i, block in enumerate(blocks)}
            self.physical = {block.key: physical_costs(block) for block in blocks}
            width = len(PHYSICAL) + len(blocks) + 1
            self.penalized = np.zeros(width, dtype=bool)
            self.penalized[len(PHYSICAL):-1] = True
        else:
            choices = checked_search_space(space)
            self.slots = {(label, repr(value)): i for i, (label, value) in enumerate(
                (label, value) for label in self.labels for value in choices[label])}
            self.penalized = np.ones(len(self.slots) + 1, dtype=bool)
            self.penalized[-1] = False

    def __call__(self, sample: Sample) -> np.ndarray:
        self.validate(sample)
        vector = np.zeros(len(self.penalized))
        vector[-1] = 1.0  # the fixed cost of a run
        if self.terms is not None:
            for block in chosen_blocks(self.terms, sample):
                vector[:len(PHYSICAL)] += self.physical[block.key]
                vector[len(PHYSICAL) + self.index[block.key]] += 1.0
            return vector
        for label in self.labels:
            vector[self.slots[(label, repr(sample[label]))]] = 1.0
        return vector


def physical_costs(block: Block) -> np.ndarray:
    """One candidate block's multiply-accumulates (millions), parameters, input and output
    elements (thousands) and 1 (a block); where counting fails, its input size and 1 only
    (its cost is then learned from its own feature)."""
    from harness.metrics.flop_count import count_forward

    in_elements = float(np.prod(block.input_shape)) / 1e3
    try:  # counted on the meta device where the block runs there, else on the CPU
        module = block.build()
        counted = count_forward(module, (torch.zeros(block.input_shape),))
        outputs = counted.output if isinstance(counted.output, (tuple, list)) else (
            counted.output,)
        out_elements = sum(int(np.prod(t.shape)) for t in outputs if isinstance(t, torch.Tensor))
        params = sum(p.numel() for p in module.parameters())
        return np.array([counted.value / 1e6, params / 1e3, in_elements, out_elements / 1e3,
                         1.0])
    except Exception as exc:  # a block the counter cannot run
        log.warning("cannot count block %s (%s); the latency model learns its cost from its "
                    "own feature", block.key, exc)
        return np.array([0.0, 0.0, in_elements, 0.0, 1.0])


@dataclass(frozen=True)
class Prediction:
    """A predicted median (ms) and its interval at `coverage`."""

    median_ms: float
    low_ms: float
    high_ms: float
    coverage: float


class LatencyModel:
    """Fitted on one device's measured medians of one space's subnets; see the module doc."""

    def __init__(self, featurize: Callable[[Sample], np.ndarray],
                 penalized: Optional[np.ndarray] = None):
        """`penalized`: which features the ridge shrinks (a Featurizer says; by default all
        but the last, the fixed cost of a run)."""
        self.featurize = featurize
        self.penalized = penalized if penalized is not None else getattr(
            featurize, "penalized", None)
        self.weights: Optional[np.ndarray] = None  # fitted on every measurement
        self.left_out: Optional[np.ndarray] = None  # row i: fitted without measurement i
        self.residuals: Optional[np.ndarray] = None  # |log(measured_i / left-out prediction)|
        self.range_ms = (0.0, math.inf)
        self.n_fit = 0

    @property
    def fitted(self) -> bool:
        return self.weights is not None

    def fit(self, samples: Sequence[Sample], medians_ms: Sequence[float]) -> bool:
        """Fit on measured medians; False (and not fitted) with fewer than MIN_MEASUREMENTS.
        Samples that are not the space's (imported rows naming choices it lacks) are left
        out, with a warning. The fit is deterministic."""
        samples, medians_ms = self._of_the_space(samples, medians_ms)
        if len(samples) < MIN_MEASUREMENTS:
            self.weights, self.left_out, self.residuals = None, None, None
            self.n_fit = len(samples)
            return False
        features = np.array([self.featurize(s) for s in samples], dtype=float)
        target = np.array(medians_ms, dtype=float)
        penalized = self.penalized if self.penalized is not None else np.r_[
            np.ones(features.shape[1] - 1, dtype=bool), False]
        # columns on one scale (the fixed cost's column is 1 already); a column of zeros
        # stays zero and gets no weight
        scale = np.abs(features).mean(axis=0)
        scale[scale == 0] = 1.0
        scaled = features / scale
        gram = scaled.T @ scaled
        strength = RIDGE * max(float(np.mean(np.diag(gram)[penalized])), 1e-12) \
            if penalized.any() else 0.0
        inverse = np.linalg.pinv(gram + np.diag(np.where(penalized, strength, 0.0)))
        weights = inverse @ (scaled.T @ target)
        # leave-one-out in closed form (the penalty held fixed): removing row i moves the
        # weights by inverse @ x_i * e_i / (1 - h_i), e_i its residual and h_i its leverage
        errors = target - scaled @ weights
        spread = scaled @ inverse  # row i: (inverse @ x_i)^T
        leverage = np.einsum("ij,ij->i", spread, scaled)
        # a measurement that alone fixes a direction of the features (leverage 1) says
        # nothing about how wrong a fit without it is: its residual is unbounded
        alone = 1.0 - leverage < 1e-6
        moved = spread * (errors / np.where(alone, 1.0, 1.0 - leverage))[:, None]
        self.weights = weights / scale
        self.left_out = (weights[None, :] - moved) / scale[None, :]
        self.range_ms = (float(target.min()) / RANGE_FACTOR, float(target.max()) * RANGE_FACTOR)
        left_out_points = self._clamped(np.einsum("ij,ij->i", self.left_out, features))
        self.residuals = np.where(alone, np.inf, np.abs(np.log(target / left_out_points)))
        self.n_fit = len(samples)
        return True

    def _of_the_space(self, samples: Sequence[Sample], medians_ms: Sequence[float]
                      ) -> Tuple[List[Sample], List[float]]:
        kept: Tuple[List[Sample], List[float]] = ([], [])
        dropped = []
        for sample, median in zip(samples, medians_ms):
            try:
                self.featurize(sample)
            except InvalidSample as exc:
                dropped.append(exc.message)
                continue
            kept[0].append(sample)
            kept[1].append(median)
        if dropped:
            log.warning("left %d stored subnets out of the latency model: they are not the "
                        "space's (first: %s); they come from an import or another version of "
                        "the space", len(dropped), dropped[0])
        return kept

    def _clamped(self, values: np.ndarray) -> np.ndarray:
        # a linear model may swing far from its data (below zero, even); a latency may not
        low, high = self.range_ms
        return np.clip(values, low, high)

    def predict_point(self, sample: Sample) -> float:
        """The predicted median (ms), without an interval."""
        if self.weights is None:
            raise ValueError("the model is not fitted")
        return float(self._clamped(np.array([self.featurize(sample) @ self.weights]))[0])

    def predict(self, sample: Sample, coverage: float) -> Optional[Prediction]:
        """The predicted median and its jackknife+ interval at `coverage` (see the module
        doc); None when not fitted or when too few measurements back that coverage."""
        if self.weights is None or self.left_out is None or self.residuals is None:
            return None
        n = len(self.residuals)
        upper_rank = math.ceil((n + 1) * coverage - 1e-9)  # 1e-9: 50 x 0.98 is 49, not 49.000001
        lower_rank = math.floor((n + 1) * (1.0 - coverage) + 1e-9)
        if upper_rank > n or lower_rank < 1:
            return None
        features = self.featurize(sample)
        logs = np.log(self._clamped(self.left_out @ features))
        low = float(np.sort(logs - self.residuals)[lower_rank - 1])
        high = float(np.sort(logs + self.residuals)[upper_rank - 1])
        return Prediction(self.predict_point(sample), math.exp(low), math.exp(high), coverage)


@dataclass
class ModelAudit:
    """How a model's skips held up when measured anyway: coverage of its intervals, and
    agreement of its decisions with the device's where the device decided (`compared`: an
    undecided measurement's side is its point estimate, no call to agree with)."""

    skipped: int = 0
    audited: int = 0
    covered: int = 0
    compared: int = 0
    agreed: int = 0

    def record(self, prediction: Prediction, measured_median_ms: float,
               agreed: Optional[bool]) -> None:
        """One audited skip: the device's value, and whether its call agreed with the
        model's (None: the device left it undecided)."""
        self.audited += 1
        self.covered += prediction.low_ms <= measured_median_ms <= prediction.high_ms
        if agreed is not None:
            self.compared += 1
            self.agreed += agreed

    def report(self) -> Dict[str, Any]:
        return {"skipped": self.skipped, "audited": self.audited,
                "coverage": self.covered / self.audited if self.audited else None,
                "compared": self.compared,
                "agreement": self.agreed / self.compared if self.compared else None}


def training_data(by_key: Mapping[str, float], labels: Sequence[str]
                  ) -> Tuple[List[Sample], List[float]]:
    """Samples and medians from the cache's sample-keyed statistics (damaged rows left out)."""
    from harness.spaces.space import values_by_sample

    samples, medians = [], []
    for values, median in values_by_sample(by_key, labels).items():
        if isinstance(median, (int, float)) and math.isfinite(median) and median > 0:
            samples.append(dict(zip(labels, values)))
            medians.append(float(median))
    return samples, medians
