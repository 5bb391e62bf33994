"""The second audit's cases (issue 31), each reproduced as the audit found it.

Real parts throughout: the agent as a separate process holding the real device lock, real
files renamed under kill -9, a 2 MB tmpfs for a full disk and a read-only bind mount (both
in a private mount namespace, as root), concurrent `harness devices add` processes, SQLite
caches and their exports. Every process a test starts is ended in its `finally`.
"""
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from harness.errors import CacheError
from harness.store.cache import Cache
from tests.conftest import AGENT, FAST, python
from tests.test_hardening import (counts_of, genuine, one_line_error, profiled,  # noqa: F401
                                  run_cli, write_export)

REPO = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie not yet reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "\nState:\tZ" in state


def wait_gone(pid: int, within: float = 120.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.05)
    return gone(pid)


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def lock_freed(path: Path, within: float = 60.0) -> bool:
    """Whether the lock is free, or becomes free within `within` seconds: a process whose
    main thread is already a zombie may still be closing its files in another thread."""
    deadline = time.monotonic() + within
    while not lock_is_free(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def lock_is_free(path: Path) -> bool:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)


def wait_measuring(pid: int, lock: Path, within: float = 300.0) -> None:
    """Wait until process `pid` holds the device lock (it is measuring); a loaded machine
    may be slow to start it."""
    deadline = time.monotonic() + within
    while not (lock.exists() and not lock_is_free(lock)):
        assert time.monotonic() < deadline and not gone(pid)
        time.sleep(0.05)


def in_private_mount(script: str, *mount: str, timeout: float = 300) -> dict:
    """Run a Python `script` as root in a private mount namespace after the shell lines
    `mount` ran there; the script prints one JSON object, returned. Skips without root."""
    if not ROOT:
        pytest.skip("needs root to mount a tmpfs or a read-only bind mount")
    shell = " && ".join([*mount, 'exec "$@"'])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", shell,
                           "harness-test", sys.executable, "-c", textwrap.dedent(script)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


FILL_DISK = """
import os
def fill(folder):
    # every block the filesystem has left, so the next write meets ENOSPC
    with open(os.path.join(folder, "ballast"), "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"x" * 4096)
        except OSError:
            pass
"""


# ================================================================ 1. runaway agent workers

def test_threads_beyond_any_device_are_a_user_error_naming_the_range(home):
    proc = run_cli("profile", "--space", "harness.spaces:TinySpace", "--samples", "1",
                   "--threads", "100000", home=home)
    one_line_error(proc, "USER", "intra_op_threads must be from 0", "to 1024", "100000")


def test_threads_beyond_the_devices_cores_are_a_user_error_before_the_lock(tmp_path,
                                                                          tiny_model):
    cores = os.cpu_count() or 1
    lock = tmp_path / "device.lock"
    settings = dict(FAST, intra_op_threads=cores + 1)
    proc = subprocess.run([python(), str(AGENT), "measure", "--model", str(tiny_model),
                           "--settings", json.dumps(settings), "--lock", str(lock)],
                          capture_output=True, text=True, timeout=120)
    error = json.loads(proc.stdout)["error"]
    assert proc.returncode == 1 and error["kind"] == "USER"
    assert f"from 0 (onnxruntime's choice) to {cores} (this device's cores)" in error["message"]
    assert f"got {cores + 1}" in error["message"]
    assert not lock.exists()  # refused before the lock was taken


ONE_SHOT_HOST = """
import json, subprocess, sys, time
agent, model, lock, settings = sys.argv[1:5]
measure = subprocess.Popen([sys.executable, agent, "measure", "--model", model, "--lock", lock,
                            "--settings", settings], stdout=subprocess.PIPE)
print(measure.pid, flush=True)
time.sleep(600)
"""

HOST = """
import json, subprocess, sys, time
agent, model, lock, settings = sys.argv[1:5]
worker = subprocess.Popen([sys.executable, agent, "worker"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
print(worker.pid, flush=True)
assert json.loads(worker.stdout.readline())["ready"]
worker.stdin.write(json.dumps({"op": "measure", "id": 1, "model": model, "lock": lock,
                               "settings": json.loads(settings), "lock_wait_s": 5}) + "\\n")
worker.stdin.flush()
if sys.argv[5] == "hang up":
    time.sleep(1.0)
    worker.stdin.close()
    print(repr(worker.stdout.read()), flush=True)  # the worker ends without an answer
    print(worker.wait(), flush=True)
time.sleep(600)
"""

