"""A device's model folder stays bounded: least recently used models out past its limit (the
agent does it before each measurement), its size in `cache stats` and `devices list`, and
`harness cache prune`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents.ort_agent import model_folder
from devices import registry
from devices.errors import BadRequest
from devices.folder_usage import remembered, usage_path
from harness.errors import InvalidArgument
from harness import LatencyProfiler, random_samples
from harness.pool.model_folders import local_models_path, local_usage, prune
from harness.spaces import TinySpace

from tests.conftest import FAST
from tests.ssh_fixtures import client_key, loop, sshd  # noqa: F401 (pytest fixtures)

ROOT = Path(__file__).resolve().parent.parent


def _models(folder: Path, sizes: dict) -> None:
    """Models of the given sizes, used in the order given (the first longest ago)."""
    folder.mkdir(parents=True, exist_ok=True)
    for age, (name, size) in enumerate(reversed(list(sizes.items()))):
        path = folder / f"{name}.onnx"
        path.write_bytes(b"x" * size)
        os.utime(path, (1_000_000 - age, 1_000_000 - age))


def test_least_recently_used_models_go_first_and_the_kept_one_never(tmp_path):
    folder = tmp_path / "models"
    _models(folder, {"old": 400, "mid": 300, "new": 200})
    (folder / "agent.py").write_bytes(b"y" * 1000)  # not a model: never counted or removed
    assert model_folder(str(folder)) == {"bytes": 900, "models": 3, "removed": 0, "removed_bytes": 0}
    assert model_folder(str(folder), 600) == {"bytes": 500, "models": 2, "removed": 1,
                                              "removed_bytes": 400}
    assert sorted(p.name for p in folder.iterdir()) == ["agent.py", "mid.onnx", "new.onnx"]
    # the model about to be measured stays even when it is the oldest
    assert model_folder(str(folder), 0, keep=(str(folder / "mid.onnx"),))["models"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["agent.py", "mid.onnx"]
    assert model_folder(str(tmp_path / "absent"), 0)["models"] == 0


def test_limits_per_device_kind_and_setting(home, monkeypatch):
    monkeypatch.delenv(registry.MODELS_LIMIT_ENV, raising=False)
    assert registry.models_limit_bytes("local", home) == 2048 * 1_000_000
    registry.add_device(home, registry.DeviceConfig(name="phone", transport="adb", address="X1"))
    registry.add_device(home, registry.DeviceConfig(name="pi", transport="ssh", address="pi@10.0.0.7",
                                                    models_limit_mb=100))
    assert registry.models_limit_bytes("phone", home) == 512 * 1_000_000
    assert registry.models_limit_bytes("pi", home) == 100 * 1_000_000  # its own setting wins
    monkeypatch.setenv(registry.MODELS_LIMIT_ENV, "64")
    assert registry.models_limit_bytes("local", home) == 64 * 1_000_000
    assert registry.models_limit_bytes("pi", home) == 100 * 1_000_000
    monkeypatch.setenv(registry.MODELS_LIMIT_ENV, "lots")
    with pytest.raises(BadRequest, match="HARNESS_MODELS_LIMIT_MB"):
        registry.models_limit_bytes("local", home)


def test_a_sweep_on_local_stays_within_the_limit(home, monkeypatch):
    space = TinySpace()
    samples = random_samples(space, 6, seed=5)
    with LatencyProfiler(space, space.dummy_input(), device="local", settings=FAST) as profiler:
        profiler.measure(samples[0])
    one_model = local_usage(home)["bytes"]
    limit = int(one_model * 2.5)  # room for two TinySpace models
    monkeypatch.setenv(registry.MODELS_LIMIT_ENV, str(limit / 1e6))
    with LatencyProfiler(space, space.dummy_input(), device="local", settings=FAST) as profiler:
        results = profiler.measure_many(samples[1:], progress=False)
    assert all(m.source == "measured" for m in results)
    usage = local_usage(home)
    assert usage["limit_bytes"] == limit and usage["bytes"] <= limit and 1 <= usage["models"] <= 2
    # the newest models are the ones kept
    newest = {m.graph_hash for m in results[-usage["models"]:]}
    assert len(list(local_models_path(home).glob("*.onnx"))) == usage["models"] == len(newest)


def harness(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HARNESS_HOME=str(home), PYTHONPATH=str(ROOT))
    env.pop(registry.MODELS_LIMIT_ENV, None)
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_cache_stats_devices_list_and_prune(home):
    space = TinySpace()
    with LatencyProfiler(space, space.dummy_input(), device="local", settings=FAST) as profiler:
        profiler.measure_many(random_samples(space, 3, seed=7), progress=False)
    usage = local_usage(home)
    assert usage["models"] == 3
    stats = harness("cache", "stats", home=home)
    assert stats.returncode == 0, stats.stderr
    assert f"local: {usage['bytes'] / 1e6:.1f} MB of 2048.0 MB (3 models)" \
        in stats.stdout and "harness cache prune" in stats.stdout
    as_json = json.loads(harness("cache", "stats", "--json", home=home).stdout)
    assert as_json["model_folders"]["local"] == dict(usage, device="local", at=None)
    listed = harness("devices", "list", home=home)
    assert listed.returncode == 0, listed.stderr
    assert "(3 models)" in listed.stdout and "cache prune" in listed.stdout
    kept = harness("cache", "prune", home=home)  # within its limit: nothing removed
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.startswith("local: removed 0 models") and local_usage(home)["models"] == 3
    emptied = harness("cache", "prune", "--device", "local", "--limit-mb", "0", home=home)
    assert emptied.returncode == 0, emptied.stderr
    assert "local: removed 3 models" in emptied.stdout and local_usage(home)["models"] == 0
    bad = harness("cache", "prune", "--limit-mb", "-1", home=home)
    assert bad.returncode != 0 and "--limit-mb -1.0 is not a size" in bad.stderr


def test_prune_refuses_a_device_without_our_agent(home):
    registry.add_device(home, registry.DeviceConfig(name="sim1", transport="sim", address="npu",
                                                    sim_ms=5.0))
    with pytest.raises(InvalidArgument, match="runs no harness agent"):
        prune("sim1", home)


def test_a_remote_devices_folder_is_shown_as_its_agent_last_reported_it(home, loop):
    """Over a real sshd: each measurement's answer carries the device's folder size, which
    `devices list` and `cache stats` show with its age, without connecting again."""
    listed = harness("devices", "list", home=home)
    assert "up to 1024.0 MB (no size reported yet)" in listed.stdout, listed.stdout
    space = TinySpace()
    with LatencyProfiler(space, space.dummy_input(), device="loop", settings=FAST) as profiler:
        profiler.measure_many(random_samples(space, 2, seed=3), progress=False)
    on_device = model_folder(str(loop / "models"))
    assert on_device["models"] == 2
    heard = remembered(usage_path(home, "loop"))
    assert heard is not None and (heard.bytes, heard.models) == (on_device["bytes"], 2)
    listed = harness("devices", "list", home=home)
    assert f"{on_device['bytes'] / 1e6:.1f} MB of 1024.0 MB (2 models), as of " in listed.stdout
    as_json = json.loads(harness("cache", "stats", "--json", home=home).stdout)
    assert as_json["model_folders"]["loop"]["models"] == 2
    pruned = harness("cache", "prune", "--device", "loop", "--limit-mb", "0", home=home)
    assert pruned.returncode == 0, pruned.stderr
    assert remembered(usage_path(home, "loop")).models == 0  # the prune's answer too
    # garbage in the remembered file is "not known", never an error
    usage_path(home, "loop").write_text('{"bytes": -1, "models": "many"}')
    assert remembered(usage_path(home, "loop")) is None
    listed = harness("devices", "list", home=home)
    assert listed.returncode == 0 and "no size reported yet" in listed.stdout
    registry.remove_device(home, "loop")
    assert not usage_path(home, "loop").exists()
