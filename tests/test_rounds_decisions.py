"""Limit decisions in interleaved rounds: the three-way test with its indifference zone, the
always-valid error rate, candidates leaving the rounds once decided. Checked on the agent's
own schedule over a virtual clock, and end to end on a simulated device replaying a noisy
trace whose truth is known exactly: correctness only, no timing."""
import math
import random

import pytest
import torch

from agents import ort_agent
from agents.ort_agent import (AgentError, Timed, interleave, limit_verdict, parse_settings,
                              rounds_stop)
from devices.noise_trace import NoiseTrace
from devices.simulated import SimulatedModel, _VirtualClock
from harness import LatencyProfiler, random_samples
from harness.errors import InvalidArgument
from harness.spaces import TinySpace
from harness.store.cache import Cache
from harness.store.decisions import decision_from_rounds
from tests.test_noise_replay import replaying_device, two_replaying_devices_one_lost

ROUNDS = {"protocol": "rounds", "block_ms": 10.0, "ref_gap_ms": 30.0, "warmup_runs": 1,
          "max_time_ms": 20000.0}


def busy_trace(seed=0, length_s=30.0, every_ms=2.0, spread=0.0):
    """A shared device: its speed steps between levels every few seconds, and one run in five
    is slowed by another tenant (noise only ever adds time, as on a real device); with
    `spread`, every run is also off by that much either way."""
    draw = random.Random(seed)
    runs, t, level = [], 0.0, 1.0
    while t < length_s:
        if draw.random() < every_ms / 1e3 / 3.0:  # a change of speed every ~3 s
            level = draw.choice((1.0, 1.0, 1.3, 1.8))
        spike = 1.0 + draw.expovariate(3.0) if draw.random() < 0.2 else 1.0
        runs.append((t, 3.0 * level * spike * math.exp(draw.gauss(0.0, spread))))
        t += every_ms / 1e3
    return NoiseTrace("busy", {"reference": tuple(runs)})


# ---------------------------------------------------------------- the three-way test

def test_the_three_way_test_calls_a_side_only_outside_the_indifference_zone():
    assert limit_verdict((0.5, 0.9), 0.7, 1.0, 0.02) == "below"
    assert limit_verdict((1.1, 1.3), 1.2, 1.0, 0.02) == "above"
    assert limit_verdict((0.9, 1.1), 1.0, 1.0, 0.02) is None          # both sides open
    assert limit_verdict((0.99, 1.015), 1.01, 1.0, 0.02) == "above"   # inside the zone:
    assert limit_verdict((0.99, 1.015), 0.995, 1.0, 0.02) == "below"  # the median says
    assert limit_verdict((0.95, 1.01), 0.97, 1.0, 0.02) == "below"    # under the zone's top
    assert limit_verdict(None, 1.0, 1.0, 0.02) is None                # no interval yet


@pytest.mark.parametrize("setting,value", [("indifference", 0.0), ("indifference", 0.5),
                                           ("indifference", float("nan")),
                                           ("reference_level_ms", -1.0),
                                           ("window_spread", -0.01), ("window_spread", 0.5),
                                           ("window_spread", float("inf"))])
def test_bad_indifference_or_level_settings_are_user_errors_naming_them(setting, value):
    with pytest.raises(AgentError, match=setting):
        parse_settings({setting: value})


# ---------------------------------------------------------------- the agent's schedule

