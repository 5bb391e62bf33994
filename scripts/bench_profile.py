#!/usr/bin/env python3
"""Benchmark of the core path, measured side by side in one run on this machine.

Prints one table:
- cached profile() per call, answered from memory and from the SQLite sample index;
- freeze + export + hash per subnet of the built-in space;
- harness overhead per uncached profile on `local`: wall time minus export, model load,
  first run, warm-up and the agent's timed loop (worker and fresh-process isolation);
- fidelity: the agent's median over an in-process onnxruntime median of the same model and
  settings (interleaved rounds), and the run-to-run CV of repeated measurements of one model.

Usage: python3 scripts/bench_profile.py [--rounds N] [--quick]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from harness import LatencyProfiler, random_samples  # noqa: E402
from harness.export import export_sample  # noqa: E402
from harness.spaces import ProxylessSpace, TinySpace  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def in_process_median(path: str, settings: dict) -> float:
    """What the agent does, done in this process: same options, inputs, pinning and loop."""
    before = os.sched_getaffinity(0)
    if settings["cpu_affinity"]:
        os.sched_setaffinity(0, settings["cpu_affinity"])
    try:
        return _in_process_median(path, settings)
    finally:
        os.sched_setaffinity(0, before)


def _in_process_median(path: str, settings: dict) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings["intra_op_threads"]
    options.inter_op_num_threads = settings["inter_op_threads"]
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    rng = np.random.RandomState(settings["seed"])
    feeds = {i.name: rng.standard_normal(i.shape).astype("float32") for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    for _ in range(settings["warmup_runs"] + 1):
        session.run(outputs, feeds)
    samples = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        session.run(outputs, feeds)
        t1 = time.perf_counter()
        samples.append(t1 - t0)
        if (len(samples) >= settings["min_runs"] and t1 - start >= settings["min_time_ms"] / 1e3) \
                or t1 - start >= settings["max_time_ms"] / 1e3:
            break
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="fidelity / CV rounds")
    parser.add_argument("--quick", action="store_true", help="shorter loops (smoke run)")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="harness-bench-")
    rows = []

    proxyless, tiny = ProxylessSpace(), TinySpace()
    loop_ms = 300.0 if args.quick else 1000.0
    settings = {"min_runs": 50, "min_time_ms": loop_ms, "max_time_ms": 20000.0}

    # Export cost per subnet of the built-in space.
    export_ms = []
    for sample in random_samples(proxyless, 3 if args.quick else 8, seed=1):
        started = time.perf_counter()
        exported = export_sample(proxyless, sample, proxyless.dummy_input())
        export_ms.append((time.perf_counter() - started) * 1e3)
    rows.append(("export per subnet (ProxylessSpace, freeze+export+hash)",
                 f"{statistics.median(export_ms):.0f} ms", "-",
                 f"{len(exported.onnx_bytes) / 1e6:.1f} MB model"))

    # Overhead of an uncached profile, worker and process isolation, tiny and full models.
    for space, name in ((tiny, "TinySpace"), (proxyless, "ProxylessSpace")):
        for isolation in ("worker", "process"):
            with LatencyProfiler(space, space.dummy_input(), settings=settings, home=home,
                                 isolation=isolation, refresh=True) as profiler:
                profiler.measure(random_samples(space, 1, seed=99)[0])  # starts the worker
                overheads = []
                for sample in random_samples(space, 2 if args.quick else 4, seed=7):
                    started = time.perf_counter()
                    m = profiler.measure(sample)
                    wall = (time.perf_counter() - started) * 1e3
                    p = m.provenance
                    device_side = m.load_ms + m.first_run_ms + p.warmup_ms + p.loop_ms
                    overheads.append(wall - p.export_ms - device_side)
            rows.append((f"overhead per uncached profile, local, {isolation} ({name})",
                         f"{statistics.median(overheads):.1f} ms",
                         "< 150 ms" if isolation == "worker" else "-",
                         "wall - export - load - first run - warm-up - timed loop"))

    # Cached profile(): from memory, and from the SQLite index (fresh memory each call).
    with LatencyProfiler(proxyless, proxyless.dummy_input(), settings=settings,
                         home=home) as profiler:
        sample = random_samples(proxyless, 1, seed=7)[0]
        profiler.profile(sample)
        memory_us = per_call_us(lambda: profiler.profile(sample), 20000)

        def from_sqlite():
            profiler._memo.clear()
            profiler.profile(sample)
        sqlite_us = per_call_us(from_sqlite, 2000)
    rows.append(("cached profile(), answered from memory", f"{memory_us:.1f} us", "< 50 us",
                 "62-label ProxylessSpace sample, validated each call"))
    rows.append(("cached profile(), answered from SQLite", f"{sqlite_us:.1f} us", "-",
                 "result written by another process after this one started"))

    # Fidelity and run-to-run CV on one full-size model, pinned to the last CPU and not.
    sample = random_samples(proxyless, 1, seed=3)[0]
    exported = export_sample(proxyless, sample, proxyless.dummy_input())
    path = Path(home) / "fidelity.onnx"
    path.write_bytes(exported.onnx_bytes)
    last_cpu = max(os.sched_getaffinity(0))
    for pinning, cpus in ((f"pinned to CPU {last_cpu}", [last_cpu]), ("unpinned", None)):
        agent_medians, local_medians = [], []
        with LatencyProfiler(proxyless, proxyless.dummy_input(), home=home, refresh=True,
                             settings=dict(settings, cpu_affinity=cpus)) as profiler:
            for _ in range(args.rounds):
                agent_medians.append(profiler.measure(sample).median)
                local_medians.append(in_process_median(str(path), profiler.settings))
        ratio = statistics.median(agent_medians) / statistics.median(local_medians)
        cv = statistics.stdev(agent_medians) / statistics.mean(agent_medians)
        rows.append((f"fidelity: agent / in-process median, {pinning}", f"{ratio:.3f}",
                     "1 +- 0.03", f"agent {statistics.median(agent_medians):.2f} ms, "
                     f"in-process {statistics.median(local_medians):.2f} ms (interleaved)"))
        rows.append((f"run-to-run CV of the median, {pinning}", f"{cv:.2%}", "< 2% (idle)",
                     f"{args.rounds} measurements: "
                     f"{', '.join(f'{m:.2f}' for m in agent_medians)} ms"))

    widths = [max(len(str(r[i])) for r in rows + [("metric", "value", "target", "notes")])
              for i in range(4)]
    print("  ".join(h.ljust(w) for h, w in zip(("metric", "value", "target", "notes"), widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    load = Path('/proc/loadavg').read_text().split()[:3]
    print(f"\nonnxruntime {ort.__version__}, {ort.get_device()}, 1 intra-op thread, "
          f"timed loop >= 50 runs and >= {loop_ms:.0f} ms; machine load {load}")


if __name__ == "__main__":
    main()
