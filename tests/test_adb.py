"""ADB phones: Debian's real adb server and adbutils against the project's emulated phone."""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from devices import registry
from devices.errors import AgentProtocolError, DeviceLost, MeasurementTimeout, ThermalError
from devices.perf_tool_client import parse_perf_test
from harness import Cache, LatencyProfiler, random_samples
from tests.conftest import FAST
from tests.ssh_fixtures import testfarm

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = FIXTURES.parent.parent
ADB = shutil.which("adb")
needs_adb = pytest.mark.skipif(ADB is None or os.geteuid() != 0,
                               reason="needs Debian's adb and root (.ci/run installs adb)")
# A private adb server, so the tests never touch a user's own; on a free port, so two test
# runs on one machine (two worktrees, two users) do not share one and kill it under each other.
SERVER_PORT = testfarm.free_port()


def adb(*args: str) -> str:
    return subprocess.run([ADB, "-P", str(SERVER_PORT), *args], capture_output=True, text=True,
                          timeout=60).stdout


@pytest.fixture(scope="module")
def adb_server():
    adb("start-server")
    yield SERVER_PORT
    adb("kill-server")


@pytest.fixture
def phone(tmp_path, adb_server):
    fixture = tmp_path / "phone"
    shutil.copytree(FIXTURES / "phone", fixture)
    emulated = testfarm.AdbPhone(testfarm.free_port(), fixture)  # a port outside 5555-5585
    assert not 5555 <= emulated.port <= 5585
    adb("connect", emulated.serial)
    yield emulated
    adb("disconnect", emulated.serial)
    emulated.stop()
    testfarm.kill_all(testfarm.processes_mentioning(str(tmp_path)))


def add_phone(home, phone, tmp_path, name="pixel", **kwargs):
    registry.add_device(home, registry.DeviceConfig(
        name=name, transport="adb", address=phone.serial, adb_port=SERVER_PORT,
        python=kwargs.pop("python", sys.executable), workdir=str(tmp_path / "data-local-tmp"),
        lock=str(tmp_path / "device.lock"), **kwargs))


def stored(home) -> int:
    with Cache(home / "cache.sqlite") as cache:
        return cache.stats()["measurements"]


def fixture_text(name: str) -> str:
    return (FIXTURES / "perf_test" / name).read_text()


def test_perf_test_parser_reads_the_real_output_formats():
    old = parse_perf_test(fixture_text("stdout_acl_1.3.txt"), fixture_text("result_acl_1.3.csv"))
    assert len(old["samples_ms"]) == 10 and old["samples_ms"][0] == pytest.approx(145.012)
    assert old["load_ms"] == pytest.approx(127.918) and old["first_run_ms"] is None
    assert old["loop_ms"] == pytest.approx(1449.16) and old["cpu_usage_percent"] == 68
    new = parse_perf_test(fixture_text("stdout_1.24.txt"),
                          fixture_text("result_1.24_six_columns.csv"))
    assert new["samples_ms"] == old["samples_ms"]  # the total time, not the submission time
    assert new["first_run_ms"] == 151


def test_perf_test_parser_refuses_truncated_output():
    lines = fixture_text("result_acl_1.3.csv").splitlines()
    with pytest.raises(AgentProtocolError, match="10 inference requests but .* 6 runs"):
        parse_perf_test(fixture_text("stdout_acl_1.3.txt"), "\n".join(lines[:6]))
    with pytest.raises(AgentProtocolError, match="no summary"):
        parse_perf_test(fixture_text("stdout_acl_1.3.txt")[:40], fixture_text("result_acl_1.3.csv"))
    with pytest.raises(AgentProtocolError, match="fields"):
        parse_perf_test(fixture_text("stdout_acl_1.3.txt"), lines[0][:20])


@needs_adb
def test_adb_lists_the_emulated_phone(phone):
    listing = adb("devices")
    assert f"{phone.serial}\tdevice" in listing


