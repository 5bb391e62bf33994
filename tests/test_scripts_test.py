"""scripts/test works the same from a root shell and from inside an activated venv: the extras
venv sees the running interpreter's packages (an activated venv's included), and every pip step
is pinned to the README's torch."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS_VENV = ROOT / "scripts" / "extras_venv.py"


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out)


def _base_python() -> Path:
    """The base interpreter of whatever runs the tests (the extras venv's, a user's venv's)."""
    return Path(sys.base_prefix) / "bin" / "python3"


def _sys_path(python: Path) -> list[str]:
    out = subprocess.run([str(python), "-c", "import sys; print('\\n'.join(sys.path))"],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_extras_venv_layers_over_an_activated_venv_and_over_a_root_shell(tmp_path):
    base = _base_python()
    user_venv = tmp_path / "v"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(user_venv)], check=True)
    user_site = _site_packages(user_venv / "bin" / "python")
    # What `pip install -e .[test]` leaves in the user's venv: a package and an editable
    # install's .pth pointing at a source folder.
    (user_site / "layered_probe.py").write_text("WHERE = 'user venv'\n")
    source = tmp_path / "src"
    source.mkdir()
    (source / "editable_probe.py").write_text("WHERE = 'editable'\n")
    (user_site / "__editable__probe.pth").write_text(f"{source}\n")

    extras = tmp_path / "extras"
    # From inside the activated venv: `python3` is the venv's.
    subprocess.run([str(user_venv / "bin" / "python"), str(EXTRAS_VENV), str(extras), "--without-pip"],
                   check=True)
    extras_python = extras / "bin" / "python"
    probe = subprocess.run([str(extras_python), "-c",
                            "import layered_probe, editable_probe;"
                            "print(layered_probe.WHERE, editable_probe.WHERE)"],
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["user", "venv", "editable"]
    path = _sys_path(extras_python)
    extras_site = str(_site_packages(extras_python))
    base_site = str(_site_packages(base))
    # The extras' own packages win (NNI's pins), then the user's venv, then the base's.
    assert path.index(extras_site) < path.index(str(user_site)) < path.index(base_site)

    # From a root shell (no venv): the same folder is layered over the base interpreter only.
    subprocess.run([str(base), str(EXTRAS_VENV), str(extras), "--without-pip"], check=True)
    probe = subprocess.run([str(extras_python), "-c", "import layered_probe"], capture_output=True, text=True)
    assert probe.returncode != 0 and "layered_probe" in probe.stderr
    assert base_site in _sys_path(extras_python)


def test_every_pip_step_is_pinned_to_the_readmes_torch():
    script = (ROOT / "scripts" / "test").read_text()
    readme_torch = re.search(r"torch==([\d.]+)", (ROOT / "README.md").read_text().splitlines()[0])
    assert readme_torch, "the README's first command installs a pinned torch"
    constraints = (ROOT / "scripts" / "constraints.txt").read_text()
    assert f"torch=={readme_torch.group(1)}" in constraints.split()
    # One place calls pip, with the constraints file; every install goes through it.
    pip_calls = [line for line in script.splitlines() if "-m pip" in line]
    assert len(pip_calls) == 1
    assert "--constraint scripts/constraints.txt" in script
    installs = [line for line in script.splitlines() if line.startswith("pip_install ")]
    # the main packages into the running interpreter, every extra into the layered venv
    assert installs[0].startswith("pip_install python3 torch==") and len(installs) >= 2
    assert all(line.startswith("pip_install .venv-extras/bin/python ") for line in installs[1:])
    # The extras venv is made by the layering script, never by a bare `venv --system-site-packages`.
    assert "python3 scripts/extras_venv.py .venv-extras" in script
    assert "-m venv" not in script
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test" in ci
