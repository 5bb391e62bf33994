#!/usr/bin/env python3
"""Make (or refresh) the extras venv layered over the packages of the interpreter running this.

`python3 -m venv --system-site-packages DIR` layers a venv over the *base* interpreter: run
from inside an activated venv, the new venv sees neither that venv's torch nor its ruff, and
its pip step then resolves torch anew (a CUDA build of several GB). So this creates DIR with
the running interpreter and, when that interpreter is itself a venv, writes a `.pth` file
into DIR's site-packages that adds the running venv's site-packages (their own `.pth` files,
such as an editable install's, processed too) after DIR's own and before the base's. Run
from a root shell on a fresh machine (no venv), DIR simply layers over the base interpreter.

Usage: python3 scripts/extras_venv.py DIR [--without-pip]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

PTH_NAME = "_harness_layer_over_running_venv.pth"


def running_site_dirs() -> list[str]:
    """The running interpreter's own site-packages when it is a venv, else none (the base's
    are seen through --system-site-packages already)."""
    if sys.prefix == sys.base_prefix:
        return []
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def venv_python(target: Path) -> Path:
    """The venv's interpreter."""
    return target / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def same_python(target: Path) -> bool:
    """Whether the venv at `target` runs the same Python version as this interpreter (a venv
    of another version cannot load this one's compiled packages)."""
    python = venv_python(target)
    if not python.exists():
        return False
    out = subprocess.run([str(python), "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return out == str(sys.version_info[:2])


def layer(target: Path, with_pip: bool = True) -> Path:
    """Create or refresh the venv at `target` over the running interpreter; return the path
    of the `.pth` file that does the layering (present only when the running one is a venv)."""
    builder = venv.EnvBuilder(system_site_packages=True, with_pip=with_pip,
                              clear=target.exists() and not same_python(target))
    if not venv_python(target).exists() or builder.clear:
        builder.create(target)
    site_packages = Path(subprocess.run(
        [str(venv_python(target)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    pth = site_packages / PTH_NAME
    dirs = running_site_dirs()
    if dirs:
        lines = [f"import site; site.addsitedir({d!r})" for d in dirs]
        pth.write_text("\n".join(lines) + "\n")
    elif pth.exists():
        pth.unlink()
    return pth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("--without-pip", action="store_true", help="for tests: no pip in the venv")
    args = parser.parse_args()
    layer(args.target.absolute(), with_pip=not args.without_pip)


if __name__ == "__main__":
    main()
