"""Interleaved rounds: the agent's schedule, the ratio arithmetic, and the protocol through a
profiler on this machine (real agent, real onnxruntime, real SQLite)."""
import bisect
import logging
import math
import random
import sqlite3
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from agents import ort_agent
from devices.agent_result import RoundsRecord
from harness import LatencyProfiler, random_samples
from harness.errors import ExportError, InvalidArgument
from harness.export.graph import export_sample
from harness.spaces import TinySpace
from harness.pool.device_pool import MeasureRequest
from harness.steps.measuring import (MEMORY_FACTOR, WINDOW_BUDGET_BYTES, window_budget,
                                     window_request, windows)
from harness.store.rounds import ReferenceLevel, quantile, summarise

FAST = {"protocol": "rounds", "rounds": 6, "block_ms": 2.0, "ref_gap_ms": 6.0,
        "warmup_runs": 2}


def tiny_models(tmp_path, count, seed=0):
    """`count` TinySpace subnets as files: {name: {"model": path, "sha256": hex}}."""
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    models = {}
    for index, sample in enumerate(random_samples(space, count, seed=seed)):
        exported = export_sample(space, sample, dummy, home=tmp_path)
        path = tmp_path / f"m{index}.onnx"
        path.write_bytes(exported.onnx_bytes)
        models[f"m{index}"] = {"model": str(path), "sha256": exported.sha256}
    return models


