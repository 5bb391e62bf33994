#!/usr/bin/env python3
"""Benchmark of FLOPs counting on NNI's hub spaces: harness against NNI's FlopsProfiler.

For each space (ProxylessNAS, MobileNetV3Space, ShuffleNetSpace), in one run: the set-up
time of each profiler, microseconds per NEW sample (never profiled before; median over N)
right after set-up and again after --warm other samples (a search that has run a while),
and per repeated sample, and agreement: harness in NNI's convention against NNI's default
counts, and harness's MACs against NNI with bias, normalisation and activations switched
off, and against torch's FlopCounterMode / 2 on the frozen subnets (the reference).
Target: a new sample in at most 0.2 ms, at or under NNI.

With --lut, also the latency lookup table's additivity error on 10 subnets: uncorrected,
with the identity model's fixed cost subtracted, and with that cost scaled by the factor
fitted on 8 other whole subnets (targets: mean <= 10% on TinySpace at 32 px, <= 5% on
ProxylessSpace at 64 px). Blocks, fixed costs and the 18 whole subnets are measured together
(in rounds: the same windows beside the reference, the quiet-state latency); the error is
given against those wholes and against the truth (scripts/benchtruth.py: --truth-s of
interleaved rounds per subnet, kept under --truth-dir), beside the truth's floor (a second
campaign: no table can do better). With --protocol loop, each model one at a time and the
floor the subnets measured again. On the `local` device in a new HARNESS_HOME.

Usage: python scripts/bench_counting.py [--px 224] [--samples 20] [--spaces ...] [--lut]
       [--protocol rounds|loop] [--statistic median|min|quiet] [--truth-s 10]
"""
import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchtruth

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from harness.metrics.counting import FlopsProfiler  # noqa: E402
from harness.spaces.space import random_samples  # noqa: E402

TARGET_US = 200.0


