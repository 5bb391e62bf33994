"""The rules of the house, checked on the source: who may import whom.

- devices/ never imports harness/ (harness builds on devices, not the reverse);
- agents/ imports only the standard library, numpy and onnxruntime (it is shipped alone);
- harness/ is wings on floors (WINGS below, mirrored in ../shared/DESIGN.md): a wing imports
  only the wings its row names, so none imports a higher one;
- the store reaches no device: of devices/ it reads only the wire values (agent_result) and
  the utilities every floor may use (errors, safe_files), which import nothing else of it;
- only the top (cli) and the wings that drive a profiler (campaigns, search) import the
  profiler;
- no import cycles among harness/ and devices/ modules, counting imports inside functions
  too (a lazy import hides a cycle, it does not break it);
- harness/ keeps at its top only what a newcomer opens first;
- harness/profiler.py stays a story a newcomer reads top to bottom (at most 250 lines);
- no module reads another's private attribute (`x._name` where x is not self or cls).
"""
import ast
import re
import sys
from pathlib import Path
from typing import Dict, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "devices", "agents")

# wing -> the wings it may import (besides the standard library and third-party packages);
# floors from the bottom: errors, paths | spaces | export | store, metrics | pool, predict |
# steps | profiler | campaigns, search | report | cli, harness (the public API)
BASE = {"errors", "paths"}
WINGS: Dict[str, Set[str]] = {
    "errors": {"devices"},
    "paths": {"errors"},
    "spaces": {"errors"},
    "export": BASE | {"spaces"},
    "store": BASE | {"agents", "devices"},
    "metrics": BASE | {"spaces", "export"},
    "pool": BASE | {"agents", "devices", "export", "store"},
    "predict": BASE | {"spaces", "export", "store", "metrics"},
    # steps reads the agent's own rules (a limit's three-way verdict) as store and pool do
    "steps": BASE | {"agents", "devices", "spaces", "export", "store", "pool", "predict"},
    "profiler": BASE | {"devices", "spaces", "export", "store", "metrics", "pool", "steps"},
    "campaigns": BASE | {"devices", "spaces", "export", "store", "metrics", "pool", "predict",
                         "steps", "profiler"},
    "search": BASE | {"spaces", "export", "store", "metrics", "profiler"},
    "report": BASE | {"devices", "spaces", "export", "store", "metrics", "predict"},
    "cli": BASE | {"harness", "devices", "spaces", "export", "store", "metrics", "pool",
                   "predict", "steps", "profiler", "campaigns", "search", "report"},
    "harness": set(),  # __init__ names its public API as strings, imported when first used
}
# What every floor may use: typed errors with a fix, and the one safe way to write and read
# files (devices/ holds them so that devices/ and harness/ share them; they reach no device).
UTILITIES = {"devices.errors", "devices.safe_files"}
TOP_OF_HARNESS = {"__init__.py", "profiler.py", "errors.py", "paths.py"}  # and cli/, the command


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


def our_files() -> Dict[str, Path]:
    return {module_name(path): path for package in PACKAGES
            for path in (ROOT / package).rglob("*.py")}


def our_graph() -> Dict[str, Set[str]]:
    """Module -> the modules of ours it imports."""
    files = our_files()
    return {name: {imported for imported in imports_of(path) if imported in files
                   and imported != name}
            for name, path in files.items()}


def wing_of(module: str) -> str:
    """harness.store.cache -> store; harness.profiler -> profiler; devices.x -> devices."""
    parts = module.split(".")
    return parts[0] if parts[0] != "harness" else parts[1] if len(parts) > 1 else "harness"


def test_devices_never_imports_harness():
    offenders = {name: sorted(i for i in deps if i.startswith("harness"))
                 for name, deps in our_graph().items() if name.startswith("devices")}
    assert not {name: deps for name, deps in offenders.items() if deps}