def test_round_order_is_a_fresh_seeded_shuffle_each_round():
    names = [f"m{i}" for i in range(12)]
    orders = [ort_agent.round_order(names, seed=7, round_index=r) for r in range(5)]
    assert all(sorted(order) == sorted(names) for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # fresh each round
    assert orders == [ort_agent.round_order(names, 7, r) for r in range(5)]  # reproducible
    assert orders != [ort_agent.round_order(names, 8, r) for r in range(5)]


def test_the_agent_tags_every_block_and_brackets_each_candidate_with_references(tmp_path):
    models = tiny_models(tmp_path, 4)
    reference = models.pop("m0")
    answer = ort_agent.handle({"op": "rounds", "models": models, "reference": reference,
                               "settings": dict(FAST, seed=3)})
    assert answer["errors"] == {} and set(answer["results"]) == {"m1", "m2", "m3"}
    first = answer["results"]["m1"]["rounds"]
    references = first["reference_blocks"]
    for name, result in answer["results"].items():
        record = RoundsRecord.from_dict(result["rounds"])
        assert record.completed == FAST["rounds"] == len(record.blocks)
        assert [block[0] for block in record.blocks] == list(range(FAST["rounds"]))
        assert all(len(block[3]) == record.k for block in record.blocks)
        assert result["samples_ms"] == [ms for block in record.blocks for ms in block[3]]
        # one thread on the caller's: each run timed by the thread's CPU clock too, never
        # longer than its wall time, and the statistics read those CPU times
        assert record.clock == "thread_cpu"
        assert all(len(block[5]) == len(block[3]) and all(
            0 < cpu <= wall + 0.05 for cpu, wall in zip(block[5], block[3]))
            for block in record.blocks + record.reference_blocks)
        ref_sequences = sorted(b[2] for b in references)
        for round_index, position, sequence, *_ in record.blocks:
            assert ref_sequences[0] < sequence < ref_sequences[-1]  # references on both sides
            order = ort_agent.round_order(["m1", "m2", "m3"], 3, round_index)
            assert order[position] == name  # the position is its place in the seeded order
    state = first["state"]  # what competed for the CPU, where the kernel says it
    if Path("/proc/pressure/cpu").exists():
        assert 0 <= state["pressure_share"] and "pressure_avg10" in state
    assert "load1" in state
    # one reference block opens the window; every round closes on one, which opens the next
    assert [b[1] for b in references].count(-1) == 1
    assert {b[0] for b in references if b[1] == 2} == set(range(FAST["rounds"]))
    sequences = sorted([b[2] for b in references] + [
        b[2] for r in answer["results"].values() for b in r["rounds"]["blocks"]])
    assert sequences == list(range(1, len(sequences) + 1))  # one sequence, no gaps


class VirtualClock:
    """A device's clock that moves only when a simulated run takes its time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def model(self, name, run_ms, block_ms, discard_runs=1):
        """A Timed model whose every run takes run_ms on this clock (a block throws one run
        away first unless told otherwise: the schedule's arithmetic below counts it)."""
        def run():
            self.now += run_ms / 1e3
        return ort_agent.Timed(name, run, self, block_ms, discard_runs=discard_runs)


@pytest.mark.parametrize("candidates, run_ms, gap_ms", [(1, 8.0, 100.0), (6, 8.0, 60.0),
                                                     (6, 8.0, 100.0), (6, 8.0, 130.0),
                                                     (3, 60.0, 100.0)])
@pytest.mark.parametrize("ref_share", [0.25, 1.0])
def test_the_reference_takes_at_most_its_share_and_brackets_every_block(candidates, run_ms,
                                                                         gap_ms, ref_share):
    # the reference runs 10 ms: blocks of 3 runs (k=2) for a block_ms of 15, 30 ms each
    clock = VirtualClock()
    settings = ort_agent.parse_settings({"protocol": "rounds", "rounds": 40, "block_ms": 15.0,
                                         "ref_gap_ms": gap_ms, "ref_share": ref_share,
                                         "max_time_ms": 1e9})
    reference = clock.model("ref", 10.0, 15.0)
    models = {f"m{i}": clock.model(f"m{i}", run_ms, 15.0) for i in range(candidates)}
    completed, _, failed, reason = ort_agent.interleave(models, reference, settings, clock)
    assert (completed, failed, reason) == (40, {}, "rounds")
    blocks = [b for model in models.values() for b in model.blocks]
    # every candidate block has a reference block on either side, and the window ends on one
    for model in models.values():
        assert len(ort_agent.block_ratios(model.blocks, reference.blocks)) == completed
    assert max(b[2] for b in reference.blocks) > max(b[2] for b in blocks)
    # no candidate has two blocks between the same two references
    for model in models.values():
        brackets = [bisect.bisect(sorted(b[2] for b in reference.blocks), b[2])
                    for b in model.blocks]
        assert len(set(brackets)) == len(brackets)
    # a reference block came when the candidates since the last took 3 times its length
    # (at a share of 0.25), or before a candidate's second block, or to close the window
    timeline = sorted([(b[2], "ref", sum(b[3])) for b in reference.blocks] + [
        (b[2], name, sum(b[3])) for name, model in models.items() for b in model.blocks])
    # and the candidates' timed ms between two references (the gaps)
    since_ms, since_names, forced, gaps = 0.0, set(), 0, []
    last_ms = timeline[0][2]
    for index, (_, name, ms) in enumerate(timeline[1:], start=1):
        if name != "ref":
            since_ms, since_names = since_ms + ms, since_names | {name}
            continue
        following = timeline[index + 1][1] if index + 1 < len(timeline) else None
        if following is not None and since_ms * ref_share < (1 - ref_share) * last_ms:
            assert following in since_names
            forced += 1
        gaps.append(since_ms)
        since_ms, since_names, last_ms = 0.0, set(), ms
    between = sum(sum(b[3]) for b in sorted(reference.blocks, key=lambda b: b[2])[1:-1])
    share = between / (between + sum(sum(b[3]) for b in blocks))
    # 24 ms blocks (2 timed runs of 8 ms): the gap brings a reference after 2, 4 or 5 of
    # them (60, 100, 130 ms); the share after 4 (3 x 30 ms), and wins over the 60 ms gap
    per_gap = {60.0: 2 if ref_share == 1.0 else 4, 100.0: 4, 130.0: 5}[gap_ms]
    if ref_share == 1.0:  # no bound: each round closes on a reference, which opens the next
        assert {b[0] for b in reference.blocks if b[1] == candidates - 1} == set(range(40))
        assert forced == 0
    elif candidates == 3:  # 180 ms blocks: a reference after each, at 14% of the time
        assert forced == 0 and share < 0.15
    elif candidates == 6:  # if not forced sooner, before a candidate's second block
        assert 0 < forced < len(reference.blocks) / 2 and 0.15 < share <= 0.27
    else:  # a lone candidate alternates with the reference all the same
        assert len(reference.blocks) == completed + 1 == forced + 2
    if candidates == 6:
        assert max(gaps) == pytest.approx(per_gap * 16.0)
        assert sum(gap == pytest.approx(per_gap * 16.0) for gap in gaps) > len(gaps) / 3


def test_a_candidate_that_fails_is_its_own_error_and_a_bad_reference_fails_the_window(tmp_path):
    models = tiny_models(tmp_path, 3)
    reference = models.pop("m0")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    models["broken"] = {"model": str(broken), "sha256": None}
    answer = ort_agent.handle({"op": "rounds", "models": models, "reference": reference,
                               "settings": FAST})
    assert set(answer["results"]) == {"m1", "m2"}
    assert answer["errors"]["broken"]["kind"] == "LOAD"
    failed = ort_agent.handle({"op": "rounds", "models": models,
                               "reference": {"model": str(broken)}, "settings": FAST})
    assert failed["error"]["kind"] == "LOAD" and "reference" in failed["error"]["message"]


@pytest.mark.parametrize("setting, value", [("rounds", 0), ("rounds", 1.5), ("block_ms", 0),
                                            ("block_ms", math.nan), ("ref_gap_ms", -1),
                                            ("ref_share", 0), ("ref_share", 1.5),
                                            ("ref_share", math.nan), ("protocol", "sideways"),
                                            ("protocol", ["rounds"]),
                                            ("discard_runs", -1), ("discard_runs", 1.0),
                                            ("discard_runs", True), ("discard_runs", 11),
                                            ("reference_sessions", 0),
                                            ("reference_sessions", 9),
                                            ("reference_sessions", 2.0),
                                            ("model_sessions", 0), ("model_sessions", 9),
                                            ("model_sessions", 2.0),
                                            ("block_runs", -1), ("block_runs", 1001),
                                            ("block_runs", 2.5), ("block_runs", 5),
                                            ("block_runs", True)])
def test_round_settings_out_of_range_are_refused_naming_the_setting(setting, value):
    with pytest.raises(InvalidArgument, match=setting):
        LatencyProfiler(TinySpace(), torch.randn(1, 3, 32, 32), settings={setting: value})


def test_rounds_warm_a_model_up_with_no_runs_by_default_and_a_loop_with_ten(tmp_path):
    """In rounds each block follows another model, so the window's models run their first
    (cold) run and the probe runs only; a loop keeps its warm-up. A value given is kept, and
    a request switched to the other protocol takes that protocol's default anew."""
    assert ort_agent.parse_settings({"protocol": "rounds"})["warmup_runs"] == 0
    assert ort_agent.parse_settings({})["warmup_runs"] == 10
    assert ort_agent.parse_settings({"protocol": "rounds", "warmup_runs": 3})["warmup_runs"] == 3
    profiler = LatencyProfiler(TinySpace(), torch.randn(1, 3, 32, 32),
                               settings={"protocol": "rounds"})
    assert profiler.request.settings["warmup_runs"] == 0
    assert profiler.request.with_settings(protocol="loop").settings["warmup_runs"] == 10
    models = tiny_models(tmp_path, 3)
    reference = models.pop("m0")
    settings = {key: value for key, value in FAST.items() if key != "warmup_runs"}
    answer = ort_agent.handle({"op": "rounds", "models": models, "reference": reference,
                               "settings": settings})
    assert answer["errors"] == {} and set(answer["results"]) == {"m1", "m2"}
    for result in answer["results"].values():
        assert result["warmup_runs"] == 0 and result["warmup_ms"] < result["first_run_ms"]


def record(candidate, references, k=3):
    """A window with one candidate block per round between two reference blocks."""
    blocks, refs, sequence = [], [], 0
    for round_index, (value, (before, after)) in enumerate(zip(candidate, references)):
        refs.append([round_index, -1, sequence + 1, [before] * k, sequence * 0.1])
        blocks.append([round_index, 0, sequence + 2, [value, value * 1.5, value * 2][:k],
                       sequence * 0.1 + 0.03])
        refs.append([round_index, 0, sequence + 3, [after] * k, sequence * 0.1 + 0.06])
        sequence += 3
    return RoundsRecord.from_dict({"completed": len(candidate), "k": k, "reference_k": k,
                                   "blocks": blocks, "reference_blocks": refs,
                                   "candidates": 1, "seed": 0,
                                   "candidates_ms": sum(sum(b[3]) for b in blocks)})


def test_the_ratios_interval_adds_the_rounds_spread_and_the_systematic_term_in_quadrature():
    # 12 rounds whose block minima spread (ratios 0.40-0.62) at a steady reference: the
    # order-statistic interval of their median, and the systematic term (the block medians
    # read 1.5x the minima), each side the two's hypotenuse: wider than either, narrower
    # than their sum
    candidate = [4.0 + 0.2 * i for i in range(12)]
    summary = summarise(record(candidate, [(10.0, 10.0)] * 12))
    ratio, (low, high) = summary.ratio, summary.ratio_interval
    plain_low, plain_high = summary.order_interval
    assert plain_low < ratio < plain_high and summary.systematic == pytest.approx(ratio * 0.5)
    assert ratio - low == pytest.approx(math.hypot(ratio - plain_low, summary.systematic))
    assert high - ratio == pytest.approx(math.hypot(plain_high - ratio, summary.systematic))
    assert high - ratio < plain_high - ratio + summary.systematic
    assert summary.statistical_half_width == pytest.approx((plain_high - plain_low) / 2 / ratio)


def test_the_ratio_is_the_median_of_block_minima_over_their_nearest_references():
    # the device slows down 2x halfway: raw times double, the ratio to the reference holds
    candidate = [5.0, 5.0, 5.0, 10.0, 10.0, 10.0]
    references = [(10.0, 10.0)] * 3 + [(20.0, 20.0)] * 3
    summary = summarise(record(candidate, references))
    assert summary.ratio == pytest.approx(0.5)
    # the rounds agree exactly; the interval holds the systematic term alone: by block
    # medians (each candidate block runs v, 1.5v, 2v; the references' runs are equal) the
    # ratio is 0.75, 0.25 away
    assert summary.systematic == pytest.approx(0.25)
    assert summary.ratio_interval == (pytest.approx(0.25), pytest.approx(0.75))
    assert summary.order_interval == (pytest.approx(0.5), pytest.approx(0.5))
    assert summary.statistical_half_width == pytest.approx(0.0)
    assert summary.reference_level_ms == pytest.approx(quantile([10.0] * 6 + [20.0] * 6, 0.1))
    assert summary.quiet_ms == pytest.approx(0.5 * summary.reference_level_ms)
    assert summary.rounds == 6 and summary.dropped == 0
    reference_ms = 3 * 2 * 3 * 10.0 + 3 * 2 * 3 * 20.0  # rounds x blocks x runs x ms
    candidate_ms = 4.5 * (3 * 5.0 + 3 * 10.0)            # each block's runs: v, 1.5v, 2v
    assert summary.reference_share == pytest.approx(reference_ms / (reference_ms + candidate_ms))
    assert summarise(record(candidate, references),
                     level=ReferenceLevel.exact(8.0)).quiet_ms == pytest.approx(4.0)


def test_the_interval_of_a_low_quantile_follows_the_binomial_and_covers_nominally():
    """The reference's level is the 10% quantile of its blocks; its interval comes from order
    statistics as the median's does (the same rule at q = 0.5)."""
    values = list(range(1, 101))
    assert ort_agent.quantile_interval(values, 0.5, 0.95) == ort_agent.median_interval(
        values, 0.95) == (40, 61)
    # n = 100, q = 0.1: P(Bin(100, 0.1) <= 4) = 0.024 <= 0.025 < P(<= 5), so the 5th value
    # lies above the quantile with probability at most 2.5%; P(Bin >= 17) = 0.021 likewise
    assert ort_agent.quantile_interval(values, 0.1, 0.95) == (5, 17)
    # 0.9 ** 35 = 0.0250 > 0.025: below 36 values no value lies below the 10% quantile often
    # enough
    assert ort_agent.quantile_interval(values[:35], 0.1, 0.95) is None
    assert ort_agent.quantile_interval(values[:36], 0.1, 0.95) == (1, 8)
    with pytest.raises(ValueError, match="0 < q < 1"):
        ort_agent.quantile_interval(values, 1.0, 0.95)
    rng = random.Random(7)
    truth = math.exp(0.3 * statistics.NormalDist().inv_cdf(0.1))
    for n, trials in ((40, 1500), (300, 800), (2000, 200)):
        covered = 0
        for _ in range(trials):
            blocks = sorted(rng.lognormvariate(0.0, 0.3) for _ in range(n))
            low, high = ort_agent.quantile_interval(blocks, 0.1, 0.95)
            covered += low <= truth <= high
        assert covered / trials >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / trials), (n, covered)


def test_the_quiet_state_latency_carries_the_levels_uncertainty_as_well_as_the_ratios():
    """A lone window's ratio can be known to +-0.2% while the level it is multiplied by is
    known to +-1%: the quiet interval must not be the ratio's alone."""
    rng = random.Random(3)
    spread = [10.0 * (1 + abs(rng.gauss(0, 0.05))) for _ in range(400)]
    level = ReferenceLevel.of(spread)
    low, high = level.interval_ms
    assert low < level.level_ms < high and not level.few_blocks and level.blocks == 400
    ordered = sorted(spread)
    statistical = ort_agent.quantile_interval(ordered, 0.1, 0.95)
    choice = level.level_ms - quantile(ordered, 0.05)  # which low quantile is quiet
    assert choice > 0
    assert (low, high) == (pytest.approx(statistical[0] - choice),
                           pytest.approx(statistical[1] + choice))
    # a tight low tail: a narrow interval
    tight = ReferenceLevel.of([10.0] * 300 + [10.0 + n for n in range(100)])
    assert tight.interval_ms == (pytest.approx(10.0), pytest.approx(10.0))
    few = ReferenceLevel.of(spread[:10])  # too few for an interval: their range, flagged
    assert few.few_blocks and few.interval_ms[1] >= max(spread[:10])

    candidate = [5.0] * 12
    window = record(candidate, [(10.0, 10.0)] * 12, k=1)
    exact = summarise(window, level=ReferenceLevel.exact(level.level_ms))
    assert exact.ratio_interval == (pytest.approx(0.5), pytest.approx(0.5))
    assert exact.quiet_interval_ms == (pytest.approx(0.5 * level.level_ms),) * 2
    carried = summarise(window, level=level)
    assert carried.quiet_ms == exact.quiet_ms
    assert carried.quiet_interval_ms == (pytest.approx(0.5 * low), pytest.approx(0.5 * high))
    assert carried.level_blocks == 400 and not carried.few_level_blocks
    # both uncertain: their relative half-widths add in quadrature, on each side
    wobbly = record([5.0, 5.1, 4.9, 5.05, 4.95, 5.0, 5.2, 4.8, 5.0, 5.0, 5.1, 4.9],
                    [(10.0, 10.0)] * 12, k=1)
    both = summarise(wobbly, level=level)
    ratio_low, ratio_high = both.ratio_interval
    assert ratio_low < both.ratio < ratio_high
    below = math.hypot(1 - ratio_low / both.ratio, 1 - low / level.level_ms)
    above = math.hypot(ratio_high / both.ratio - 1, high / level.level_ms - 1)
    assert both.quiet_interval_ms == (pytest.approx(both.quiet_ms * (1 - below)),
                                      pytest.approx(both.quiet_ms * (1 + above)))
    # the window's own level when no history is given: 24 blocks are too few, and it says so
    alone = summarise(window)
    assert alone.few_level_blocks and alone.level_blocks == 24
    assert any("few reference blocks: 24" in reason for reason in alone.noisy_reasons)


def test_the_reference_is_read_at_the_candidates_time_so_a_steady_drift_divides_out():
    """A device slowing steadily: the reference runs 10.0 ms, then 10.8 ms; a candidate
    block whose timed runs were half done a quarter of the way between the two references'
    sees the reference at 10.2 ms, and its ratio is exact. The plain mean of the two (before
    agent 1.4) read 10.4 ms, 2% off."""
    def block(sequence, middle_s, run_ms):  # one timed run, stamped when it began
        return [0, 0, sequence, [run_ms], middle_s - 0.5 * run_ms / 1e3]

    assert ort_agent.block_middle_s(block(0, 0.1, 10.0)) == pytest.approx(0.1)
    references = [block(0, 0.100, 10.0), block(2, 0.200, 10.8)]
    (ratio, kept), = ort_agent.block_ratios([block(1, 0.125, 5.1)], references)
    assert kept and ratio == pytest.approx(0.5)
    # references that share a middle (or a hostile order of times): their mean; a block
    # outside their span is read at the nearer one, never extrapolated
    (same, _), = ort_agent.block_ratios([block(1, 0.125, 5.2)],
                                        [block(0, 0.1, 10.0), block(2, 0.1, 10.8)])
    assert same == pytest.approx(0.5)
    (outside, _), = ort_agent.block_ratios([block(1, 0.5, 5.4)], references)
    assert outside == pytest.approx(0.5)
    # a reference block of no time (a garbled record) gives no ratio beside it, no crash
    assert ort_agent.block_ratios([block(1, 0.1, 5.0)],
                                  [block(0, 0.1, 0.0), block(2, 0.2, 10.0)]) == []


def test_a_block_whose_references_disagree_is_dropped_and_counted():
    candidate = [5.0, 5.0, 7.0, 5.0]
    references = [(10.0, 10.0), (10.0, 10.0), (10.0, 14.0), (10.0, 10.0)]  # speed changed
    summary = summarise(record(candidate, references))
    assert summary.rounds == 3 and summary.dropped == 1 and summary.ratio == pytest.approx(0.5)
    # the systematic term reads the same blocks by their median: one run per block gives
    # the same ratios, so none, whatever the speed filter dropped
    single = summarise(record(candidate, references, k=1))
    assert single.dropped == 1 and single.systematic == 0.0
    alone = summarise(record([5.0], [(10.0, 14.0)]))  # nothing survives: all, flagged
    # the reference read at the candidate's middle (its timed runs began at 30 ms and took
    # 22.5): 0.398 of the way from 10 to 14 (the references' middles: 15 ms and 81 ms)
    at_block = 10.0 + 4.0 * (0.04125 - 0.015) / (0.081 - 0.015)
    assert alone.unfiltered and alone.ratio == pytest.approx(5.0 / at_block)
    assert any("changed speed around every block" in r for r in alone.noisy_reasons)


def test_blocks_are_read_by_their_cpu_times_where_the_agent_timed_them():
    """A neighbour on the device's own core stretches a candidate's runs on the wall clock
    (the thread waits for its core) and not on the thread's CPU clock: the ratio reads the
    CPU times, so no burst between references moves it; the noise stays the wall's."""
    plain = record([5.0] * 6, [(10.0, 10.0)] * 6).to_dict()
    sliced = dict(plain, clock="thread_cpu")
    for index, block in enumerate(sliced["blocks"]):  # every other block waited 60% longer
        block.append(list(block[3]))
        block[3] = [ms * 1.6 for ms in block[3]] if index % 2 else block[3]
    walls = []
    for index, block in enumerate(sliced["reference_blocks"]):  # so did a few references
        block.append(list(block[3]))
        block[3] = [ms * (1.3 if index % 4 == 1 else 1.1) for ms in block[3]]
        walls.append(min(block[3]))
    by_cpu = summarise(RoundsRecord.from_dict(sliced))
    assert by_cpu.clock == "thread_cpu" and by_cpu.ratio == pytest.approx(0.5)
    assert by_cpu.reference_level_ms == pytest.approx(10.0)  # the level reads CPU times
    mean = sum(walls) / len(walls)  # the noise level is what the wall clock saw
    cv = (sum((w - mean) ** 2 for w in walls) / len(walls)) ** 0.5 / mean
    assert cv > 0.05 and by_cpu.noise == pytest.approx(cv)
    by_wall = summarise(RoundsRecord.from_dict(dict(sliced, clock="wall", blocks=[
        block[:5] for block in sliced["blocks"]], reference_blocks=[
        block[:5] for block in sliced["reference_blocks"]])))
    assert by_wall.clock == "wall" and by_wall.ratio > 0.55  # the wall time's median moved
    again = RoundsRecord.from_dict(RoundsRecord.from_dict(sliced).to_dict())
    assert again == RoundsRecord.from_dict(sliced)  # CPU times and clock round-trip


def cpu_block(good, **change):
    """`good` (a thread_cpu record's dict) with its first block's CPU times changed."""
    data = dict(good)
    data["blocks"] = [list(block) for block in good["blocks"]]
    data["blocks"][0] = data["blocks"][0][:5] + [change["cpu"]] if "cpu" in change \
        else data["blocks"][0][:5]
    return data


@pytest.mark.parametrize("change", [{"cpu": [1.0]}, {"cpu": [1.0, "x", 2.0]},
                                    {"cpu": [1.0, -2.0, 1.0]}, {"cpu": [0.0, 1.0, 1.0]},
                                    {"cpu": [5.0, 9.0, 9.0]}, {}])
def test_cpu_times_that_do_not_match_their_runs_are_refused(change):
    good = record([5.0] * 2, [(10.0, 10.0)] * 2).to_dict()
    for block in good["blocks"] + good["reference_blocks"]:
        block.append(list(block[3]))
    good["clock"] = "thread_cpu"
    RoundsRecord.from_dict(good)
    with pytest.raises(ValueError, match="CPU times|rounds.blocks"):
        RoundsRecord.from_dict(cpu_block(good, **change))
    with pytest.raises(ValueError, match="not one of"):
        RoundsRecord.from_dict(dict(good, clock="sundial"))
    with pytest.raises(ValueError, match="rounds.clock is wall"):
        RoundsRecord.from_dict(dict(good, clock="wall"))


@pytest.mark.parametrize("change, clock", [
    ({}, "thread_cpu"), ({"intra_op_threads": 2}, None), ({"inter_op_threads": 2}, None),
    ({"execution_mode": "parallel"}, None), ({"provider": "XnnpackExecutionProvider"}, None)])
def test_the_cpu_clock_times_runs_only_where_they_compute_on_the_calling_thread(change, clock):
    settings = ort_agent.parse_settings(dict({"protocol": "rounds"}, **change))
    chosen = ort_agent.run_cpu_clock(settings)
    assert (chosen is not None) == (clock is not None)
    assert ort_agent.run_cpu_clock(dict(settings, runtime="litert")) is None  # its own threads


@pytest.mark.parametrize("reads", [[0.0, 0.0], [0.0, 0.5]])  # a coarse clock; one that races
def test_a_thread_clock_that_reads_nothing_sound_leaves_the_wall_clock_alone(reads):
    """A thread clock whose probe reads 0 over a run, or more than the run's wall time, is
    not used: the model's blocks carry wall times only."""
    now = {"wall": 0.0, "cpu": iter(reads * 100)}

    def run():
        now["wall"] += 0.001

    timed = ort_agent.Timed("m", run, lambda: now["wall"], 2.0,
                            cpu_clock=lambda: next(now["cpu"]))
    assert timed.cpu_clock is None
    timed.block(0, 0, 1, 0.0)
    assert len(timed.blocks[0]) == 5
    # in a window, one model without a sound clock puts every block on the wall clock
    sound = {"cpu": 0.0}

    def counted():
        now["wall"] += 0.001
        sound["cpu"] += 0.0009

    def model(name, cpu_clock):
        return ort_agent.Timed(name, counted, lambda: now["wall"], 2.0, cpu_clock=cpu_clock)

    models = {"good": model("good", lambda: sound["cpu"]),
              "coarse": model("coarse", lambda: 0.0)}
    reference = model("reference", lambda: sound["cpu"])
    assert models["good"].cpu_clock is not None and models["coarse"].cpu_clock is None
    ort_agent.interleave(models, reference, ort_agent.parse_settings(
        {"protocol": "rounds", "rounds": 3, "block_ms": 2.0}), lambda: now["wall"])
    assert {len(block) for m in list(models.values()) + [reference]
            for block in m.blocks} == {5}


def test_the_schedule_reads_time_slicing_away_on_the_cpu_clock():
    """The agent's own schedule on a virtual device whose core is shared: now and then a run
    waits for its core (wall clock only). The ci rule and the ratios read the CPU clock."""
    now = {"wall": 0.0, "cpu": 0.0, "runs": 0}

    def runner(ms, always):
        def run():
            now["runs"] += 1
            waited = 0.004 if now["runs"] % 11 < 5 else 0.0  # another task had the core
            now["wall"] += ms / 1e3 * (1 + always) + waited  # ... and a share of every run
            now["cpu"] += ms / 1e3
        return run

    def timed(name, ms, always=0.0):
        return ort_agent.Timed(name, runner(ms, always), lambda: now["wall"], 2.0,
                               cpu_clock=lambda: now["cpu"])

    models = {"a": timed("a", 1.0), "b": timed("b", 3.0)}
    reference = timed("reference", 2.0)
    settings = ort_agent.parse_settings({"protocol": "rounds", "rounds": 12, "block_ms": 2.0,
                                         "ref_gap_ms": 6.0})
    ort_agent.interleave(models, reference, settings, lambda: now["wall"])
    for name, truth in (("a", 0.5), ("b", 1.5)):
        ratios = [r for r, keep in ort_agent.block_ratios(models[name].blocks,
                                                          reference.blocks)]
        assert ratios and all(r == pytest.approx(truth) for r in ratios)
        by_wall = ort_agent.block_ratios([block[:5] for block in models[name].blocks],
                                         [block[:5] for block in reference.blocks])
        assert any(abs(r / truth - 1) > 0.1 for r, _ in by_wall)  # the wall clock saw them
    # the ci rule is satisfied at once on the CPU times (every ratio exact), not on the wall
    models = {"a": timed("a", 1.0), "b": timed("b", 3.0)}
    reference = timed("reference", 2.0)
    ci = dict(settings, stop="ci", rel_ci=0.005, rounds=40, min_runs=6)
    assert ort_agent.interleave(models, reference, ci, lambda: now["wall"])[3] == "precise"
    # the limit rule reads the ratios and the reference's level from the CPU times: 2.0 ms,
    # where every reference run waited a quarter more on the wall clock
    models = {"a": timed("a", 1.0), "b": timed("b", 3.0)}
    reference = timed("reference", 2.0, always=0.25)
    limit = dict(settings, stop="limit", limit_ms=2.0, rounds=40)
    ort_agent.interleave(models, reference, limit, lambda: now["wall"])
    for name, below in (("a", True), ("b", False)):
        look = models[name].verdict
        assert look["level_ms"] == pytest.approx(2.0) and look["ratio"] == pytest.approx(
            0.5 if below else 1.5)


@pytest.mark.parametrize("ref_share", [1.0, 0.25])
def test_under_the_ci_rule_a_model_known_within_rel_ci_leaves_the_rounds(ref_share):
    """The agent's schedule on a virtual clock: a steady model is known after min_runs
    rounds and leaves (its blocks stop there, its answer says when), a noisy one runs on
    beside the reference until it is known too; the window ends when none is left. The
    host reads from the blocks what the agent read (the reference blocks that came after a
    model left change nothing of it), and shares the window's time by the runs each took."""
    import random

    now = {"wall": 0.0}
    draw = random.Random(5)

    def timed(name, ms, jitter):
        def run():
            now["wall"] += ms / 1e3 * (1 + draw.uniform(-jitter, jitter))
        return ort_agent.Timed(name, run, lambda: now["wall"], 2.0)

    def window(rounds):
        models = {"steady": timed("steady", 1.0, 0.002), "noisy": timed("noisy", 3.0, 0.1)}
        reference = timed("reference", 2.0, 0.002)
        settings = ort_agent.parse_settings({"protocol": "rounds", "stop": "ci", "rel_ci": 0.02,
                                             "min_runs": 8, "rounds": rounds,
                                             "block_ms": 2.0, "ref_share": ref_share})
        completed, _, _, reason = ort_agent.interleave(models, reference, settings,
                                                       lambda: now["wall"])
        stops = {name: ort_agent.rounds_stop(model, settings, completed, reason)
                 for name, model in models.items()}
        every_ms = sum(ms for model in models.values() for block in model.blocks
                       for ms in block[3])
        records = {name: RoundsRecord.from_dict({
            "completed": completed, "k": model.k, "reference_k": reference.k,
            "blocks": model.blocks, "reference_blocks": reference.blocks, "candidates": 2,
            "seed": 0, "candidates_ms": every_ms}) for name, model in models.items()}
        return models, reference, completed, reason, stops, records

    models, reference, completed, reason, stops, records = window(400)
    steady, noisy = models["steady"], models["noisy"]
    assert reason == "precise" and steady.precise_at == 8 < noisy.precise_at == completed
    assert len(steady.blocks) == 8 and len(noisy.blocks) == completed
    # the reference ran on beside the noisy one, after the steady one left (and with a
    # bound on its share, closed every round the rule looked at)
    last_of_round = {}  # the last block of each round: a reference's where the rule looked
    for name, model in [("reference", reference)] + list(models.items()):
        for block in model.blocks:
            if block[2] > last_of_round.get(block[0], (0, ""))[0]:
                last_of_round[block[0]] = (block[2], name)
    looked = {r for r, (_, name) in last_of_round.items() if name == "reference"}
    assert looked >= set(range(7, completed))
    if ref_share == 1.0:
        assert len(reference.blocks) > completed and looked == set(range(completed))
    else:  # before the rule looks, the bound lets rounds end without one (8 ms of
        # candidate blocks per round, where it would need 12)
        assert looked.isdisjoint(range(7))
    assert stops["steady"]["reason"] == stops["noisy"]["reason"] == "precise"
    assert (stops["steady"]["looks"], stops["noisy"]["looks"]) == (8, completed)
    for name, model in models.items():
        summary = summarise(records[name])
        assert summary is not None and summary.statistical_half_width <= 0.02
    shares = {name: records[name].share_of([ms for block in model.blocks for ms in block[3]])
              for name, model in models.items()}
    assert shares["steady"] < 0.1 < shares["noisy"] and sum(shares.values()) == \
        pytest.approx(1.0)
    # a budget that ends first: the one still imprecise says so, the steady one does not
    models, _, completed, reason, stops, _ = window(10)
    assert reason == "rounds" and completed == 10 and models["noisy"].precise_at is None
    assert (stops["steady"]["reason"], stops["noisy"]["reason"]) == ("precise", "rounds")


def test_with_a_bound_a_failed_block_brings_no_reference_and_a_limit_closes_every_round():
    """A candidate that fails mid-window is its own error, and no reference block follows
    a stretch of failed blocks alone; a window whose every candidate failed stops there;
    under the limit rule every round closes on a reference block, whatever the bound,
    since each look reads the whole round."""
    def breaking(clock, good_blocks):
        calls = {"n": 0}

        def run():  # its 3 probe runs, then good blocks of 3 runs (k=2), then it fails
            calls["n"] += 1
            if calls["n"] > 3 + 3 * good_blocks:
                raise RuntimeError("device memory gone")
            clock.now += 8e-3
        return ort_agent.Timed("breaks", run, clock, 15.0, discard_runs=1)

    for ref_share in (1.0, 0.25):
        settings = ort_agent.parse_settings({"protocol": "rounds", "rounds": 12,
                                             "block_ms": 15.0, "ref_gap_ms": 100.0,
                                             "ref_share": ref_share, "max_time_ms": 1e9})
        for stop in ("fixed", "ci"):  # ci: it fails before min_runs, before any look
            clock = VirtualClock()  # alone: a reference, its good block, a reference, the failure
            reference = clock.model("ref", 10.0, 15.0)
            alone = {"breaks": breaking(clock, 1)}
            completed, _, failed, reason = ort_agent.interleave(
                alone, reference, ort_agent.parse_settings(dict(settings, stop=stop,
                                                                min_runs=None)), clock)
            assert "device memory gone" in failed["breaks"]["message"]
            assert len(alone["breaks"].blocks) == 1 and len(reference.blocks) == 2
            assert (completed, reason) == (2, "failed")  # no empty rounds after its failure
        clock = VirtualClock()  # beside another, which goes on to the end
        reference = clock.model("ref", 10.0, 15.0)
        models = {"breaks": breaking(clock, 3), "steady": clock.model("steady", 8.0, 15.0)}
        completed, _, failed, _ = ort_agent.interleave(models, reference, settings, clock)
        assert set(failed) == {"breaks"} and completed == 12
        assert len(models["breaks"].blocks) == 3 and len(models["steady"].blocks) == 12
        for model in models.values():  # every block that ran between two references
            assert len(ort_agent.block_ratios(model.blocks, reference.blocks)) == \
                len(model.blocks)

    clock = VirtualClock()
    limit = ort_agent.parse_settings({"protocol": "rounds", "rounds": 12, "block_ms": 15.0,
                                      "ref_gap_ms": 100.0, "ref_share": 0.25,
                                      "max_time_ms": 1e9, "stop": "limit", "limit_ms": 1e6,
                                      "min_runs": 3, "confidence": 0.9})
    reference = clock.model("ref", 10.0, 15.0)
    models = {f"m{i}": clock.model(f"m{i}", 8.0, 15.0) for i in range(6)}
    completed, _, failed, reason = ort_agent.interleave(models, reference, limit, clock)
    assert failed == {} and reason == "decided"
    for round_index in range(completed):
        last = max(b[2] for model in models.values() for b in model.blocks
                   if b[0] == round_index)
        assert any(r[2] == last + 1 for r in reference.blocks)


def test_windows_respect_the_memory_budget_and_keep_the_order(tmp_path):
    class Model:
        def __init__(self, size):
            self.onnx_bytes = b"x" * size

    models = [Model(size) for size in (10, 20, 30, 40, 500, 5)]
    cut = windows(models, budget_bytes=MEMORY_FACTOR * 60, max_models=3)
    assert [[len(m.onnx_bytes) for m in w] for w in cut] == [[10, 20, 30], [40], [500], [5]]
    assert [m for w in cut for m in w] == models
    twice = windows(models, budget_bytes=MEMORY_FACTOR * 60, max_models=3, sessions=2)
    assert [[len(m.onnx_bytes) for m in w] for w in twice] == [[10, 20], [30], [40], [500], [5]]


def test_a_window_asks_for_no_more_sessions_than_the_memory_budget_holds(caplog):
    class Model:
        def __init__(self, size):
            self.onnx_bytes, self.graph_hash = b"x" * size, f"{size:064d}"

    request = MeasureRequest.checked({"protocol": "rounds", "model_sessions": 4,
                                      "min_time_ms": 50, "max_time_ms": 100},
                                     timeout_s=10)
    budget = MEMORY_FACTOR * 100
    fits = window_request(request, [Model(10), Model(15)], block_runs=2, budget_bytes=budget)
    assert fits.settings["model_sessions"] == 4 and fits.settings["block_runs"] == 2
    assert fits.settings["max_time_ms"] == 200 and fits.timeout_s == 20
    # a model that windows() put alone: in as many sessions as the budget holds, one at least
    assert window_request(request, [Model(40)], 0, budget).settings["model_sessions"] == 2
    with caplog.at_level("WARNING"):
        alone = window_request(request, [Model(500)], 0, budget)
    assert alone.settings["model_sessions"] == 1
    assert "model_sessions=4" in caplog.text and "1 session(s)" in caplog.text


def test_the_window_budget_follows_the_memory_the_device_has(tmp_path):
    assert window_budget({}) == WINDOW_BUDGET_BYTES  # an agent that does not say
    for garbage in (True, -5, 0, "lots", 1.5e9):
        assert window_budget({"mem_available_kb": garbage}) == WINDOW_BUDGET_BYTES
    assert window_budget({"mem_available_kb": 10 * 2 ** 20}) == WINDOW_BUDGET_BYTES  # 10 GiB
    assert window_budget({"mem_available_kb": 400 * 1024}) == 200 * 2 ** 20  # a small board
    assert window_budget({"mem_available_kb": 2 ** 1100}) == WINDOW_BUDGET_BYTES  # no overflow
    # the agent says, where the kernel does
    available = ort_agent.fingerprint()["state"]["mem_available_kb"]
    assert isinstance(available, int) and available > 0

    # a device that says it has little memory gets windows of fewer models
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    samples = random_samples(space, 3, seed=11)
    with LatencyProfiler(space, dummy, home=tmp_path, settings=FAST) as profiler:
        identity = profiler.identify()
        roomy = profiler.steps.window_budget()
        assert roomy == window_budget(identity.facts.state) > 0
        graphs = [profiler.graph_hash(sample) for sample in samples]
        profiler._identity = replace(identity, facts=replace(
            identity.facts, state=dict(identity.facts.state, mem_available_kb=1)))
        assert profiler.steps.window_budget() == 512  # half of 1 kB: one model a window
        measured = profiler.measure_many(samples, progress=False)
    assert MEMORY_FACTOR * len(export_sample(space, samples[0], dummy).onnx_bytes) > 512
    assert len({tuple(m.provenance.lease or ()) for m in measured}) == len(set(graphs)) == 3


def test_a_profiler_measures_a_batch_in_rounds_and_serves_it_from_the_cache(tmp_path):
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    samples = random_samples(space, 5, seed=1)
    settings = dict(FAST, cpu_affinity=[0])
    with LatencyProfiler(space, dummy, home=tmp_path, settings=settings,
                         statistic="quiet") as profiler:
        measured = profiler.measure_many(samples + samples[:1], progress=False)
        assert [m.source for m in measured[:5]].count("measured") == len(
            {m.graph_hash for m in measured[:5]})
        assert measured[5].source == "cached"  # a twin of the first sample
        for m in measured:
            assert m.protocol == "rounds" and m.interleaved is not None
            assert m.statistic("quiet") == m.interleaved.quiet_ms > 0
            assert m.rounds.reference_blocks and m.device_s > 0
        assert profiler.profile(samples[0]) == pytest.approx(measured[0].interleaved.quiet_ms)
        # the window's device time is shared by its candidates
        assert profiler.counters["device_s"] == pytest.approx(
            sum(m.device_s for m in measured if m.source == "measured"))
    with LatencyProfiler(space, dummy, home=tmp_path, settings=settings,
                         statistic="quiet") as again:
        cached = again.measure_many(samples, progress=False)
        assert {m.source for m in cached} == {"cached"}
        assert [m.interleaved.quiet_ms for m in cached] == [
            m.interleaved.quiet_ms for m in measured[:5]]
        assert [m.interleaved.quiet_interval_ms for m in cached] == [
            m.interleaved.quiet_interval_ms for m in measured[:5]]
    # each stored the level it was read with, the level's interval and the blocks behind it:
    # the device's history so far (every window's reference blocks), this one's included
    levels = [m.provenance.reference_level() for m in measured[:5]]
    assert all(level.interval_ms[0] <= level.level_ms <= level.interval_ms[1]
               for level in levels)
    assert [level.blocks for level in levels] == sorted(level.blocks for level in levels)
    assert levels[0].blocks >= len(measured[0].rounds.reference_blocks)
    # the device's history of reference blocks holds their CPU minima, the clock the ratios
    # read (their wall minima lie a few microseconds above)
    assert {m.rounds.clock for m in measured} == {"thread_cpu"}
    with sqlite3.connect(tmp_path / "cache.sqlite") as conn:
        history = sorted(value for (value,) in conn.execute(
            "SELECT value FROM reference_blocks").fetchall())
    windows_timed = {m.rounds.reference_blocks for m in measured[:5]}
    assert history == sorted(min(block[5]) for blocks in windows_timed for block in blocks)


def test_a_loop_measurement_answers_rounds_from_the_cache_and_says_so(tmp_path, caplog):
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    sample = random_samples(space, 1, seed=2)[0]
    loop = {"min_runs": 5, "min_time_ms": 0.0, "warmup_runs": 1, "protocol": "loop"}
    with LatencyProfiler(space, dummy, home=tmp_path, settings=loop) as profiler:
        first = profiler.measure(sample)
        assert first.protocol == "loop" and first.interleaved is None
        # no reference to read a quiet state by: its median stands for it; no ratio at all
        assert first.statistic("quiet") == first.median
        with pytest.raises(ValueError, match="timed one model at a time"):
            first.statistic("ratio")
    with caplog.at_level(logging.WARNING, logger="harness.steps.measuring"):
        with LatencyProfiler(space, dummy, home=tmp_path, settings=FAST) as rounds:
            # made the old way, it answers a profiler of rounds from the cache, and says so
            old = rounds.measure(sample)
            assert old.source == "cached" and old.protocol == "loop"
            assert old.created_at == first.created_at
            assert rounds.profile(random_samples(space, 1, seed=2)[0]) == first.median
            assert rounds.counters["old_way_answers"] == 1
            assert rounds.counters["measurements"] == 0
    warnings = [r.getMessage() for r in caplog.records if "one model at a time" in r.getMessage()]
    assert len(warnings) == 1 and "refresh=True" in warnings[0]
    # a profiler that answers with the ratio (which a loop has not) measures it in rounds,
    # and so does refresh=True
    with LatencyProfiler(space, dummy, home=tmp_path, settings=FAST, statistic="ratio") as ratio:
        again = ratio.measure(sample)
        assert again.source == "measured" and again.protocol == "rounds"
    with LatencyProfiler(space, dummy, home=tmp_path, settings=loop) as profiler:
        later_loop = profiler.measure(sample)  # the loop's own, still
        assert later_loop.source == "cached" and later_loop.protocol == "loop"
        refreshed = LatencyProfiler(space, dummy, home=tmp_path, settings=loop, refresh=True)
        with refreshed:
            newer_loop = refreshed.measure(sample)  # a loop result newer than the rounds one
        assert newer_loop.source == "measured"
    with LatencyProfiler(space, dummy, home=tmp_path, settings=FAST) as rounds:
        # a result of rounds, once stored, answers rounds before any loop result, newer or not
        answer = rounds.measure(sample)
        assert answer.source == "cached" and answer.protocol == "rounds"
        assert answer.created_at == again.created_at
        assert rounds.counters["old_way_answers"] == 0
    # a result of rounds beside another reference is measured anew, never answered by the
    # loop's: the loop only answers where nothing was measured in rounds
    custom = tmp_path / "custom-reference.onnx"
    custom.write_bytes(export_sample(space, random_samples(space, 1, seed=4)[0], dummy).onnx_bytes)
    with LatencyProfiler(space, dummy, home=tmp_path, settings=FAST, reference=custom) as other_ref:
        beside = other_ref.measure(sample)
        assert beside.source == "measured" and beside.protocol == "rounds"
        assert other_ref.counters["old_way_answers"] == 0
    # blocks and wholes measured together (a lookup table) take no loop's answer: they must
    # see the device in the same rounds
    other = random_samples(space, 2, seed=9)[1]
    with LatencyProfiler(space, dummy, home=tmp_path, settings=loop) as profiler:
        assert profiler.measure(other).protocol == "loop"
    with LatencyProfiler(space, dummy, home=tmp_path, settings=FAST) as rounds:
        together = rounds.measure_modules([], [other])[0]
        assert together.source == "measured" and together.protocol == "rounds"


def test_quiet_needs_rounds_and_a_bad_reference_stores_nothing(tmp_path):
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    with pytest.raises(InvalidArgument, match="interleaved rounds"):
        LatencyProfiler(space, dummy, home=tmp_path, statistic="quiet",
                        settings={"protocol": "loop"})
    broken = tmp_path / "reference.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ExportError, match="the reference model") as refused:
        with LatencyProfiler(space, dummy, home=tmp_path, settings=FAST,
                             reference=broken) as profiler:
            profiler.measure_many(random_samples(space, 2, seed=5), progress=False)
    assert str(broken) in str(refused.value)
    # a reference that does not exist is refused whatever the protocol, also one that
    # would never run it (one model at a time)
    for settings in (FAST, {"protocol": "loop"}):
        with pytest.raises(InvalidArgument, match="reference model .* does not exist"):
            LatencyProfiler(space, dummy, home=tmp_path, settings=settings,
                            reference=tmp_path / "nope.onnx")
    assert not list((tmp_path / "staging").glob("*"))  # refused before a pool opened
    with LatencyProfiler(space, dummy, home=tmp_path, settings=FAST) as profiler:
        assert profiler.cache.measurement_counts().get("measurements", 0) == 0


def test_rounds_and_the_quiet_state_latency_are_the_default_wherever_they_can_run(tmp_path):
    from devices import registry

    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    short = {key: value for key, value in FAST.items() if key != "protocol"}
    sample = random_samples(space, 1, seed=9)[0]
    with LatencyProfiler(space, dummy, home=tmp_path, settings=short) as profiler:
        assert profiler.settings["protocol"] == "rounds" and profiler.statistic == "quiet"
        measured = profiler.measure(sample)  # alone: the reference-paired window
        assert measured.protocol == "rounds" and measured.rounds.reference_blocks
        # one block of the candidate per round, each between two references
        assert len(measured.rounds.blocks) == FAST["rounds"] == measured.rounds.completed
        assert len(measured.rounds.reference_blocks) == FAST["rounds"] + 1
        assert profiler.profile(sample) == measured.interleaved.quiet_ms
        decision = profiler.decide(sample, measured.statistic("median") * 50)
        assert decision.below and decision.source in ("measured", "cached")
    # what cannot run rounds measures one model at a time, and answers with the median:
    # inputs the default reference does not fit (unless a reference is named) ...
    with LatencyProfiler(TinySpace(), torch.randn(1, 3, 32, 16), home=tmp_path,
                         settings=short) as odd:
        assert odd.settings["protocol"] == "loop" and odd.statistic == "median"
    with LatencyProfiler(None, None, home=tmp_path, settings=short) as files:
        assert files.settings["protocol"] == "loop"
    # ... and a pool with a phone timed by onnxruntime_perf_test (one model at a time)
    perf_test = tmp_path / "onnxruntime_perf_test"
    perf_test.write_text("#!/bin/sh\n")
    registry.add_device(tmp_path, registry.DeviceConfig(
        name="phone", transport="adb", address="X1", agent="perf-test",
        perf_test=str(perf_test)))
    with LatencyProfiler(space, dummy, device="phone", home=tmp_path, settings=short) as phone:
        assert phone.settings["protocol"] == "loop" and phone.statistic == "median"
    # ... and a fresh agent process per model, and what only a loop gives
    with LatencyProfiler(space, dummy, home=tmp_path, settings=short,
                         isolation="process") as fresh:
        assert fresh.settings["protocol"] == "loop"
        assert fresh.measure(sample).protocol == "loop"
    with LatencyProfiler(space, dummy, home=tmp_path, settings=dict(
            short, stop="limit", limit_ms=1.0)) as limited:
        assert limited.settings["protocol"] == "loop"
    with LatencyProfiler(space, dummy, home=tmp_path, settings=short) as per_op:
        with_ops = per_op.measure(sample, per_op=True)  # per-operator times: a loop's
        assert with_ops.protocol == "loop" and with_ops.ops is not None
        assert per_op.profile(sample) == measured.interleaved.quiet_ms  # rounds still answer
    # asked for, a protocol is what a user gets
    with LatencyProfiler(space, dummy, home=tmp_path, settings=dict(short, protocol="loop"),
                         statistic="min") as asked:
        assert asked.statistic == "min" and asked.settings["protocol"] == "loop"


def test_the_default_reference_needs_an_image_input(tmp_path):
    from harness.steps.reference import reference_model
    with pytest.raises(InvalidArgument, match="reference"):
        reference_model(torch.randn(1, 16), tmp_path)


def test_the_report_draws_the_reference_over_time(tmp_path):
    from harness.report.html import write_report

    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    with LatencyProfiler(space, dummy, home=tmp_path, settings=FAST) as profiler:
        profiler.measure_many(random_samples(space, 3, seed=4), progress=False)
        blocks = len(profiler.measure(random_samples(space, 1, seed=4)[0]).rounds
                     .reference_blocks)
        history = profiler.cache.reference_history(profiler.identify().fingerprint)
    assert len(history) == blocks  # one window, its blocks recorded once
    files = write_report(tmp_path / "cache.sqlite", tmp_path / "report", home=tmp_path)
    assert any(path.name == "reference.png" for path in files.figures)
    assert "The device&#x27;s speed" in files.index.read_text() or \
        "The device's speed" in files.index.read_text()


def test_a_noisy_window_says_what_competed_for_the_cpu():
    from harness.store.measurement import Measurement, competition

    assert competition({"pressure_share": 0.3, "steal_ticks": 12}) == [
        "noisy: tasks waited for a CPU 30% of the window (CPU pressure)",
        "noisy: the hypervisor took 12 ticks (steal)"]
    assert competition({"pressure_share": 0.01, "steal_ticks": 0}) == []
    window = record([5.0, 5.0, 7.0, 5.0], [(10.0, 10.0), (10.0, 10.0), (10.0, 14.0), (10.0, 10.0)])
    noisy = Measurement(samples_ms=(5.0,), source="measured", device="d", graph_hash="g",
                        rounds=dict(window.to_dict(), state={"pressure_share": 0.4}))
    assert "noisy: tasks waited for a CPU 40% of the window (CPU pressure)" in noisy.flags


def test_a_rounds_result_answers_only_beside_the_same_reference(tmp_path):
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    sample = random_samples(space, 1, seed=6)[0]
    other = tmp_path / "other_reference.onnx"
    other.write_bytes(export_sample(space, random_samples(space, 1, seed=9)[0], dummy,
                                    home=tmp_path).onnx_bytes)
    with LatencyProfiler(space, dummy, home=tmp_path, settings=FAST) as profiler:
        first = profiler.measure(sample)
    with LatencyProfiler(space, dummy, home=tmp_path, settings=FAST) as same:
        assert same.measure(sample).source == "cached"
    with LatencyProfiler(space, dummy, home=tmp_path, settings=FAST, reference=other) as moved:
        again = moved.measure(sample)
    assert again.source == "measured"  # a ratio is to its reference: measured beside the new one
    assert again.rounds.reference_sha256 != first.rounds.reference_sha256


def test_a_model_file_is_measured_in_its_own_window_under_rounds(tmp_path):
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    path = tmp_path / "m.onnx"
    path.write_bytes(export_sample(space, random_samples(space, 1, seed=8)[0], dummy,
                                   home=tmp_path).onnx_bytes)
    with LatencyProfiler(None, None, home=tmp_path, settings=FAST,
                         reference=tmp_path / "m.onnx") as profiler:
        measured = profiler.measure_model(path)
        assert measured.protocol == "rounds" and measured.rounds.candidates == 1
        assert measured.interleaved.ratio == pytest.approx(1.0, rel=0.5)  # itself beside itself
        assert profiler.measure_model(path).source == "cached"


def test_input_shapes_size_the_candidate_not_the_reference(tmp_path, dynamic_model):
    """A model file with a dynamic axis, sized by input_shapes, beside a static reference
    (calibration times the kernels it cuts out of subnets this way)."""
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    reference = tmp_path / "reference.onnx"
    reference.write_bytes(export_sample(space, random_samples(space, 1, seed=8)[0], dummy,
                                        home=tmp_path).onnx_bytes)
    with LatencyProfiler(None, None, home=tmp_path, settings=FAST,
                         reference=reference) as profiler:
        measured = profiler.measure_model(dynamic_model, {"x": [2, 4]})
    assert measured.protocol == "rounds" and measured.rounds.reference_blocks
    assert measured.input_signature[0]["shape"] == [2, 4]


@pytest.mark.parametrize("field, value", [("state", {"load1": 10 ** 400}),
                                          ("blocks", [[0, 0, 2, [10 ** 400], 0.0]]),
                                          ("candidates_ms", 10 ** 400)])
def test_huge_numbers_in_a_rounds_record_are_refused_not_a_crash(field, value):
    good = record([5.0, 5.0], [(10.0, 10.0), (10.0, 10.0)]).to_dict()
    with pytest.raises(ValueError):
        RoundsRecord.from_dict(dict(good, **{field: value}))


@pytest.mark.parametrize("stored, problem", [
    ({"reference_level_ms": -1.0}, "reference_level_ms"),
    ({"reference_level_ms": 8.0, "reference_level_interval_ms": [8.5, 9.0],
      "reference_level_blocks": 50}, "reference_level_interval_ms"),
    ({"reference_level_ms": 8.0, "reference_level_interval_ms": [7.9, float("nan")],
      "reference_level_blocks": 50}, "reference_level_interval_ms"),
    ({"reference_level_ms": 8.0, "reference_level_interval_ms": "7.9,8.1",
      "reference_level_blocks": 50}, "reference_level_interval_ms"),
    ({"reference_level_ms": 8.0, "reference_level_interval_ms": [False, 8.1],
      "reference_level_blocks": 50}, "reference_level_interval_ms"),
    ({"reference_level_ms": 8.0, "reference_level_interval_ms": [7.9, 8.1],
      "reference_level_blocks": True}, "reference_level_blocks"),
    ({"reference_level_ms": 8.0, "reference_level_interval_ms": [7.9, 8.1]},
     "reference_level_blocks"),
    ({"reference_level_ms": 8.0, "reference_level_interval_ms": [7.9, 10 ** 400],
      "reference_level_blocks": 50}, "reference_level_interval_ms"),
    ({"reference_level_ms": 10 ** 400}, "reference_level_ms"),
    ({"reference_level_ms": 8.0, "reference_level_interval_ms": [7.9, 8.1],
      "reference_level_blocks": 10 ** 400}, "reference_level_blocks"),
    ({"reference_level_interval_ms": [7.9, 8.1], "reference_level_blocks": 50},
     "reference_level_ms beside them")])
def test_a_stored_level_that_makes_no_sense_is_refused_naming_the_field(stored, problem):
    from harness.store.measurement import Measurement

    good = {"samples_ms": [4.0], "source": "measured", "device": "d", "graph_hash": "g",
            "rounds": record([5.0] * 8, [(10.0, 10.0)] * 8).to_dict()}
    with pytest.raises(ValueError, match=problem):
        Measurement(**dict(good, provenance=stored))
    # a level stored before levels had intervals: read as exact, the ratio's interval alone
    old = Measurement(**dict(good, provenance={"reference_level_ms": 8.0}))
    assert old.interleaved.quiet_interval_ms == tuple(
        8.0 * bound for bound in old.interleaved.ratio_interval)
    assert old.interleaved.level_blocks == 0 and not old.interleaved.few_level_blocks


def reference_windows(tmp_path, tiny_model, rounds):
    """A window runner over one candidate beside a copy of it as the reference, from a
    worker that keeps no reference yet: window(**changes) -> (the candidate's result, the
    kept reference); and the reference's file."""
    from agents import ort_agent

    reference = tmp_path / "reference.onnx"
    reference.write_bytes(tiny_model.read_bytes())
    sha = ort_agent.file_sha256(str(reference))
    models = {"a": {"model": str(tiny_model), "sha256": sha}}
    settings = {"protocol": "rounds", "rounds": rounds, "min_time_ms": 0.0, "block_ms": 1.0}

    def window(**changes):
        answer = ort_agent.measure_rounds(models, {"model": str(reference), "sha256": sha},
                                          dict(settings, **changes))
        return answer["results"]["a"], ort_agent.KEPT_REFERENCE["model"]

    ort_agent.KEPT_REFERENCE.clear()
    return window, reference


def test_a_workers_next_window_keeps_its_reference_loaded(tmp_path, tiny_model):
    """A lone profile() is a window of its own: the reference is loaded, run and warmed up
    once per worker, not per window; another file, a damaged copy or other session settings
    load it anew, and a failed window keeps nothing."""
    from agents import ort_agent

    run_window, reference = reference_windows(tmp_path, tiny_model, rounds=3)

    def window(**changes):
        result, kept = run_window(**changes)
        assert result["rounds"]["reference_blocks"]
        return kept

    first = window()
    assert window() is first                       # kept: no load, no first run
    second = window(graph_optimization_level="basic")  # another session: loaded anew
    assert second is not first
    assert window(graph_optimization_level="basic", seed=1) is not second  # other inputs
    reference.write_bytes(b"damaged")
    with pytest.raises(ort_agent.AgentError, match="the reference model failed"):
        window(graph_optimization_level="basic", seed=1)
    assert ort_agent.KEPT_REFERENCE == {}
    ort_agent.measure_rounds({"a": {"model": str(tiny_model), "sha256": None}},
                             {"model": str(tiny_model), "sha256": None},
                             {"protocol": "rounds", "rounds": 3, "min_time_ms": 0.0})
    assert ort_agent.KEPT_REFERENCE == {}  # without a hash, nothing is kept


def test_the_reference_runs_in_its_sessions_in_turn_and_is_kept_with_them(tmp_path,
                                                                          tiny_model,
                                                                          monkeypatch):
    """The reference is loaded in reference_sessions sessions of their own (one by
    default), its blocks taken from each in turn from the first in every window, each
    session readied with the probe runs' count before it; a kept reference with as many
    sessions serves the next window, another count loads it anew."""
    from agents import ort_agent

    loads = []  # the files opened in a session
    open_model = ort_agent.open_model

    def counted_open(ort, path, settings):
        loads.append(path)
        return open_model(ort, path, settings)

    monkeypatch.setattr(ort_agent, "open_model", counted_open)
    window, reference = reference_windows(tmp_path, tiny_model, rounds=6)
    try:
        result, kept = window(reference_sessions=4)
        assert ort_agent.parse_settings({})["reference_sessions"] == 1
        assert loads.count(str(reference)) == 4 and len(kept.sessions) == 4
        assert loads.count(str(tiny_model)) == 1  # a candidate: one session
        assert result["settings"]["reference_sessions"] == 4
        runs = {}  # session -> its runs in the next window

        def counted(index, run):
            def run_counted():
                runs[index] = runs.get(index, 0) + 1
                run()
            return run_counted

        for index, session in enumerate(kept.sessions):
            session.model.run = counted(index, session.model.run)
        result, again = window(reference_sessions=4)
        assert again is kept and loads.count(str(reference)) == 4  # kept: not loaded again
        references = len(result["rounds"]["reference_blocks"])
        k = result["rounds"]["reference_k"]
        # each session's PROBE_RUNS (the first's are the probes), then its blocks in turn
        # from the first: a window of 7 reference blocks ends on the last session's turn
        expected = {index: ort_agent.PROBE_RUNS + k * len(range(index, references, 4))
                    for index in range(4)}
        assert references == 7 and runs == expected
        assert kept.turn == references % 4
        _, single = window()
        assert single is not kept and len(single.sessions) == 1  # another count: anew
    finally:
        ort_agent.KEPT_REFERENCE.clear()


def test_a_candidate_runs_in_its_sessions_in_turn(tmp_path, tiny_model, monkeypatch):
    """With model_sessions a candidate is loaded that many times (once by default), each
    session run once and readied with the probe runs' count, and its blocks are taken from
    each in turn: every load of a model is a draw of its speed, and its ratio reads their
    mean."""
    from agents import ort_agent

    runs = []  # per load of the candidate: its runs
    open_model = ort_agent.open_model

    def counted_open(ort, path, settings):
        model, load_ms = open_model(ort, path, settings)
        if path == str(tiny_model):
            index, run = len(runs), model.run
            runs.append(0)

            def run_counted():
                runs[index] += 1
                run()
            model.run = run_counted
        return model, load_ms

    monkeypatch.setattr(ort_agent, "open_model", counted_open)
    window, _ = reference_windows(tmp_path, tiny_model, rounds=6)
    try:
        assert ort_agent.parse_settings({})["model_sessions"] == 1
        result, _ = window(model_sessions=2)
        blocks, k = len(result["rounds"]["blocks"]), result["rounds"]["k"]
        assert result["settings"]["model_sessions"] == 2 and blocks == 6
        # each: its cold run, PROBE_RUNS (the first's are the probes), then every other block
        assert runs == [1 + ort_agent.PROBE_RUNS + k * blocks // 2] * 2
        runs.clear()
        window()
        assert len(runs) == 1  # one session by default
    finally:
        ort_agent.KEPT_REFERENCE.clear()


def test_the_known_level_reads_the_newest_blocks_the_history_keeps(tmp_path):
    """A decision reads the limit against the level the device's history keeps (its newest
    REFERENCE_HISTORY blocks), also where a history was merged from several caches: an
    older campaign's blocks beyond them (the device ran faster then) do not move it."""
    from harness.store.cache import REFERENCE_HISTORY, Cache

    scope = ("device", "settings", "reference")
    with Cache(tmp_path / "cache.sqlite") as cache:
        assert cache.known_reference(*scope) == (None, 0)
        with cache._write("merge two campaigns' histories") as conn:
            conn.executemany("INSERT INTO reference_blocks VALUES (?, ?, ?, ?, ?, ?, ?)", [
                (*scope, "old" if n < 3000 else "new", n, 0.90 if n < 3000 else 1.00, n)
                for n in range(3000 + REFERENCE_HISTORY)])
        known, blocks = cache.known_reference(*scope)
        recorded = cache.reference_level(*scope, "next", [(1, 1.0, 9e9)])
    assert known == pytest.approx(1.00) and recorded.level_ms == pytest.approx(1.00)
    assert recorded.interval_ms == pytest.approx((1.00, 1.00))
    assert blocks == REFERENCE_HISTORY


def test_the_reference_history_is_kept_apart_by_clock_agent_version_and_block_length(
        monkeypatch):
    """Levels read one way never mix with another's: the history's key differs by the clock
    the blocks were read by, the agent's version, the block length, the runs a block
    throws away and the sessions the reference is loaded in, and not by the
    candidates' input shapes or precision (one history for a device's every window)."""
    from harness.pool.device_pool import MeasureRequest
    from harness.steps import measuring

    settings = MeasureRequest.checked({"protocol": "rounds"}, 60.0).settings
    key = measuring.reference_history_key(settings, "thread_cpu", 2)
    assert key != measuring.reference_history_key(settings, "wall", 2)
    assert key != measuring.reference_history_key(settings, "thread_cpu", 1)
    assert key != measuring.reference_history_key(dict(settings, block_ms=5.0), "thread_cpu", 2)
    assert key != measuring.reference_history_key(dict(settings, discard_runs=1),
                                                  "thread_cpu", 2)
    assert key != measuring.reference_history_key(dict(settings, reference_sessions=4),
                                                  "thread_cpu", 2)
    assert key == measuring.reference_history_key(
        dict(settings, input_shapes={"input": [1, 3, 64, 64]}, precision="fp16"),
        "thread_cpu", 2)
    monkeypatch.setattr(measuring, "AGENT_VERSION", "9.9")
    assert key != measuring.reference_history_key(settings, "thread_cpu", 2)


def test_a_request_fixes_the_runs_of_every_block_of_its_window(tmp_path):
    """block_runs sets k for the reference and so for every candidate, whatever the probe
    would choose (a tiny model runs far below the 2 ms a block lasts: several runs)."""
    models = tiny_models(tmp_path, 3)
    reference = models.pop("m0")
    answer = ort_agent.handle({"op": "rounds", "models": models, "reference": reference,
                               "settings": dict(FAST, block_runs=1)})
    assert answer["errors"] == {}
    for result in answer["results"].values():
        record = RoundsRecord.from_dict(result["rounds"])
        assert record.k == record.reference_k == 1
        assert {len(block[3]) for block in record.blocks + record.reference_blocks} == {1}


@pytest.mark.parametrize("run_ms, k", [
    (9.85, 2), (10.3, 1), (19.9, 1), (150.0, 1),  # about block_ms and above: one or two
    (4.0, 3), (0.3, 48),  # short runs: as many as last block_ms, on the ladder
])
def test_a_block_holds_the_fewest_runs_of_the_ladder_that_last_block_ms(run_ms, k):
    """k is the fewest runs on the ladder (1, 2, 3, 4, 6, 8, 12, ...) that last block_ms: two
    runs at least for short runs cost a decision's rounds twice the device time."""
    assert ort_agent.runs_per_block(10.0, run_ms) == k


def test_a_device_keeps_the_runs_per_block_its_history_was_read_at(tmp_path):
    """After a device's first window (its probe's k), a profiler's windows take the k whose
    blocks last block_ms at the reference's quiet level in the device's newest history (a
    probe of three runs in every window would switch k where the reference's run lies near
    block_ms / k, and a ratio of minima of one run reads otherwise than one of two): a
    newer history whose level is 0.3 ms makes 2 ms blocks eight runs long, and those blocks
    join a history of their own; a request that fixes block_runs, or asks for the probe
    (0), is obeyed, each window's blocks filed under the k they ran at."""
    from harness.store.rounds import LEVEL_QUANTILE, quantile

    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    samples = random_samples(space, 7, seed=4)
    settings = dict(FAST, cpu_affinity=[0])

    def batch(chosen, picked):
        with LatencyProfiler(space, dummy, home=tmp_path, settings=chosen) as profiler:
            measured = profiler.measure_many(picked, progress=False)
            return measured, profiler.steps

    def history(steps, k):
        with sqlite3.connect(tmp_path / "cache.sqlite") as conn:
            return [value for (value,) in conn.execute(
                "SELECT value FROM reference_blocks WHERE settings_key = ?",
                (steps._reference_ran_as("thread_cpu", k),))]

    first, steps = batch(settings, samples[:2])
    probed = first[0].rounds.reference_k
    assert first[0].settings["block_runs"] == 0  # the device's first window: its probe
    assert len(history(steps, probed)) == len(first[0].rounds.reference_blocks)
    level = quantile(history(steps, probed), LEVEL_QUANTILE)
    second, steps = batch(settings, samples[2:3])
    kept = ort_agent.runs_per_block(FAST["block_ms"], level)
    assert second[0].settings["block_runs"] == second[0].rounds.reference_k == kept
    with sqlite3.connect(tmp_path / "cache.sqlite") as conn:  # later, a faster device at 1
        device_fp, reference = conn.execute(
            "SELECT device_fp, reference FROM reference_blocks LIMIT 1").fetchone()
        conn.executemany("INSERT INTO reference_blocks VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [(device_fp, steps._reference_ran_as("thread_cpu", 1), reference,
                           "later", n, 0.3, 9e9 + n) for n in range(5)])
    assert steps.known_reference() == (pytest.approx(0.3), 5)  # the newest history's
    faster, steps = batch(settings, samples[3:5])
    assert {(m.rounds.k, m.rounds.reference_k) for m in faster} == {(8, 8)}
    assert len(history(steps, 8)) == len(faster[0].rounds.reference_blocks)
    assert len(history(steps, 1)) == 5  # a history of one k never takes another's blocks
    fixed, steps = batch(dict(settings, block_runs=6), samples[5:6])
    assert fixed[0].rounds.reference_k == 6 and len(history(steps, 6)) > 0
    again, _ = batch(dict(settings, block_runs=0), samples[6:7])
    assert again[0].settings["block_runs"] == 0  # asked for the probe: sent it
