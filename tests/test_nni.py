"""Interoperation with NNI 3.0: our profilers on an NNI ModelSpace, inside NNI's strategies.

Skips where nni is absent (it is an optional extra; scripts/test installs it in a venv)."""
import pytest
import torch
from torch import nn

nni = pytest.importorskip("nni")
from nni.nas.nn.pytorch import LayerChoice, ModelSpace  # noqa: E402

from harness import LatencyProfiler  # noqa: E402
from harness.counting import FlopsProfiler, NumParamsProfiler  # noqa: E402
from tests.conftest import FAST  # noqa: E402


class NniNet(ModelSpace):
    def __init__(self):
        super().__init__()
        self.conv = LayerChoice([nn.Conv2d(3, 8, k, padding=k // 2) for k in (3, 5, 7)],
                                label="conv")
        self.act = LayerChoice([nn.ReLU(), nn.Identity()], label="act")
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.act(self.conv(x)))


def test_profilers_accept_an_nni_model_space():
    space, x = NniNet(), torch.randn(1, 3, 16, 16)
    flops = FlopsProfiler(space, x)
    assert [flops.profile({"conv": c, "act": 0}) for c in (0, 1, 2)] == [
        8 * 3 * k * k * 256 + 80 for k in (3, 5, 7)]
    assert NumParamsProfiler(space, x).profile({"conv": 2, "act": 1}) == 8 * 3 * 49 + 8 + 90
    with LatencyProfiler(space, x, settings=FAST) as latency:
        assert latency.measure({"conv": 1, "act": 0}).source == "measured"
        assert latency.measure({"conv": 1, "act": 0}).source == "cached"


def test_inside_nni_chain_random_filter():
    from nni.nas.evaluator import FunctionalEvaluator
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.space import RawFormatModelSpace
    from nni.nas.strategy import Random
    from nni.nas.strategy.middleware import Chain, Filter

    space, x = NniNet(), torch.randn(1, 3, 16, 16)
    flops = FlopsProfiler(space, x)
    limit = 8 * 3 * 25 * 256 + 80  # conv 3x3 and 5x5 pass, 7x7 does not

    def evaluate(model):
        nni.report_final_result(1.0)

    engine = SequentialExecutionEngine(max_model_count=10)
    strategy = Chain(Random(dedup=True), Filter(lambda m: flops.profile(m.sample) <= limit))
    strategy(RawFormatModelSpace.from_model(space, FunctionalEvaluator(evaluate)), engine)
    evaluated = [m.sample for m in engine.list_models()]
    assert sorted((s["conv"], s["act"]) for s in evaluated) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_latency_limit_inside_nni_filter():
    """harness.search.LatencyLimit as the predicate of NNI's own Filter middleware: what NNI
    evaluates is exactly what the device decided to be below the limit."""
    from nni.nas.evaluator import FunctionalEvaluator
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.space import RawFormatModelSpace
    from nni.nas.strategy import Random
    from nni.nas.strategy.middleware import Chain, Filter

    from harness.search import LatencyLimit

    space, x = NniNet(), torch.randn(1, 3, 16, 16)
    with LatencyProfiler(space, x, settings=FAST) as latency:
        medians = {(c, a): latency.measure({"conv": c, "act": a}).median
                   for c in range(3) for a in range(2)}
        limit = LatencyLimit(latency, max(medians.values()) * 20)  # every subnet passes

        def evaluate(model):
            nni.report_final_result(1.0)

        engine = SequentialExecutionEngine(max_model_count=6)
        strategy = Chain(Random(dedup=True), Filter(lambda m: limit(m.sample)))
        strategy(RawFormatModelSpace.from_model(space, FunctionalEvaluator(evaluate)), engine)
    evaluated = sorted((m.sample["conv"], m.sample["act"]) for m in engine.list_models())
    assert evaluated == sorted(medians) and all(d.below for d in limit.decisions)
    assert {d.source for d in limit.decisions} == {"cached"}  # answered by the measurements