def timed_us(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e6


def bench_space(name: str, space: Any, px: int, count: int, seed: int,
                warm: int) -> Dict[str, Any]:
    from nni.nas.profiler.pytorch.flops import FlopsProfiler as NniFlops

    x = torch.randn(1, 3, px, px)
    row: Dict[str, Any] = {"space": name}
    started = time.perf_counter()
    ours = FlopsProfiler(space, x)
    ours_nni = FlopsProfiler(space, x, convention="nni")
    row["harness_setup_s"] = (time.perf_counter() - started) / 2
    row["tables"] = "additive" if ours.additive is not None else (
        "memoized" if ours.nni_tables is not None else "whole subnets")
    started = time.perf_counter()
    theirs = NniFlops(space, x)
    theirs_macs = NniFlops(space, x, count_bias=False, count_normalization=False,
                           count_activation=False)
    row["nni_setup_s"] = (time.perf_counter() - started) / 2
    samples = random_samples(space, count, seed=seed)
    ours_us, theirs_us, again_us = [], [], []
    agree_nni = agree_macs = agree_torch = 0
    for i, sample in enumerate(samples):
        value: List[float] = []
        ours_us.append(timed_us(lambda: value.append(ours.profile(sample))))
        again_us.append(timed_us(lambda: ours.profile(sample)))
        nni_value: List[float] = []
        theirs_us.append(timed_us(lambda: nni_value.append(float(theirs.profile(sample)))))
        agree_nni += ours_nni.profile(sample) == nni_value[0]
        agree_macs += value[0] == float(theirs_macs.profile(sample))
        if i < 3:  # the reference: the frozen subnet under torch's own counter
            module = space.freeze(sample).eval()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                module(x)
            agree_torch += value[0] == counter.get_total_flops() / 2
    # After a search has run a while: new samples once `warm` others have been profiled
    # (per-module tables filled; matters where they are memoized, not additive).
    warm_samples = random_samples(space, warm + count, seed=seed + 1)
    for sample in warm_samples[:warm]:
        ours.profile(sample)
    warm_us = [timed_us(lambda: ours.profile(sample)) for sample in warm_samples[warm:]]
    row.update(harness_new_us=statistics.median(ours_us), nni_new_us=statistics.median(theirs_us),
               harness_new_us_after_warm=statistics.median(warm_us),
               harness_repeat_us=statistics.median(again_us),
               agree_nni_convention=f"{agree_nni}/{count}", agree_macs=f"{agree_macs}/{count}",
               agree_torch=f"{agree_torch}/{min(3, count)}")
    return row


def bench_lut(spaces: List[str], statistic: Optional[str], protocol: str, truth_s: float,
              truth_dir: Path) -> List[Dict[str, Any]]:
    """Each space's table on `local`: its additivity error against the whole subnets measured
    in the same build, and (rounds) against the truth (scripts/benchtruth.py) beside the
    truth's floor; a loop's floor is the subnets measured again."""
    import os

    from benchtruth import campaign
    from harness.search.lut import LatencyLUT
    from harness.profiler import LatencyProfiler
    from harness.spaces.space import load_space

    home = Path(tempfile.mkdtemp(prefix="bench-counting-"))
    os.environ["HARNESS_HOME"] = str(home)
    rows = []
    for spec, px in [(s.split("@")[0], int(s.split("@")[1])) for s in spaces]:
        space = load_space(spec)
        x = torch.randn(1, 3, px, px)
        checks = random_samples(space, 10, seed=7)
        with LatencyProfiler(space, x, statistic=statistic, settings={"protocol": protocol}
                             ) as latency:  # blocks, fixed costs and wholes together
            lut = LatencyLUT.build(space, x, latency, progress=False,
                                   fit_samples=random_samples(space, 8, seed=3),
                                   check_samples=checks)
            report = lut.additivity_error(checks, latency)
            used = latency.statistic
            level = latency.steps.known_reference_level() if used == "quiet" else None
        row = {"space": f"{spec.split(':')[-1]} {px}px", "statistic": used,
               "fixed_ms": report["fixed_ms"], "scale": report["overhead_scale"],
               "mean_err_before": report["mean_abs_error_uncorrected"],
               "mean_err_identity": report["mean_abs_error_identity"],
               "mean_err_fitted": report["mean_abs_error"],
               "max_err_fitted": report["max_abs_error"],
               "signed_fitted": report["mean_signed_error"]}
        if used == "quiet":  # against the truth, beside its floor
            name = f"lut-{spec.split(':')[-1]}-{px}px-{truth_s:g}s"
            truth = campaign(space, x, checks, device="local", home=home, seconds=truth_s,
                             cache=truth_dir / f"truth-{name}.sqlite")
            again = campaign(space, x, checks, device="local", home=home, seconds=truth_s,
                             cache=truth_dir / f"floor-{name}.sqlite", seed=1)
            # in units of the reference: the table's and the truth's levels drift apart
            # (harness.store.rounds; scripts/benchtruth.py), their ratios do not
            row["err_vs_truth"] = statistics.mean(
                abs((lut.profile(s) / level) / (t.quiet_ms / t.level_ms) - 1)
                for s, t in zip(checks, truth))
            row["truth_floor"] = statistics.mean(
                abs((b.quiet_ms / b.level_ms) / (a.quiet_ms / a.level_ms) - 1)
                for a, b in zip(truth, again))
        else:
            with LatencyProfiler(space, x, statistic=statistic, settings={"protocol": protocol},
                                 refresh=True) as remeasure:  # the noise floor
                again_ms = [remeasure.profile(s) for s in checks]
            row["remeasured_err"] = statistics.mean(abs(a / r["measured_ms"] - 1)
                                                    for a, r in zip(again_ms, report["rows"]))
        rows.append(row)
        print_table(rows[-1:])
    return rows


def print_table(rows: List[Dict[str, Any]]) -> None:
    keys = list(rows[0])
    cells = [[f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
             for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm", type=int, default=200,
                        help="samples profiled before the after-warm column's new samples")
    parser.add_argument("--spaces", nargs="*",  # none: only the lookup-table part
                        default=["ProxylessNAS", "MobileNetV3Space", "ShuffleNetSpace"])
    parser.add_argument("--lut", nargs="*", default=None, metavar="MODULE:SPACE@PX",
                        help="also the lookup table's fixed-cost correction (default spaces: "
                             "TinySpace@32 ProxylessSpace@64)")
    parser.add_argument("--statistic", choices=("median", "min", "quiet"), default=None,
                        help="what the lookup table and the subnets are measured by "
                             "(default: quiet in rounds, the median in a loop)")
    parser.add_argument("--protocol", choices=("rounds", "loop"), default="rounds")
    parser.add_argument("--truth-s", type=float, default=10.0,
                        help="device time per subnet of the truth campaign (default 10 s)")
    parser.add_argument("--truth-dir", type=Path,
                        default=Path.home() / ".cache" / "harness-bench")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="nni")

    import nni.nas.hub.pytorch as hub

    rows = []
    for name in args.spaces:
        rows.append(bench_space(name, getattr(hub, name)(), args.px, args.samples, args.seed,
                                args.warm))
        print(f"{name} done", file=sys.stderr)
    if rows:
        print(f"FLOPs counting at {args.px} px, {args.samples} new samples per space "
              f"(medians; target: new sample <= {TARGET_US:g} us and <= NNI)")
        print_table(rows)
    if args.lut is not None:
        lut = args.lut or ["harness.spaces:TinySpace@32", "harness.spaces:ProxylessSpace@64"]
        print(f"\nLatency lookup table, additivity error on 10 subnets (local device, "
              f"{args.protocol}; against the truth: its quiet-state latency from "
              f"{args.truth_s:g} s of interleaved rounds per subnet, beside the truth's floor)")
        args.truth_dir.mkdir(parents=True, exist_ok=True)
        rows = bench_lut(lut, args.statistic, args.protocol, args.truth_s, args.truth_dir)
        print("\nall:")
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
