"""Recorded noise replayed on a simulated device, where the truth is known exactly: the
interleaved protocol recovers it through a change of speed that the sequential loop does not
survive; corrupt traces are refused by name."""
import json
from pathlib import Path

import pytest
import torch

from devices.noise_trace import NoiseTrace, NoiseTraceError, trace_from_blocks
from devices.registry import DeviceConfig, add_device
from devices.simulated import SimulatedModel
from harness import LatencyProfiler, random_samples
from harness.spaces import TinySpace

SIM_MS = 4.0
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "noise"


def step_trace(period_s=1.0, slow=2.0, length_s=8.0, every_ms=2.0):
    """The device runs at full speed for period_s, then `slow` times slower, and so on."""
    runs = []
    t = 0.0
    while t < length_s:
        factor = 1.0 if int(t / period_s) % 2 == 0 else slow
        runs.append((t, 3.0 * factor))
        t += every_ms / 1e3
    return NoiseTrace("stepper", {"reference": tuple(runs)})


def replaying_device(home, trace, name="sim1"):
    trace.save(home / "trace.json")
    add_device(home, DeviceConfig(name=name, transport="sim", address="simboard",
                                  sim_ms=SIM_MS, sim_seed=3, noise_trace="trace.json"))
    return SimulatedModel("simboard", SIM_MS, seed=3, noise=trace)


def test_a_trace_round_trips_and_replays_its_factors(tmp_path):
    trace = step_trace()
    trace.save(tmp_path / "t.json")
    again = NoiseTrace.load(tmp_path / "t.json")
    assert again.quiet_ms == pytest.approx(3.0) and again.duration_s == pytest.approx(
        trace.duration_s)
    assert again.factor_at(0.5) == pytest.approx(1.0)
    assert again.factor_at(1.5) == pytest.approx(2.0)
    assert again.factor_at(1.5 + again.duration_s) == pytest.approx(2.0)  # it wraps around


@pytest.mark.parametrize("content, problem", [
    ("", "cannot be read as JSON"), ("[1, 2]", "is not a harness-noise-trace"),
    (json.dumps({"format": "harness-noise-trace", "version": 9}), "version"),
    (json.dumps({"format": "harness-noise-trace", "version": 1, "runs": {}}), "no runs"),
    (json.dumps({"format": "harness-noise-trace", "version": 1,
                 "runs": {"reference": [[0, 1.0], [1, "x"]]}}), "not \\[time"),
    (json.dumps({"format": "harness-noise-trace", "version": 1,
                 "runs": {"reference": [[1, 1.0], [0, 1.0]]}}), "out of time order"),
    (json.dumps({"format": "harness-noise-trace", "version": 1,
                 "runs": {"reference": [[0, 1.0]]}}), "at least two runs"),
    # a quiet level near 0 ms: every replayed run would be infinitely slow
    (json.dumps({"format": "harness-noise-trace", "version": 1,
                 "runs": {"reference": [[0, 5e-324], [1, 1e8], [2, 3.0]]}}), "as slow as its quiet"),
    (json.dumps({"format": "harness-noise-trace", "version": 1,
                 "runs": {"reference": [[0, 1.0], [1, 1.0], [2, 5000.0]]}}), "as slow as its quiet"),
])
def test_a_corrupt_or_hostile_trace_is_refused_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(NoiseTraceError, match=problem) as refused:
        NoiseTrace.load(path)
    assert str(path) in str(refused.value)
    with pytest.raises(NoiseTraceError, match="not a readable file"):
        NoiseTrace.load(tmp_path)  # a folder


def test_blocks_become_a_trace_with_each_run_timed_from_its_block():
    trace = trace_from_blocks("dev", {"reference": [[0, -1, 1, [2.0, 2.0], 0.0],
                                                    [0, 0, 3, [4.0, 2.0], 0.01]]})
    assert trace.runs["reference"] == ((0.0, 2.0), (0.002, 2.0), (0.01, 4.0), (0.014, 2.0))