@needs_adb
def test_profile_on_a_phone_with_python(tiny, home, phone, tmp_path):
    add_phone(home, phone, tmp_path, max_temp_c=60.0)
    with LatencyProfiler(tiny, tiny.dummy_input(), device="pixel", settings=FAST) as profiler:
        measured = profiler.measure(random_samples(tiny, 1, seed=1)[0])
        assert profiler.measure(random_samples(tiny, 1, seed=1)[0]).source == "cached"
    identity = measured.device_fingerprint
    assert identity["android_model"] == "Pixel 7 (emulated)" and identity["soc"] == "GS201"
    assert identity["sdk"] == "34" and identity["build"].startswith("google/panther")
    control = measured.provenance.device_control
    thermal = measured.provenance.thermal_before  # the phone's zones, kept once
    assert [z["temp_c"] for z in thermal] == [38.5, 41.2, 29.0] and measured.hottest_c() == 41.2
    assert measured.provenance.thermal_after and "thermal_before" not in control
    assert "thermal" not in measured.provenance.device_state
    assert control["pinned_mask"] == ["2"]                     # cpu1 is the big core
    assert measured.pinned_to() == "mask 2"
    assert measured.provenance.controlled["affinity"] == [1]  # and the agent ran there
    assert measured.flags == () or all(not f.startswith(("hot", "throttled")) for f in measured.flags)


