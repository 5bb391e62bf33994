"""A per-device latency model, learned from the device's own measurements, with honest
(split-conformal) prediction intervals.

Features cost microseconds: for a space with per-block terms (harness.spaces.additive), which
candidate blocks a subnet builds (so the model is a learned lookup table plus the fixed cost
of a run); for any other space, which choice each label takes. A ridge regression on those
features predicts the median latency; the interval comes from split-conformal calibration:
the model is fitted on part of the measurements and its relative errors on the rest (never
seen in fitting) set how wide an interval must be to cover a new subnet with the asked
probability. With fewer measurements than that coverage needs, there is no interval (None),
and a decision measures instead of trusting the model.
"""
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from harness.spaces.additive import chosen_blocks, distinct_blocks
from harness.export.graph import DummyInput, as_input_tuple
from harness.errors import InvalidSample
from harness.spaces.space import ModelSpace, Sample, SampleValidator, checked_search_space

log = logging.getLogger(__name__)

MIN_MEASUREMENTS = 20   # fewer than this: the model does not fit, and says so
CALIBRATION_SHARE = 0.5  # of the measurements, held out to calibrate the intervals
# Ridge penalty on the per-feature costs (not on the fixed cost), as a share of the features'
# mean square: with fewer subnets than blocks, costs shrink towards each other instead of
# swinging wildly; predictions also stay within a factor 2 of the latencies it was fitted on.
RIDGE = 0.05
RANGE_FACTOR = 2.0


def featurizer(space: ModelSpace, dummy_input: DummyInput,
               labels: Sequence[str]) -> Callable[[Sample], np.ndarray]:
    """The cheap features of a sample: chosen blocks (additive spaces) or chosen values.
    A sample that is not one of the space's (an imported sample-index row naming a choice
    the space lacks) raises InvalidSample, never a KeyError from deep inside."""
    terms_of = getattr(space, "additive_terms", None)
    inputs = as_input_tuple(dummy_input)
    choices = checked_search_space(space)
    validate = SampleValidator(choices)
    if callable(terms_of) and len(inputs) == 1:
        terms = terms_of(tuple(inputs[0].shape))
        index = {block.key: i for i, block in enumerate(distinct_blocks(terms))}

        def blocks(sample: Sample) -> np.ndarray:
            validate(sample)
            vector = np.zeros(len(index) + 1)
            vector[-1] = 1.0  # the fixed cost of a run
            for block in chosen_blocks(terms, sample):
                vector[index[block.key]] += 1.0
            return vector
        return blocks
    slots = {(label, repr(value)): i for i, (label, value) in enumerate(
        (label, value) for label in labels for value in choices[label])}

    def values(sample: Sample) -> np.ndarray:
        validate(sample)
        vector = np.zeros(len(slots) + 1)
        vector[-1] = 1.0
        for label in labels:
            vector[slots[(label, repr(sample[label]))]] = 1.0
        return vector
    return values


@dataclass(frozen=True)
class Prediction:
    """A predicted median (ms) and its interval at `coverage`."""

    median_ms: float
    low_ms: float
    high_ms: float
    coverage: float


class LatencyModel:
    """Fitted on one device's measured medians of one space's subnets; see the module doc."""

    def __init__(self, featurize: Callable[[Sample], np.ndarray]):
        self.featurize = featurize
        self.weights: Optional[np.ndarray] = None
        self.residuals: List[float] = []  # sorted |log(measured / predicted)| on held-out data
        self.range_ms = (0.0, math.inf)
        self.n_fit = 0

    @property
    def fitted(self) -> bool:
        return self.weights is not None

    def fit(self, samples: Sequence[Sample], medians_ms: Sequence[float], seed: int = 0) -> bool:
        """Fit on measured medians; False (and not fitted) with fewer than MIN_MEASUREMENTS.
        Samples that are not the space's (imported rows naming choices it lacks) are left
        out, with a warning."""
        samples, medians_ms = self._of_the_space(samples, medians_ms)
        if len(samples) < MIN_MEASUREMENTS:
            self.weights, self.residuals, self.n_fit = None, [], len(samples)
            return False
        order = list(range(len(samples)))
        random.Random(seed).shuffle(order)
        held = max(1, int(len(order) * CALIBRATION_SHARE))
        train, calibration = order[held:], order[:held]
        features = np.array([self.featurize(samples[i]) for i in train])
        target = np.array([medians_ms[i] for i in train], dtype=float)
        gram = features.T @ features
        penalty = RIDGE * max(float(np.mean(np.diag(gram))), 1e-12) * np.eye(gram.shape[0])
        penalty[-1, -1] = 0.0  # the fixed cost of a run (the last feature) is not shrunk
        self.weights = np.linalg.solve(gram + penalty + 1e-9 * np.eye(gram.shape[0]),
                                       features.T @ target)
        self.range_ms = (float(target.min()) / RANGE_FACTOR, float(target.max()) * RANGE_FACTOR)
        self.residuals = sorted(abs(math.log(medians_ms[i] / self._point(samples[i])))
                                for i in calibration)
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

    def _point(self, sample: Sample) -> float:
        assert self.weights is not None
        # a linear model may swing far from its data (below zero, even); a latency may not
        low, high = self.range_ms
        return min(max(float(self.featurize(sample) @ self.weights), low), high)

    def predict_point(self, sample: Sample) -> float:
        """The predicted median (ms), without an interval."""
        if self.weights is None:
            raise ValueError("the model is not fitted")
        return self._point(sample)

    def predict(self, sample: Sample, coverage: float) -> Optional[Prediction]:
        """The predicted median and its split-conformal interval covering the true median
        with probability >= `coverage`; None when not fitted or when too few held-out
        measurements back that coverage."""
        if self.weights is None or not self.residuals:
            return None
        n = len(self.residuals)
        rank = math.ceil((n + 1) * coverage)
        if rank > n:
            return None
        width = self.residuals[rank - 1]
        point = self._point(sample)
        return Prediction(point, point * math.exp(-width), point * math.exp(width), coverage)


@dataclass
class ModelAudit:
    """How a model's skips held up when measured anyway: coverage of its intervals and
    agreement of its decisions with the device's."""

    skipped: int = 0
    audited: int = 0
    covered: int = 0
    agreed: int = 0

    def record(self, prediction: Prediction, measured_median_ms: float, agreed: bool) -> None:
        self.audited += 1
        self.covered += prediction.low_ms <= measured_median_ms <= prediction.high_ms
        self.agreed += agreed

    def report(self) -> Dict[str, Any]:
        return {"skipped": self.skipped, "audited": self.audited,
                "coverage": self.covered / self.audited if self.audited else None,
                "agreement": self.agreed / self.audited if self.audited else None}


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
