"""LatencyProfiler on the local device: misses, hits, shared architectures, failures."""
import json
import multiprocessing

import pytest

from agents.ort_agent import AGENT_VERSION
from harness.errors import InvalidArgument
from harness import (BadRequest, Cache, InvalidSample, LatencyProfiler, MeasurementTimeout,
                     Profiler, random_samples)
from harness.spaces import TinySpace
from tests.conftest import FAST


@pytest.fixture
def profiler(tiny, home):
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST) as profiler:
        yield profiler


def test_miss_then_hit(profiler, tiny):
    sample = random_samples(tiny, 1, seed=1)[0]
    first = profiler.measure(sample)
    assert first.source == "measured" and first.n >= 5
    assert first.device == "local" and first.agent_version == AGENT_VERSION
    assert first.device_fingerprint["cpu_count"] >= 1
    assert first.provenance.model_sha256 and first.provenance.runtime["name"] == "onnxruntime"
    assert profiler.profile(sample) == first.median
    again = profiler.measure(sample)
    assert again.source == "cached" and again.samples_ms == first.samples_ms
    assert profiler.counters["measurements"] == 1 and profiler.counters["exports"] == 1
    assert isinstance(profiler, Profiler)


def test_a_new_profiler_answers_from_the_index_without_exporting(profiler, tiny, home):
    samples = random_samples(tiny, 3, seed=2)
    values = profiler.profile_many(samples)
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST) as fresh:
        assert [fresh.profile(s) for s in samples] == values
        assert fresh.counters["exports"] == 0 and fresh.counters["measurements"] == 0
        assert fresh.measure(samples[0]).source == "cached"
        assert fresh.counters["exports"] == 0


def test_results_written_by_another_process_are_found_without_exporting(profiler, tiny, home):
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST) as early:
        early.profile(random_samples(tiny, 1, seed=40)[0])  # learns the device, loads the cache
        sample = random_samples(tiny, 1, seed=41)[0]
        value = profiler.profile(sample)  # another profiler measures it afterwards
        assert early.profile(sample) == value
        assert early.counters["exports"] == 1 and early.counters["measurements"] == 1


def test_samples_of_one_architecture_share_a_measurement(profiler, tiny):
    sample = dict(random_samples(tiny, 1, seed=3)[0], **{"stage2.depth": 1})
    twin = dict(sample, **{"stage2.block1.kernel": 3 if sample["stage2.block1.kernel"] != 3 else 5})
    a, b = profiler.measure_many([sample, twin])
    assert a.graph_hash == b.graph_hash
    assert a.source == "measured" and b.source == "cached"
    assert profiler.counters["measurements"] == 1


def test_profile_many_keeps_input_order(profiler, tiny):
    samples = random_samples(tiny, 4, seed=4)
    measurements = profiler.measure_many(samples + samples[:2])
    assert [m.graph_hash for m in measurements] == [profiler.graph_hash(s) for s in samples + samples[:2]]
    assert profiler.counters["measurements"] == 4


def test_runtime_settings_are_part_of_the_key(profiler, tiny, home):
    sample = random_samples(tiny, 1, seed=5)[0]
    profiler.profile(sample)
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=dict(FAST, intra_op_threads=2)) as two:
        assert two.measure(sample).source == "measured"
        assert two.measure(sample).settings["intra_op_threads"] == 2
    # The timing loop is not part of the key: more runs of the same thing answer from the cache.
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=dict(FAST, min_runs=7)) as more:
        assert more.measure(sample).source == "cached"


def test_input_shape_is_part_of_the_key(profiler, tiny):
    import torch
    sample = random_samples(tiny, 1, seed=6)[0]
    profiler.profile(sample)
    with LatencyProfiler(tiny, torch.randn(2, 3, 32, 32), settings=FAST) as batch2:
        measured = batch2.measure(sample)
        assert measured.source == "measured"
        assert measured.input_signature == ({"shape": [2, 3, 32, 32], "dtype": "float32"},)