@needs_adb
def test_thermal_state_and_pinning_in_check_and_table(home, phone, tmp_path):
    add_phone(home, phone, tmp_path, max_temp_c=60.0)
    env = dict(os.environ, HARNESS_HOME=str(home))
    check = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "check", "pixel"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "hottest zone 41.2 C" in check.stdout and "pinned: mask 2" in check.stdout
    table = subprocess.run([sys.executable, "-m", "harness.cli", "profile", "--space",
                            "harness.spaces:TinySpace", "--device", "pixel", "--samples", "1",
                            "--min-runs", "5", "--min-time-ms", "5"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert table.returncode == 0, table.stderr
    header, _, row = table.stdout.splitlines()[:3]
    assert "temp C" in header and "pinned" in header
    assert "41.2" in row and "mask 2" in row and "pixel" in row


@needs_adb
def test_perf_test_mode(tiny, home, phone, tmp_path):
    add_phone(home, phone, tmp_path, agent="perf-test",
              perf_test=str(FIXTURES / "perf_test" / "onnxruntime_perf_test"))
    with LatencyProfiler(tiny, tiny.dummy_input(), device="pixel",
                         settings=dict(FAST, min_runs=40)) as profiler:
        measured = profiler.measure(random_samples(tiny, 1, seed=2)[0])
    assert measured.n == 40 and measured.load_ms > 0
    assert measured.agent_version.startswith("perf_test-")
    assert measured.provenance.runtime["name"] == "onnxruntime_perf_test"
    assert measured.device_fingerprint["android_model"] == "Pixel 7 (emulated)"


@needs_adb
def test_truncated_perf_test_output_is_an_error_and_caches_nothing(tiny, home, phone, tmp_path,
                                                                  monkeypatch):
    add_phone(home, phone, tmp_path, agent="perf-test",
              perf_test=str(FIXTURES / "perf_test" / "onnxruntime_perf_test"))
    monkeypatch.setenv("HARNESS_FAKE_PERF_TRUNCATE", "1")  # the phone's shell inherits it
    with LatencyProfiler(tiny, tiny.dummy_input(), device="pixel", settings=FAST) as profiler:
        with pytest.raises(AgentProtocolError, match="truncated"):
            profiler.profile(random_samples(tiny, 1, seed=3)[0])
    assert stored(home) == 0


@needs_adb
def test_a_hot_phone_is_waited_for_then_refused(tiny, home, phone, tmp_path):
    zone = phone.fixture / "sys" / "thermal" / "thermal_zone1" / "temp"
    zone.write_text("80000\n")
    add_phone(home, phone, tmp_path, max_temp_c=45.0, cool_timeout_s=2.0)
    with LatencyProfiler(tiny, tiny.dummy_input(), device="pixel", settings=FAST) as profiler:
        started = time.monotonic()
        with pytest.raises(ThermalError, match="80.0 C, above the 45.0 C limit"):
            profiler.profile(random_samples(tiny, 1, seed=4)[0])
        assert time.monotonic() - started >= 2.0
        assert stored(home) == 0
    registry.remove_device(home, "pixel")
    add_phone(home, phone, tmp_path, max_temp_c=45.0, cool_timeout_s=30.0)
    zone.write_text("40000\n")
    with LatencyProfiler(tiny, tiny.dummy_input(), device="pixel", settings=FAST) as profiler:
        assert profiler.measure(random_samples(tiny, 1, seed=8)[0]).source == "measured"
        zone.write_text("80000\n")
        threading.Timer(1.5, zone.write_text, ("40000\n",)).start()  # the phone cools down
        measured = profiler.measure(random_samples(tiny, 1, seed=4)[0])
    assert measured.provenance.device_control["waited_s"] >= 0.5  # it waited to cool


@needs_adb
def test_a_throttled_run_is_flagged(tiny, home, phone, tmp_path):
    (phone.fixture / "sys" / "cpu" / "cpu1" / "cpufreq" / "scaling_max_freq").write_text("1200000\n")
    add_phone(home, phone, tmp_path)
    with LatencyProfiler(tiny, tiny.dummy_input(), device="pixel", settings=FAST) as profiler:
        measured = profiler.measure(random_samples(tiny, 1, seed=5)[0])
    assert "throttled: CPUs [1] capped below their maximum frequency" in measured.flags


SLOW = dict(FAST, min_time_ms=3000.0, max_time_ms=8000.0)


@needs_adb
def test_phone_killed_mid_run_is_a_typed_error_and_caches_nothing(tiny, home, phone, tmp_path):
    add_phone(home, phone, tmp_path)
    with LatencyProfiler(tiny, tiny.dummy_input(), device="pixel", settings=SLOW,
                         timeout_s=30.0) as profiler:
        profiler.profile(random_samples(tiny, 1, seed=9)[0])  # the agent is up and running
        profiler.graph_hash(random_samples(tiny, 1, seed=6)[0])
        threading.Timer(1.5, phone.stop).start()  # strikes in the middle of the next run
        started = time.monotonic()
        with pytest.raises((DeviceLost, MeasurementTimeout)):
            profiler.profile(random_samples(tiny, 1, seed=6)[0])
        assert time.monotonic() - started < 30
    assert stored(home) == 1  # the measurement before the fault, nothing from the faulty one


@needs_adb
@pytest.mark.parametrize("fault", ["adb disconnect", "adb server restarted"])
def test_transient_adb_faults_mid_run_are_retried_once_from_scratch(tiny, home, phone, tmp_path,
                                                                    fault):
    """The worker's stream dies; harness reconnects (Wi-Fi serial) or restarts the adb
    server, starts a new agent and measures again from the start: the stored result is a
    whole measurement, never the cut one."""
    add_phone(home, phone, tmp_path)
    action = {"adb disconnect": lambda: adb("disconnect", phone.serial),
              "adb server restarted": lambda: adb("kill-server")}[fault]
    with LatencyProfiler(tiny, tiny.dummy_input(), device="pixel", settings=SLOW,
                         timeout_s=60.0) as profiler:
        profiler.profile(random_samples(tiny, 1, seed=9)[0])
        first_worker = profiler.pool.client("pixel").worker_pid
        threading.Timer(1.5, action).start()
        started = time.monotonic()
        measured = profiler.measure(random_samples(tiny, 1, seed=6)[0])
        assert time.monotonic() - started >= 1.5 + 3.0  # the loop ran again after the fault
        assert measured.provenance.loop_ms >= 3000 and not measured.provenance.capped
        assert profiler.pool.client("pixel").worker_pid != first_worker
    assert stored(home) == 2


@needs_adb
def test_a_phone_without_python_or_perf_test_says_what_to_install(home, phone, tmp_path):
    add_phone(home, phone, tmp_path, python="python3.99-not-here")
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "check", "pixel"],
                          capture_output=True, text=True, env=dict(os.environ, HARNESS_HOME=str(home)))
    assert proc.returncode == 1
    assert "Termux" in proc.stdout and "--agent perf-test" in proc.stdout