def schedule(latencies_ms, limit_ms, trace=None, confidence=0.99, cv=0.1, reference_draw=1.0,
             **settings):
    """The agent's rounds over simulated models of these true latencies beside a reference of
    3 ms (its level known to be 3 ms) on one virtual clock, each run off by a spread `cv`, or
    replaying `trace`: ({name: Timed}, why it stopped, the settings). With `reference_draw`,
    this window's load of the reference runs that many times its known level: every ratio
    in the window is off by the same share, as when a model is loaded again on a real
    device."""
    clock = _VirtualClock()
    spec = SimulatedModel("board", 3.0, seed=1, noise=trace, cv=cv)
    checked = parse_settings(dict({"stop": "limit", "limit_ms": limit_ms, "confidence":
                                   confidence, "rounds": 400, "block_ms": 10.0,
                                   "ref_gap_ms": 30.0, "max_time_ms": 600000.0,
                                   "reference_level_ms": 3.0}, **settings))

    def timed(name, true_ms):
        run = spec.runner(name, clock)
        return Timed(name, lambda: _scaled(run, clock, true_ms / spec.graph_median_ms(name)),
                     clock, checked["block_ms"])

    reference = timed("reference", 3.0 * reference_draw)
    models = {f"m{i}": timed(f"m{i}", ms) for i, ms in enumerate(latencies_ms)}
    _, _, failed, reason = interleave(models, reference, checked, clock)
    assert not failed
    return models, reason, checked


def drawn_window(latencies_ms, limit_ms, reference_draw, **settings):
    """schedule() on runs 1% apart, its reference drawn `reference_draw`: (models, settings)."""
    models, _, checked = schedule(latencies_ms, limit_ms, cv=0.01,
                                  reference_draw=reference_draw, **settings)
    return models, checked


def test_a_window_drawn_within_its_spread_calls_no_side_wrongly(monkeypatch):
    """This window's reference runs 2.5% faster than its known level, so every ratio in it
    reads 2.5% high: a candidate 2.2% below the limit (outside the zone) reads 0.25% above
    it. Without the between-window term its tight interval lies inside the zone and the
    median calls it, wrongly. With a spread that covers the draw (3%) it is never called
    wrongly, however late the cost cut-off lets it leave; a candidate far below is still
    called at the first look."""
    limit = 3.0
    latencies = [limit * 0.978, limit * 0.85]
    plain, _ = drawn_window(latencies, limit, 1 / 1.025, window_spread=0.0)
    assert plain["m0"].verdict["outcome"] == "above"  # wrong
    # the second cut-off off (no 90% interval before 41 ratios): m0 leaves by the first
    monkeypatch.setattr(ort_agent, "NEAR_CONFIDENCE", 1 - 1e-12)
    for narrow in (1.0, 0.1):  # the cut-off as set, and one ten times later
        monkeypatch.setattr(ort_agent, "SPREAD_NARROW", narrow)
        spread, _ = drawn_window(latencies, limit, 1 / 1.025, window_spread=0.03)
        assert spread["m0"].verdict is None or spread["m0"].verdict["outcome"] != "above"
        assert spread["m0"].last_look["outcome"] != "above"
        assert spread["m1"].verdict["outcome"] == "below"
        assert spread["m1"].verdict["looks"] == 1


def test_the_cost_cut_off_leaves_undecided_once_the_rounds_agree_within_the_spread(
        monkeypatch):
    """At the limit, a candidate's widened interval straddles the zone however many rounds
    run: it leaves, undecided ("spread"), once its rounds' interval is within the spread of
    its median, long before the budget; its interval carries the term on both sides (the
    second cut-off, its 90% interval inside the zone, kept off)."""
    monkeypatch.setattr(ort_agent, "NEAR_CONFIDENCE", 1 - 1e-12)
    limit = 3.0
    models, settings = drawn_window([limit], limit, 1.0)
    assert settings["window_spread"] == 0.02  # the default
    near = models["m0"].verdict
    assert near["outcome"] is None and near["left"] == "spread" and near["rounds"] < 400
    low, high = near["ratio_interval"]
    assert low <= near["ratio"] / 1.02 and high >= near["ratio"] / 0.98
    stop = rounds_stop(models["m0"], settings, near["rounds"], "decided")
    assert stop["reason"] == "spread" and stop["outcome"] is None