def test_interleaved_rounds_recover_the_truth_through_speed_steps_the_loop_does_not(tmp_path):
    spec = replaying_device(tmp_path, step_trace())
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    samples = random_samples(space, 8, seed=0)
    rounds = {"protocol": "rounds", "rounds": 20, "block_ms": 10.0, "ref_gap_ms": 30.0,
              "warmup_runs": 1, "max_time_ms": 60000.0}
    loop = {"min_runs": 20, "min_time_ms": 150.0, "warmup_runs": 1, "protocol": "loop"}
    with LatencyProfiler(space, dummy, device="sim1", home=tmp_path, settings=rounds,
                         statistic="ratio") as profiler:
        measured = profiler.measure_many(samples, progress=False)
        reference_ms = spec.graph_median_ms(profiler.reference().sha256)
    truth = [spec.graph_median_ms(m.provenance.model_sha256) / reference_ms for m in measured]
    errors = [abs(m.interleaved.ratio / true - 1) for m, true in zip(measured, truth)]
    assert max(errors) < 0.02, errors
    # the quiet-state latency: the ratio times the reference's quiet level (its low quantile
    # over the device's history), the graph's latency at full speed
    quiet = [abs(m.interleaved.quiet_ms / spec.graph_median_ms(m.provenance.model_sha256) - 1)
             for m in measured]
    assert max(quiet) < 0.02, quiet
    assert sum(m.interleaved.dropped for m in measured) > 0  # blocks across a step
    add_device(tmp_path / "loop", DeviceConfig(
        name="sim1", transport="sim", address="simboard", sim_ms=SIM_MS, sim_seed=3,
        noise_trace=str(tmp_path / "trace.json")))
    with LatencyProfiler(space, dummy, device="sim1", home=tmp_path / "loop",
                         settings=loop) as sequential:
        timed = [sequential.measure(s) for s in samples]
    loop_errors = [abs(m.median / spec.graph_median_ms(m.provenance.model_sha256) - 1)
                   for m in timed]
    # the loop's median is its graph's latency at whatever speed its second ran: off by up
    # to the step (2x) for some, where the rounds' ratio is within 2% for every one
    assert max(loop_errors) > 0.3, loop_errors


def two_replaying_devices_one_lost(home, trace):
    """sim1 and sim2 of kind "replay", both replaying `trace`; sim1 is down."""
    from devices.simulated import down_path

    trace.save(home / "trace.json")
    for name in ("sim1", "sim2"):
        add_device(home, DeviceConfig(name=name, transport="sim", address="simboard",
                                      kind="replay", sim_ms=SIM_MS, sim_seed=3,
                                      noise_trace="trace.json"))
    down_path(home, "sim1").parent.mkdir(parents=True, exist_ok=True)
    down_path(home, "sim1").touch()


def test_a_window_whose_device_is_lost_fails_over_whole_to_another(tmp_path):
    two_replaying_devices_one_lost(tmp_path, step_trace())  # sim1's window goes to sim2
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    settings = {"protocol": "rounds", "rounds": 8, "block_ms": 10.0, "warmup_runs": 1}
    with LatencyProfiler(space, dummy, device="kind:replay", home=tmp_path, settings=settings,
                         max_strikes=1) as profiler:
        measured = profiler.measure_many(random_samples(space, 4, seed=1), progress=False)
        assert {m.device for m in measured} == {"sim2"}
        assert all(m.interleaved is not None for m in measured)
        stored = profiler.cache.measurement_counts()
    assert stored == {"sim2": len({m.graph_hash for m in measured})}  # nothing of sim1's


def test_the_ci_rule_on_rounds_stops_once_every_ratio_is_known_within_rel_ci(tmp_path):
    spec = replaying_device(tmp_path, step_trace())
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    settings = {"protocol": "rounds", "stop": "ci", "rel_ci": 0.01, "rounds": 5000,
                "block_ms": 10.0, "warmup_runs": 1, "max_time_ms": 600000.0}
    with LatencyProfiler(space, dummy, device="sim1", home=tmp_path, settings=settings,
                         statistic="ratio") as profiler:
        measured = profiler.measure_many(random_samples(space, 5, seed=2), progress=False)
        reference_ms = spec.graph_median_ms(profiler.reference().sha256)
    for m in measured:
        assert m.provenance.stop["reason"] == "precise"
        assert 10 <= m.rounds.completed < 5000
        assert m.interleaved.statistical_half_width <= 0.01  # what the ci rule stopped on
        truth = spec.graph_median_ms(m.provenance.model_sha256) / reference_ms
        assert abs(m.interleaved.ratio / truth - 1) < 0.01


