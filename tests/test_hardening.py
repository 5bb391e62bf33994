"""Regression tests for the hardening issue: the agent's shared device lock, perf-test's remote
shell line, predictor pickles and where a predictor name is looked up, and `cache import`.

Everything is real: the agent as a separate process, /bin/sh running the remote commands,
scikit-learn pickles, SQLite caches written by LatencyProfiler on the local device.
"""
import importlib.util
import json
import os
import pickle
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from agents.ort_agent import AgentError, DeviceLock
from harness.store.cache import Cache
from harness.store.key import MeasurementKey
from harness.errors import CacheError
from harness.store.measurement import Measurement
from tests.conftest import AGENT, FAST, python

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# ================================================================ 1. the agent's device lock

def agent_measure(model, lock, timeout=120):
    """`ort_agent.py measure --lock LOCK` as the host runs it: (exit code, JSON answer)."""
    proc = subprocess.run([python(), str(AGENT), "measure", "--model", str(model), "--settings",
                           json.dumps(FAST), "--lock", str(lock)],
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, json.loads(proc.stdout)


def test_lock_that_is_a_symlink_is_refused_and_its_target_left_alone(tmp_path, tiny_model):
    target = tmp_path / "owned-by-root.conf"
    target.write_text("precious = true\n")
    link = tmp_path / "harness-device.lock"
    link.symlink_to(target)
    code, answer = agent_measure(tiny_model, link)
    assert code == 1
    error = answer["error"]
    assert error["kind"] == "USER"
    assert str(link) in error["message"] and "symbolic link" in error["message"]
    assert "devices.toml" in error["message"] and "remove" in error["message"]
    assert target.read_text() == "precious = true\n"
    # A dangling link is refused too, and the agent creates nothing where it points.
    dangling = tmp_path / "dangling.lock"
    dangling.symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(AgentError) as caught:
        with DeviceLock(str(dangling), 1.0):
            pass
    assert caught.value.kind == "USER"
    assert not (tmp_path / "created-through-the-link").exists()


@pytest.mark.parametrize("make, what", [
    (lambda path: path.mkdir(), "a folder"),
    (lambda path: os.mkfifo(path), "a FIFO"),
])
def test_lock_that_is_a_folder_or_a_fifo_is_refused(tmp_path, tiny_model, make, what):
    lock = tmp_path / "harness-device.lock"
    make(lock)
    code, answer = agent_measure(tiny_model, lock, timeout=60)  # a FIFO must not hang it
    assert code == 1
    assert answer["error"]["kind"] == "USER"
    message = answer["error"]["message"]
    assert f"{lock} is {what}, not a regular file" in message and "devices.toml" in message


def test_a_normal_lock_serializes_and_is_never_written(tmp_path, tiny_model):
    existing = tmp_path / "existing.lock"
    existing.write_text("left by an older agent\n")
    existing.chmod(0o600)
    for lock in (existing, tmp_path / "new.lock"):
        worker = subprocess.Popen([python(), str(AGENT), "worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert json.loads(worker.stdout.readline())["ready"] is True

            def ask(wait_s):
                request = {"op": "measure", "id": 1, "model": str(tiny_model),
                           "settings": FAST, "lock": str(lock), "lock_wait_s": wait_s}
                worker.stdin.write(json.dumps(request) + "\n")
                worker.stdin.flush()
                return json.loads(worker.stdout.readline())

            with DeviceLock(str(lock), 1.0):  # another measurement holds the device
                held = ask(0.3)
                assert held["error"]["kind"] == "TIMEOUT"
                assert str(lock) in held["error"]["message"]
                with pytest.raises(AgentError) as caught:  # a second holder, same process
                    with DeviceLock(str(lock), 0.2):
                        pass
                assert caught.value.kind == "TIMEOUT"
            free = ask(5.0)
            assert "error" not in free and len(free["samples_ms"]) >= FAST["min_runs"]
        finally:
            worker.stdin.close()
            worker.wait(timeout=60)
    assert existing.read_text() == "left by an older agent\n"   # never truncated or written
    assert existing.stat().st_mode & 0o777 == 0o600               # never chmod-ed
    created = tmp_path / "new.lock"
    assert created.is_file() and created.stat().st_size == 0
    umask = os.umask(0)
    os.umask(umask)
    assert created.stat().st_mode & 0o777 == 0o666 & ~umask


# ================================================================ 2. perf-test's remote commands

class ShellTransport:
    """A device whose commands run through a real /bin/sh, as over SSH or ADB: `run` sends
    the quoted argv as one command line, `shell` sends its text as is. `workdir` plays the
    device's working folder; commands run in `cwd`."""

    python = [sys.executable]

    def __init__(self, workdir: Path, cwd: Path):
        self.name = "shell-phone"
        self.workdir = workdir
        self.cwd = cwd
        self.control = self  # no lock, pinning or cooling (the DeviceControl of a transport)
        self.command_prefix = []

    def sh(self, line: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["/bin/sh", "-c", line], cwd=self.cwd, capture_output=True,
                              text=True, timeout=timeout)

    def put(self, local_path: str, remote_name: str, force: bool = False) -> str:
        target = self.workdir / remote_name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local_path, target)
        return str(target)

    def run(self, argv, timeout):
        done = self.sh(" ".join(shlex.quote(a) for a in argv), timeout)
        return done.returncode, done.stdout, done.stderr

    def shell(self, command: str, timeout: float = 60.0) -> str:
        return self.sh(command, timeout).stdout

    def prepare(self, deadline):
        return None

    def finish(self, prepared):
        return prepared

    def prepare_measurement(self, deadline):
        return {}

    def finish_measurement(self, prepared):
        return None

    def fingerprint(self):
        return {}

    def close(self):
        pass


def _samples(result):
    return result.samples_ms if hasattr(result, "samples_ms") else result["samples_ms"]


@pytest.mark.parametrize("folder", ["x; touch PWNED; y", "a b", "$(touch PWNED)", "`touch PWNED`",
                                    "it's"])
def test_perf_test_workdir_with_shell_metacharacters(tmp_path, tiny_model, folder):
    from devices.perf_tool_client import PerfTestClient

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    bystander = tmp_path / "a"  # what an unquoted '/T/a b/...' would read and delete
    bystander.write_text("bystander\n")
    workdir = tmp_path / folder
    transport = ShellTransport(workdir, cwd)
    client = PerfTestClient(transport, str(FIXTURES / "perf_test" / "onnxruntime_perf_test"))
    settings = {"min_runs": 7, "intra_op_threads": 1, "inter_op_threads": 1,
                "graph_optimization_level": "all"}
    result = client.measure(str(tiny_model), settings, deadline=time.monotonic() + 120)
    assert len(_samples(result)) == 7
    assert not [p for p in tmp_path.rglob("PWNED")], "a command ran from the folder's name"
    assert bystander.read_text() == "bystander\n"
    models = workdir / "models"
    assert not list(models.glob("result-*")), "the result file was not removed"
    assert len(list(models.glob("*.onnx"))) == 1  # and nothing else was


# ================================================================ 3. predictor pickles

nn_meter_needed = pytest.mark.skipif(importlib.util.find_spec("nn_meter") is None,
                                     reason="nn-Meter runs from .venv-extras (scripts/test)")


def calling(module: str, name: str, argument: str) -> bytes:
    """A protocol-4 pickle that calls module.name(argument) when it is loaded."""
    def text(value: str) -> bytes:
        data = value.encode()
        return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(argument) + b"\x85R."


def forest(features: int, seed: int = 0):
    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(seed)
    x = rng.uniform(1, 64, size=(60, features))
    y = 0.01 + x[:, : min(3, features)].prod(axis=1) * 1e-4
    return RandomForestRegressor(n_estimators=4, max_features=None, random_state=seed).fit(x, y)


def test_predictor_pickles_that_run_commands_are_refused(tmp_path):
    from harness.errors import HarnessError
    from harness.predict.sklearn_pickle import (LegacyPickleError, UnsafePickleError,
                                        load_kernel_predictor)

    proof = tmp_path / "PWNED"
    shell = f"touch {proof}"
    evil = {
        "os.system": calling(os.system.__module__, "system", shell),
        "eval": calling("builtins", "eval", f"__import__('os').system({shell!r})"),
        "via a scikit-learn module": calling("sklearn.datasets._base", "os.system", shell),
        "a scikit-learn function": calling("sklearn.base", "clone", shell),
        "a test module": calling("sklearn.utils._testing", "os.system", shell),
        "numpy's memmap": calling("numpy", "memmap", str(tmp_path / "written")),
    }
    messages = {}
    for what, data in evil.items():
        path = tmp_path / "conv-bn-relu.pkl"
        path.write_bytes(data)
        with pytest.raises(LegacyPickleError) as caught:
            load_kernel_predictor(path)
        assert isinstance(caught.value, UnsafePickleError), what
        assert isinstance(caught.value, HarnessError) and "code" in caught.value.fix, what
        assert str(path) in caught.value.message and "refused" in caught.value.message, what
        assert not proof.exists() and not (tmp_path / "written").exists(), what
        messages[what] = caught.value.message
    assert f"names {os.system.__module__}.system," in messages["os.system"]
    assert "names builtins.eval," in messages["eval"]
    assert "names sklearn.datasets._base.os.system," in messages["via a scikit-learn module"]


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_real_predictor_pickles_still_load_under_the_allow_list(tmp_path, protocol):
    from harness.predict.sklearn_pickle import load_kernel_predictor
    from tests.legacy_sklearn import old_pickle_bytes

    model = forest(5, seed=protocol)
    probe = np.random.default_rng(protocol).uniform(0, 80, size=(200, 5))
    current = tmp_path / "current.pkl"
    current.write_bytes(pickle.dumps(model, protocol=protocol))
    assert np.array_equal(load_kernel_predictor(current).predict(probe), model.predict(probe))
    old = tmp_path / "old.pkl"  # scikit-learn 0.23's format, as nn-Meter ships it
    old.write_bytes(old_pickle_bytes(model))
    assert np.array_equal(load_kernel_predictor(old).predict(probe), model.predict(probe))
    seeded = tmp_path / "seeded.pkl"  # an estimator that keeps a RandomState
    from sklearn.ensemble import RandomForestRegressor
    keeps_state = RandomForestRegressor(n_estimators=2, random_state=np.random.RandomState(1))
    seeded.write_bytes(pickle.dumps(keeps_state.fit(probe[:20], probe[:20, 0]),
                                    protocol=protocol))
    assert load_kernel_predictor(seeded).predict(probe).shape == (200,)


@nn_meter_needed
def test_a_predictor_name_is_never_looked_up_in_the_current_folder(tmp_path, home):
    """`harness profile --offline --predictor cortexA76cpu_tflite21` in a folder where someone
    planted ./cortexA76cpu_tflite21/ with a pickle that runs a command."""
    proof = tmp_path / "PWNED"
    cwd = tmp_path / "shared-folder"
    planted = cwd / "cortexA76cpu_tflite21"
    planted.mkdir(parents=True)
    (planted / "fusion_rules.json").write_text("{}")
    (planted / "conv-bn-relu.pkl").write_bytes(calling(os.system.__module__, "system",
                                                       f"touch {proof}"))
    user_home = tmp_path / "user"
    user_home.mkdir()
    env = dict(os.environ, HOME=str(user_home), PYTHONPATH=str(REPO), HARNESS_HOME=str(home))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "harness.cli", "profile",
                           "--space", "harness.spaces:TinySpace", "--device", "nowhere",
                           "--offline", "--fallback", "nn-meter",
                           "--predictor", "cortexA76cpu_tflite21", "--samples", "1"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert not proof.exists(), "the planted predictor ran"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    # nn-Meter not set up by the user: its data folder is in harness's home (issue 31)
    data_folder = home / "nn-meter" / ".nn_meter" / "data" / "predictor" / \
        "cortexA76cpu_tflite21"
    assert str(data_folder) in proc.stderr and list(user_home.iterdir()) == []
    assert "is not used for a predictor name" in proc.stderr and "./cortexA76cpu_tflite21" \
        in proc.stderr


@nn_meter_needed
def test_a_predictor_path_is_used_where_it_points(tmp_path, monkeypatch):
    import harness.predict.nn_meter as predict
    from harness.campaigns.calibrate import ORT_CPU_FUSION_RULES
    from harness.predict.nn_meter import PredictorError, is_predictor_path, load_predictor

    for name in ("cortexA76cpu_tflite21", "my-predictor"):
        assert not is_predictor_path(name)
    for name in ("./mine", "../mine", "~/mine", "/abs/mine", "sub/mine", Path("mine")):
        assert is_predictor_path(name)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "fc.pkl").write_bytes(pickle.dumps(forest(4)))
    (folder / "fusion_rules.json").write_text(json.dumps(ORT_CPU_FUSION_RULES))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(predict, "nn_meter_data_folder", lambda: tmp_path / "data")
    assert load_predictor("./mine").folder == Path("mine")
    with pytest.raises(PredictorError, match="unknown nn-Meter predictor 'mine'"):
        load_predictor("mine")  # a bare name is not a folder here
    (folder / "evil.pkl").write_bytes(calling(os.system.__module__, "system", "true"))
    with pytest.raises(PredictorError) as caught:
        load_predictor("./mine")
    assert "evil.pkl" in caught.value.message and "code" in caught.value.fix


# ================================================================ 4. cache import

@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """A cache LatencyProfiler filled on the local device (once per module): its folder, its
    export's rows (header first) and the samples profiled."""
    from harness import LatencyProfiler, random_samples
    from harness.spaces import TinySpace

    folder = tmp_path_factory.mktemp("genuine")
    tiny = TinySpace()
    chosen = random_samples(tiny, 2, seed=11)
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST, home=folder) as profiler:
        profiler.profile_many(chosen)
    with Cache(folder / "cache.sqlite") as cache:
        cache.export_jsonl(folder / "genuine.jsonl")
    rows = [json.loads(line) for line in (folder / "genuine.jsonl").read_text().splitlines()]
    return folder, rows, chosen