def test_a_candidate_whose_rounds_lie_inside_the_zone_leaves_early_and_one_outside_is_called(
        monkeypatch):
    """The second cut-off: 1% off the limit, on runs 3% apart, a candidate leaves undecided
    once its rounds' 90% interval lies inside the zone, while the look's own
    interval is still wider than the spread (the first cut-off alone kept it for several
    times as many rounds); one 3% above the limit, outside the zone, is still called."""
    limit = 3.0
    models, _, settings = schedule([limit * 1.01, limit * 1.03], limit_ms=limit, cv=0.03)
    near, outside = models["m0"].verdict, models["m1"].verdict
    assert near["outcome"] is None and near["left"] == "spread"
    low, high = near["ratio_interval"]  # the look's interval, widened by the spread
    strict = (low * (1 + settings["window_spread"]), high * (1 - settings["window_spread"]))
    assert max(near["ratio"] - strict[0], strict[1] - near["ratio"]) > \
        settings["window_spread"] * near["ratio"]  # not the first cut-off's doing
    assert outside["outcome"] == "above"
    assert "90% interval lies inside the indifference zone" in decision_from_rounds(
        near, 10, source="measured", device_s=1.0, graph_hash="g", device="d").reason
    # without it (no 90% interval before 41 ratios) the candidate stays over twice as long
    monkeypatch.setattr(ort_agent, "NEAR_CONFIDENCE", 1 - 1e-12)
    alone, _, _ = schedule([limit * 1.01], limit_ms=limit, cv=0.03)
    assert alone["m0"].verdict["rounds"] > 2 * near["rounds"]
    assert "agree within the device's between-window spread" in decision_from_rounds(
        alone["m0"].verdict, 10, source="measured", device_s=1.0, graph_hash="g",
        device="d").reason


def _scaled(run, clock, scale):
    began = clock.now
    run()
    clock.now = began + (clock.now - began) * scale


def test_a_decided_candidate_leaves_the_rounds_and_the_undecided_stay():
    models, reason, settings = schedule([1.0, 9.0, 3.0 * 1.05], limit_ms=3.0, cv=0.04)
    rounds = {name: len({block[0] for block in model.blocks}) for name, model in models.items()}
    assert models["m0"].verdict["outcome"] == "below"
    assert models["m1"].verdict["outcome"] == "above"
    # each ran in the rounds up to the one that decided it, and in none after; its looks
    # came as its kept ratios grew (the first at min_runs of them)
    for model in models.values():
        assert rounds[model.name] == model.verdict["rounds"]
        assert model.verdict["kept"] >= settings["min_runs"]
        assert model.verdict["looks"] < model.verdict["kept"] - settings["min_runs"] + 1 or \
            model.verdict["looks"] == 1
    # far from the limit: decided at the first look; 5% above it, on runs 4% apart, it
    # stays until its interval clears the zone's bottom
    assert models["m0"].verdict["looks"] == models["m1"].verdict["looks"] == 1
    assert max(rounds["m0"], rounds["m1"]) < rounds["m2"]
    assert models["m2"].verdict["outcome"] == "above" and reason == "decided"
    stop = rounds_stop(models["m0"], settings, 400, reason)
    assert stop["rule"] == "rounds-limit" and stop["reason"] == "settled"
    assert stop["rounds"] == rounds["m0"] and stop["looks"] == 1


def test_a_candidate_at_the_limit_of_a_noisy_device_uses_the_budget_and_says_undecided():
    models, reason, settings = schedule([3.0], limit_ms=3.0, rounds=40, confidence=0.999)
    verdict = models["m0"].last_look
    assert models["m0"].verdict is None  # never called, and never left
    assert reason == "rounds" and verdict["outcome"] is None and verdict["rounds"] == 40
    stop = rounds_stop(models["m0"], settings, 40, reason)
    assert stop["reason"] == "rounds" and stop["outcome"] is None
    assert stop["ratio_interval"] is not None  # undecided, with its interval