def test_refresh_measures_again_and_keeps_the_old_result(profiler, tiny):
    sample = random_samples(tiny, 1, seed=7)[0]
    profiler.profile(sample)
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST, refresh=True) as again:
        assert again.measure(sample).source == "measured"
    graph = profiler.graph_hash(sample)
    assert len(profiler.cache.history(profiler.cache_key(graph))) == 2


def test_statistic_choice(tiny):
    sample = random_samples(tiny, 1, seed=8)[0]
    with LatencyProfiler(tiny, tiny.dummy_input(), statistic="p90", settings=FAST) as p90:
        assert p90.profile(sample) == p90.measure(sample).p90
    with pytest.raises(ValueError, match="statistic"):
        LatencyProfiler(tiny, tiny.dummy_input(), statistic="average")


def test_a_failure_is_not_cached(tiny, home):
    sample = random_samples(tiny, 1, seed=9)[0]
    slow = dict(FAST, min_time_ms=20000.0, max_time_ms=30000.0)
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=slow, timeout_s=2.0) as profiler:
        with pytest.raises(MeasurementTimeout):
            profiler.profile(sample)
        assert profiler.cache.stats()["measurements"] == 0
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST) as profiler:
        assert profiler.measure(sample).source == "measured"


def test_bad_input_gets_clear_errors(profiler, tiny):
    with pytest.raises(InvalidSample, match="missing label .stage1.block0.expand"):
        profiler.profile({"stage1.depth": 1})
    with pytest.raises(InvalidArgument, match="min_runs"):
        LatencyProfiler(tiny, tiny.dummy_input(), settings={"min_runs": -1})
    with pytest.raises(BadRequest, match="no device named 'rpi4'"):
        LatencyProfiler(tiny, tiny.dummy_input(), device="rpi4").profile(
            random_samples(tiny, 1)[0])


def test_process_isolation(tiny):
    sample = random_samples(tiny, 1, seed=10)[0]
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST, isolation="process") as p:
        assert p.measure(sample).provenance.isolation == "process"


def _profile_in_another_process(home: str, seed: int, out: str) -> None:
    import os
    os.environ["HARNESS_HOME"] = home
    space = TinySpace()
    with LatencyProfiler(space, space.dummy_input(), settings=dict(FAST, min_time_ms=100.0)) as p:
        windows = [p.measure(s).provenance.lease for s in random_samples(space, 3, seed=seed)]
    with open(out, "w") as handle:
        json.dump(windows, handle)


def test_two_processes_never_measure_on_the_device_at_once(home, tmp_path):
    context = multiprocessing.get_context("spawn")
    outs = [str(tmp_path / f"windows{i}.json") for i in range(2)]
    processes = [context.Process(target=_profile_in_another_process,
                                 args=(str(home), 100 + i, outs[i])) for i in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(180)
        assert process.exitcode == 0
    windows = sorted(w for out in outs for w in json.load(open(out)))
    assert len(windows) == 6
    for (start, end), (next_start, _) in zip(windows, windows[1:]):
        assert end <= next_start, "two measurements overlapped on one device"
    with Cache(home / "cache.sqlite") as cache:
        assert cache.stats()["measurements"] == 6


def test_two_profilers_never_measure_one_architecture_twice(tiny, home):
    """Both miss the cache and queue for the device; the one that gets the lease second finds
    the other's result in the cache and gives the lease back unused."""
    import threading

    from harness import Cache

    sample = random_samples(tiny, 1, seed=31)[0]
    settings = dict(FAST, min_time_ms=1000.0, max_time_ms=5000.0)
    profilers = [LatencyProfiler(tiny, tiny.dummy_input(), settings=settings) for _ in range(2)]
    results = [None, None]

    def measure(index):
        results[index] = profilers[index].measure(sample)

    threads = [threading.Thread(target=measure, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(r.source for r in results) == ["cached", "measured"]
    assert sum(p.counters["measurements"] for p in profilers) == 1
    key = profilers[0].cache_key(results[0].graph_hash)
    for profiler in profilers:
        profiler.close()
    with Cache(home / "cache.sqlite") as cache:
        assert len(cache.history(key)) == 1