@needs_adb
def test_devices_add_and_list_with_adb(home):
    env = dict(os.environ, HARNESS_HOME=str(home))
    out = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "add", "pixel7",
                          "--adb", "2A1B0C3D", "--max-temp", "45"], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert "harness devices check pixel7" in out
    listing = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "list"],
                             capture_output=True, text=True, env=env, check=True).stdout
    assert "pixel7" in listing and "adb" in listing
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "add", "p2", "--adb",
                          "X", "--agent", "perf-test"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "--perf-test PATH" in bad.stderr


def start_testfarm_phone(home, port):
    """`scripts/testfarm phone` as the README runs it, on the tests' private adb server."""
    farm = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "testfarm"), "phone",
                             "--port", str(port), "--adb-port", str(SERVER_PORT)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, HARNESS_HOME=str(home)))
    lines = []
    for line in farm.stdout:
        lines.append(line)
        if line.startswith("registered as phone1"):
            return farm
    raise AssertionError(f"testfarm phone did not start: {''.join(lines)}")


@needs_adb
def test_the_testfarm_phone_checks_out_of_the_box_and_is_forgotten_when_stopped(home,
                                                                                adb_server):
    env = dict(os.environ, HARNESS_HOME=str(home))
    for stop in ("Ctrl-C", "testfarm stop"):
        port = testfarm.free_port()
        farm = start_testfarm_phone(home, port)
        try:
            check = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "check",
                                    "phone1"], capture_output=True, text=True, env=env,
                                   timeout=300)
            assert check.returncode == 0, check.stdout + check.stderr
            assert "phone1: ok" in check.stdout
            if stop == "Ctrl-C":
                farm.send_signal(signal.SIGINT)
            else:
                subprocess.run([sys.executable, str(ROOT / "scripts" / "testfarm"), "stop"],
                               env=env, check=True, capture_output=True, timeout=60)
            assert farm.wait(timeout=30) == 0
        finally:
            if farm.poll() is None:
                farm.kill()
        assert "phone1" not in registry.load_devices(home), f"still registered after {stop}"
        assert f"127.0.0.1:{port}" not in adb("devices")
    assert not (home / "testfarm" / "state.json").exists()


@needs_adb
def test_a_phone_without_python_measures_litert_with_benchmark_model(tiny, home, phone,
                                                                     tmp_path):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("litert_torch")
    fake = FIXTURES / "native_bench" / "benchmark_model"
    tool = tmp_path / "benchmark_model"  # run by this interpreter, which has LiteRT
    tool.write_text(fake.read_text().replace("#!/usr/bin/env python3", f"#!{sys.executable}", 1))
    tool.chmod(0o755)
    add_phone(home, phone, tmp_path, agent="benchmark-model", perf_test=str(tool))
    with LatencyProfiler(tiny, tiny.dummy_input(), device="pixel", runtime="litert",
                         settings=dict(FAST, min_runs=3)) as profiler:
        measured = profiler.measure(random_samples(tiny, 1, seed=4)[0])
    assert measured.n == 3 and measured.agent_version.startswith("benchmark-model-")
    assert measured.provenance.runtime["name"] == "litert"
    assert "input values" in " ".join(measured.provenance.controlled["not_controlled"])
    assert measured.device_fingerprint["android_model"] == "Pixel 7 (emulated)"
    with LatencyProfiler(tiny, tiny.dummy_input(), device="pixel", settings=FAST) as onnx:
        with pytest.raises(Exception, match="--runtime litert"):
            onnx.measure(random_samples(tiny, 1, seed=4)[0])
