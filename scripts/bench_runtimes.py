#!/usr/bin/env python3
"""Benchmark: the same subnets on the runtimes they ship on. ProxylessSpace subnets at
--input-size px on `local`, each runtime measured in interleaved rounds beside its own
reference (1 thread, pinned to --cpu, default 0), then:

- conversion: the host's time per new subnet per format (ONNX export; .tflite through
  litert-torch; .pte through ExecuTorch lowered to XNNPACK), and what a subnet already
  converted costs (read back from $HARNESS_HOME/converted);
- per runtime: the median of the subnets' median latencies (ms);
- per pair of runtimes: Kendall's tau between the subnets' latencies, and the share of
  subnets on different sides of a limit set at each runtime's population median;
- the agent against in-process timing of the same runtime and file (--compare subnets,
  interleaved: agent block, in-process block, alternating which goes first), as the
  relative difference of the medians.

    python3 scripts/bench_runtimes.py --out bench_runtimes.md [--subnets 40]
        [--input-size 224] [--runtimes onnxruntime,openvino,litert,executorch]

The results go to a fresh $HARNESS_HOME under --home (default: a temporary folder), so that
every conversion is new. Rows are printed as they are measured and appended to --out.
"""
import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from benchlib import ROOT, space_at_input  # noqa: F401  (the repository on sys.path)