# A loop that would run for ten minutes unless something ends it.
LONG = dict(FAST, min_runs=10**9, min_time_ms=600_000.0, max_time_ms=600_000.0)


@pytest.mark.parametrize("how", ["host killed", "hang up", "one-shot host killed"])
def test_a_worker_whose_host_is_gone_stops_and_releases_the_device_lock(tmp_path, tiny_model,
                                                                        how):
    """The audit's orphan: SIGKILL the host (or close the worker's stdin) mid-measurement;
    the worker must stop long before its loop ends, and the device lock must be free. The
    same for a one-shot 'ort_agent.py measure' (process isolation)."""
    lock = tmp_path / "device.lock"
    script = ONE_SHOT_HOST if how.startswith("one-shot") else HOST
    host = subprocess.Popen([python(), "-c", script, str(AGENT), str(tiny_model), str(lock),
                             json.dumps(LONG), how], stdout=subprocess.PIPE, text=True)
    worker = int(host.stdout.readline())
    try:
        wait_measuring(worker, lock)
        if how.endswith("host killed"):
            host.kill()
            host.wait()
        else:
            assert host.stdout.readline().strip() == "''"       # no answer, just the end
            assert host.stdout.readline().strip() == "3"        # ended by its watch
        assert wait_gone(worker), "the orphaned worker kept measuring"
        assert lock_freed(lock)
    finally:
        kill_quietly(worker)
        host.kill()
        host.wait()