@pytest.fixture
def profiled(genuine, home):
    """$HARNESS_HOME holding a copy of the genuine cache; (export rows, samples)."""
    folder, rows, chosen = genuine
    home.mkdir(parents=True, exist_ok=True)
    for name in ("cache.sqlite", "cache.sqlite-wal"):
        if (folder / name).exists():
            shutil.copy(folder / name, home / name)
    return json.loads(json.dumps(rows)), chosen


def write_export(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def first(rows, kind):
    return next(row for row in rows if isinstance(row, dict) and row.get("type") == kind)


def number_of(rows, kind):
    return sum(1 for row in rows if row.get("type") == kind)


def counts_of(home):
    with Cache(home / "cache.sqlite") as cache:
        stats = cache.stats()
    return stats["measurements"], stats["samples_indexed"], stats["devices"]


def forged(row, **changes):
    """A copy of a measurement row with a new uid and `changes` in its measurement."""
    copy = json.loads(json.dumps(row))
    copy["uid"] = uuid.uuid4().hex
    copy["measurement"].update(changes)
    return copy


def test_a_row_dated_in_the_future_is_skipped_and_never_wins_over_a_refresh(tiny, home,
                                                                           tmp_path, profiled):
    from harness import LatencyProfiler

    rows, _ = profiled
    genuine = first(rows, "measurement")
    sample = next(json.loads(row["sample"]) for row in rows if row["type"] == "sample"
                  and row["graph_hash"] == genuine["key"]["graph_hash"])
    ten_years = time.time() + 10 * 365 * 86400
    future = forged(genuine, samples_ms=[999.0] * 5, created_at=ten_years)
    before = counts_of(home)
    with Cache(home / "cache.sqlite") as cache:
        counts = cache.import_jsonl(write_export(tmp_path / "future.jsonl", [rows[0], future]))
    assert counts == {"device": 0, "sample": 0, "measurement": 0, "decision": 0}
    assert [row.line for row in counts.skipped] == [2]
    assert counts.skipped[0].reason.startswith("dated in the future")
    assert counts_of(home) == before
    # A cache that already holds such a row (imported before these checks): the measurement
    # stored last answers, whatever date the other one claims.
    with Cache(home / "cache.sqlite") as cache:
        key = MeasurementKey(**future["key"])
        with cache._write("plant a row") as conn:
            Cache._insert(conn, future["uid"], key, Measurement.from_dict(future["measurement"]))
        assert cache.get(key).median == 999.0  # the planted row is the newest so far
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST, refresh=True) as refreshing:
        fresh = refreshing.measure(sample)
    assert fresh.source == "measured" and fresh.graph_hash == key.graph_hash
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST) as later:
        assert later.profile(sample) == fresh.median
        again = later.measure(sample)
    assert again.source == "cached" and again.samples_ms == fresh.samples_ms


