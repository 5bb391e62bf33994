"""The harness command, run as a user runs it."""
import json
import os
import subprocess
import sys

import pytest


def harness(*args, home, check=True):
    env = dict(os.environ, HARNESS_HOME=str(home))
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


FAST_ARGS = ["--min-runs", "5", "--min-time-ms", "5"]


def test_profile_json_then_cached(home):
    args = ["profile", "--space", "harness.spaces:TinySpace", "--device", "local",
            "--samples", "3", "--seed", "1", "--json", *FAST_ARGS]
    first = json.loads(harness(*args, home=home).stdout)
    assert len(first) == 3
    assert {r["source"] for r in first} == {"measured"}
    assert all(r["stats"]["median"] > 0 and len(r["samples_ms"]) >= 5 for r in first)
    assert all("stage1.depth" in r["sample"] for r in first)
    again = json.loads(harness(*args, home=home).stdout)
    assert {r["source"] for r in again} == {"cached"}
    assert [r["samples_ms"] for r in again] == [r["samples_ms"] for r in first]


def test_profile_table(home):
    out = harness("profile", "--space", "harness.spaces:TinySpace", "--samples", "2",
                  *FAST_ARGS, home=home).stdout
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["#", "graph", "median", "ms"]
    assert "measured" in lines[2] and "measured" in lines[3]
    assert "2 samples" in out and "on local" in out


def test_cache_stats_export_import(home, tmp_path):
    harness("profile", "--space", "harness.spaces:TinySpace", "--samples", "2", *FAST_ARGS,
            home=home)
    stats = json.loads(harness("cache", "stats", "--json", home=home).stdout)
    assert stats["measurements"] == 2 and stats["devices"] == 1
    assert "local: 2 measurements" in harness("cache", "stats", home=home).stdout
    dump = tmp_path / "dump.jsonl"
    assert "exported 2 measurements" in harness("cache", "export", str(dump), home=home).stdout
    other = tmp_path / "other-home"
    assert "imported 2 new" in harness("cache", "import", str(dump), home=other).stdout
    assert json.loads(harness("cache", "stats", "--json", home=other).stdout)["measurements"] == 2


@pytest.mark.parametrize("args, words", [
    (["profile", "--space", "harness.spaces:Nope"], ["no attribute 'Nope'", "TinySpace"]),
    (["profile", "--space", "harness.spaces:TinySpace", "--device", "pixel7"],
     ["no device named 'pixel7'", "fix:"]),
    (["profile", "--space", "harness.spaces:TinySpace", "--samples", "0"], ["--samples"]),
])
def test_errors_name_cause_and_fix(home, args, words):
    proc = harness(*args, home=home, check=False)
    assert proc.returncode == 1
    for word in words:
        assert word in proc.stderr
    assert "Traceback" not in proc.stderr


def test_corrupt_cache_is_reported_not_replaced(home, tmp_path):
    home.mkdir(parents=True)
    (home / "cache.sqlite").write_text("not a database")
    proc = harness("profile", "--space", "harness.spaces:TinySpace", "--samples", "1",
                   home=home, check=False)
    assert proc.returncode == 1 and "not a SQLite database" in proc.stderr
    assert (home / "cache.sqlite").read_text() == "not a database"


def test_console_script_is_installed():
    proc = subprocess.run(["harness", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "profile" in proc.stdout
