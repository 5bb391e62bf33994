"""Interoperation with NNI 3.0: our profilers on an NNI ModelSpace, inside NNI's strategies.

Skips where nni is absent (it is an optional extra; scripts/test installs it in a venv)."""
import pytest
import torch
from torch import nn

nni = pytest.importorskip("nni")
from nni.nas.nn.pytorch import LayerChoice, ModelSpace  # noqa: E402

from harness import LatencyProfiler  # noqa: E402
from harness.metrics.counting import FlopsProfiler, NumParamsProfiler  # noqa: E402
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
    """harness.search.strategies.LatencyLimit as the predicate of NNI's own Filter middleware: what NNI
    evaluates is exactly what the device decided to be below the limit."""
    from nni.nas.evaluator import FunctionalEvaluator
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.space import RawFormatModelSpace
    from nni.nas.strategy import Random
    from nni.nas.strategy.middleware import Chain, Filter

    from harness.search.strategies import LatencyLimit

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


# ---------------------------------------------------------------- per-choice tables

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from harness.errors import HarnessError  # noqa: E402
from harness.search.strategies import ExpectationProfilerPenalty  # noqa: E402
from harness.spaces.space import checked_search_space, random_samples  # noqa: E402


class StagedNet(ModelSpace):
    """LayerChoice, nni.choice (a kernel size) and Repeat: shapes never follow choices."""

    def __init__(self):
        from nni.nas.nn.pytorch import MutableConv2d, Repeat

        super().__init__()
        k = nni.choice("stem_k", [1, 3])
        self.stem = nn.Sequential(MutableConv2d(3, 8, k, padding=(k - 1) // 2), nn.ReLU())
        self.body = Repeat(lambda i: LayerChoice(
            [nn.Sequential(nn.Conv2d(8, 8, k, padding=k // 2, groups=g), nn.BatchNorm2d(8))
             for k, g in ((1, 1), (3, 1), (3, 8))], label=f"b{i}"), (1, 3), label="depth")
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


class WidthNet(ModelSpace):
    """Channel widths are choices: what later layers see follows the sample."""

    def __init__(self):
        from nni.nas.nn.pytorch import MutableConv2d, MutableLinear

        super().__init__()
        w = nni.choice("width", [4, 8, 16])
        self.conv = MutableConv2d(3, w, 3, padding=1)
        self.act = LayerChoice([nn.ReLU(), nn.Identity()], label="act")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = MutableLinear(w, 10)

    def forward(self, x):
        y = self.pool(self.act(self.conv(x)))  # .view: NNI's shape inference fails on flatten
        return self.fc(y.view(y.size(0), -1))


def torch_macs(space, sample, x):
    module = space.freeze(sample).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() / 2


def forbid_freeze(space):
    def freeze(sample):
        raise AssertionError("profile() froze the space: no per-choice table was used")
    space.freeze = freeze


class GlueNet(WidthNet):
    """WidthNet whose own forward computes (a functional linear layer outside its modules):
    no per-choice table, memoized look-ups per module instead."""

    def __init__(self):
        super().__init__()
        self.register_buffer("extra", torch.ones(10, 10))

    def forward(self, x):
        return torch.nn.functional.linear(super().forward(x), self.extra)


@pytest.mark.parametrize("net", [StagedNet, WidthNet, GlueNet])
def test_nni_space_counted_by_per_choice_tables_exactly_as_torch(net):
    space, x = net(), torch.randn(2, 3, 12, 12)
    flops = FlopsProfiler(space, x)
    if net is not GlueNet:  # additive: a sum of per-choice table entries (WidthNet's pool
        assert flops.additive is not None  # and fc see widths its conv's label decides)
    else:
        assert flops.additive is None and flops.nni_tables is not None
        assert "outside its modules" in flops.why_not_additive
    samples = random_samples(space, 12, seed=4)
    expected = [torch_macs(space, s, x) for s in samples]
    forbid_freeze(space)
    assert [flops.profile(s) for s in samples] == expected
    assert flops.uncounted == set()


def test_widths_chosen_upstream_get_terms_with_the_deciding_label():
    """A unit whose input width follows a label upstream (WidthNet's pool and fc) gets a term
    over that label, with one block per width at the shape it sees; a unit whose shapes no
    label near it decides makes the space non-additive, said so."""
    space, x = WidthNet(), torch.randn(2, 3, 12, 12)
    flops = FlopsProfiler(space, x)
    pool = next(t for t in flops.additive._terms
                if any(b is not None and ":pool:" in b.key for b in t.blocks.values()))
    assert "width" in pool.labels
    shapes = sorted({b.input_shape for b in pool.blocks.values() if b is not None})
    assert shapes == [(2, 4, 12, 12), (2, 8, 12, 12), (2, 16, 12, 12)]
    assert flops.nni_tables.block_costs  # counted while tracing, not again


def test_nni_convention_matches_nni_own_flops_profiler():
    """convention='nni' equals NNI's FlopsProfiler; the default (MACs) equals NNI with bias,
    normalisation and activations switched off, and torch's FlopCounterMode / 2."""
    from nni.nas.profiler.pytorch.flops import FlopsProfiler as NniFlops

    for space in (StagedNet(), WidthNet()):
        x = torch.randn(1, 3, 12, 12)
        ours, ours_nni = FlopsProfiler(space, x), FlopsProfiler(space, x, convention="nni")
        theirs = NniFlops(space, x)
        theirs_macs = NniFlops(space, x, count_bias=False, count_normalization=False,
                               count_activation=False)
        for sample in random_samples(space, 8, seed=9):
            assert ours_nni.profile(sample) == float(theirs.profile(sample))
            assert ours.profile(sample) == float(theirs_macs.profile(sample))
            assert ours_nni.profile(sample) > ours.profile(sample)  # bias, BN, ReLU added
    with pytest.raises(ValueError, match="convention"):
        FlopsProfiler(StagedNet(), x, convention="flops")


def test_num_params_on_an_nni_space_by_tables():
    space, x = StagedNet(), torch.randn(1, 3, 12, 12)
    params = NumParamsProfiler(space, x)
    assert params.additive is not None
    for sample in random_samples(space, 5, seed=1):
        assert params.profile(sample) == sum(p.numel() for p in space.freeze(sample).parameters())


def test_input_choice_keeping_several_inputs_is_refused_at_the_space_check():
    from nni.nas.nn.pytorch import InputChoice

    class Cell(ModelSpace):
        def __init__(self):
            super().__init__()
            self.ops = nn.ModuleList(nn.Conv2d(3, 4, k, padding=k // 2) for k in (1, 3, 5))
            self.pick = InputChoice(3, n_chosen=2, reduction="sum", label="pick")

        def forward(self, x):
            return self.pick([op(x) for op in self.ops])

    with pytest.raises(HarnessError, match="chooses several") as info:
        checked_search_space(Cell())
    assert "n_chosen=1" in info.value.fix
    with pytest.raises(HarnessError, match="chooses several"):
        FlopsProfiler(Cell(), torch.randn(1, 3, 8, 8))


def test_expectation_penalty_on_nni_spaces():
    """The penalty works on an NNI ModelSpace (it failed with AttributeError), its gradient
    reaches every label; where there is no per-choice table it says why."""
    space, x = StagedNet(), torch.randn(1, 3, 12, 12)
    flops = FlopsProfiler(space, x)
    choices = checked_search_space(space)
    alphas = {label: torch.zeros(len(v), requires_grad=True) for label, v in choices.items()}
    penalty = ExpectationProfilerPenalty(flops, baseline=flops.profile(random_samples(space, 1)[0]))
    loss, details = penalty(torch.tensor(0.0), {k: a.softmax(-1) for k, a in alphas.items()})
    loss.backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in alphas.values())
    sample = random_samples(space, 1, seed=3)[0]
    one_hot = {label: {v: float(v == sample[label]) for v in values}  # NNI's form
               for label, values in choices.items()}
    assert penalty(0.0, one_hot)[1]["penalty"] == pytest.approx(flops.profile(sample))

    width = WidthNet()  # widths chosen upstream: terms over the deciding label
    wflops = FlopsProfiler(width, x)
    one_hot = {"width": {4: 0.0, 8: 1.0, 16: 0.0}, "act": {0: 1.0, 1: 0.0}}
    assert ExpectationProfilerPenalty(wflops, baseline=1.0)(0.0, one_hot)[1]["penalty"] == \
        pytest.approx(wflops.profile({"width": 8, "act": 0}))
    glue = FlopsProfiler(GlueNet(), x)
    with pytest.raises(TypeError, match="no per-choice table"):
        ExpectationProfilerPenalty(glue, baseline=1.0)(0.0, one_hot)


def test_nni_darts_with_our_penalty_moves_the_space_towards_cheaper_choices():
    """A few steps of NNI's own DARTS strategy, our penalty bound to its architecture
    parameters: every label ends up preferring its cheaper choices."""
    from nni.nas.evaluator.pytorch import Classification, DataLoader
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.space import RawFormatModelSpace
    from nni.nas.strategy import DARTS

    from harness.search import nni_oneshot

    space, x = StagedNet(), torch.randn(1, 3, 8, 8)
    flops = FlopsProfiler(space, x)
    middle = {"stem_k": 1, "depth": 2, "b0": 1, "b1": 1, "b2": 1}
    penalty = nni_oneshot.ExpectationProfilerPenalty(flops, baseline=flops.profile(middle),
                                                     scale=10.0)
    strategy = DARTS(penalty=penalty, arc_learning_rate=0.1)  # NNI accepts it as its own
    penalty.bind(strategy)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    evaluator = Classification(
        train_dataloaders=DataLoader(data, batch_size=4), val_dataloaders=DataLoader(data, batch_size=4),
        num_classes=10, max_epochs=1, enable_progress_bar=False, logger=False,
        enable_checkpointing=False, enable_model_summary=False)
    strategy(RawFormatModelSpace.from_model(space, evaluator), SequentialExecutionEngine())
    probs = {label: torch.softmax(alpha.detach(), -1).tolist()
             for label, alpha in strategy._arch_parameters.items()}
    choices = checked_search_space(space)
    for label, p in probs.items():
        cost = []
        for value in choices[label]:  # the label's own cost, others at the middle sample
            cost.append(flops.profile({**middle, "depth": 3, label: value}))
        cheapest = min(range(len(cost)), key=cost.__getitem__)
        if len(set(cost)) > 1:  # started uniform (alphas ~ 0)
            assert p[cheapest] > 1 / len(p) + 0.05, (label, p, cost)
            assert p[cheapest] == max(p) or cost[p.index(max(p))] < 1.01 * cost[cheapest]


def test_sample_penalty_and_range_filter_for_nni_strategies():
    from nni.nas.oneshot.pytorch import profiler as nni_profiler

    from harness.search import nni_oneshot

    space, x = StagedNet(), torch.randn(1, 3, 12, 12)
    flops = FlopsProfiler(space, x)
    sample = random_samples(space, 1, seed=2)[0]
    value = flops.profile(sample)
    penalty = nni_oneshot.SampleProfilerPenalty(flops, baseline=value / 2)
    assert isinstance(penalty, nni_profiler.SampleProfilerPenalty)
    loss, details = penalty(torch.tensor(1.0), sample)
    assert float(loss) == pytest.approx(2.0) and details["penalty"] == value
    keep = nni_oneshot.RangeProfilerFilter(flops, max=value)
    assert isinstance(keep, nni_profiler.ProfilerFilter)
    assert keep.filter(sample) and keep(sample)
    assert not nni_oneshot.RangeProfilerFilter(flops, max=value - 1).filter(sample)
    expectation = nni_oneshot.ExpectationProfilerPenalty(flops, baseline=value)
    assert isinstance(expectation, nni_profiler.ExpectationProfilerPenalty)
    with pytest.raises(RuntimeError, match="no architecture parameters"):
        expectation.bind(object())(0.0, {})


def test_latency_lookup_table_of_an_nni_space():
    from harness.search.lut import LatencyLUT

    space, x = StagedNet(), torch.randn(1, 3, 12, 12)
    with LatencyProfiler(space, x, settings=FAST) as latency:
        lut = LatencyLUT.build(space, x, latency)
        report = lut.additivity_error(random_samples(space, 2, seed=5), latency)
    # stem conv (2 kernel sizes) + its ReLU + 3 positions x 3 candidates + the head
    assert len(lut.block_ms) == 2 + 1 + 9 + 1
    assert report["samples"] == 2 and lut.fixed_ms > 0
    probs = {label: torch.full((len(v),), 1 / len(v), requires_grad=True)
             for label, v in lut.additive.choices.items()}
    lut.expected(probs).backward()
    assert all(p.grad is not None for p in probs.values())


def test_a_space_that_cannot_be_decomposed_says_what_and_is_counted_exactly(caplog):
    import logging

    from nni.nas.nn.pytorch import MutableModule

    class Opaque(MutableModule):
        """A mutable module of its own around a LayerChoice: its forward is its business."""

        def __init__(self):
            super().__init__()
            self.inner = LayerChoice([nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 3, padding=1)],
                                     label="inner")

        def forward(self, x):
            return self.inner(x) * 2

    class Net(ModelSpace):
        def __init__(self):
            super().__init__()
            self.opaque = Opaque()
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

        def forward(self, x):
            return self.head(self.opaque(x))

    space, x = Net(), torch.randn(1, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="harness"):
        flops = FlopsProfiler(space, x)
    assert flops.additive is None and flops.nni_tables is None
    assert "opaque: a Opaque (a mutable module of its own) holds" in flops.why_not_additive
    assert "cannot be decomposed" in caplog.text
    for sample in ({"inner": 0}, {"inner": 1}):
        assert flops.profile(sample) == torch_macs(space, sample, x)


def test_mobilenetv3_space_has_per_choice_tables_despite_its_widths():
    """NNI's MobileNetV3Space chooses widths and expansion ratios, so what its modules see
    follows the sample: it still gets additive tables (each module's input shape decided by
    its own labels or its predecessors'), and their sums equal torch's count of the frozen
    subnets."""
    from nni.nas.hub.pytorch import MobileNetV3Space

    space, x = MobileNetV3Space(), torch.randn(1, 3, 64, 64)
    flops = FlopsProfiler(space, x)
    assert flops.additive is not None, flops.why_not_additive
    samples = random_samples(space, 3, seed=8)
    expected = [torch_macs(space, s, x) for s in samples]
    forbid_freeze(space)
    assert [flops.profile(s) for s in samples] == expected


def test_a_lookup_table_of_a_space_without_tables_says_why():
    """An NNI space whose own forward computes outside its modules has no per-block table:
    the lookup table's error names that reason, not a generic one."""
    from harness.search.lut import LatencyLUT

    with pytest.raises(HarnessError, match="outside its modules.*no per-block lookup table"):
        LatencyLUT(GlueNet(), torch.randn(2, 3, 12, 12), {})