@pytest.mark.parametrize("samples", ["987", [], ["1.5", "2.5"], [1.0, -2.0], [1.0, 0.0],
                                     [1.0, float("nan")], [True, True], [[1.0]]])
def test_samples_that_are_not_positive_numbers_are_skipped(tmp_path, genuine, samples):
    _, rows, _ = genuine
    row = forged(first(rows, "measurement"), samples_ms=samples)
    with Cache(tmp_path / "target.sqlite") as cache:
        counts = cache.import_jsonl(write_export(tmp_path / "bad.jsonl", [rows[0], row]))
        assert counts["measurement"] == 0 and cache.stats()["measurements"] == 0
    assert counts.skipped[0].reason.startswith("bad samples_ms")


def test_rows_whose_key_does_not_match_their_record_are_skipped(tmp_path, genuine):
    _, rows, _ = genuine
    genuine_row = first(rows, "measurement")
    other_graph = forged(genuine_row)
    other_graph["key"]["graph_hash"] = "a" * 64
    other_device = forged(genuine_row, device_fingerprint={"cpu_model": "a much faster one"})
    other_input = forged(genuine_row)
    other_input["key"]["input_sig"] = '[{"dtype":"float32","shape":[1,3,64,64]}]'
    not_hex = forged(genuine_row)
    not_hex["key"]["settings_key"] = "settings"
    text_date = forged(genuine_row, created_at="yesterday")
    predicted = forged(genuine_row, source="predicted")
    device = first(rows, "device")
    wrong_identity = dict(device, identity={"cpu_model": "forged"})
    forged_rows = [other_graph, other_device, other_input, not_hex, text_date, predicted,
                   wrong_identity, {"type": "unknown"}, ["not", "an", "object"]]
    with Cache(tmp_path / "target.sqlite") as cache:
        counts = cache.import_jsonl(write_export(tmp_path / "forged.jsonl",
                                                 [rows[0], *forged_rows, genuine_row]))
        assert counts == {"device": 0, "sample": 0, "measurement": 1, "decision": 0}  # the genuine one
        assert cache.stats()["measurements"] == 1
    reasons = [row.reason for row in counts.skipped]
    assert [row.line for row in counts.skipped] == list(range(2, 2 + len(forged_rows)))
    assert reasons[0].startswith("key mismatch: the key's graph hash")
    assert reasons[1].startswith("key mismatch: the key's device digest")
    assert reasons[2].startswith("key mismatch: the key's input signature")
    assert reasons[3].startswith("bad settings_key")
    assert reasons[4].startswith("bad created_at")
    assert reasons[5].startswith("not measured")
    assert reasons[6].startswith("key mismatch: the fingerprint")
    assert reasons[7].startswith("unknown entry type")
    assert reasons[8].startswith("unknown entry type")


