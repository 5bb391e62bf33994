#!/usr/bin/env python3
"""Benchmark of the core path, measured side by side in one run on this machine.

Prints one table:
- cached profile() per call, answered from memory and from the SQLite sample index;
- export per new subnet of the built-in space at 224 px: the whole model (freeze,
  torch.onnx.export, hash) beside the composed one (compose block pieces, hash), and the cost
  of exporting every candidate block once;
- composed vs whole-model latency on `local`: both models of a few subnets measured by the
  agent, side by side (interleaved rounds);
- harness overhead per uncached profile on `local`: wall time minus export, model load,
  first run, warm-up and the agent's timed loop (worker and fresh-process isolation);
- fidelity: the agent's median over an in-process onnxruntime median of the same model and
  settings (interleaved rounds), and the run-to-run CV of repeated measurements of one model.

Usage: python3 scripts/bench_profile.py [--rounds N] [--quick]
"""
import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import temporary_folder  # noqa: E402  (also the repository on sys.path)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from harness import LatencyProfiler, random_samples  # noqa: E402
from harness.export.graph import (export_module, export_onnx, export_sample, freeze,  # noqa: E402
                            graph_hash, prepare_pieces)
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
    home = str(temporary_folder("harness-bench-"))
    rows = []

    proxyless, tiny = ProxylessSpace(), TinySpace()
    loop_ms = 300.0 if args.quick else 1000.0
    settings = {"min_runs": 50, "min_time_ms": loop_ms, "max_time_ms": 20000.0,
                "protocol": "loop"}  # the agent's loop against in-process timing

    # Export cost per new subnet of the built-in space: whole model, and composed from pieces.
    dummy = proxyless.dummy_input()
    whole_ms = []
    for sample in random_samples(proxyless, 3 if args.quick else 8, seed=1):
        started = time.perf_counter()
        whole = export_onnx(freeze(proxyless, sample, dummy), dummy)
        graph_hash(whole), hashlib.sha256(whole).hexdigest()  # what export_module adds
        whole_ms.append((time.perf_counter() - started) * 1e3)
    rows.append(("export per new subnet, whole model (ProxylessSpace 224 px)",
                 f"{statistics.median(whole_ms):.0f} ms", "-",
                 f"freeze + torch.onnx.export + graph hash + sha256, {len(whole) / 1e6:.1f} MB "
                 f"model"))
    started = time.perf_counter()
    pieces = prepare_pieces(proxyless, dummy, home=home)
    pieces_s = time.perf_counter() - started
    composed_ms, sha_ms, same_hash = [], [], 0
    for sample in random_samples(proxyless, 10 if args.quick else 40, seed=2):
        exported = export_sample(proxyless, sample, dummy, home=home)
        composed_ms.append(exported.export_ms)
        started = time.perf_counter()
        exported.sha256  # computed when the model goes to a device, in the device's thread
        sha_ms.append((time.perf_counter() - started) * 1e3)
    for sample in random_samples(proxyless, 2 if args.quick else 4, seed=1):
        same_hash += export_sample(proxyless, sample, dummy, home=home).graph_hash == \
            graph_hash(export_onnx(freeze(proxyless, sample, dummy), dummy))
    rows.append(("export per new subnet, composed (ProxylessSpace 224 px)",
                 f"{statistics.median(composed_ms):.1f} ms", "<= 20 ms",
                 f"compose pieces + graph hash, {len(composed_ms)} subnets, p90 "
                 f"{sorted(composed_ms)[int(0.9 * len(composed_ms))]:.1f} ms (+ "
                 f"{statistics.median(sha_ms):.0f} ms sha256 for a model sent to a device); graph "
                 f"hash equal to the whole model's for {same_hash}/{2 if args.quick else 4}"))
    rows.append(("every candidate block exported once (pieces)", f"{pieces_s:.1f} s", "-",
                 f"{pieces} blocks at 224 px, once per input shape, kept in $HARNESS_HOME/pieces"))

    # Composed vs whole model on `local`: the same subnets, measured by the agent side by side
    # (back to back in each round, so that a change of the machine's load hits both alike),
    # and the whole model measured twice as the control: how far apart two measurements of
    # one model land here.
    pinned = dict(settings, cpu_affinity=[max(os.sched_getaffinity(0))])
    with LatencyProfiler(proxyless, dummy, settings=pinned, home=home) as profiler:
        ratios, controls, notes = [], [], []
        for sample in random_samples(proxyless, 2 if args.quick else 4, seed=4):
            composed = export_sample(proxyless, sample, dummy, home=home)
            whole_model = export_module(freeze(proxyless, sample, dummy), dummy)
            rounds = []
            for _ in range(2 if args.quick else 5):
                pair = [statistics.median(profiler.pool.measure(model, profiler.request).samples_ms)
                        for model in (composed, whole_model, whole_model)]
                rounds.append(pair)
            ratios.append(statistics.median(c / w for c, w, _ in rounds))
            controls.append(statistics.median(again / w for _, w, again in rounds))
            notes.append(f"{statistics.median(c for c, _, _ in rounds):.2f}/"
                         f"{statistics.median(w for _, w, _ in rounds):.2f}")
    rows.append(("latency, composed / whole model, local", f"{statistics.median(ratios):.3f}",
                 "1 +- 0.03", f"median of per-round ratios per subnet: "
                              f"{', '.join(f'{r:.3f}' for r in ratios)} ({', '.join(notes)} ms, "
                              f"pinned to one CPU)"))
    rows.append(("latency, whole / whole model (control), local", f"{statistics.median(controls):.3f}",
                 "1 +- 0.03", f"the whole model measured again in each round: "
                              f"{', '.join(f'{r:.3f}' for r in controls)}"))

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
    exported = export_sample(proxyless, sample, proxyless.dummy_input(), home=home)
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