def test_a_worker_over_its_thread_cap_ends_itself(tmp_path):
    """The hard cap: a worker running more threads than max_threads() ends (here the cap is
    lowered so that a few sleeping threads pass it)."""
    script = textwrap.dedent(f"""
        import sys, threading, time
        sys.path.insert(0, {str(AGENT.parent)!r})
        import ort_agent
        watch = ort_agent.HostWatch(sys.stdin.fileno(), interval=0.05)
        watch.thread_cap = 8
        watch.start()
        for _ in range(20):
            threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
        time.sleep(600)
    """)
    proc = subprocess.Popen([python(), "-c", script], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.wait(timeout=60) == 3
        assert "more than the cap of 8" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


# ================================================================ 2-4. files we replace

KILLED_AT_RENAME = """
import os, sys, time
import devices.safe_files as safe_files
def stalled_replace(source, target):  # the audit's kill -9, at the worst moment
    print("renaming", flush=True)
    time.sleep(600)
safe_files.os.replace = stalled_replace
"""


def killed_at_the_rename(code: str, home: Path) -> None:
    """Run `code` in a process whose rename stalls, and kill -9 it there."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HARNESS_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_AT_RENAME + textwrap.dedent(code)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "renaming"
    finally:
        proc.kill()
        proc.wait()


def known_hosts_with(home: Path, count: int) -> str:
    import paramiko

    key = paramiko.ECDSAKey.generate()
    keys = paramiko.HostKeys()
    for n in range(count):
        keys.add(f"board-{n}.lab", key.get_name(), key)
    home.mkdir(parents=True, exist_ok=True)
    keys.save(str(home / "known_hosts"))
    return (home / "known_hosts").read_text()


TRUST_ONE = """
import paramiko
from pathlib import Path
from devices import registry
from devices.ssh import Endpoint
home = Path(os.environ["HARNESS_HOME"])
registry._trust(home, "new", Endpoint.parse("pi@new-board.lab"), paramiko.ECDSAKey.generate(),
                lambda *shown: True, replace=False)
"""


def test_kill_9_while_trust_saves_loses_no_host_key(home):
    before = known_hosts_with(home, 42)
    killed_at_the_rename(TRUST_ONE, home)
    assert (home / "known_hosts").read_text() == before  # all 42 keys, untouched
    # the next save sweeps what the killed one left, and records its key
    subprocess.run([sys.executable, "-c", "import os\n" + TRUST_ONE], check=True, timeout=120,
                   env=dict(os.environ, PYTHONPATH=str(REPO), HARNESS_HOME=str(home)))
    lines = (home / "known_hosts").read_text().splitlines()
    assert len(lines) == 43 and lines[:42] == before.splitlines()
    assert sorted(p.name for p in home.iterdir()) == [".registry.lock", "known_hosts"]


def test_trust_on_a_full_disk_keeps_every_host_key_and_says_so():
    result = in_private_mount(FILL_DISK + """
import json, os, paramiko
from pathlib import Path
from devices import registry
from devices.ssh import Endpoint
home = Path("/mnt")
keys = paramiko.HostKeys()
key = paramiko.ECDSAKey.generate()
for n in range(42):
    keys.add("board-%d.lab" % n, key.get_name(), key)
keys.save(str(home / "known_hosts"))
before = (home / "known_hosts").read_text()
open(home / ".registry.lock", "w").close()
fill(str(home))
try:
    registry._trust(home, "new", Endpoint.parse("pi@new-board.lab"), key, lambda *a: True, False)
    error = None
except registry.RegistryError as exc:
    error = str(exc)
print(json.dumps({"error": error, "same": (home / "known_hosts").read_text() == before,
                  "files": sorted(os.listdir(home))}))
""", "mount -t tmpfs -o size=2m tmpfs /mnt")
    assert result["error"] and "No space left on device" in result["error"]
    assert "free some space" in result["error"]
    assert result["same"]  # never truncated: the device does not read as CHANGED afterwards
    assert result["files"] == [".registry.lock", "ballast", "known_hosts"]


def test_kill_9_while_devices_toml_is_saved_keeps_the_old_file(home):
    from devices import registry

    registry.add_device(home, registry.DeviceConfig("sim-0", "sim", "npu", sim_ms=5.0))
    before = (home / "devices.toml").read_text()
    killed_at_the_rename("""
from pathlib import Path
from devices import registry
registry.add_device(Path(os.environ["HARNESS_HOME"]),
                    registry.DeviceConfig("sim-1", "sim", "npu", sim_ms=5.0))
""", home)
    assert (home / "devices.toml").read_text() == before
    registry.add_device(home, registry.DeviceConfig("sim-2", "sim", "npu", sim_ms=5.0))
    assert sorted(registry.load_devices(home)) == ["sim-0", "sim-2"]
    assert not [p for p in home.iterdir() if p.name.endswith(".part")]  # swept


@pytest.mark.parametrize("device", ["null", "full", "fifo", "symlink"])
def test_cache_export_refuses_a_target_that_is_not_a_regular_file(tmp_path, genuine,
                                                                  device):
    folder, _, _ = genuine
    target = tmp_path / f"dev-{device}"
    if device in ("null", "full"):
        if not ROOT:
            pytest.skip("making a device node needs root")
        os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3 if device == "null" else 7))
    elif device == "fifo":
        os.mkfifo(target)
    else:
        (tmp_path / "mine.txt").write_text("mine\n")
        target.symlink_to(tmp_path / "mine.txt")
    before = os.lstat(target)
    with Cache(folder / "cache.sqlite") as cache, pytest.raises(CacheError) as caught:
        cache.export_jsonl(target)
    assert f"cannot export to {target}" in caught.value.message
    assert "harness replaces only regular files" in caught.value.message
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino, after.st_rdev) == \
        (before.st_mode, before.st_ino, before.st_rdev)
    proc = run_cli("--cache", str(folder / "cache.sqlite"), "cache", "export", str(target),
                   home=tmp_path / "home")
    one_line_error(proc, str(target), "harness replaces only regular files")
    assert sorted(p.name for p in tmp_path.iterdir() if ".part" in p.name) == []


def test_cache_export_on_a_full_disk_keeps_the_earlier_export(genuine):
    folder, _, _ = genuine
    result = in_private_mount(FILL_DISK + f"""
import json, os, shutil
from harness.errors import CacheError
from harness.store.cache import Cache
shutil.copy({str(folder / "genuine.jsonl")!r}, "/mnt/export.jsonl")
before = open("/mnt/export.jsonl").read()
fill("/mnt")
os.truncate("/mnt/ballast", os.path.getsize("/mnt/ballast") - 1024)  # room for a little
try:
    with Cache({str(folder / "cache.sqlite")!r}) as cache:
        cache.export_jsonl("/mnt/export.jsonl")
    error = None
except CacheError as exc:
    error = str(exc)
print(json.dumps({{"error": error, "same": open("/mnt/export.jsonl").read() == before,
                  "files": sorted(os.listdir("/mnt"))}}))
""", "mount -t tmpfs -o size=2m tmpfs /mnt")
    assert result["error"] and "No space left on device" in result["error"]
    assert result["same"] and result["files"] == ["ballast", "export.jsonl"]


def test_devices_add_from_four_processes_at_once_keeps_all_four(home):
    home.mkdir(parents=True)
    env = dict(os.environ, HARNESS_HOME=str(home), PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-W", "ignore", "-m", "harness.cli", "devices",
                               "add", f"sim-{n}", "--sim", "npu"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(4)]
    try:
        outputs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert all(out.startswith("added sim-") for out, _ in outputs)
    from devices import registry

    assert sorted(registry.load_devices(home)) == [f"sim-{n}" for n in range(4)]


# ================================================================ 5-10. what an import trusts

def test_cache_import_of_dev_zero_is_refused_in_bounded_memory(home):
    proc = run_cli("cache", "import", "/dev/zero", home=home, timeout=120)
    one_line_error(proc, "/dev/zero is not a harness cache export",
                   "line 1 is longer than 16 MiB")


def test_a_key_whose_settings_are_not_its_records_is_skipped(tmp_path, profiled, home):
    from agents.ort_agent import parse_settings
    from harness.store.key import settings_key

    rows, _ = profiled
    row = next(r for r in rows if r["type"] == "measurement")
    two_threads = settings_key(parse_settings(dict(row["measurement"]["settings"],
                                                   intra_op_threads=2)))
    forged = json.loads(json.dumps(row))
    forged["uid"] = uuid.uuid4().hex
    forged["key"]["settings_key"] = two_threads  # the record still says 1 thread
    with Cache(home / "cache.sqlite") as cache:
        counts = cache.import_jsonl(write_export(tmp_path / "forged.jsonl", [rows[0], forged]))
        assert counts["measurement"] == 0
        assert "key mismatch: the key's settings digest" in counts.skipped[0].reason
        from harness.store.key import MeasurementKey

        assert cache.get(MeasurementKey(**dict(forged["key"]))) is None


@pytest.mark.parametrize("value", [1e308, 1e8 + 1])
def test_imported_samples_beyond_the_agents_cap_are_skipped(tmp_path, profiled, home, value):
    rows, _ = profiled
    row = json.loads(json.dumps(next(r for r in rows if r["type"] == "measurement")))
    row["uid"] = uuid.uuid4().hex
    row["measurement"]["samples_ms"] = [value] * 5
    before = counts_of(home)
    with Cache(home / "cache.sqlite") as cache:
        counts = cache.import_jsonl(write_export(tmp_path / "big.jsonl", [rows[0], row]))
    assert counts["measurement"] == 0 and "at most 1e+08" in counts.skipped[0].reason
    assert counts_of(home) == before


def test_a_stored_sample_the_space_lacks_is_left_out_of_the_latency_model(tiny):
    from harness.errors import InvalidSample
    from harness.predict.latency_model import Featurizer, LatencyModel
    from harness.spaces.space import checked_search_space, random_samples

    labels = list(checked_search_space(tiny))
    model = LatencyModel(Featurizer(tiny, tiny.dummy_input(), labels))
    samples = random_samples(tiny, 30, seed=1)
    alien = dict(samples[0], **{labels[0]: 99})  # the audit's stage1.depth=99
    with pytest.raises(InvalidSample, match="not among the choices"):
        model.featurize(alien)
    assert model.fit([*samples, alien], [1.0 + i / 10 for i in range(31)])
    assert model.n_fit == 30


def test_a_decision_from_one_run_settles_no_later_limit(tmp_path):
    from harness.store.decisions import decision_from_samples
    from harness.store.key import MeasurementKey

    one = decision_from_samples([50.0], 10.0, 0.99, source="measured", device_s=0.1,
                                graph_hash="g", device="local", reason="")
    assert not one.settled and not one.has_interval
    assert not one.settles(10.0, 0.99) and not one.settles(40.0, 0.5)
    key = MeasurementKey("a" * 64, "[]", "b" * 64, "c" * 64, "1.1")
    with Cache(tmp_path / "c.sqlite") as cache:
        cache.put_decision(key, one, [50.0])
        (stored,) = cache.decisions(key)
    assert not stored.settles(10.0, 0.99)  # read back: still no evidence for any limit
    many = decision_from_samples([50.0 + i / 100 for i in range(40)], 10.0, 0.99,
                                 source="measured", device_s=1.0, graph_hash="g",
                                 device="local", reason="")
    assert many.settled and many.has_interval and many.settles(20.0, 0.99)


def test_decisions_survive_an_export_and_import_round_trip(tmp_path):
    from harness.store.decisions import decision_from_samples
    from harness.store.key import MeasurementKey

    key = MeasurementKey("a" * 64, "[]", "b" * 64, "c" * 64, "1.1")
    runs = [5.0 + i / 100 for i in range(30)]
    decision = decision_from_samples(runs, 10.0, 0.99, source="measured", device_s=1.0,
                                     graph_hash="a" * 64, device="local", reason="r")
    with Cache(tmp_path / "a.sqlite") as source:
        source.put_decision(key, decision, runs)
        assert source.export_jsonl(tmp_path / "x.jsonl")["decision"] == 1
    rows = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    forged = json.loads(json.dumps(rows[-1]))
    forged["decision"]["samples_ms"] = [1e308]
    write_export(tmp_path / "y.jsonl", [*rows, forged])
    with Cache(tmp_path / "b.sqlite") as target:
        counts = target.import_jsonl(tmp_path / "y.jsonl")
        assert counts["decision"] == 1 and len(counts.skipped) == 1
        assert target.import_jsonl(tmp_path / "y.jsonl")["decision"] == 0  # no duplicate
        (back,) = target.decisions(key)
    assert back == decision.with_source("cached")


# ================================================================ 11-15. typed errors

def calibration_file(home: Path) -> Path:
    from harness.predict.calibration import Calibration

    folder = home / "calibrations" / "local"
    Calibration(device="local", base_predictor=str(folder), base_predictor_digest="",
                intercept=0.1, slope=1.0, kind="log-linear", device_fingerprint="",
                agent_version="1.1", settings_key="", space="", space_fingerprint="",
                input_signature=[], n_train=14, n_holdout=6,
                report={"calibrated": {"rmspe": 3.0, "kendall_tau": float("nan")}}
                ).save(folder)
    return folder / "calibration.json"


@pytest.mark.parametrize("field, raw, words", [
    ("intercept", "NaN", "NaN is not a JSON number"),
    ("intercept", "Infinity", "Infinity is not a JSON number"),
    ("intercept", "1e6", "intercept is 1000000.0, not a finite number from -50 to 50"),
    ("slope", '"1.5"', 'slope is "1.5", not a finite number'),
    ("report", '"abc"', 'report is "abc", not an object of objects of numbers'),
    ("created_at", '"yesterday"', 'created_at is "yesterday", not a date'),
    ("created_at", "1e300", "not a date in seconds since 1970, not in the future"),
    ("n_train", "-3", "n_train is -3, not a whole number"),
])
def test_a_damaged_calibration_file_is_a_typed_error_naming_the_field(home, field, raw, words):
    from harness.predict.calibration import load_calibration
    from harness.predict.nn_meter import PredictorError

    path = calibration_file(home)
    assert load_calibration("local").report["calibrated"]["kendall_tau"] is None  # was NaN
    data = json.loads(path.read_text())
    data[field] = "@@"
    path.write_text(json.dumps(data).replace('"@@"', raw))
    with pytest.raises(PredictorError) as caught:
        load_calibration("local")
    assert f"calibration file {path} is unreadable" in caught.value.message
    assert words in caught.value.message and "harness calibrate --device local" in \
        caught.value.fix


def profile_ops(home: Path, model: Path, trace_dir: str, *more: str):
    return run_cli("profile", "--model", str(model), "--ops", "--trace-dir", trace_dir,
                   "--min-runs", "5", "--min-time-ms", "5", *more, home=home)


def test_a_trace_that_cannot_be_written_is_a_warning_after_the_table(home, tiny_model,
                                                                     tmp_path):
    traces = tmp_path / "traces"
    traces.mkdir()
    first = profile_ops(home, tiny_model, str(traces))
    assert first.returncode == 0, first.stderr
    (written,) = traces.iterdir()
    written.unlink()
    written.mkdir()  # the audit's folder at the trace's path
    proc = profile_ops(home, tiny_model, str(traces))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "1 model file, 1 results" in proc.stdout  # the table the user waited for
    assert "not written (see the warning)" in proc.stdout
    assert f"the Chrome trace {written} was not written" in proc.stderr
    assert "pass another --trace-dir" in proc.stderr
    assert written.is_dir() and list(written.iterdir()) == []


def test_a_trace_dir_on_a_full_disk_keeps_the_table(home, tiny_model):
    result = in_private_mount(FILL_DISK + f"""
import json, os, subprocess, sys
fill("/mnt")
proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "harness.cli", "profile", "--model",
                       {str(tiny_model)!r}, "--ops", "--trace-dir", "/mnt", "--min-runs", "5",
                       "--min-time-ms", "5"], capture_output=True, text=True,
                      env=dict(os.environ, HARNESS_HOME={str(home)!r}))