def test_bad_sample_index_rows_are_skipped_and_later_profiles_work(tiny, home, tmp_path,
                                                                   profiled):
    from harness import LatencyProfiler, random_samples

    rows, chosen = profiled
    row = first(rows, "sample")
    labels = json.loads(row["sample"])
    canonical = lambda sample: json.dumps(sample, sort_keys=True, separators=(",", ":"))  # noqa
    bad = [dict(row, sample=text) for text in
           ("not json", "[1, 2]", '{"stage1.depth": 1}', json.dumps(labels))]  # not canonical
    bad.append(dict(row, sample=canonical(dict(labels, x=1))))  # labels of another space
    bad.append(dict(row, graph_hash="not-a-hash", sample=canonical(dict(labels, zz=1))))
    bad.append(dict(row, space_fp=42))
    bad.append(dict(row, created_at=float("inf")))
    before = counts_of(home)
    with Cache(home / "cache.sqlite") as cache:
        counts = cache.import_jsonl(write_export(tmp_path / "samples.jsonl", [rows[0], *bad]))
    assert counts == {"device": 0, "sample": 0, "measurement": 0, "decision": 0}
    assert [row.kind for row in counts.skipped] == ["sample"] * len(bad)
    assert counts_of(home) == before
    # A damaged row already stored (by an older import) no longer breaks the space either.
    with Cache(home / "cache.sqlite") as cache:
        cache.put_sample(row["space_fp"], row["input_sig"], "not json", row["graph_hash"])
        cache.put_sample(row["space_fp"], row["input_sig"], "[1, 2]", row["graph_hash"])
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST) as later:
        assert later.profile(chosen[0]) > 0
        assert later.profile(random_samples(tiny, 1, seed=12)[0]) > 0


