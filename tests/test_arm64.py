"""An emulated arm64 board: a real sshd chrooting into a Debian bullseye arm64 root whose
Python 3.9, numpy and onnxruntime run under qemu-user-static (scripts/testfarm). It is
100-500x slower than this machine: the slow board of another architecture that checks,
timeouts and stop rules have to live with. The tests skip, saying why, where the root cannot
be built (no debootstrap, qemu-user-static, binfmt_misc or network); scripts/test builds it.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devices.errors import LoadError, MeasurementTimeout
from harness import Cache, LatencyProfiler, random_samples
from tests.conftest import FAST
from tests.ssh_fixtures import client_key, leftovers, needs_root, register, testfarm  # noqa: F401

pytestmark = needs_root


@pytest.fixture(scope="module")
def arm64_root():
    try:
        return testfarm.arm64_root(log=lambda text: None)
    except testfarm.FarmUnavailable as exc:
        pytest.skip(f"no emulated arm64 board here: {exc}")


@pytest.fixture
def arm(arm64_root, tmp_path, client_key, home):
    """Board 'arm' (network namespace hnb-121), registered and trusted."""
    board = testfarm.Board(testfarm.ARM64_INDEX + 21, tmp_path, client_key,
                           root=arm64_root).start()
    register(home, "arm", f"root@{board.address}", client_key, Path(board.workdir),
             python="python3")
    yield board
    board.destroy()


def measurements(home) -> int:
    with Cache(home / "cache.sqlite") as cache:
        return cache.stats()["measurements"]


def board_has_litert(root) -> bool:
    return (root / ".testfarm-litert").exists()


def test_check_an_arm64_board_and_the_runtimes_it_lists(home, arm, arm64_root):
    """One `devices check` (a minute, emulated): the board's Python and onnxruntime, its tiny
    model's time, and the runtimes it has or cannot have."""
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "check", "arm"],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HARNESS_HOME=str(home)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CPython 3.9" in proc.stdout and "onnxruntime: 1.19" in proc.stdout
    assert "tiny model:" in proc.stdout and "arm: ok" in proc.stdout
    lines = {line.split(":")[0].strip(): line.split(":", 1)[1].strip()
             for line in proc.stdout.splitlines() if ":" in line}
    for runtime in ("executorch", "openvino"):  # their wheels need Python 3.10
        assert lines[runtime].startswith("not available: it needs Python >= 3.10"), lines
    if board_has_litert(arm64_root):
        assert lines["litert"] == "1.4.0"
    else:
        assert "pip install ai-edge-litert" in lines["litert"]


def test_profile_on_an_arm64_board(tiny, home, arm):
    sample = random_samples(tiny, 1, seed=21)[0]
    with LatencyProfiler(tiny, tiny.dummy_input(), device="arm", settings=FAST) as profiler:
        measured = profiler.measure(sample)
    assert measured.source == "measured" and measured.device == "arm"
    assert measured.device_fingerprint["machine"] == "aarch64"
    assert measured.device_fingerprint["python"].startswith("CPython 3.9")
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST) as local:
        here = local.measure(sample)
    assert measured.median > 5 * here.median  # emulated: far slower than this machine
    assert (arm.host_workdir / "models").is_dir()
    assert leftovers(arm.workdir) == []


def test_a_timeout_on_an_arm64_board_kills_the_agent_there(tiny, home, arm):
    sample = random_samples(tiny, 1, seed=22)[0]
    endless = dict(FAST, min_time_ms=60000.0, max_time_ms=90000.0)
    with LatencyProfiler(tiny, tiny.dummy_input(), device="arm", settings=endless,
                         timeout_s=8.0) as profiler:
        profiler.graph_hash(sample)
        profiler.identify()  # the agent started (slowly, emulated) before the clock starts
        started = time.monotonic()
        with pytest.raises(MeasurementTimeout):
            profiler.profile(sample)
        assert time.monotonic() - started < 8.0 + 3.0
        assert leftovers(arm.workdir, seconds=10) == []
    assert measurements(home) == 0


def test_an_arm64_board_measures_tflite_models_on_litert(tiny, home, arm, arm64_root):
    if not board_has_litert(arm64_root):
        pytest.skip("the arm64 root has no LiteRT (scripts/testfarm arm64-root adds it)")
    pytest.importorskip("litert_torch")
    sample = random_samples(tiny, 1, seed=23)[0]
    with LatencyProfiler(tiny, tiny.dummy_input(), device="arm", runtime="litert",
                         settings=FAST) as profiler:
        measured = profiler.measure(sample)
    assert measured.source == "measured" and measured.device == "arm"
    assert measured.provenance.runtime["name"] == "litert"
    assert measured.provenance.runtime["version"] == "1.4.0"
    assert measured.device_fingerprint["machine"] == "aarch64"
    assert measured.device_fingerprint["runtimes"] == {"litert": "1.4.0"}
    assert any(path.suffix == ".tflite" for path in (arm.host_workdir / "models").iterdir())
    with LatencyProfiler(tiny, tiny.dummy_input(), device="arm", runtime="openvino",
                         settings=FAST) as profiler:
        with pytest.raises(LoadError, match="needs Python >= 3.10"):
            profiler.measure(sample)