print(json.dumps({{"code": proc.returncode, "out": proc.stdout, "err": proc.stderr,
                  "files": sorted(os.listdir("/mnt"))}}))
""", "mount -t tmpfs -o size=2m tmpfs /mnt")
    assert result["code"] == 0 and "Traceback" not in result["err"], result["err"]
    assert "1 model file, 1 results" in result["out"]
    assert "No space left on device" in result["err"]
    assert result["files"] == ["ballast"]  # no partial trace left


def test_a_read_only_trace_dir_is_refused_before_measuring(home, tiny_model, tmp_path):
    traces = tmp_path / "read-only"
    traces.mkdir()
    result = in_private_mount(f"""
import json, os, subprocess, sys
proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "harness.cli", "profile", "--model",
                       {str(tiny_model)!r}, "--ops", "--trace-dir", {str(traces)!r}],
                      capture_output=True, text=True, env=dict(os.environ,
                                                               HARNESS_HOME={str(home)!r}))
print(json.dumps({{"code": proc.returncode, "err": proc.stderr}}))
""", f'mount --bind "{traces}" "{traces}"', f'mount -o remount,bind,ro "{traces}"')
    assert result["code"] == 1 and "Traceback" not in result["err"]
    assert f"--trace-dir {traces} is not writable" in result["err"]
    assert not (home / "cache.sqlite").exists()  # nothing was measured


@pytest.mark.parametrize("home_at", ["/proc/harness-home", "/sys/harness-home",
                                     "read-only/new-home"])
def test_a_harness_home_that_cannot_be_made_is_a_typed_error(tmp_path, home_at):
    if home_at.startswith("read-only"):
        folder = tmp_path / "read-only"
        folder.mkdir()
        home = folder / "new-home"
        result = in_private_mount(f"""
