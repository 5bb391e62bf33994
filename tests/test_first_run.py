"""What a new user hits first (issue 30), run as a user runs it: a space in the current folder,
shape errors, the variant in the table and the summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import FAST

ROOT = Path(__file__).resolve().parent.parent

FAST_ARGS = ["--min-runs", "5", "--min-time-ms", "5", "--protocol", "loop"]


def console_script(tmp_path: Path) -> Path:
    """A launcher like pip's `harness` console script: its own folder, not the current one,
    starts the import path."""
    script = tmp_path / "bin" / "harness"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("import sys\nfrom harness.cli import main\nsys.exit(main())\n")
    return script


def run_harness(*args: str, home: Path, cwd: Path, script: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HARNESS_HOME=str(home), PYTHONPATH=str(ROOT))
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "harness.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def test_space_module_in_the_current_folder_is_found_like_python_m(tmp_path, home):
    project = tmp_path / "project"
    project.mkdir()
    (project / "myspace.py").write_text(
        "from harness.spaces import TinySpace\n\n\nclass MySpace(TinySpace):\n    pass\n")
    script = console_script(tmp_path)
    done = run_harness("profile", "--space", "myspace:MySpace", "--device", "local", "--samples", "1",
                       *FAST_ARGS, home=home, cwd=project, script=script)
    assert done.returncode == 0, done.stderr
    assert "measured" in done.stdout
    # Elsewhere it is not found, and the error says where it looked.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_harness("profile", "--space", "myspace:MySpace", "--device", "local", "--samples", "1",
                       home=home, cwd=elsewhere, script=script)
    assert done.returncode != 0
    assert "cannot import module 'myspace'" in done.stderr and str(elsewhere) in done.stderr


def _table_header(stdout: str) -> list[str]:
    return stdout.splitlines()[0].split()


def test_the_variant_shows_whenever_it_is_not_the_spaces_default(tmp_path, home):
    space = ["profile", "--space", "harness.spaces:TinySpace", "--device", "local", "--samples", "1",
             *FAST_ARGS]
    default = run_harness(*space, home=home, cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    assert "variant" not in _table_header(default.stdout)
    assert "on local; input 1x3x32x32" in default.stdout
    for extra, variant in ((["--input-size", "24"], "fp32 1x3x24x24"), (["--batch", "2"], "fp32 2x3x32x32"),
                           (["--precision", "int8-dynamic"], "int8-dynamic 1x3x32x32")):
        done = run_harness(*space, *extra, home=home, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "variant" in _table_header(done.stdout), extra
        assert variant in done.stdout.splitlines()[2], extra
        assert f"input {variant.split()[-1]}" in done.stdout, extra
    summary = json.loads(run_harness(*space, "--batch", "2", "--json", home=home, cwd=tmp_path)
                         .stdout.splitlines()[-1])["summary"]
    assert summary["input_shapes"] == ["2x3x32x32"]


def test_a_model_files_variant_shows_when_its_shape_was_chosen(tmp_path, home, tiny_model):
    static = run_harness("profile", "--model", str(tiny_model), *FAST_ARGS, home=home, cwd=tmp_path)
    assert static.returncode == 0, static.stderr
    assert "variant" not in _table_header(static.stdout) and "input 1x3x32x32" in static.stdout
    batched = run_harness("profile", "--model", str(tiny_model), "--batch", "2", *FAST_ARGS,
                          home=home, cwd=tmp_path)
    assert batched.returncode == 1 and "does not fit" in batched.stderr  # its batch axis is static


def test_precision_checks_count_what_the_cpu_provider_runs_in_fp32(tiny):
    from harness.export.graph import export_sample
    from harness.export.model_file import convert
    from harness.export.precision_check import check_on_cpu
    from harness.spaces.space import random_samples

    exported = export_sample(tiny, random_samples(tiny, 1, seed=1)[0], tiny.dummy_input())
    shapes = {"input0": [1, 3, 32, 32]}
    fp16 = check_on_cpu(convert(exported, "fp16", shapes), "fp16")
    assert fp16.nodes > 10 and fp16.other == fp16.nodes and fp16.casts_inserted > 0
    assert fp16.flag() == (f"fp16 ran as fp32: {fp16.nodes} of {fp16.nodes} nodes, "
                           f"{fp16.casts_inserted} casts inserted (the CPU provider has no fp16 "
                           f"kernels for them)")
    static = check_on_cpu(convert(exported, "int8-static", shapes), "int8-static")
    assert 0 < static.other < static.nodes  # most Convs fused into QLinearConv, a few not
    assert static.flag().startswith(f"int8 partly fp32: {static.other} of {static.nodes} "
                                    f"Conv/MatMul/Gemm nodes ran in fp32")
    dynamic = check_on_cpu(convert(exported, "int8-dynamic", shapes), "int8-dynamic")
    assert dynamic.other == 0 and dynamic.flag() is None  # every Conv is a ConvInteger
    assert check_on_cpu(exported, "fp32") is None


def test_the_python_api_flags_a_precision_run_in_fp32_and_so_does_its_cached_answer(tiny):
    from harness import LatencyProfiler
    from harness.spaces.space import random_samples

    sample = random_samples(tiny, 1, seed=4)[0]
    with LatencyProfiler(tiny, tiny.dummy_input(), precision="fp16", settings=FAST) as profiler:
        measured = profiler.measure(sample)
        again = profiler.measure(sample)
    assert measured.source == "measured" and again.source == "cached"
    for result in (measured, again):
        assert sum(flag.startswith("fp16 ran as fp32:") for flag in result.flags) == 1
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST) as profiler:
        assert not any("fp32:" in flag for flag in profiler.measure(sample).flags)


def test_the_table_and_json_flag_a_precision_run_in_fp32(tmp_path, home, tiny_model):
    done = run_harness("profile", "--model", str(tiny_model), "--precision", "fp32,fp16", *FAST_ARGS,
                       home=home, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    fp32_line, fp16_line = done.stdout.splitlines()[2:4]
    assert "fp16 ran as fp32" not in fp32_line
    assert "fp16 1x3x32x32" in fp16_line and "fp16 ran as fp32:" in fp16_line
    rows = [json.loads(line) for line in run_harness(
        "profile", "--model", str(tiny_model), "--precision", "fp16", "--json", *FAST_ARGS,
        home=home, cwd=tmp_path).stdout.splitlines()[:-1]]
    assert any(flag.startswith("fp16 ran as fp32:") for flag in rows[0]["flags"])
    assert rows[0]["source"] == "cached"  # a cached result says it too


def test_smaller_points_version_csv_dates_and_filter(tmp_path, home):
    version = run_harness("--version", home=home, cwd=tmp_path).stdout
    assert version.startswith("harness 0.") and "onnxruntime 1." in version and "torch 2." in version
    assert len(version.strip().splitlines()) == 1
    space = ["--space", "harness.spaces:TinySpace", "--device", "local", "--samples", "2", *FAST_ARGS]
    csv_text = run_harness("profile", *space, "--csv", home=home, cwd=tmp_path).stdout
    import csv
    import io
    import re
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    numbers = [rows[0][field] for field in ("median_ms", "p90_ms", "iqr_ms", "cv", "load_ms")]
    assert all(re.fullmatch(r"-?\d+(\.\d{1,6})?(e-?\d+)?", value) for value in numbers), numbers
    row = json.loads(run_harness("profile", *space, "--json", home=home, cwd=tmp_path)
                     .stdout.splitlines()[0])
    assert isinstance(row["created_at"], float)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["created"])
    done = run_harness("filter", "--space", "harness.spaces:TinySpace", "--device", "local",
                       "--limit-ms", "1000", "--samples", "3", *FAST_ARGS, home=home, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "below 1000 ms: samples 0, 1, 2 (numbered from 0 in the order --seed 0 draws them" \
        in done.stdout
    refused = run_harness("filter", "--space", "harness.spaces:TinySpace", "--device", "local",
                          "--limit-ms", "1000", "--samples", "1", "--window-spread", "0.7",
                          *FAST_ARGS, home=home, cwd=tmp_path)
    assert refused.returncode != 0 and "window_spread must be a share" in refused.stderr
    refused = run_harness("filter", "--space", "harness.spaces:TinySpace", "--device", "local",
                          "--limit-ms", "1000", "--samples", "1", "--block-ms", "-1",
                          *FAST_ARGS, home=home, cwd=tmp_path)
    assert refused.returncode != 0 and "block_ms must be a number of ms above 0" in refused.stderr
    refused = run_harness("filter", "--space", "harness.spaces:TinySpace", "--device", "local",
                          "--limit-ms", "1000", "--samples", "1", "--ref-share", "1.5",
                          *FAST_ARGS, home=home, cwd=tmp_path)
    assert refused.returncode != 0 and "ref_share must be a share" in refused.stderr