# What the agent may import besides the standard library: numpy and the runtimes it drives
# (ExecuTorch's Python runtime takes torch tensors), each only when a request asks for it.
AGENT_THIRD_PARTY = {"numpy", "onnxruntime", "ai_edge_litert", "executorch", "openvino", "torch"}


def test_agents_import_only_stdlib_numpy_and_the_runtimes_they_drive():
    for path in (ROOT / "agents").rglob("*.py"):
        roots = {name.split(".")[0] for name in imports_of(path)}
        third_party = {name for name in roots if name not in sys.stdlib_module_names}
        assert third_party <= AGENT_THIRD_PARTY, (path.name, third_party)
        top = ast.parse(path.read_text())  # at module level: the standard library only
        for node in top.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                    else [node.module or ""]
                assert all(n.split(".")[0] in sys.stdlib_module_names for n in names), \
                    (path.name, names)


def test_every_wing_imports_only_the_wings_below_it():
    graph = our_graph()
    wings = {wing_of(name) for name in graph if name.startswith("harness")}
    assert wings <= set(WINGS), f"a wing the table does not know: {wings - set(WINGS)}"
    for name, deps in graph.items():
        if not name.startswith("harness"):
            continue
        wing = wing_of(name)
        reached = {wing_of(dep) for dep in deps if dep not in UTILITIES} - {wing}
        assert reached <= WINGS[wing], (name, sorted(reached - WINGS[wing]))


def test_the_store_reaches_no_device():
    graph = our_graph()
    wire = {"devices.agent_result"} | UTILITIES
    for name, deps in graph.items():
        if name.startswith("harness.store"):
            assert {d for d in deps if d.startswith("devices")} <= wire, name
    assert {d for d in graph["devices.agent_result"] if d.startswith("devices")} <= wire
    for utility in UTILITIES:
        assert {d for d in graph[utility] if d.startswith("devices")} <= {"devices.errors"}


def test_only_the_top_and_what_drives_a_profiler_import_it():
    importers = {name for name, deps in our_graph().items() if "harness.profiler" in deps}
    assert {wing_of(name) for name in importers} <= {"cli", "campaigns", "search"}, importers


def test_a_space_knows_no_profiler():
    graph = our_graph()
    for name in (name for name in graph if wing_of(name) == "spaces"):
        assert {wing_of(dep) for dep in graph[name]} <= WINGS["spaces"] | {"spaces"}, name


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


def test_the_top_of_harness_holds_only_what_a_newcomer_opens_first():
    files = {path.name for path in (ROOT / "harness").iterdir() if path.is_file()
             and path.suffix == ".py"}
    assert files == TOP_OF_HARNESS


def test_no_module_reads_another_ones_private_attribute():
    # `other._name` (other: not self or cls) where `_name` is private to another module of
    # ours (defined there as `def _name` or `self._name = ...`) and not to this one
    defined = re.compile(r"def (_[a-z][a-z0-9_]*)|self\.(_[a-z][a-z0-9_]*)\s*(?::[^=]+)?=")
    read = re.compile(r"\b(?!self\b|cls\b)[a-z_][a-z0-9_]*\.(_[a-z][a-z0-9_]*)\b")
    texts = {path: path.read_text() for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    owners: Dict[str, Set[Path]] = {}
    for path, text in texts.items():
        for match in defined.finditer(text):
            owners.setdefault(match.group(1) or match.group(2), set()).add(path)
    offenders = [f"{path.relative_to(ROOT)}:{number}: {match.group(0)}"
                 for path, text in texts.items()
                 for number, line in enumerate(text.splitlines(), 1)
                 for match in read.finditer(line.split("#")[0])
                 if owners.get(match.group(1)) and path not in owners[match.group(1)]]
    assert not offenders, offenders


def test_the_profiler_reads_in_one_sitting():
    assert len((ROOT / "harness" / "profiler.py").read_text().splitlines()) <= 250
