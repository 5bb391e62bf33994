"""The benchmarks' noisy neighbour is never left running, and a device's noise is measured:
`devices check` prints its noise level, `devices record-noise` writes a trace that loads."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import Neighbour  # noqa: E402
from devices.noise_trace import NoiseTrace, NoiseTraceError  # noqa: E402


def neighbour_pids():
    found = subprocess.run(["pgrep", "-f", "scripts/neighbour.py"], capture_output=True,
                           text=True).stdout.split()
    return [int(pid) for pid in found]


def gone_within(seconds, pids):
    """Whether every pid in `pids` has ended within `seconds` (a bounded wait, not a timing
    assertion: the neighbour checks its parent five times a second)."""
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        if not set(pids) & set(neighbour_pids()):
            return True
        time.sleep(0.2)
    return False


def test_the_neighbour_stops_when_the_block_fails():
    with pytest.raises(RuntimeError):
        with Neighbour("1", seed=1) as neighbour:
            deadline = time.monotonic() + 20
            while len(neighbour_pids()) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)  # the leader forks its worker once numpy is imported
            started = neighbour_pids()
            assert neighbour.process.pid in started and len(started) >= 2  # leader, worker
            raise RuntimeError("the benchmark failed")
    assert gone_within(10, started)


def test_the_neighbour_stops_when_the_benchmark_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, {str(ROOT / 'scripts' / 'neighbour.py')!r},
                          "--cpus", "1", "--seed", "2"])
        time.sleep(60)
        """)])
    try:
        deadline = time.monotonic() + 20
        while not neighbour_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        started = neighbour_pids()
        assert started
    finally:
        os.kill(parent.pid, signal.SIGKILL)  # as a benchmark killed with -9
        parent.wait()
    assert gone_within(10, started), "the neighbour outlived the benchmark that started it"


def test_devices_check_prints_the_noise_level_and_record_noise_writes_a_trace(tmp_path):
    env = dict(os.environ, HARNESS_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    check = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "check", "local"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert check.returncode == 0, check.stderr
    assert "noise: reference blocks vary" in check.stdout
    out = tmp_path / "trace.json"
    record = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "record-noise",
                             "local", "--minutes", "0.05", "--input-size", "64", "--out",
                             str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert record.returncode == 0, record.stderr
    trace = NoiseTrace.load(out)
    assert {"reference", "small", "large"} <= set(trace.runs)
    assert trace.quiet_ms > 0 and trace.duration_s > 1
    refused = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "record-noise",
                              "local", "--minutes", "0", "--out", str(out)],
                             capture_output=True, text=True, env=env, timeout=600)
    assert refused.returncode != 0 and "--minutes" in refused.stderr


def test_record_noise_checks_where_it_writes_before_recording(tmp_path):
    from harness.campaigns.noise import record_noise
    from harness.errors import InvalidArgument

    # the destination is checked before any device is asked for: a device that does not
    # exist is never reached
    with pytest.raises(NoiseTraceError, match="does not exist") as refused:
        record_noise("no-such-device", 30, tmp_path / "missing" / "trace.json", home=tmp_path)
    assert "nothing was recorded" in str(refused.value)
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(NoiseTraceError, match="not a regular file"):
        record_noise("no-such-device", 30, tmp_path / "folder.json", home=tmp_path)
    for minutes in (float("inf"), float("nan"), 0, -1):
        with pytest.raises(InvalidArgument, match="minutes"):
            record_noise("no-such-device", minutes, tmp_path / "trace.json", home=tmp_path)
    env = dict(os.environ, HARNESS_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    refused_cli = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "record-noise",
                                  "local", "--minutes", "inf", "--out", str(tmp_path / "t.json")],
                                 capture_output=True, text=True, env=env, timeout=600)
    assert refused_cli.returncode != 0 and "--minutes" in refused_cli.stderr


def test_devices_check_reports_a_failed_noise_window_instead_of_aborting(monkeypatch, capsys,
                                                                         tmp_path):
    from devices.errors import MeasurementTimeout
    from harness.campaigns import noise
    from harness.cli import main

    def fails(*args, **kwargs):
        raise MeasurementTimeout("the window took too long", fix="raise timeout_s")

    monkeypatch.setenv("HARNESS_HOME", str(tmp_path))
    monkeypatch.setattr(noise, "noise_level", fails)
    assert main(["devices", "check", "local"]) == 1
    printed = capsys.readouterr().out
    assert "noise: not measured" in printed
    assert "problem: its window of interleaved rounds failed: TIMEOUT: the window took too long" \
        in printed
    assert printed.rstrip().endswith("local: NOT ready")


def test_a_recording_no_trace_can_stand_for_keeps_its_blocks(tmp_path, monkeypatch):
    from harness.campaigns import noise

    # [round, position, sequence, runs ms, start s]: one run 5000x the quiet level
    blocks = {"reference": [[0, 0, 0, [1.0, 1.0], 0.0], [1, 0, 1, [5000.0], 1.0]],
              "small": [[0, 1, 2, [0.5], 0.5]], "large": [[0, 2, 3, [2.0], 0.7]]}
    monkeypatch.setattr(noise, "_window", lambda *args, **kwargs: blocks)
    with pytest.raises(NoiseTraceError, match="as slow as its quiet") as refused:
        noise.record_noise("local", 1, tmp_path / "trace.json", home=tmp_path)
    kept = list((tmp_path / "noise-traces").iterdir())
    assert len(kept) == 1 and str(kept[0]) in str(refused.value)
    assert json.loads(kept[0].read_text()) == blocks
    assert not (tmp_path / "trace.json").exists()
    # runs below the clock's resolution: a typed error, not a division by zero
    with pytest.raises(NoiseTraceError, match="quiet level of 0 ms"):
        NoiseTrace("clock", {"reference": ((0.0, 0.0), (1.0, 0.0), (2.0, 1.0))})
