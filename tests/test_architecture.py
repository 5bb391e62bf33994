"""The rules of the house, checked on the source: who may import whom.

- devices/ never imports harness/ (harness builds on devices, not the reverse);
- agents/ imports only the standard library, numpy and onnxruntime (it is shipped alone);
- a model space knows no profiler (spaces are described, profilers measure them);
- no import cycles among harness/ and devices/ modules, counting imports inside functions
  too (a lazy import hides a cycle, it does not break it);
- harness/profiler.py stays a story a newcomer reads top to bottom (at most 320 lines).
"""
import ast
import sys
from pathlib import Path
from typing import Dict, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "devices", "agents")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> Set[str]:
    """Every module a file imports, anywhere in it (module level or inside functions)."""
    names: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def our_graph() -> Dict[str, Set[str]]:
    """Module -> the modules of ours it imports."""
    files = {module_name(path): path for package in PACKAGES
             for path in (ROOT / package).rglob("*.py")}
    return {name: {imported for imported in imports_of(path) if imported in files
                   and imported != name}
            for name, path in files.items()}


def test_devices_never_imports_harness():
    offenders = {name: sorted(i for i in deps if i.startswith("harness"))
                 for name, deps in our_graph().items() if name.startswith("devices")}
    assert not {name: deps for name, deps in offenders.items() if deps}


def test_agents_import_only_stdlib_numpy_and_onnxruntime():
    for path in (ROOT / "agents").rglob("*.py"):
        roots = {name.split(".")[0] for name in imports_of(path)}
        third_party = {name for name in roots if name not in sys.stdlib_module_names}
        assert third_party <= {"numpy", "onnxruntime"}, (path.name, third_party)


def test_a_space_knows_no_profiler():
    graph = our_graph()
    spaces = [name for name in graph if name in ("harness.spaces.space", "harness.spaces.additive")
              or name.startswith("harness.spaces")]
    measuring = {"harness.profiler", "harness.metrics.profiler_base", "harness.pool.device_pool",
                 "harness.pool.ray_pool", "harness.predict.nn_meter", "harness.metrics.counting",
                 "harness.search.lut",
                 "harness.steps.fallback", "harness.campaigns.calibrate", "harness.search.strategies"}
    for name in spaces:
        assert not graph[name] & measuring, (name, graph[name] & measuring)


def test_no_import_cycles():
    graph = our_graph()
    # a package's __init__ re-exports its modules; importing it from them is not a cycle
    # of the code's design, so the edges into package __init__s are left out
    packages = {name for name in graph if (ROOT / name.replace(".", "/") / "__init__.py").exists()}
    edges = {name: {d for d in deps if d not in packages} for name, deps in graph.items()}
    state: Dict[str, int] = {}  # 1: on the path, 2: done
    path: list = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_profiler_reads_in_one_sitting():
    # 250 until issue 14 added measure_model, per_op and precision (their plumbing per request)
    # and issue 16 the units of a kind's model that a lookup answers from
    assert len((ROOT / "harness" / "profiler.py").read_text().splitlines()) <= 320
