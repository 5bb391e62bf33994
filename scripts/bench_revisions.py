#!/usr/bin/env python3
"""The core path's costs of two revisions of harness, side by side in one run.

A restructuring must not cost time. This checks out both revisions (git worktrees in a
temporary folder), then alternates between them for --rounds rounds: each round runs one child
process per revision (its own tree first on sys.path, its own $HARNESS_HOME kept across rounds,
so the pieces are exported once per revision), and each child measures:
- cached profile() per call, answered from memory and from the SQLite sample index
  (ProxylessSpace, a 62-label sample);
- export of a new subnet composed from pieces, with its graph hash (ProxylessSpace 224 px);
- harness overhead per uncached profile on `local`, worker isolation (TinySpace): wall time
  minus export, model load, first run, warm-up and the agent's timed loop.
Alternating puts a change of this machine's load on both revisions alike. The table holds
the medians over rounds and the ratio after/before; each round's figures are printed and
appended to --out as they come, the table after them.

Usage: python3 scripts/bench_revisions.py --before REV [--after REV] [--rounds N] [--out F]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent

# Runs in the child with the revision's tree first on sys.path; written against the public
# API and both homes of the export functions (harness.export before the wings, then
# harness.export.graph).
PROBE = r'''
import json, sys, time
from harness import LatencyProfiler, random_samples
from harness.spaces import ProxylessSpace, TinySpace
try:
    from harness.export.graph import export_sample, prepare_pieces
except ImportError:
    from harness.export import export_sample, prepare_pieces
from agents.ort_agent import DEFAULT_SETTINGS

def per_call_us(fn, calls):
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6

round_index = int(sys.argv[1])
settings = {"min_runs": 20, "min_time_ms": 200.0, "max_time_ms": 5000.0}
if "protocol" in DEFAULT_SETTINGS:  # one model after another, as before rounds existed
    settings["protocol"] = "loop"
out = {}
proxyless, tiny = ProxylessSpace(), TinySpace()
dummy = proxyless.dummy_input()
prepare_pieces(proxyless, dummy)  # once per revision: its home is kept across rounds
composed = [export_sample(proxyless, s, dummy).export_ms
            for s in random_samples(proxyless, 15, seed=100 + round_index)]
out["composed export per new subnet (ms)"] = sorted(composed)[len(composed) // 2]

with LatencyProfiler(tiny, tiny.dummy_input(), settings=settings, refresh=True) as profiler:
    profiler.measure(random_samples(tiny, 1, seed=99)[0])  # starts the worker
    overheads = []
    for sample in random_samples(tiny, 5, seed=200 + round_index):
        started = time.perf_counter()
        m = profiler.measure(sample)
        wall = (time.perf_counter() - started) * 1e3
        p = m.provenance
        overheads.append(wall - p.export_ms - (m.load_ms + m.first_run_ms + p.warmup_ms
                                               + p.loop_ms))
    out["overhead per uncached profile, local worker (ms)"] = sorted(overheads)[2]

with LatencyProfiler(proxyless, dummy, settings=settings) as profiler:
    sample = random_samples(proxyless, 1, seed=7)[0]
    profiler.profile(sample)
    out["cached profile(), from memory (us)"] = per_call_us(lambda: profiler.profile(sample),
                                                            20000)
    def from_sqlite():
        profiler._memo.clear()
        profiler.profile(sample)
    out["cached profile(), from SQLite (us)"] = per_call_us(from_sqlite, 2000)
print(json.dumps(out))
'''


def run_probe(tree: Path, home: Path, round_index: int) -> Dict[str, float]:
    """One child process of one revision: its figures (the probe's last line, JSON)."""
    env = dict(os.environ, HARNESS_HOME=str(home), PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, "-c", PROBE, str(round_index)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"the probe failed in {tree}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="the earlier revision (a git rev)")
    parser.add_argument("--after", default="HEAD", help="the later revision (default HEAD)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench_revisions.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="harness-revisions-") as scratch:
        trees = {}
        for side in ("before", "after"):
            rev = getattr(args, side)
            tree = trees[side] = Path(scratch) / side
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet",
                            str(tree), rev], check=True)
            (Path(scratch) / f"home-{side}").mkdir()
        figures: Dict[str, Dict[str, List[float]]] = {"before": {}, "after": {}}
        out = Path(args.out)
        out.write_text(f"# rounds of {args.before} and {args.after}, as they ran\n\n")
        try:
            for index in range(args.rounds):
                order = ("before", "after") if index % 2 == 0 else ("after", "before")
                for side in order:
                    got = run_probe(trees[side], Path(scratch) / f"home-{side}", index)
                    for name, value in got.items():
                        figures[side].setdefault(name, []).append(value)
                    line = f"round {index + 1} {side}: " + ", ".join(
                        f"{k} {v:.1f}" for k, v in got.items())
                    print(line, flush=True)
                    with out.open("a") as rows:  # a run cut short keeps what it measured
                        rows.write(f"- {line}\n")
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False)
    lines = [f"# {args.before} against {args.after}: medians of {args.rounds} alternating "
             f"rounds, one run", "",
             f"| figure | before ({args.before}) | after ({args.after}) | after / before |",
             "|---|---|---|---|"]
    for name in figures["before"]:
        before = statistics.median(figures["before"][name])
        after = statistics.median(figures["after"][name])
        lines.append(f"| {name} | {before:.1f} | {after:.1f} | {after / before:.2f} |")
    lines.append(f"\nmachine load {Path('/proc/loadavg').read_text().split()[:3]}")
    text = "\n".join(lines)
    print(text)
    with out.open("a") as table:
        table.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
