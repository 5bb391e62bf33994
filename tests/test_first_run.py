"""What a new user hits first (issue 30), run as a user runs it: a space in the current folder,
shape errors, the variant in the table and the summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST_ARGS = ["--min-runs", "5", "--min-time-ms", "5"]


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
