"""Search integration: strategies, Filter modes, chained constraints, one-shot penalties, LUT."""
import json

import pytest
import torch

from harness import LatencyProfiler, random_samples
from harness.metrics.counting import FlopsProfiler, NumParamsProfiler
from harness.errors import HarnessError
from harness.search.lut import LatencyLUT
from harness.search.strategies import (Chain, ExpectationProfilerPenalty, Filter, Random, RangeProfilerFilter,
                            RegularizedEvolution, SampleProfilerPenalty, SearchExhausted,
                            run_search)
from harness.spaces.space import sample_key
from harness.spaces import TinySpace
from tests.conftest import FAST


@pytest.fixture
def space():
    return TinySpace()


@pytest.fixture
def flops(space):
    return FlopsProfiler(space, space.dummy_input())


def test_random_is_seeded_and_dedups(space):
    a = [Random(space, seed=1).propose() for _ in range(1)]
    assert a == [Random(space, seed=1).propose()]
    strategy = Random(space, seed=2)
    keys = [sample_key(strategy.propose()) for _ in range(300)]
    assert len(set(keys)) == 300


def test_filter_discards_and_chain_checks_the_cheap_constraint_first(space, flops):
    limit = sorted(flops.profile(s) for s in random_samples(space, 200, seed=0))[100]
    expensive_calls = []

    def expensive(sample):
        assert flops.profile(sample) < limit, "a sample that fails the FLOPs filter got through"
        expensive_calls.append(sample)
        return True

    first, second = Filter(lambda s: flops.profile(s) < limit), Filter(expensive)
    result = run_search(Chain(Random(space, seed=3), first, second), lambda s: 1.0, budget=20)
    assert len(result.history) == 20
    assert first.rejected > 0 and first.passed == 20 == len(expensive_calls)


def test_latency_filter_after_a_flops_filter_never_touches_the_device_for_violators(space, flops):
    limit = sorted(flops.profile(s) for s in random_samples(space, 200, seed=0))[60]
    with LatencyProfiler(space, space.dummy_input(), settings=FAST) as latency:
        cheap = Filter(lambda s: flops.profile(s) < limit)
        on_device = Filter(lambda s: latency.profile(s) < 1e9)
        run_search(Chain(Random(space, seed=4), cheap, on_device), lambda s: 0.0, budget=5)
        assert cheap.rejected > 0
        assert latency.counters["exports"] == 5 and latency.counters["measurements"] <= 5


def test_bad_metric_mode_teaches_the_strategy(space, flops):
    limit = sorted(flops.profile(s) for s in random_samples(space, 200, seed=0))[50]
    evolution = RegularizedEvolution(space, population_size=10, sample_size=3, seed=5)
    gate = Filter(lambda s: flops.profile(s) < limit, metric_for_invalid=-1.0)
    result = run_search(Chain(evolution, gate), lambda s: flops.profile(s) / limit, budget=30)
    assert gate.rejected > 0
    assert all(metric < 1 for _, metric in result.history)
    assert any(metric == -1.0 for _, metric in evolution.population) or gate.rejected >= 10


def test_filter_gives_up_after_patience(space):
    with pytest.raises(SearchExhausted, match="rejected 25 samples in a row"):
        run_search(Chain(Random(space, seed=6), Filter(lambda s: False, patience=25)),
                   lambda s: 0.0, budget=5)


def test_evolution_beats_random_on_a_simple_objective(space, flops):
    objective = lambda s: -flops.profile(s)  # noqa: E731  (smallest model wins)
    evolved = run_search(RegularizedEvolution(space, population_size=10, sample_size=5, seed=7),
                         objective, budget=120)
    best_possible = -min(flops.profile(s) for s in random_samples(space, 3000, seed=8))
    assert evolved.best[1] >= best_possible * 1.001 or evolved.best[1] == best_possible


def test_expected_cost_gradient_moves_architecture_towards_cheaper_choices(space, flops):
    choices = flops.additive.choices
    alphas = {label: torch.zeros(len(values), requires_grad=True) for label, values in choices.items()}
    penalty = ExpectationProfilerPenalty(flops, baseline=2e5, scale=1.0, nonlinear="positive")
    optimizer = torch.optim.SGD(list(alphas.values()), lr=0.5)
    history = []
    for _ in range(5):
        probs = {label: torch.softmax(alpha, 0).double() for label, alpha in alphas.items()}
        loss, details = penalty(torch.tensor(0.0, dtype=torch.float64), probs)
        optimizer.zero_grad()
        loss.backward()
        for label, alpha in alphas.items():
            # A residual skip is an addition: no multiply-accumulates, so no gradient.
            assert (alpha.grad.abs().sum() > 0) != label.endswith(".skip"), label
        optimizer.step()
        history.append(details["penalty"])
    assert history == sorted(history, reverse=True) and history[-1] < history[0]
    kernel = torch.softmax(alphas["stage2.block0.kernel"], 0)
    assert kernel[0] > kernel[1] > kernel[2]  # 3x3 is now likelier than 7x7
    expand = torch.softmax(alphas["stage1.block0.expand"], 0)
    assert expand[0] > expand[1]              # expansion 1 over 3


