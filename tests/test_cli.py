"""The harness command, run as a user runs it."""
import json
import os
import re
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


FAST_ARGS = ["--min-runs", "5", "--min-time-ms", "5", "--protocol", "loop"]


def json_lines(text):
    """The rows and the summary of a --json output (JSON Lines, the summary last)."""
    objects = [json.loads(line) for line in text.splitlines()]
    assert "summary" in objects[-1] and all("summary" not in row for row in objects[:-1])
    return objects[:-1], objects[-1]["summary"]


def test_profile_json_lines_then_cached(home):
    args = ["profile", "--space", "harness.spaces:TinySpace", "--device", "local",
            "--samples", "3", "--seed", "1", "--json", *FAST_ARGS]
    first, summary = json_lines(harness(*args, home=home).stdout)
    assert len(first) == 3 and summary["samples"] == 3 and summary["measured"] == 3
    assert {r["source"] for r in first} == {"measured"} and [r["index"] for r in first] == [0, 1, 2]
    assert all(r["median_ms"] > 0 and r["n"] >= 5 and r["device"] == "local" for r in first)
    assert all("stage1.depth" in r["sample"] and r["arch"] for r in first)
    assert all(r["interval_low_ms"] <= r["median_ms"] <= r["interval_high_ms"] for r in first)
    assert all("samples_ms" not in r for r in first)  # raw times only with --raw
    raw, summary = json_lines(harness(*args, "--raw", home=home).stdout)
    assert {r["source"] for r in raw} == {"cached"} and summary["cached"] == 3
    assert all(len(r["samples_ms"]) == r["n"] for r in raw)


def test_profile_csv(home):
    import csv
    import io

    out = harness("profile", "--space", "harness.spaces:TinySpace", "--samples", "2",
                  "--csv", "--raw", *FAST_ARGS, home=home).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 2 and rows[0]["device"] == "local" and rows[0]["source"] == "measured"
    assert float(rows[0]["median_ms"]) > 0 and len(rows[0]["samples_ms"].split()) == \
        int(rows[0]["n"])
    assert json.loads(rows[1]["sample"])["stage1.depth"] in (1, 2)
    proc = harness("profile", "--space", "harness.spaces:TinySpace", "--raw", home=home,
                   check=False)
    assert proc.returncode == 1 and "--json --raw" in proc.stderr


def test_profile_table(home):
    out = harness("profile", "--space", "harness.spaces:TinySpace", "--samples", "2",
                  "--statistic", "p99", *FAST_ARGS, home=home).stdout
    lines = out.splitlines()
    assert lines[0].split()[:8] == ["#", "device", "architecture", "graph", "p99", "ms",
                                    "median", "ms"]
    assert lines[0].count("p99") == 1  # the chosen statistic is not shown twice
    assert "measured" in lines[2] and "measured" in lines[3] and "local" in lines[2]
    assert re.search(r"\s\d+\.\d{3}\s", lines[2])  # milliseconds with fixed decimals
    assert not re.search(r"\d\.\d{4}", lines[2])
    assert "2 samples" in out and "on local" in out


def test_version_and_fast_help(home):
    assert harness("--version", home=home).stdout.startswith("harness 0.")
    for args in (["--help"], ["profile", "--help"], ["filter", "--help"]):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "harness.cli", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "usage: harness" in proc.stdout
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()}
        assert not imported & {"torch", "onnx", "onnxruntime", "matplotlib", "ray", "nn_meter"}


def test_no_traceback_on_a_closed_pipe(home):
    command = [sys.executable, "-m", "harness.cli", "profile", "--space",
               "harness.spaces:TinySpace", "--samples", "40", "--json", *FAST_ARGS]
    env = dict(os.environ, HARNESS_HOME=str(home))
    reader = subprocess.Popen(["head", "-n", "1"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL)
    writer = subprocess.run(command, stdout=reader.stdin, stderr=subprocess.PIPE, text=True,
                            env=env, timeout=300)
    reader.stdin.close()
    reader.wait(timeout=10)
    assert "Traceback" not in writer.stderr and "BrokenPipe" not in writer.stderr
    assert writer.returncode == 141


def test_hints_are_flags():
    from harness.cli.options import as_flags, build_parser as _parser, option_names

    options = option_names(_parser())
    assert as_flags("pass fallback='nn-meter' (calibrate first) or fallback='model'",
                    options) == "pass --fallback nn-meter (calibrate first) or --fallback model"
    assert as_flags("pass predictor=NAME_OR_FOLDER", options) == \
        "pass --predictor NAME_OR_FOLDER"
    assert as_flags("pass the latency limit in ms, e.g. limit_ms=25.0", options).endswith(
        "e.g. --limit-ms 25.0")
    assert as_flags("set RAY_AUTH_MODE=token, mode=0600", options) == \
        "set RAY_AUTH_MODE=token, mode=0600"  # no option of the command: left alone


def test_cache_stats_export_import(home, tmp_path):
    harness("profile", "--space", "harness.spaces:TinySpace", "--samples", "2", *FAST_ARGS,
            home=home)
    stats = json.loads(harness("cache", "stats", "--json", home=home).stdout)
    assert stats["measurements"] == 2 and stats["devices"] == 1 and stats["fingerprints"] == 1
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


def test_every_subcommand_the_parser_offers_has_its_command():
    import argparse

    from harness.cli import COMMANDS
    from harness.cli.options import build_parser

    subcommands = next(action for action in build_parser()._actions
                       if isinstance(action, argparse._SubParsersAction))
    assert set(subcommands.choices) == set(COMMANDS)
