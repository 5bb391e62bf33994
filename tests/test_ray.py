"""A multi-host farm on a local Ray cluster: two emulated hosts, each serving its own board."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from harness import Cache, LatencyProfiler, random_samples  # noqa: E402
from tests.conftest import FAST  # noqa: E402
from tests.ssh_fixtures import client_key, needs_root, register, testfarm  # noqa: E402,F401

pytestmark = needs_root
RAY = str(Path(sys.executable).with_name("ray"))


def serve(home: Path, *args: str) -> None:
    env = dict(os.environ, HARNESS_HOME=str(home))
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "farm", "serve", *args],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def farm(tmp_path, client_key):
    """Head on loopback, and hosts A and B, each with one board of kind testboard."""
    port = testfarm.free_port()
    boards, homes = [], []
    try:
        serve(tmp_path / "head-home", "--port", str(port))
        for index, host in ((5, "hostA"), (6, "hostB")):
            home = tmp_path / host
            board = testfarm.Board(index, tmp_path, client_key).start()
            boards.append(board)
            register(home, f"board{index}", f"root@{board.address}", client_key,
                     Path(board.workdir))
            serve(home, "--address", f"127.0.0.1:{port}")
            homes.append(home)
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
        for board in boards:
            board.destroy()


def test_profiling_through_farm_resources_on_two_hosts(tiny, home, farm):
    samples = random_samples(tiny, 6, seed=1)
    settings = dict(FAST, min_time_ms=300.0, max_time_ms=3000.0)
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:testboard", farm=farm,
                         settings=settings) as profiler:
        assert len(profiler.devices) == 2  # one slot per device the farm offers
        measured = profiler.measure_many(samples)
        assert [m.graph_hash for m in measured] == [profiler.graph_hash(s) for s in samples]
    fresh = [m for m in measured if m.source == "measured"]
    assert {m.device for m in fresh} == {"board5", "board6"}  # both hosts worked
    with Cache(home / "cache.sqlite") as cache:                 # results in the caller's cache
        assert cache.stats()["measurements"] == len(fresh)
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:testboard", farm=farm,
                         settings=settings) as again:
        assert {m.source for m in again.measure_many(samples)} == {"cached"}