def test_expectation_accepts_nni_style_distributions_and_matches_brute_force(space, flops):
    uniform = {label: {v: 1 / len(values) for v in values}
               for label, values in flops.additive.choices.items()}
    penalty = ExpectationProfilerPenalty(flops, baseline=1.0, aggregate="mul", scale=1.0)
    loss, details = penalty(torch.tensor(1.0, dtype=torch.float64), uniform)
    from harness.spaces.space import enumerate_samples
    brute = [flops.profile(s) for s in enumerate_samples(space)]
    assert details["penalty"] == pytest.approx(sum(brute) / len(brute))
    assert float(loss) == pytest.approx(details["penalty"])  # 1 * (1 + (E/1 - 1)) ** 1
    with pytest.raises(TypeError, match="expected cost"):
        ExpectationProfilerPenalty(object(), 1.0)(0.0, uniform)


def test_sample_penalty_and_range_filter(space, flops):
    sample = random_samples(space, 1, seed=9)[0]
    value = flops.profile(sample)
    loss, details = SampleProfilerPenalty(flops, baseline=value / 2, nonlinear="positive")(
        torch.tensor(0.5), sample)
    assert float(loss) == pytest.approx(1.5) and details["normalized_penalty"] == pytest.approx(1.0)
    loss, _ = SampleProfilerPenalty(flops, baseline=value * 2, nonlinear="negative")(0.5, sample)
    assert float(loss) == pytest.approx(0.0)
    assert RangeProfilerFilter(flops, value - 1, value + 1)(sample)
    assert not RangeProfilerFilter(flops, max=value - 1)(sample)
    assert RangeProfilerFilter(NumParamsProfiler(space, space.dummy_input()), min=1)(sample)


def test_latency_lookup_table_on_the_device(space):
    with LatencyProfiler(space, space.dummy_input(), settings=FAST) as latency:
        lut = LatencyLUT.build(space, space.dummy_input(), latency)
        blocks = len(lut.block_ms)
        # stem + head + (3 kernels x 2 expansions) per block 0 and x2 skips per block 1,
        # less stage 1's block 1 without skip, the same module at the same shape as block 0.
        assert blocks == 2 + 2 * (3 * 2) + 2 * (3 * 2 * 2) - 3 * 2
        sample = random_samples(space, 1, seed=10)[0]
        assert lut.profile(sample) > 0
        report = lut.additivity_error(random_samples(space, 3, seed=11), latency)
        assert report["samples"] == 3 and report["max_abs_error"] >= report["mean_abs_error"] >= 0
        measured = latency.counters["measurements"]
        again = LatencyLUT.build(space, space.dummy_input(), latency)  # all from the cache
        assert latency.counters["measurements"] == measured
        assert again.block_ms == lut.block_ms
    probs = {label: torch.full((len(v),), 1 / len(v), dtype=torch.float64, requires_grad=True)
             for label, v in lut.additive.choices.items()}
    expected = lut.expected(probs)
    expected.backward()
    assert probs["stage1.block0.kernel"].grad is not None


def test_a_lookup_table_in_rounds_times_blocks_and_wholes_in_the_same_windows(space):
    """Under the rounds protocol, blocks, fixed costs and the whole subnets a table is fitted
    and checked on are timed in the same windows beside the reference (quiet-state
    latencies); additivity_error then reads the wholes from the cache."""
    settings = {"protocol": "rounds", "rounds": 8, "block_ms": 2.0, "ref_gap_ms": 10.0,
                "warmup_runs": 1}
    checks = random_samples(space, 2, seed=11)
    with LatencyProfiler(space, space.dummy_input(), settings=settings) as latency:
        assert latency.statistic == "quiet"
        lut = LatencyLUT.build(space, space.dummy_input(), latency,
                               fit_samples=random_samples(space, 2, seed=3),
                               check_samples=checks)
        measured = latency.counters["measurements"]
        windows = {tuple(m.provenance.lease) for _, m in latency.cache.newest_measurements()}
        report = lut.additivity_error(checks, latency)
        assert latency.counters["measurements"] == measured  # the wholes from the cache
    assert measured == len(lut.block_ms) + len(lut.overhead_ms) + 4
    assert len(windows) < measured / 10  # together, not one window each
    assert report["samples"] == 2 and report["mean_abs_error"] >= 0