def test_the_stated_error_rate_holds_over_many_seeded_decisions():
    """Candidates whose truth lies outside the zone, decided at 90% on a device replaying a
    noisy trace: at most 10% of the calls are wrong (each look spends its share)."""
    trace = busy_trace(seed=4)
    draw = random.Random(11)
    calls = wrong = 0
    for trial in range(12):
        latencies = [3.0 * draw.uniform(0.8, 1.25) for _ in range(6)]
        limit = 3.0 * draw.uniform(0.9, 1.1)
        models, _, _ = schedule(latencies, limit, trace=trace, confidence=0.9, seed=trial)
        for (name, model), truth in zip(sorted(models.items(), key=lambda m: int(m[0][1:])),
                                        latencies):
            if abs(truth / limit - 1) <= 0.02 or model.verdict is None or \
                    model.verdict["outcome"] is None:  # undecided: no call
                continue
            calls += 1
            wrong += model.verdict["outcome"] != ("below" if truth < limit else "above")
    assert calls >= 50 and wrong <= 0.10 * calls, (wrong, calls)


# ---------------------------------------------------------------- end to end, replayed

def test_decide_many_in_rounds_agrees_with_the_known_truth_outside_the_zone(tmp_path):
    spec = replaying_device(tmp_path, busy_trace(seed=2))
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    samples = random_samples(space, 12, seed=5)
    with LatencyProfiler(space, dummy, device="sim1", home=tmp_path, settings=ROUNDS) as profiler:
        profiler.measure_many(samples[:2], progress=False)  # the reference's history begins
        truths = [spec.graph_median_ms(profiler.export(s).sha256) for s in samples]
        limit = sorted(truths)[len(truths) // 2] * 1.001
        decisions = profiler.decide_many(samples, limit, confidence=0.99)
        again = profiler.decide_many(samples, limit, confidence=0.99)
        key = profiler.cache_key(decisions[-1].graph_hash)
    for decision, truth in zip(decisions, truths):
        assert decision.source in ("measured", "cached") and decision.indifference == 0.02
        if decision.settled and abs(truth / limit - 1) > 0.02:
            assert decision.below == (truth < limit), (decision, truth)
    assert sum(d.settled for d in decisions) >= 10
    measured = [d for d in decisions if d.source == "measured"]
    assert measured and all(d.device_s > 0 for d in measured)
    # decided answers are reused; nothing is served as a measurement
    assert all(a.source == "cached" for a, d in zip(again, decisions) if d.settled)
    with Cache(tmp_path / "cache.sqlite") as cache:
        assert cache.get(key) is None or cache.get(key).source == "cached"


def test_decisions_time_short_blocks_where_the_history_gives_the_level(tmp_path,
                                                                       monkeypatch):
    """A first look needs ten kept blocks whatever their length: where the device's history
    holds enough reference blocks to give the level, a decision times short blocks
    (DECISION_BLOCK_MS, or three runs of the reference if longer) and leaves the history to
    the measurements' blocks, 20 ms here (a minimum of fewer runs lies higher); before that, it
    times the measurements' length and its blocks join the history, so that no one window's
    level is kept for good; the decider's block_ms is kept, up to the measurements'."""
    from harness.steps import decider

    replaying_device(tmp_path, busy_trace(seed=2))
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    samples = random_samples(space, 8, seed=5)
    settings = {"protocol": "rounds", "ref_gap_ms": 30.0, "warmup_runs": 1, "block_ms": 20.0}

    def history() -> int:
        with Cache(tmp_path / "cache.sqlite") as cache:
            return cache._query("count", "SELECT COUNT(*) FROM reference_blocks")[0][0]

    sent = []
    with LatencyProfiler(space, dummy, device="sim1", home=tmp_path, settings=settings) as profiler:
        measure_rounds = profiler.pool.measure_rounds
        monkeypatch.setattr(profiler.pool, "measure_rounds", lambda models, reference, request:
                            sent.append(request.settings["block_ms"]) or
                            measure_rounds(models, reference, request))
        first = profiler.decide_many(samples[:2], 1000.0)  # no history yet
        assert sent == [20.0] and history() > 0 and all(d.settled for d in first)
        monkeypatch.setattr(decider, "DECISION_HISTORY_BLOCKS", history() + 1)
        profiler.decide_many(samples[2:4], 1000.0)  # one window's blocks: not enough
        assert sent == [20.0, 20.0] and history() >= decider.DECISION_HISTORY_BLOCKS
        recorded, level = history(), profiler.steps.known_reference_level()
        far = profiler.decide_many(samples[4:6], 1000.0)
        assert sent[2] == pytest.approx(max(decider.DECISION_BLOCK_MS,
                                            decider.DECISION_BLOCK_RUNS * level))
        assert sent[2] < 20.0 and history() == recorded and all(d.below for d in far)
        assert all("(look 1, round 10)" in d.reason for d in far), [d.reason for d in far]
        profiler.decider.block_ms = 15.0
        profiler.decide_many(samples[6:7], 1000.0)
        profiler.decider.block_ms = 40.0
        profiler.decide_many(samples[7:], 1000.0)
        assert sent[3:] == [15.0, 20.0]


def test_undecided_results_are_not_kept_as_decisions(tmp_path):
    replaying_device(tmp_path, busy_trace(seed=3, spread=0.1))
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    sample = random_samples(space, 1, seed=1)[0]
    settings = dict(ROUNDS, rounds=10, max_time_ms=100000.0)
    with LatencyProfiler(space, dummy, device="sim1", home=tmp_path, settings=settings) as profiler:
        quiet = profiler.measure(sample).statistic("quiet")
        decision = profiler.decide(sample, quiet, confidence=0.999, indifference=0.001)
        assert not decision.settled and "undecided" in decision.reason
        assert not profiler.cache.decisions(profiler.cache_key(decision.graph_hash))


def test_a_decisions_budget_in_rounds_is_the_deciders(tmp_path, monkeypatch):
    """profiler.decider.budget_rounds bounds a decision's rounds (the request's rounds where
    they are more): a candidate at the limit, with the cost cut-offs off, stays to that
    budget and leaves undecided."""
    replaying_device(tmp_path, busy_trace(seed=3, spread=0.1))
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    sample = random_samples(space, 1, seed=1)[0]
    settings = dict(ROUNDS, rounds=5, window_spread=0.0, max_time_ms=100000.0)
    with LatencyProfiler(space, dummy, device="sim1", home=tmp_path, settings=settings) as profiler:
        quiet = profiler.measure(sample).statistic("quiet")
        sent = []
        measure_rounds = profiler.pool.measure_rounds
        monkeypatch.setattr(profiler.pool, "measure_rounds", lambda models, reference, request:
                            sent.append(request.settings["rounds"]) or
                            measure_rounds(models, reference, request))
        profiler.decider.budget_rounds = 25
        decision = profiler.decide(sample, quiet, confidence=0.999, indifference=0.001)
        assert sent == [25] and not decision.settled
        assert "undecided after 25 rounds" in decision.reason, decision.reason


def test_a_candidate_at_the_limit_leaves_undecided_within_the_window_spread(tmp_path):
    """At its own quiet latency, a candidate's rounds soon agree within the device's
    between-window spread: it leaves well before the budget, undecided, and says why; the
    profiler's window_spread setting reaches the agent, and the interval carries it. The
    indifference zone is too narrow for its own cut-off to fire, and the spreads are wide
    enough for a short window of these runs (5% noise each) to agree within. With +-2% for
    both, either cut-off may fire first, or neither, as the trace's draw falls."""
    replaying_device(tmp_path, busy_trace(seed=3, spread=0.05))
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    sample = random_samples(space, 1, seed=1)[0]
    for spread in (0.04, 0.06):
        with LatencyProfiler(space, dummy, device="sim1", home=tmp_path,
                             cache=tmp_path / f"cache-{spread}.sqlite",
                             settings=dict(ROUNDS, window_spread=spread)) as profiler:
            quiet = profiler.measure(sample).statistic("quiet")
            decision = profiler.decide(sample, quiet, confidence=0.99, indifference=0.001)
            assert not decision.settled and "a cost cut-off" in decision.reason
            assert f"between-window spread (+-{spread:.1%})" in decision.reason
            assert not profiler.cache.decisions(profiler.cache_key(decision.graph_hash))
            low, high = decision.interval_ms
            point = decision.median_ms
            assert low <= point / (1 + spread) * 1.000001 and high >= point / (1 - spread)
            rounds = int(decision.reason.split(" rounds")[0].split()[-1])
            assert rounds < 200  # the budget (DECISION_ROUNDS)


@pytest.mark.parametrize("limit,confidence,indifference,name", [
    (float("nan"), 0.99, 0.02, "limit_ms"), (0.0, 0.99, 0.02, "limit_ms"),
    (5.0, 1.0, 0.02, "confidence"), (5.0, 0.9, 0.0, "indifference"),
    (5.0, 0.9, 0.5, "indifference"), (5.0, 0.9, float("inf"), "indifference")])
def test_bad_decision_arguments_are_user_errors_naming_them(tmp_path, limit, confidence,
                                                            indifference, name):
    replaying_device(tmp_path, busy_trace())
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    with LatencyProfiler(space, dummy, device="sim1", home=tmp_path, settings=ROUNDS) as profiler:
        with pytest.raises(InvalidArgument, match=name):
            profiler.decide(random_samples(space, 1)[0], limit, confidence, indifference)


def test_decisions_in_rounds_on_this_machine_leave_when_decided(tiny):
    """The real agent on `local`: far limits are called after few rounds, each candidate's
    decision is evidence of its own window (never a measurement)."""
    settings = {"protocol": "rounds", "block_ms": 2.0, "ref_gap_ms": 10.0, "warmup_runs": 1,
                "rounds": 60, "max_time_ms": 5000.0}
    samples = random_samples(tiny, 3, seed=4)
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=settings) as profiler:
        quiet = [m.statistic("quiet") for m in profiler.measure_many(samples, progress=False)]
        below = profiler.decide_many(samples, max(quiet) * 20, progress=False)
        above = profiler.decide_many(samples, min(quiet) / 20, progress=False)
        stored = profiler.cache.decisions(profiler.cache_key(below[0].graph_hash))
    assert all(d.below and d.settled and d.source == "measured" for d in below)
    assert all(not d.below and d.settled for d in above)
    assert all("look 1," in d.reason for d in below)  # the first look called them
    assert all(0 < d.device_s for d in below) and stored and stored[0].below