def harness_cli(*args, home, check=True):
    env = dict(os.environ, HARNESS_HOME=str(home))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "harness.cli", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cache_stats_survives_odd_rows_already_stored(home, profiled):
    rows, _ = profiled
    connection = sqlite3.connect(home / "cache.sqlite")
    connection.execute("UPDATE measurements SET created_at = 'yesterday'")
    connection.commit()
    connection.close()
    measured = number_of(rows, "measurement")
    out = harness_cli("cache", "stats", home=home).stdout
    assert (f"local: {measured} measurements of {measured} graphs, latest unknown "
            f"({measured} with a date") in out
    stats = json.loads(harness_cli("cache", "stats", "--json", home=home).stdout)
    assert stats["per_device"][0]["latest"] is None
    assert stats["per_device"][0]["odd_dates"] == measured


def test_cache_import_reports_what_it_skipped(tmp_path, genuine):
    _, rows, _ = genuine
    genuine_row = first(rows, "measurement")
    dump = write_export(tmp_path / "dump.jsonl", [*rows, forged(genuine_row, samples_ms="987"),
                                                  forged(genuine_row, created_at=4e10)])
    out = harness_cli("cache", "import", str(dump), home=tmp_path / "other-home").stdout
    assert (f"imported {number_of(rows, 'measurement')} new measurements, "
            f"{number_of(rows, 'sample')} samples, 1 devices") in out
    assert "skipped 2 rows that failed their checks: 1 bad samples_ms, 1 dated in the future" \
        in out
    assert f"line {len(rows) + 1} (measurement): bad samples_ms" in out