def test_lut_counts_the_fixed_cost_of_a_run_once_not_once_per_block(space):
    """Each block's measurement pays the run's fixed cost (an identity model at its input
    shape): the table subtracts it per block and adds the identity at the subnet input once."""
    from harness.spaces.additive import chosen_blocks

    with LatencyProfiler(space, space.dummy_input(), settings=FAST) as latency:
        lut = LatencyLUT.build(space, space.dummy_input(), latency)
    input_shape = tuple(space.dummy_input().shape)
    blocks = list(chosen_blocks(space.additive_terms(input_shape), random_samples(space, 1)[0]))
    assert {b.input_shape for b in blocks} | {input_shape} <= set(lut.overhead_ms)
    assert all(ms > 0 for ms in lut.overhead_ms.values())
    sample = random_samples(space, 1)[0]
    expected = lut.overhead_ms[input_shape] + sum(
        max(lut.block_ms[b.key] - lut.overhead_ms[b.input_shape], 0.0) for b in blocks)
    assert lut.profile(sample) == pytest.approx(expected)
    assert lut.profile_uncorrected(sample) == pytest.approx(sum(lut.block_ms[b.key] for b in blocks))
    assert lut.profile(sample) < lut.profile_uncorrected(sample)
    probs = {label: torch.eye(len(v), dtype=torch.float64)[v.index(sample[label])]
             for label, v in lut.additive.choices.items()}
    assert float(lut.expected(probs)) == pytest.approx(lut.profile(sample))


def test_lut_round_trip(space, tmp_path):
    with LatencyProfiler(space, space.dummy_input(), settings=FAST) as latency:
        lut = LatencyLUT.build(space, space.dummy_input(), latency)
    lut.save(tmp_path / "lut.json")
    loaded = LatencyLUT.load(tmp_path / "lut.json", space, space.dummy_input())
    sample = random_samples(space, 1, seed=12)[0]
    assert loaded.profile(sample) == lut.profile(sample)
    assert loaded.overhead_ms == lut.overhead_ms and loaded.fixed_ms > 0
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(HarnessError, match="cannot read the lookup table"):
        LatencyLUT.load(tmp_path / "bad.json", space, space.dummy_input())


def test_latency_constrained_search_script(tmp_path, home):
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "scripts" / "latency_constrained_search.py"
    png = tmp_path / "front.png"
    proc = subprocess.run([sys.executable, str(script), "--space", "harness.spaces:TinySpace",
                           "--latency-ms", "1000", "--budget", "4", "--strategy", "random",
                           "--min-time-ms", "5", "--png", str(png)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, HARNESS_HOME=str(home)))
    assert proc.returncode == 0, proc.stderr
    assert "4 samples within 1000.0 ms on local" in proc.stdout and "best sample" in proc.stdout
    assert "0 rejected by the FLOPs filter" in proc.stdout
    spread = float(proc.stdout.split("proxy (naswot) over 4 samples:")[1].split("spread")[1]
                   .split(",")[0])
    assert spread > 0.1  # the proxy tells architectures apart (SynFlow spanned 0.0005)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _TableMinusScaledOverhead:
    """Stands in for a device whose whole subnets cost exactly the table's blocks less 0.4
    of their identity costs: what the fit must find."""

    def __init__(self, lut):
        self.lut = lut

    def profile(self, sample):
        values = self.lut._validate.values(sample)
        raw = self.lut._raw.total(values)
        at_one = self.lut._identity_net().total(values) + self.lut._corrected(1.0)[0]
        return raw - 0.4 * (raw - at_one)


def test_lut_fits_the_scale_of_the_fixed_cost_on_whole_subnets(space, tmp_path):
    """With fit_samples the table fits one factor on the identity costs from whole subnets
    measured on the device, keeps it (saved and loaded), and reports the error with the plain
    identity correction beside the fitted one."""
    with LatencyProfiler(space, space.dummy_input(), settings=FAST) as latency:
        lut = LatencyLUT.build(space, space.dummy_input(), latency,
                               fit_samples=random_samples(space, 4, seed=5))
        assert 0.0 <= lut.overhead_scale <= 4.0
        report = lut.additivity_error(random_samples(space, 3, seed=11), latency)
    assert report["overhead_scale"] == lut.overhead_scale
    assert {"mean_abs_error_identity", "mean_abs_error_uncorrected"} <= set(report)
    lut.save(tmp_path / "lut.json")
    loaded = LatencyLUT.load(tmp_path / "lut.json", space, space.dummy_input())
    sample = random_samples(space, 1, seed=12)[0]
    assert loaded.overhead_scale == lut.overhead_scale
    assert loaded.profile(sample) == pytest.approx(lut.profile(sample))
    # the fit itself: a device that pays 0.4 of the identity costs is found to
    plain = LatencyLUT(space, space.dummy_input(), lut.block_ms, overhead_ms=lut.overhead_ms)
    device = _TableMinusScaledOverhead(plain)
    scale = plain.fit_overhead_scale(random_samples(space, 6, seed=2), device)
    assert scale == pytest.approx(0.4, abs=0.05)  # blocks clamped at 0 ms bend it a little
    data = json.loads((tmp_path / "lut.json").read_text())
    data["overhead_scale"] = float("nan")
    (tmp_path / "nan.json").write_text(json.dumps(data))
    with pytest.raises(HarnessError, match="overhead scale"):
        LatencyLUT.load(tmp_path / "nan.json", space, space.dummy_input())