def test_a_decision_window_whose_device_is_lost_fails_over_whole(tmp_path):
    two_replaying_devices_one_lost(tmp_path, busy_trace(seed=6))  # sim1's goes to sim2
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    with LatencyProfiler(space, dummy, device="kind:replay", home=tmp_path, settings=ROUNDS,
                         max_strikes=1) as profiler:
        profiler.decider.use_model = False
        decisions = profiler.decide_many(random_samples(space, 4, seed=1), 1000.0)
    assert all(d.below and d.settled and d.device == "sim2" for d in decisions)


@pytest.mark.parametrize("garbage", [
    {"rule": "rounds"}, {"level_ms": float("nan")}, {"level_ms": -1.0}, {"outcome": "maybe"},
    {"ratio_interval": [2.0, 1.0]}, {"ratio_interval": "wide"}, {"confidence": True},
    {"window_spread": float("nan")}, {"window_spread": 0.5}, {"window_spread": None},
    {"left": "bored"}, {"left": "spread"}, {"left": None}, {"outcome": None, "left": "settled"},
    {"outcome": None, "left": "spread", "ratio_interval": None},
    {"outcome": None, "left": "spread", "window_spread": 0.0},
    {"ratio": "0.5"}])
def test_an_agents_garbage_verdict_is_refused(garbage):
    from harness.steps.decider import _sound_verdict

    sound = {"rule": "rounds-limit", "level_ms": 3.0, "limit_ms": 4.0, "confidence": 0.99,
             "indifference": 0.02, "looks": 2, "rounds": 14, "outcome": "below",
             "ratio": 0.8, "ratio_interval": [0.78, 0.83], "window_spread": 0.02,
             "left": "settled"}
    assert _sound_verdict(sound)
    assert _sound_verdict(dict(sound, outcome=None, left="spread"))  # the cost cut-off
    assert _sound_verdict(dict(sound, outcome=None, left=None))      # the budget ran out
    assert not _sound_verdict(dict(sound, **garbage))