@pytest.mark.parametrize("content, problem", [
    (None, "NUL bytes"),                                       # the cache file itself
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8"),      # some binary file
    (b"\xff\xfe\xfdnot utf-8\n", "not UTF-8"),
    (b"", "the file is empty"),
    (b'{"type": "someone-elses-export", "version": 1}\n', "no harness-cache-export header"),
    (b'{"type": "harness-cache-export", "version": "1"}\n', "no valid format version"),
    (b"a,b,c\n1,2,3\n", "line 1 is not JSON"),
])
def test_a_file_that_is_not_an_export_is_refused_whole(tmp_path, genuine, content, problem):
    folder, rows, _ = genuine
    path = tmp_path / "not-an-export"
    if content is None:
        shutil.copy(folder / "cache.sqlite", path)
    else:
        path.write_bytes(content)
    with Cache(tmp_path / "target.sqlite") as cache:
        cache.import_jsonl(write_export(tmp_path / "genuine.jsonl", rows))
        before = cache.stats()
        with pytest.raises(CacheError) as caught:
            cache.import_jsonl(path)
        assert cache.stats() == before
    assert str(path) in caught.value.message and problem in caught.value.message
    assert "harness cache export" in caught.value.fix
    proc = harness_cli("cache", "import", str(path), home=tmp_path / "cli-home", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "not a harness cache export" in proc.stderr and "fix:" in proc.stderr


def test_a_genuine_export_round_trips_with_nothing_skipped(tmp_path, genuine):
    _, rows, _ = genuine
    with Cache(tmp_path / "target.sqlite") as cache:
        counts = cache.import_jsonl(write_export(tmp_path / "genuine.jsonl", rows))
    assert counts.skipped == []
    assert counts == {kind: number_of(rows, kind)
                      for kind in ("device", "sample", "measurement", "decision")}


# ================================================================ 5. bad input

def run_cli(*args, home, env=None, timeout=300):
    """`python -m harness.cli ARGS` as a user runs it (PYTHONPATH and other `env` added)."""
    full = dict(os.environ, HARNESS_HOME=str(home), **(env or {}))
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "harness.cli", *args],
                          capture_output=True, text=True, env=full, timeout=timeout)