def test_a_replay_is_seeded_and_its_clock_goes_on_across_sessions(tmp_path):
    trace = step_trace()
    replaying_device(tmp_path, trace)
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    sample = random_samples(space, 1, seed=0)[0]
    loop = {"min_runs": 20, "min_time_ms": 100.0, "warmup_runs": 1, "protocol": "loop"}
    runs = []
    for _ in range(2):
        with LatencyProfiler(space, dummy, device="sim1", home=tmp_path, settings=loop,
                             refresh=True) as profiler:
            runs.append(profiler.measure(sample).samples_ms)
    assert (tmp_path / "sim-clock" / "sim1").exists()
    assert runs[0] != runs[1]  # the second session goes on where the first stopped
    for trial in ("a", "b"):  # the same history in a fresh home gives the same runs
        (tmp_path / trial).mkdir()
        replaying_device(tmp_path / trial, trace)
        with LatencyProfiler(space, dummy, device="sim1", home=tmp_path / trial, settings=loop,
                             refresh=True) as profiler:
            runs.append(profiler.measure(sample).samples_ms)
    assert runs[2] == runs[3] == runs[0]


def test_a_replay_runs_at_the_recorded_speed_of_its_moment_floor_included():
    """A run takes the factor of the recorded run nearest to its moment: two graphs run
    close in time see the same speed (as on a real device), and no replayed run is faster
    than a recorded one (jitter drawn apart from the moment ran the loaded trace's runs 27%
    below its quiet level)."""
    trace = NoiseTrace.load(FIXTURES / "loaded.json")
    recorded = sorted(ms / trace.quiet_ms for _, ms in trace.runs["reference"])
    spec = SimulatedModel("replayer", 10.0, seed=1, noise=trace)
    clock = type("Clock", (), {"now": 0.0})()  # what a runner reads and advances
    runs = {sha: spec.runner(sha, clock) for sha in ("a" * 64, "b" * 64)}
    factors = []
    for _ in range(3000):
        for sha, run in runs.items():
            began = clock.now
            run()
            factors.append((clock.now - began) * 1e3 / spec.graph_median_ms(sha))
    assert min(factors) >= recorded[0] - 1e-9
    assert max(factors) <= recorded[-1] + 1e-9
    pairs = list(zip(factors[::2], factors[1::2]))  # a and b, one after the other
    assert sum(a == pytest.approx(b) for a, b in pairs) > 0.5 * len(pairs)


def test_a_trace_with_huge_or_nested_numbers_is_refused(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"format": "harness-noise-trace", "version": 1, "runs": {"reference": '
                    '[[0, 1.0], [1, 1' + "0" * 400 + ']]}}')
    with pytest.raises(NoiseTraceError, match="not \\[time"):
        NoiseTrace.load(path)
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(NoiseTraceError, match="cannot be read"):
        NoiseTrace.load(path)


def test_a_device_read_by_the_wall_keeps_its_k_from_session_to_session(tmp_path):
    """A simulated device's blocks are read by the wall clock: a later session finds the
    device's history under that clock, and sends the k its level implies instead of
    probing anew."""
    from agents.ort_agent import runs_per_block

    replaying_device(tmp_path, step_trace())
    space, dummy = TinySpace(), torch.randn(1, 3, 32, 32)
    settings = {"protocol": "rounds", "rounds": 4, "block_ms": 10.0, "warmup_runs": 1}
    for session, sample in enumerate(random_samples(space, 3, seed=5)):
        with LatencyProfiler(space, dummy, device="sim1", home=tmp_path, settings=settings,
                             statistic="ratio") as profiler:
            level, blocks = profiler.steps.known_reference()
            measured = profiler.measure(sample)
        assert measured.rounds.clock == "wall"
        if session == 0:  # a new device: no history, its window probes
            assert (level, blocks, measured.settings["block_runs"]) == (None, 0, 0)
        else:  # the wall clock's history, and the k its level implies
            assert blocks > 0
            assert measured.settings["block_runs"] == measured.rounds.reference_k == \
                runs_per_block(settings["block_ms"], level)