def test_a_stored_decision_answers_only_requests_that_allow_no_wider_window_spread():
    """A decision made without the between-window term (an older one, or --window-spread 0)
    has too narrow an interval for a request with the term: it is not served to it; one made
    with the term answers a request that asks for as much or less; the term survives the
    store's round trip, and an older record without it reads as 0."""
    from harness.store.decisions import Decision

    narrow = Decision(below=True, settled=True, limit_ms=10.0, confidence=0.99,
                      interval_ms=(8.0, 9.0), median_ms=8.5, runs=40, source="measured",
                      device_s=1.0, graph_hash="g", device="d", reason="", indifference=0.02)
    assert narrow.settles(9.5, 0.99, 0.02) and not narrow.settles(9.5, 0.99, 0.02, 0.02)
    assert not narrow.for_limit(9.5, 0.99, 0.02, window_spread=0.02).settled
    wide = Decision.from_dict(dict(narrow.to_dict(), window_spread=0.02))
    assert wide.settles(9.5, 0.99, 0.02, 0.02) and wide.settles(9.5, 0.99, 0.02, 0.01)
    assert not wide.settles(9.5, 0.99, 0.02, 0.03)
    assert wide.for_limit(9.5, 0.99, 0.02, window_spread=0.02).window_spread == 0.02
    old = {k: v for k, v in wide.to_dict().items() if k != "window_spread"}
    assert Decision.from_dict(old).window_spread == 0.0


