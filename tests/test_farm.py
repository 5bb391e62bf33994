"""Device pools on test boards in network namespaces: leases, fail-over, resume, sharing."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import Cache, LatencyProfiler, random_samples
from tests.conftest import FAST
from tests.ssh_fixtures import client_key, needs_root, register, testfarm  # noqa: F401

pytestmark = needs_root

STEADY = dict(FAST, min_time_ms=300.0, max_time_ms=3000.0)


@pytest.fixture
def pool(tmp_path, client_key, home):
    """Two boards of kind 'testboard', each in its own namespace."""
    boards = [testfarm.Board(index, tmp_path, client_key).start() for index in (5, 6)]
    for board in boards:
        register(home, f"board{board.index}", f"root@{board.address}", client_key,
                 Path(board.workdir))
    yield boards
    for board in boards:
        board.destroy()


def lease_windows(home):
    """Lease windows per device, from what the cache stored."""
    with Cache(home / "cache.sqlite") as cache:
        rows = cache._query("read", "SELECT record FROM measurements")
    windows = {}
    for (record,) in rows:
        data = json.loads(record)
        windows.setdefault(data["device"], []).append(tuple(data["provenance"]["lease"]))
    return windows


def assert_no_overlap(windows):
    for device, spans in windows.items():
        spans = sorted(set(spans))  # candidates of one window of rounds share its lease
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, f"two measurements overlapped on {device}"


def test_a_pool_shares_the_work_and_never_overlaps_on_a_device(tiny, home, pool):
    samples = random_samples(tiny, 6, seed=1)
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:testboard",
                         settings=STEADY) as profiler:
        measured = profiler.measure_many(samples)
        assert [m.graph_hash for m in measured] == [profiler.graph_hash(s) for s in samples]
    windows = lease_windows(home)
    assert set(windows) == {"board5", "board6"}
    assert sum(len(w) for w in windows.values()) == len({m.graph_hash for m in measured})
    assert_no_overlap(windows)


def test_one_architecture_is_measured_once_in_a_pool(tiny, home, pool):
    sample = dict(random_samples(tiny, 1, seed=2)[0], **{"stage2.depth": 1})
    twin = dict(sample, **{"stage2.block1.kernel": 3 if sample["stage2.block1.kernel"] != 3 else 5})
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:testboard",
                         settings=FAST) as profiler:
        first, second = profiler.measure_many([sample, twin])
        assert first.graph_hash == second.graph_hash
        assert profiler.counters["measurements"] == 1
        assert {first.source, second.source} == {"measured", "cached"}


def test_jobs_fail_over_when_a_board_dies(tiny, home, pool):
    dead, alive = pool
    dead.sshd.kill_everything()
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:testboard", settings=FAST,
                         max_strikes=1, quarantine_s=600) as profiler:
        measured = profiler.measure_many(random_samples(tiny, 4, seed=3))
        assert {m.device for m in measured if m.source == "measured"} == {"board6"}
        assert profiler.pool.health.available() == ["board6"]
    # profile() fails over too
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:testboard",
                         settings=FAST) as profiler:
        assert profiler.measure(random_samples(tiny, 1, seed=4)[0]).device == "board6"


SWEEP = """
import sys
from harness import LatencyProfiler, random_samples
from harness.spaces import TinySpace
space = TinySpace()
settings = {"warmup_runs": 2, "min_runs": 5, "min_time_ms": 700.0, "max_time_ms": 3000.0}
if len(sys.argv) > 4:
    settings["protocol"] = sys.argv[4]  # else the default: rounds
with LatencyProfiler(space, space.dummy_input(), device=sys.argv[1], settings=settings) as p:
    p.measure_many(random_samples(space, int(sys.argv[2]), seed=int(sys.argv[3])))
"""


def measured_count(home) -> int:
    try:
        with Cache(home / "cache.sqlite") as cache:
            return cache.stats()["measurements"]
    except Exception:
        return 0


def test_an_interrupted_sweep_resumes_without_measuring_again(tiny, home, pool):
    env = dict(os.environ, HARNESS_HOME=str(home))
    # one model after another, so that a kill mid-sweep leaves some measured and some not
    sweep = subprocess.Popen([sys.executable, "-c", SWEEP, "kind:testboard", "8", "5", "loop"],
                             env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while measured_count(home) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(sweep.pid, signal.SIGKILL)  # a crash, mid-sweep
    sweep.wait()
    done = measured_count(home)
    assert 3 <= done < 8
    for board in pool:
        testfarm.kill_all(testfarm.processes_mentioning(board.workdir))
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:testboard",
                         settings=dict(FAST, min_time_ms=700.0, max_time_ms=3000.0)) as profiler:
        measured = profiler.measure_many(random_samples(tiny, 8, seed=5))
        distinct = len({m.graph_hash for m in measured})
        assert profiler.counters["measurements"] == distinct - done
    assert measured_count(home) == distinct


def test_two_processes_share_one_pool(tiny, home, pool):
    """Each process times its batch in interleaved rounds (the default): a window holds its
    device's lease from its first model to its last, and no two windows overlap."""
    env = dict(os.environ, HARNESS_HOME=str(home))
    sweeps = [subprocess.Popen([sys.executable, "-c", SWEEP, "kind:testboard", "3", str(seed)],
                               env=env) for seed in (10, 11)]
    for sweep in sweeps:
        assert sweep.wait(timeout=300) == 0
    windows = lease_windows(home)
    assert sum(len(w) for w in windows.values()) >= 5
    assert_no_overlap(windows)


def test_each_measurement_of_a_pool_records_its_own_export_time(tiny, home, pool, monkeypatch):
    """The export time travels with its model: with an export thread running ahead of two
    devices, a Measurement must record the export of its own graph, not the latest one."""
    import dataclasses

    import harness.steps.export_step

    real_export = harness.steps.export_step.export_sample

    def export_with_known_time(space, sample, dummy_input, **options):
        exported = real_export(space, sample, dummy_input, **options)
        return dataclasses.replace(exported, export_ms=float(int(exported.graph_hash[:6], 16)))

    monkeypatch.setattr(harness.steps.export_step, "export_sample", export_with_known_time)
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:testboard",
                         settings=STEADY) as profiler:
        measured = profiler.measure_many(random_samples(tiny, 6, seed=21))
    fresh = [m for m in measured if m.source == "measured"]
    assert len({m.graph_hash for m in fresh}) >= 3 and len({m.device for m in fresh}) == 2
    for m in fresh:
        assert m.provenance.export_ms == float(int(m.graph_hash[:6], 16))


def test_decisions_fail_over_when_a_board_dies(tiny, home, pool):
    """A device lost mid-decision fails over like a measurement; what the dead board would
    have decided comes from the live one, and nothing partial is stored."""
    dead, alive = pool
    dead.sshd.kill_everything()
    samples = random_samples(tiny, 4, seed=23)
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:testboard", settings=FAST,
                         max_strikes=1, quarantine_s=600) as profiler:
        decisions = profiler.decide_many(samples, 1000.0)
    assert all(d.below and d.settled for d in decisions)
    assert {d.device for d in decisions if d.source == "measured"} == {"board6"}
    with Cache(home / "cache.sqlite") as cache:
        assert cache.stats()["measurements"] == 0  # decisions are not measurements