def one_line_error(proc, *words):
    """The command failed with exit 1 and one 'harness: error:' with its fix, no traceback."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("harness: error: ") and "\n  fix: " in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


@pytest.mark.parametrize("source, raised", [
    ("raise RuntimeError('no GPU on this machine')\n", "RuntimeError: no GPU on this machine"),
    ("def Space(:\n    pass\n", "SyntaxError: "),
    ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
])
def test_a_space_module_that_fails_as_it_is_imported_is_named(tmp_path, monkeypatch, home,
                                                              source, raised):
    from harness.errors import HarnessError
    from harness.spaces.space import load_space

    module = f"broken_space_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(HarnessError) as caught:
        load_space(f"{module}:Space")
    assert f"importing module {module!r}" in caught.value.message
    assert raised in caught.value.message and f"import {module}" in caught.value.fix
    proc = run_cli("profile", "--space", f"{module}:Space", home=home,
                   env={"PYTHONPATH": str(tmp_path)})
    one_line_error(proc, module, raised)


@pytest.mark.parametrize("args, words", [
    (["--timeout", "nan"], ["USER", "--timeout nan is not a positive number of seconds"]),
    (["--timeout", "inf"], ["USER", "--timeout inf"]),
    (["--timeout", "0"], ["USER", "--timeout 0.0"]),
    (["--samples", "200000000"], ["USER", "--samples 200000000", "100000", "--seed"]),
    # Refused by the agent's own settings check (agents/ort_agent.py parse_settings, the other
    # half of this item), which the host runs before anything is measured.
    (["--min-time-ms", "nan"], ["USER", "min_time_ms"]),
    (["--max-time-ms", "inf"], ["USER", "max_time_ms"]),
])
def test_numbers_no_run_can_use_are_user_errors_before_any_work(home, args, words):
    started = time.monotonic()
    proc = run_cli("profile", "--space", "harness.spaces:TinySpace", "--samples", "1", *args,
                   home=home)
    one_line_error(proc, *words)
    assert time.monotonic() - started < 60  # 200 million samples were never drawn
    if (home / "cache.sqlite").exists():
        assert counts_of(home)[0] == 0


@pytest.mark.parametrize("table, words", [
    ('transport = "ssh"\naddress = 5\n', ["address = 5 is not a text"]),
    ('transport = "ssh"\naddress = "pi@10.0.0.7:notaport"\n',
     ["address", "port 'notaport', not a port number"]),
    ('transport = "adb"\naddress = "2A1B0C3D"\nadb_port = "notaport"\n',
     ['adb_port = "notaport" is not a port number']),
    ('transport = "ssh"\naddress = "pi@10.0.0.7"\nkind = [1]\n', ["kind = [1] is not a text"]),
    ('transport = "telnet"\naddress = "pi@10.0.0.7"\n',
     ['transport = "telnet" is not one of "ssh", "adb"']),
    ('transport = "ssh"\naddress = "pi@10.0.0.7"\nconnect_timeout = nan\n',
     ["connect_timeout = NaN is not a positive number of seconds"]),
    ('transport = "ssh"\naddress = "pi@10.0.0.7"\npin_big_cores = "yes"\n',
     ['pin_big_cores = "yes" is not true or false']),
])
def test_devices_toml_fields_of_the_wrong_type_name_the_file_and_the_field(home, table, words):
    from devices import registry
    from devices.errors import FixableError

    home.mkdir(parents=True)
    path = home / "devices.toml"
    path.write_text("[devices.pi]\n" + table)
    for call in (lambda: registry.load_devices(home), lambda: registry.open_transport("pi", home),
                 lambda: registry.open_client("pi", home)):
        with pytest.raises(registry.RegistryError) as caught:
            call()
        error = caught.value
        assert isinstance(error, FixableError) and error.kind == "USER"
        assert error.message.startswith(f"{path}: [devices.pi] "), error.message
        assert all(word in error.message for word in words), error.message
        assert str(path) in error.fix
    for args in (["devices", "check", "pi"], ["devices", "list"],
                 ["profile", "--space", "harness.spaces:TinySpace", "--device", "pi"]):
        one_line_error(run_cli(*args, home=home), str(path), *words)


def test_a_devices_toml_without_device_tables_is_named(home):
    from devices import registry

    home.mkdir(parents=True)
    path = home / "devices.toml"
    for text, words in (("devices = 3\n", "devices = 3 is not a table of devices"),
                        ("[devices]\npi = 3\n", "devices.pi = 3 is not a table"),
                        ('[devices."../../victim"]\ntransport = "ssh"\naddress = "a@b"\n',
                         '[devices."../../victim"] is not a device name')):
        path.write_text(text)
        with pytest.raises(registry.RegistryError) as caught:
            registry.load_devices(home)
        assert str(path) in caught.value.message and words in caught.value.message
        one_line_error(run_cli("devices", "list", home=home), str(path), words)
    assert sorted(p.name for p in home.iterdir()) == ["devices.toml"]  # no lease file made


@pytest.mark.parametrize("where", ["is a file", "lies under"])
def test_a_harness_home_that_is_a_file_or_under_one_is_a_typed_error(tmp_path, where):
    from harness import LatencyProfiler
    from harness.errors import HomeError
    from harness.paths import harness_home
    from harness.spaces import TinySpace

    mine = tmp_path / "notes.txt"
    mine.write_text("mine\n")
    home = mine if where == "is a file" else mine / "harness"
    for args in (["devices", "add", "pi", "--ssh", "pi@10.0.0.7"], ["devices", "list"],
                 ["cache", "stats"], ["profile", "--space", "harness.spaces:TinySpace"]):
        one_line_error(run_cli(*args, home=home), f"$HARNESS_HOME {home} {where}",
                       f"move {mine} aside")
    with pytest.raises(HomeError):
        harness_home(home)
    tiny = TinySpace()
    with pytest.raises(HomeError):
        LatencyProfiler(tiny, tiny.dummy_input(), home=home)
    assert mine.read_text() == "mine\n" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_a_read_only_harness_home_for_devices_add(tmp_path):
    home = tmp_path / "read-only home"
    home.mkdir()
    argv = [sys.executable, "-W", "ignore", "-m", "harness.cli", "devices", "add", "pi",
            "--ssh", "pi@10.0.0.7"]
    if os.geteuid() == 0:  # root writes anywhere: make the folder a read-only mount instead
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare (util-linux) to mount the home folder read-only")
        argv = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && '
                'mount -o remount,bind,ro "$0" && exec "$@"', str(home), *argv]
    else:
        home.chmod(0o555)
    env = dict(os.environ, HARNESS_HOME=str(home), PYTHONPATH=str(REPO))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    one_line_error(proc, f"USER: cannot write {home / 'devices.toml'}",
                   f"make {home} writable for this user")
    assert "Read-only file system" in proc.stderr or "Permission denied" in proc.stderr
    assert list(home.iterdir()) == []  # no partial file left


@pytest.mark.parametrize("target, words", [
    ("missing/dump.jsonl", "missing does not exist"),
    ("a-folder", "it is a folder"),
    ("a-file/dump.jsonl", "a-file is not a folder"),
])
def test_cache_export_to_a_place_that_cannot_hold_it(tmp_path, genuine, target, words):
    folder, _, _ = genuine
    out = tmp_path / "out"
    (out / "a-folder").mkdir(parents=True)
    (out / "a-file").write_text("mine\n")
    before = sorted(out.rglob("*"))
    with Cache(folder / "cache.sqlite") as cache, pytest.raises(CacheError) as caught:
        cache.export_jsonl(out / target)
    assert f"cannot export to {out / target}" in caught.value.message
    assert words in caught.value.message and "fix" not in caught.value.message
    proc = run_cli("--cache", str(folder / "cache.sqlite"), "cache", "export", str(out / target),
                   home=tmp_path / "home")
    one_line_error(proc, str(out / target), words)
    assert sorted(out.rglob("*")) == before  # no .part file anywhere
    assert (out / "a-file").read_text() == "mine\n"


GARBLING_AGENT = """
import json, subprocess, sys
# The real agent, with every measurement's samples replaced by 1e308 ms.
real = subprocess.Popen([sys.executable, *sys.argv[1:]], stdin=sys.stdin,
                        stdout=subprocess.PIPE, text=True)