def test_a_stored_loop_measurement_answers_a_rounds_decision_widened_by_the_term(tiny,
                                                                                  tmp_path):
    """A loop's window is one draw as a window of rounds is: a stored loop measurement that
    answers a decision of a rounds request has its interval widened by the request's
    between-window term, and a request without the term reads it as it is."""
    from harness.store.decisions import decision_from_samples

    sample = random_samples(tiny, 1, seed=5)[0]
    loop = {"warmup_runs": 1, "min_runs": 20, "min_time_ms": 5.0, "max_time_ms": 2000.0,
            "protocol": "loop"}
    with LatencyProfiler(tiny, tiny.dummy_input(), home=tmp_path, settings=loop) as profiler:
        measured = profiler.measure(sample)
    limit = measured.median / 1.03
    plain = decision_from_samples(measured.samples_ms, limit, 0.99, source="cached",
                                  device_s=0.0, graph_hash="", device="", reason="",
                                  indifference=0.02).interval_ms
    for spread, interval in ((0.02, (plain[0] / 1.02, plain[1] / 0.98)), (0.0, plain)):
        settings = dict(ROUNDS, window_spread=spread)
        with LatencyProfiler(tiny, tiny.dummy_input(), home=tmp_path,
                             settings=settings) as profiler:
            decision = profiler.decide(sample, limit)
        assert decision.source == "cached" and decision.reason == "a stored measurement"
        assert decision.window_spread == spread
        assert decision.interval_ms == pytest.approx(interval)
        called = limit_verdict(interval, decision.median_ms, limit, 0.02)
        assert decision.settled == (called is not None)  # called on the widened interval
