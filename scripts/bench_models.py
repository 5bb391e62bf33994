#!/usr/bin/env python3
"""Benchmark of profiling the way users' tools do, on a few subnets of the built-in space,
measured side by side in one run (one fresh agent process per measurement, so each memory
figure is that model's own).

Prints one table, a row per subnet:
- fp32: the whole-graph median of the timed runs; the sum of the per-node medians from the
  per-operator profile (separate, profiled runs) and the median whole run in those profiled
  runs; the runtime's overhead between operators (profiled run minus the per-node sum, as a
  share of the profiled run) and what profiling itself adds (profiled run over timed median);
- peak resident memory of the agent process (load and runs) at fp32 and its rise over the
  process before the load, and the model files' sizes at fp32 and int8;
- fp32 / int8-dynamic / int8-static medians side by side, and the int8 ones over fp32.

Usage: python3 scripts/bench_models.py [--samples N] [--size PX] [--device NAME] [--quick]
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from harness import LatencyProfiler, random_samples  # noqa: E402
from harness.report.output import describe_sample  # noqa: E402
from harness.spaces import ProxylessSpace  # noqa: E402

PRECISIONS = ("fp32", "int8-dynamic", "int8-static")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--size", type=int, default=160, help="input height = width (160)")
    parser.add_argument("--device", default="local")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="short loops (a smoke test)")
    args = parser.parse_args()
    settings = ({"min_runs": 5, "min_time_ms": 50.0, "warmup_runs": 2, "profile_runs": 5}
                if args.quick else {"profile_runs": 20})
    settings["protocol"] = "loop"  # its figures are the loop's (per-operator times, memory)
    space = ProxylessSpace()
    dummy = torch.randn(1, 3, args.size, args.size)
    samples = random_samples(space, args.samples, seed=args.seed)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-models-") as home:
        for precision in PRECISIONS:
            with LatencyProfiler(space, dummy, device=args.device, settings=settings,
                                 isolation="process", home=home,
                                 cache=Path(home) / "cache.sqlite",
                                 precision=precision) as profiler:
                results[precision] = profiler.measure_many(
                    samples, progress=False, per_op=precision == "fp32")
    header = ["subnet", "fp32 ms", "ops sum ms", "profiled ms", "overhead", "profiling x",
              "peak MB", "+MB", "fp32 KB", "int8 KB", "int8-dyn ms", "int8-st ms",
              "dyn/fp32", "st/fp32"]
    rows, ratios = [header], {"dyn": [], "st": [], "overhead": [], "profiling": []}
    for index, sample in enumerate(samples):
        fp32, dyn, st = (results[p][index] for p in PRECISIONS)
        ops, memory = fp32.ops, fp32.memory
        assert ops is not None and memory is not None and memory.peak_mb is not None
        overhead = (ops.run_median_ms - ops.sum_of_medians_ms) / ops.run_median_ms
        ratios["dyn"].append(dyn.median / fp32.median)
        ratios["st"].append(st.median / fp32.median)
        ratios["overhead"].append(overhead)
        ratios["profiling"].append(ops.run_median_ms / fp32.median)
        rows.append([describe_sample(space, sample)[:30], f"{fp32.median:.3f}",
                     f"{ops.sum_of_medians_ms:.3f}", f"{ops.run_median_ms:.3f}",
                     f"{overhead:.0%}", f"{ops.run_median_ms / fp32.median:.2f}",
                     f"{memory.peak_mb:.1f}", f"{memory.added_mb or 0:.1f}",
                     f"{(fp32.provenance.model_bytes or 0) / 1024:.0f}",
                     f"{(st.provenance.model_bytes or 0) / 1024:.0f}",
                     f"{dyn.median:.3f}", f"{st.median:.3f}",
                     f"{dyn.median / fp32.median:.2f}", f"{st.median / fp32.median:.2f}"])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    for r, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                        for c, (cell, w) in enumerate(zip(row, widths))))
        if r == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{len(samples)} ProxylessSpace subnets at {args.size} px on {args.device}, one "
          f"intra-op thread, a fresh agent process per measurement; medians over subnets: "
          f"int8-dynamic/fp32 {statistics.median(ratios['dyn']):.2f}, int8-static/fp32 "
          f"{statistics.median(ratios['st']):.2f}, runtime overhead between operators "
          f"{statistics.median(ratios['overhead']):.0%} of a profiled run, profiled run over "
          f"timed median {statistics.median(ratios['profiling']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