import json, subprocess, sys
proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "harness.cli", "cache", "stats"],
                      capture_output=True, text=True,
                      env=dict(__import__("os").environ, HARNESS_HOME={str(home)!r}))
print(json.dumps({{"code": proc.returncode, "err": proc.stderr}}))
""", f'mount --bind "{folder}" "{folder}"', f'mount -o remount,bind,ro "{folder}"')
        code, err = result["code"], result["err"]
    else:
        home = Path(home_at)
        proc = run_cli("cache", "stats", home=home)
        code, err = proc.returncode, proc.stderr
    assert code == 1 and "Traceback" not in err, err
    assert err.startswith(f"harness: error: cannot open the cache {home / 'cache.sqlite'}")
    assert "writable disk" in err
    assert not Path(home).exists()


def test_numpy_scalars_are_numbers_as_limits_and_settings(tiny):
    import numpy as np

    from agents.ort_agent import parse_settings
    from harness.store.decisions import check_limit

    assert check_limit(np.float32(5.0), np.float64(0.99)) == (5.0, 0.99, 0.02)
    settings = parse_settings({"limit_ms": np.float32(5.0), "stop": "limit",
                               "min_runs": np.int64(7), "intra_op_threads": np.int32(1)})
    assert settings["limit_ms"] == 5.0 and type(settings["limit_ms"]) is float
    assert settings["min_runs"] == 7 and type(settings["min_runs"]) is int
    json.dumps(settings)  # travels to the agent as JSON
    with pytest.raises(Exception, match="limit_ms must be a positive number"):
        check_limit(np.float32("nan"), 0.99)
    with pytest.raises(Exception, match="per_op must be true or false"):
        parse_settings({"per_op": np.int64(1)})


ESCAPES = "\x1b]0;pwned\x07\x1b[2J"  # set the window title, clear the screen


def test_escapes_in_node_and_file_names_are_shown_escaped_and_csv_formulas_neutralised(
        home, tmp_path):
    from onnx import TensorProto, helper

    from tests.conftest import onnx_file

    model = onnx_file(tmp_path / f"=HYPERLINK(1){ESCAPES}.onnx",
                      [helper.make_node("Relu", ["x"], ["y"], name=f"relu{ESCAPES}")],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    table = profile_ops(home, model, str(tmp_path))
    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout and "\x07" not in table.stdout
    assert "relu\\x1b]0;pwned\\x07\\x1b[2J" in table.stdout  # the node, named visibly
    csv_out = run_cli("profile", "--model", str(model), "--min-runs", "5", "--min-time-ms", "5",
                      "--csv", home=home)
    assert csv_out.returncode == 0, csv_out.stderr
    cells = csv_out.stdout.splitlines()[1]
    assert ",'=HYPERLINK(1)" in cells and ",=HYPERLINK" not in cells


def test_an_imported_device_name_with_escapes_is_shown_escaped(tmp_path, profiled, home):
    rows, _ = profiled
    row = json.loads(json.dumps(next(r for r in rows if r["type"] == "measurement")))
    row["uid"] = uuid.uuid4().hex
    row["measurement"]["device"] = f"board{ESCAPES}"
    with Cache(home / "cache.sqlite") as cache:
        assert cache.import_jsonl(write_export(tmp_path / "e.jsonl", [rows[0], row]))[
            "measurement"] == 1
    stats = run_cli("cache", "stats", home=home)
    assert stats.returncode == 0 and "\x1b" not in stats.stdout
    assert "board\\x1b]0;pwned" in stats.stdout


def test_nn_meter_writes_nothing_outside_harness_home(tmp_path):
    pytest.importorskip("nn_meter")
    user, home = tmp_path / "user", tmp_path / "harness-home"
    user.mkdir()
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c",
         "from harness.predict.nn_meter import official_predictors, nn_meter_data_folder\n"
         "assert official_predictors()\nprint(nn_meter_data_folder())"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, HOME=str(user), HARNESS_HOME=str(home), PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    assert list(user.iterdir()) == []  # no ~/.nn_meter
    assert proc.stdout.strip() == str(home / "nn-meter" / ".nn_meter" / "data" / "predictor")
    assert (home / "nn-meter" / ".nn_meter" / "config" / "settings.yaml").is_file()


def png_size(path: Path) -> tuple:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_the_report_of_301_devices_draws_figures_of_bounded_size(tmp_path):
    import dataclasses

    pytest.importorskip("matplotlib")
    from harness.report.html import DPI, MAX_FIGURE_HEIGHT, write_report
    from harness.store.key import digest
    from tests.test_cache import IDENTITY, key, measurement

    with Cache(tmp_path / "c.sqlite") as cache:
        for n in range(301):
            identity = dict(IDENTITY, unit=n)
            cache.put(key(0, digest(identity)),
                      dataclasses.replace(measurement(2.0 + n / 100), device=f"dev-{n}",
                                          device_fingerprint=identity))
    files = write_report(tmp_path / "c.sqlite", tmp_path / "out", home=tmp_path / "home")
    assert files.devices == 301 and files.figures
    for figure in files.figures:
        width, height = png_size(figure)
        assert height <= MAX_FIGURE_HEIGHT * DPI and width * height <= 3_000_000, figure


# ================================================================ 19. the farm's files

def test_kill_9_while_the_farm_token_is_made_leaves_no_empty_token(home):
    from harness.pool.ray_pool import checked_token, ensure_token, token_path

    home.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), HARNESS_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, sys, time
        import devices.safe_files as safe_files
        def stalled_link(source, target):
            print("linking", flush=True)
            time.sleep(600)
        safe_files.os.link = stalled_link
        from pathlib import Path
        from harness.pool.ray_pool import ensure_token
        ensure_token(Path(os.environ["HARNESS_HOME"]))
    """)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "linking"
    finally:
        proc.kill()
        proc.wait()
    assert not token_path(home).exists()  # no token rather than an empty one
    assert ensure_token(home) == token_path(home) == checked_token(home)
    assert len(token_path(home).read_text().strip()) == 64
    assert stat.S_IMODE(token_path(home).stat().st_mode) == 0o600
    assert sorted(p.name for p in home.iterdir()) == ["ray-token"]  # the killed one's swept


