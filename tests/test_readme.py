"""Every Python block of the README runs as written: the blocks in order, as one session (a
later block uses the names an earlier one made), on the device `local`, in a fresh
$HARNESS_HOME, in a separate process as a reader would run them."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

DRIVER = """
import sys
namespace = {"__name__": "__main__"}
for index, block in enumerate(BLOCKS):
    print(f"--- block {index}", flush=True)
    exec(compile(block, f"README.md python block {index}", "exec"), namespace)
print("--- all blocks ran", flush=True)
"""


def readme_python_blocks() -> list[str]:
    """The README's ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def _needs_nn_meter(block: str) -> bool:
    return "nn_meter" in block


def _nn_meter_ready() -> bool:
    """nn-Meter installed and its predictor unzipped where the README says (harness never
    downloads one)."""
    if importlib.util.find_spec("nn_meter") is None:
        return False
    return (Path.home() / ".nn_meter" / "data" / "predictor").is_dir() and any(
        (Path.home() / ".nn_meter" / "data" / "predictor").glob("cortexA76cpu_tflite21*"))


def _run_blocks(blocks: list[str], home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HARNESS_HOME=str(home),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    program = f"BLOCKS = {blocks!r}\n{DRIVER}"
    return subprocess.run([sys.executable, "-c", program], cwd=home, env=env, capture_output=True,
                          text=True, timeout=900)


def test_the_readme_has_python_blocks_and_they_use_the_local_device():
    blocks = readme_python_blocks()
    assert len(blocks) >= 3
    assert 'device="local"' in blocks[0]


def test_readme_python_blocks_run_as_written(tmp_path):
    blocks = [block for block in readme_python_blocks() if not _needs_nn_meter(block)]
    done = _run_blocks(blocks, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "--- all blocks ran" in done.stdout


def test_readme_nn_meter_block_runs_where_nn_meter_is_installed(tmp_path):
    if not _nn_meter_ready():
        pytest.skip("needs nn-Meter and its cortexA76cpu_tflite21 predictor in ~/.nn_meter "
                    "(harness never downloads one)")
    blocks = readme_python_blocks()
    upto = next(i for i, block in enumerate(blocks) if _needs_nn_meter(block))
    done = _run_blocks(blocks[:upto + 1], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