RUNTIMES = ("onnxruntime", "openvino", "litert", "executorch")
PINNED: Dict[str, Any] = {"cpu_affinity": [0], "intra_op_threads": 1, "inter_op_threads": 1}


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of two paired sequences."""
    concordant = discordant = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        x, y = a[i] - a[j], b[i] - b[j]
        if x == 0 and y == 0:
            continue
        if x == 0:
            ties_a += 1
        elif y == 0:
            ties_b += 1
        elif (x > 0) == (y > 0):
            concordant += 1
        else:
            discordant += 1
    denominator = ((concordant + discordant + ties_a) * (concordant + discordant + ties_b)) ** 0.5
    return (concordant - discordant) / denominator if denominator else float("nan")


def side_changes(a: Sequence[float], b: Sequence[float]) -> Tuple[float, int]:
    """The share (and count) of subnets below the population median on one runtime and not
    on the other (each runtime's limit is its own population median)."""
    limit_a, limit_b = statistics.median(a), statistics.median(b)
    changed = sum((x < limit_a) != (y < limit_b) for x, y in zip(a, b))
    return changed / len(a), changed


def conversions(space: Any, samples: List[Dict[str, Any]], runtimes: Sequence[str],
                home: Path) -> Dict[str, Tuple[List[float], List[float]]]:
    """Per format: the host's time per new subnet (ms) and per subnet already converted."""
    import torch

    from harness.export.formats import FormatTarget, convert
    from harness.export.graph import export_sample, freeze

    dummy = torch.zeros(space.dummy_input().shape)
    times: Dict[str, Tuple[List[float], List[float]]] = {"onnx": ([], [])}
    for sample in samples:
        started = time.perf_counter()
        exported = export_sample(space, sample, dummy, home=home)
        times["onnx"][0].append((time.perf_counter() - started) * 1e3)
        for runtime in runtimes:
            target = FormatTarget(runtime)
            if not target.converts:
                continue
            new, again = times.setdefault(target.variant(), ([], []))
            for kept in (new, again):
                started = time.perf_counter()
                convert(exported, target, lambda: freeze(space, sample, dummy), dummy, home)
                kept.append((time.perf_counter() - started) * 1e3)
    return times


def measure_runtimes(space: Any, samples: List[Dict[str, Any]], runtimes: Sequence[str],
                     home: Path, rounds: int) -> Dict[str, List[float]]:
    """Each runtime's median latency (ms) per subnet, measured in interleaved rounds."""
    from harness import LatencyProfiler

    medians: Dict[str, List[float]] = {}
    settings = dict(PINNED, protocol="rounds", rounds=rounds, min_time_ms=0.0,
                    max_time_ms=600000.0)
    for runtime in runtimes:
        with LatencyProfiler(space, space.dummy_input(), runtime=runtime, home=home,
                             settings=settings) as profiler:
            results = profiler.measure_many(samples, progress=False)
        medians[runtime] = [m.median for m in results]
        print(f"{runtime}: median of medians {statistics.median(medians[runtime]):.3f} ms",
              flush=True)
    return medians


# The in-process side: a plain Python process that loads the model with the runtime's own API
# (through the agent's thin per-runtime classes, no protocol, no stop rule) and times its
# runs in a loop, pinned to the agent's CPU. It is a process of its own so that this
# script's torch (and its OpenMP threads, which spin after the host's exports) is not
# timed alongside it.
IN_PROCESS = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import ort_agent
os.sched_setaffinity(0, {int(sys.argv[2])})
model = None
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "load":
        settings = ort_agent.parse_settings(request["settings"])
        module = ort_agent.import_runtime(settings["runtime"])
        model, _ = ort_agent.open_model(module, request["path"], settings)
        model.make_inputs()
        for _ in range(settings["warmup_runs"]):
            model.run()
        print(json.dumps({"loaded": True}), flush=True)
    else:
        times = []
        for _ in range(request["runs"]):
            begun = time.perf_counter()
            model.run()
            times.append((time.perf_counter() - begun) * 1e3)
        print(json.dumps({"times": times}), flush=True)
"""


class InProcess:
    """The in-process timer: a child process speaking one JSON line per request."""

    def __init__(self) -> None:
        import subprocess

        self.process = subprocess.Popen(
            [sys.executable, "-c", IN_PROCESS, str(ROOT / "agents"), str(PINNED["cpu_affinity"][0])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)

    def ask(self, request: Dict[str, Any]) -> Dict[str, Any]:
        import json

        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError("the in-process timer died")
        return json.loads(answer)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def agent_vs_in_process(space: Any, samples: List[Dict[str, Any]], runtimes: Sequence[str],
                        home: Path, runs: int, repeats: int) -> Dict[str, List[float]]:
    """Per runtime and subnet: (agent median / in-process median - 1) over `repeats`
    interleaved pairs of blocks of `runs` runs (which goes first alternates), both pinned to
    the --cpu with 1 thread, the same file and settings."""
    from harness import LatencyProfiler

    gaps: Dict[str, List[float]] = {}
    settings = dict(PINNED, protocol="loop", warmup_runs=5, min_runs=runs, min_time_ms=0.0)
    for runtime in runtimes:
        timer = InProcess()
        try:
            with LatencyProfiler(space, space.dummy_input(), runtime=runtime, home=home,
                                 settings=settings, refresh=True) as profiler, \
                    tempfile.TemporaryDirectory(prefix="bench-runtimes-") as folder:
                for index, sample in enumerate(samples):
                    exported = profiler.export(profiler._validate(sample))
                    path = Path(folder) / f"{index}{exported.suffix}"
                    path.write_bytes(exported.onnx_bytes)
                    timer.ask({"op": "load", "path": str(path),
                               "settings": dict(settings, runtime=runtime)})
                    agent: List[float] = []
                    local: List[float] = []
                    for repeat in range(repeats):
                        order = ("agent", "local") if repeat % 2 == 0 else ("local", "agent")
                        for who in order:
                            if who == "agent":
                                agent.extend(profiler.measure(sample).samples_ms)
                            else:
                                local.extend(timer.ask({"op": "run", "runs": runs})["times"])
                    gaps.setdefault(runtime, []).append(
                        statistics.median(agent) / statistics.median(local) - 1)
        finally:
            timer.close()
        print(f"{runtime}: agent vs in-process median {statistics.median(gaps[runtime]):+.2%}",
              flush=True)
    return gaps


def report(args: argparse.Namespace, name: str, converted: Dict[str, Tuple[List[float], List[float]]],
           medians: Dict[str, List[float]], gaps: Dict[str, List[float]]) -> str:
    n = len(next(iter(medians.values())))
    lines = [f"### {name}, {n} subnets, `local` (1 thread, pinned to CPU {args.cpu}), "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| format | conversion per new subnet (median ms) | max ms | subnet already "
             "converted (median ms) |", "|---|---|---|---|"]
    for fmt, (new, again) in converted.items():
        kept = f"{statistics.median(again):.1f}" if again else "- (composed each time)"
        lines.append(f"| {fmt} | {statistics.median(new):.1f} | {max(new):.1f} | {kept} |")
    lines += ["", "| runtime | median of the subnets' medians (ms) | min ms | max ms | agent vs "
              "in-process (median, range) |", "|---|---|---|---|---|"]
    for runtime, values in medians.items():
        gap = gaps.get(runtime)
        gap_text = (f"{statistics.median(gap):+.2%} ({min(gap):+.2%} .. {max(gap):+.2%})"
                    if gap else "-")
        lines.append(f"| {runtime} | {statistics.median(values):.3f} | {min(values):.3f} | "
                     f"{max(values):.3f} | {gap_text} |")
    lines += ["", "| runtimes | Kendall tau | subnets on another side of the median limit |",
              "|---|---|---|"]
    for a, b in itertools.combinations(medians, 2):
        share, count = side_changes(medians[a], medians[b])
        lines.append(f"| {a} / {b} | {kendall_tau(medians[a], medians[b]):.3f} | "
                     f"{share:.0%} ({count} of {n}) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subnets", "--samples", type=int, default=40)
    parser.add_argument("--space", default="harness.spaces:ProxylessSpace")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds per window")
    parser.add_argument("--compare", type=int, default=8,
                        help="subnets timed by the agent and in-process (default 8)")
    parser.add_argument("--compare-runs", type=int, default=30, help="runs per block (30)")
    parser.add_argument("--compare-repeats", type=int, default=4, help="block pairs (4)")
    parser.add_argument("--cpu", type=int, default=0,
                        help="the CPU the agent and the in-process timer are pinned to (0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", help="$HARNESS_HOME for the run (default: a fresh folder)")
    parser.add_argument("--out", help="markdown file the table is appended to")
    args = parser.parse_args()
    from harness import random_samples

    PINNED["cpu_affinity"] = [args.cpu]
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown runtimes {', '.join(unknown)}; the runtimes are {', '.join(RUNTIMES)}")
    space, name = space_at_input(parser, args.space, args.input_size)
    samples = random_samples(space, args.subnets, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-home-") as scratch:
        home = Path(args.home or scratch)
        started = time.monotonic()
        converted = conversions(space, samples, runtimes, home)
        print(f"converted in {time.monotonic() - started:.0f} s", flush=True)
        medians = measure_runtimes(space, samples, runtimes, home, args.rounds)
        gaps = agent_vs_in_process(space, samples[:args.compare], runtimes, home,
                                   args.compare_runs, args.compare_repeats)
        table = report(args, name, converted, medians, gaps)
    print(table)
    if args.out:
        with open(args.out, "a") as out:
            out.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