def test_an_empty_farm_token_of_ours_is_replaced(home):
    from harness.pool.ray_pool import ensure_token, token_path

    home.mkdir(parents=True)
    token_path(home).touch(mode=0o600)  # what an older harness left when killed
    ensure_token(home)
    assert len(token_path(home).read_text().strip()) == 64


def test_a_damaged_farm_record_never_suggests_ending_every_ray_node(home):
    from harness.errors import HarnessError
    from harness.pool.farm import read_record, record_path

    home.mkdir(parents=True)
    record_path(home).write_text("{not json")
    with pytest.raises(HarnessError) as caught:
        read_record(home)
    assert "ray stop --force', which ends every Ray node" in caught.value.fix
    assert caught.value.fix.startswith(f"move {record_path(home)} aside")


@pytest.mark.parametrize("before", [None, b"10.0.0.1:6379"])
def test_rays_machine_wide_cluster_file_is_left_as_it_was(tmp_path, before):
    from harness.pool.farm import _shared_cluster_file_kept

    shared = tmp_path / "ray" / "ray_current_cluster"
    shared.parent.mkdir()
    if before is not None:
        shared.write_bytes(before)
    with _shared_cluster_file_kept(shared):
        shared.write_bytes(b"127.0.0.1:26380")  # what 'ray start --head' writes
    assert (shared.read_bytes() if shared.exists() else None) == before