for line in real.stdout:
    answer = json.loads(line)
    if "samples_ms" in answer:
        answer["samples_ms"] = [1e308, 1e308]
    print(json.dumps(answer), flush=True)
sys.exit(real.wait())
"""


@pytest.mark.parametrize("isolation", ["worker", "process"])
def test_an_agent_answering_1e308_ms_is_a_protocol_error_and_nothing_is_cached(
        tmp_path, tiny, home, isolation):
    from devices import AgentClient, LocalTransport
    from devices.errors import AgentProtocolError
    from harness import LatencyProfiler, random_samples
    from harness.pool.device_pool import LocalPool

    agent = tmp_path / "garbling_agent.py"
    agent.write_text(GARBLING_AGENT)

    def garbled(name, _home, isolation):
        return AgentClient(LocalTransport(tmp_path / "device", name=name,
                                          python=[sys.executable, str(agent)]), isolation)

    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST,
                         isolation=isolation) as profiler:
        profiler.pool.close()
        profiler.pool = LocalPool(profiler.home, "local", isolation, client_factory=garbled)
        with pytest.raises(AgentProtocolError) as caught:
            profiler.measure(random_samples(tiny, 1, seed=4)[0])
    assert caught.value.kind == "PROTOCOL" and "samples_ms" in caught.value.message
    assert "1e+08" in caught.value.message  # names the bound it broke
    assert counts_of(home)[0] == 0


# ================================================================ 6. faults a user sees

@pytest.fixture
def silent_host():
    """A TCP port that accepts connections and never says a word (no SSH banner)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for connection in held:
        connection.close()


@pytest.mark.parametrize("what", ["closed port", "silent host"])
def test_an_unreachable_host_is_one_error_with_its_fix(home, silent_host, what):
    from devices import registry

    port = 1 if what == "closed port" else silent_host
    registry.add_device(home, registry.DeviceConfig(
        name="gone", transport="ssh", address=f"root@127.0.0.1:{port}", connect_timeout=2.0))
    profile = ["profile", "--space", "harness.spaces:TinySpace", "--device", "gone",
               "--samples", "1"]
    proc = run_cli(*profile, home=home)
    one_line_error(proc, "DEVICE_LOST on device 'gone'", "127.0.0.1")
    assert len(proc.stderr.splitlines()) == 2, proc.stderr  # the error and its fix
    assert "paramiko" not in proc.stderr and "restarting the agent" not in proc.stderr
    if what == "silent host":
        assert "Error reading SSH protocol banner" in proc.stderr or \
            "no SSH server answered within 2 s" in proc.stderr
        assert "sshd (not another service) listens on that port" in proc.stderr
    # With a fallback that has nothing to predict with, nothing is announced first.
    proc = run_cli(*profile, "--fallback", "nn-meter", home=home)
    one_line_error(proc, "gone is unreachable (", "harness calibrate --device gone")
    assert "answering with nn-Meter predictions" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 2, proc.stderr
    # The library's own account is still there for debugging, at -vv.
    debug = run_cli("-vv", *profile, home=home)
    assert debug.returncode == 1 and "trying once more" in debug.stderr
    if what == "silent host":
        assert "paramiko.transport" in debug.stderr
    assert counts_of(home)[0] == 0 if (home / "cache.sqlite").exists() else True


def test_a_device_name_that_is_a_path_touches_no_file(tiny, home):
    """`--device ../../victim` once overwrote victim.lock two folders up: a name is checked
    before any file is touched."""
    from harness import HarnessError, LatencyProfiler, random_samples

    victim = home.parent / "victim.lock"
    victim.write_text("precious\n")
    with LatencyProfiler(tiny, tiny.dummy_input(), device="../../victim",
                         settings=FAST) as profiler:
        with pytest.raises(HarnessError, match="cannot name a device"):
            profiler.measure(random_samples(tiny, 1)[0])
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "profile", "--space",
                           "harness.spaces:TinySpace", "--device", "../../victim", "--samples",
                           "1"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HARNESS_HOME=str(home)))
    assert proc.returncode == 1 and "cannot name a device" in proc.stderr
    assert victim.read_text() == "precious\n" and not (home / "leases").exists()