# ================================================================ 20. the farm's sockets

LISTENER = """
import socket, sys, time
socks = []
for address in sys.argv[1:]:
    s = socket.socket()
    s.bind((address, 0))
    s.listen()
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks), flush=True)
time.sleep(600)
"""


def test_the_farm_nodes_listening_sockets_are_listed_with_a_warning_and_a_rule(home):
    pytest.importorskip("psutil")
    from harness.pool import farm

    name = f"test-node-{uuid.uuid4().hex[:6]}"
    home.mkdir(parents=True)
    farm.record_path(home).write_text(json.dumps({
        "name": name, "address": "127.0.0.1:26380", "head": True, "devices": 0,
        "started_at": time.time(), "token": str(home / "ray-token")}))  # an older record
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, "127.0.0.1", "127.0.0.2"],
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, **{farm.NODE_MARK: name}))
    try:
        asked_port, beyond_port = map(int, proc.stdout.readline().split())
        exposure = farm.node_exposure(home)
        assert exposure.asked == "127.0.0.1"
        assert [(a, p) for a, p, _ in exposure.listening] == [("127.0.0.1", asked_port),
                                                               ("127.0.0.2", beyond_port)]
        assert [(a, p) for a, p, _ in exposure.beyond] == [("127.0.0.2", beyond_port)]
        lines = exposure.lines(["10.0.0.8"])
        assert lines[1].startswith("WARNING: 1 of them listen beyond 127.0.0.1: "
                                   f"127.0.0.2:{beyond_port}")
        low, high = sorted((asked_port, beyond_port))
        assert (f"ip saddr != {{ 10.0.0.8, 127.0.0.1 }} tcp dport {{ {low}, {high}, "
                f"10002-19999 }} drop") in lines[2]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("args, words", [
    (["--sim", "npu", "--sim-ms", "nan"], "sim_ms = NaN is not a positive number of ms"),
    (["--adb", "2A1B0C3D", "--adb-port", "0"], "adb_port = 0 is not a port number"),
    (["--ssh", "pi@10.0.0.7", "--kind", ""], 'kind = "" is not a text'),
    (["--ssh", "pi@10.0.0.7", "--connect-timeout", "-1"], "connect_timeout = -1.0"),
])
def test_devices_add_refuses_what_the_reader_would_refuse(home, args, words):
    proc = run_cli("devices", "add", "dev", *args, home=home)
    one_line_error(proc, "USER", words, "correct --")
    assert not (home / "devices.toml").exists()
    assert run_cli("devices", "list", home=home).returncode == 0  # the registry still reads


def test_an_unknown_field_in_devices_toml_names_the_nearest_known_one(home):
    home.mkdir(parents=True)
    (home / "devices.toml").write_text('[devices.pi]\ntransport = "ssh"\n'
                                       'address = "pi@10.0.0.7"\nlcok = "/run/lock/x"\n')
    one_line_error(run_cli("devices", "list", home=home), "[devices.pi] has an unknown field "
                   "'lcok' (did you mean 'lock'?)")
